"""The frozen CLIP image encoder, shared by extraction, captioning and serving.

`load_clip` loads only the vision tower and its projection from any CLIP checkpoint (a hub name or
a local directory), with the model's own image processor. `ClipEncoder.encode` turns preprocessed
pixels into `image_embeds`, the vectors the feature cache stores and the caption model reads. `fingerprint`
is that of the CLIP weight files, which every file of embeddings records and every reader checks.
"""

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModelWithProjection

from clipcap_cache import devices
from clipcap_cache.errors import ClipcapError
from clipcap_cache.fingerprints import pretrained_fingerprint
from clipcap_cache.hub import load_pretrained, resolve_name

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
IMAGE_PROCESSORS = ("torchvision", "pil")


@dataclass
class ClipEncoder:
    """A frozen CLIP vision tower with its projection, and the matching image processor."""

    name: str
    model: CLIPVisionModelWithProjection
    processor: object
    device: torch.device
    dtype: torch.dtype
    fingerprint: str | None = None  # of the CLIP weight files (`pretrained_fingerprint`)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, D) float32 `image_embeds` on the CPU."""
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        return self.model(pixel_values=pixel_values).image_embeds.float().cpu()


def load_clip(
    name_or_dir: str, device: str | torch.device = "auto", image_processor: str = "torchvision"
) -> ClipEncoder:
    """Load the vision tower and projection of a CLIP checkpoint, and its image processor.

    A full `CLIPModel` checkpoint works: only the vision weights are loaded, and the top-level
    `projection_dim` is carried into the vision config.
    """
    device = devices.resolve_device(device) if isinstance(device, str) else device
    config = load_pretrained(AutoConfig.from_pretrained, name_or_dir, "CLIP model")
    if config.model_type == "clip":
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise ClipcapError(f"'{name_or_dir}' is a '{config.model_type}' model, not a CLIP model")
    dtype = devices.inference_dtype(device)
    model = load_pretrained(
        CLIPVisionModelWithProjection.from_pretrained,
        name_or_dir,
        "CLIP model",
        config=vision_config,
        dtype=dtype,
    )
    # The torchvision backend preprocesses about 2x faster than the PIL one on the CPU, with the
    # same embeddings to a cosine of 0.9999999 (benchmarks/image_processor.py).
    processor = load_pretrained(
        AutoImageProcessor.from_pretrained,
        name_or_dir,
        "CLIP image processor",
        backend=image_processor,
    )
    model.to(device).eval().requires_grad_(False)
    fingerprint = pretrained_fingerprint(name_or_dir)
    return ClipEncoder(resolve_name(name_or_dir), model, processor, device, dtype, fingerprint)
