"""Choice of device and numeric precision, made in one place for every command."""

import contextlib

import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.options import Option

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The `device` field of every config that runs a model.
DEVICE = Option("auto", help="Where to run; auto is cuda, then mps, then cpu.", choices=DEVICES)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|mps` into a torch device; `auto` prefers cuda, then mps, then cpu."""
    if name not in DEVICES:
        raise ClipcapError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipcapError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ClipcapError("--device mps was asked for, but MPS is not available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    `auto` means bf16 on a GPU that supports it, fp16 on other GPUs and fp32 on the CPU.
    """
    if precision not in PRECISIONS:
        raise ClipcapError(
            f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def inference_dtype(device: torch.device) -> torch.dtype:
    """The one rule for inference precision: half precision on a GPU, fp32 on the CPU.

    CLIP's image and text towers are loaded in this dtype, and caption decoding runs under
    autocast to it (`inference_autocast`) wherever it happens: `caption`, `serve`, `evaluate` and
    training validation, so a checkpoint's validation CIDEr-D and its evaluation agree.
    """
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def inference_autocast(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for decoding with a trained model, or None for plain fp32."""
    dtype = inference_dtype(device)
    return None if dtype == torch.float32 else dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` while the block runs; None runs it in plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
