"""Fingerprints of frozen base weights: a short hash that tells two models of one shape apart.

A checkpoint holds only the trained tensors, and a feature cache only the embeddings; the base
models (GPT-2, CLIP) are named, by hub name or folder, not copied. Another model of the same shape
put behind that name would load without a complaint and give garbage, so each stage records the
fingerprint of the base weights it used and the next stage compares it with the weights it loads:

    weights_fingerprint(gpt2.named_parameters())   # a loaded module (the base GPT-2)
    pretrained_fingerprint("openai/clip-vit-base-patch32")   # a model's weight files (CLIP)

Both hash, in name order, every floating-point tensor's name, shape and up to FINGERPRINT_SAMPLES
of its values, evenly spaced, rounded to float16 (so a copy in another precision, or a file with
integer buffers more or fewer, is the same model): well under a second even for large models
(0.3 to 0.6 s for a ViT-B/32 CLIP of 151M parameters on 2 busy CPU cores). CLIP is fingerprinted from its
weight files, not from a loaded tower, because extraction loads only the image tower and
`embed-text` or CLIPScore only the text tower: one fingerprint of the files covers both, so a
text file can be checked against a cache. The files are memory-mapped, and only the sampled
values are read.
"""

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.hub import looks_local

FINGERPRINT_SAMPLES = 4096  # values hashed per tensor, evenly spaced through it

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
# numpy dtypes of the safetensors dtype names; bfloat16, which numpy lacks, is read as its bits.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A 16-hex-digit hash of some named tensors: their names, shapes and sampled values.

    Only floating-point tensors count, with their values rounded to float16: integer buffers
    (`position_ids`, which some saved files hold and others do not) and the storage precision of
    one set of weights (a float16 copy of float32 files) do not make two fingerprints differ.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(named_tensors, key=lambda named: named[0]):
            if not tensor.is_floating_point():
                continue
            flat = tensor.detach().reshape(-1)
            if flat.numel() > FINGERPRINT_SAMPLES:
                # Integer arithmetic: exact on every machine, where float positions could round
                # differently from one CPU to another (and past the end of a 38.6M-value table).
                count = flat.numel()
                positions = (
                    torch.arange(FINGERPRINT_SAMPLES) * (count - 1) // (FINGERPRINT_SAMPLES - 1)
                )
                flat = flat[positions.to(flat.device)]
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(flat.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def legacy_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The first scheme's hash (float32 positions and values, every tensor), to read old records.

    Checkpoints saved before `weights_fingerprint` took its present form recorded this one for
    their base GPT-2; it is compared only when the present one differs.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(named_tensors, key=lambda named: named[0]):
            flat = tensor.detach().reshape(-1)
            if flat.numel() > FINGERPRINT_SAMPLES:
                positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES).long()
                flat = flat[positions.clamp_(max=flat.numel() - 1).to(flat.device)]
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(flat.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def pretrained_fingerprint(name_or_dir: str) -> str | None:
    """The fingerprint of the weight files of a model folder or hub name, as they are on disk.

    None where no weight file is found (a hub model not in the local cache): nothing to compare.
    """
    try:
        files = weight_files(name_or_dir)
        if not files:
            return None
        return weights_fingerprint(tensor for path in files for tensor in _tensors_of(path))
    except ClipcapError:
        raise
    except Exception as e:  # noqa: BLE001 (a damaged file can fail in any of its readers' ways)
        raise ClipcapError(
            f"cannot read the weights of {name_or_dir} to fingerprint them "
            f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})"
        ) from None


def weight_files(name_or_dir: str) -> list[Path]:
    """The files `from_pretrained` loads weights from: safetensors (sharded or not), or a .bin."""
    directory = Path(name_or_dir).expanduser()
    if directory.is_dir():

        def find(name: str) -> Path | None:
            return directory / name if (directory / name).is_file() else None

    elif looks_local(name_or_dir):
        return []
    else:
        from huggingface_hub import try_to_load_from_cache

        def find(name: str) -> Path | None:
            found = try_to_load_from_cache(name_or_dir, name)
            return Path(found) if isinstance(found, str) else None

    if (single := find(SAFETENSORS)) is not None:
        return [single]
    if (index := find(SAFETENSORS_INDEX)) is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        found = [find(shard) for shard in shards]
        return found if all(found) else []
    return [bin_file] if (bin_file := find(PYTORCH_BIN)) is not None else []


def _tensors_of(path: Path) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a weights file, memory-mapped: only the values that are hashed are read."""
    if path.suffix != ".safetensors":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped: read it
            state = torch.load(path, map_location="cpu", weights_only=True)
        return list(state.items())
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: torch wants it writable
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = mapped[start + begin : start + end].view(_DTYPES[entry["dtype"]])
        tensor = torch.from_numpy(raw.reshape(entry["shape"]))
        if entry["dtype"] == "BF16":
            tensor = tensor.view(torch.bfloat16)
        tensors.append((name, tensor))
    return tensors
