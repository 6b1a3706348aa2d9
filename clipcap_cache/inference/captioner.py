"""`Captioner`: load a checkpoint and its CLIP encoder once, then caption many images.

    from clipcap_cache import Captioner

    captioner = Captioner.from_checkpoint("runs/coco", device="auto")
    captioner(["a.jpg", pil_image, jpeg_bytes], beams=5, num_captions=3)
    # -> one list per image of {"caption": str, "score": float}
    captioner(["a.jpg"], prompt="a photo of")  # captions that begin with "a photo of"

A score is the caption's mean log-probability per generated token under the model, its EOS
included and a prompt's tokens not (`generate.sequence_scores`): 0 is certain, and lower is less
likely. `clipcap caption`, `clipcap serve` and `clipcap evaluate` all caption through this class,
so the checkpoint, the CLIP model named in it, the check that the two match and the inference
precision are decided here once.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clipcap_cache import checkpoint
from clipcap_cache.data.images import ImageLoadError, decode_image, load_image, to_rgb
from clipcap_cache.devices import inference_autocast, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.extraction.encoder import ClipEncoder, load_clip
from clipcap_cache.inference.generate import (
    DecodeConfig,
    check_positions,
    decode_config,
    generate_captions,
    prompt_token_ids,
)
from clipcap_cache.model import ClipCaptionModel

ImageInput = str | Path | bytes | Image.Image


@dataclass
class ImageCaptions:
    """The captions of one image, best first, or why it has none.

    The one result type of captioning: `Captioner.caption`, `clipcap caption` and the server.
    """

    captions: list[dict] = field(default_factory=list)  # {"caption": str, "score": float}
    error: str | None = None
    image: str | None = None  # the image's name, where it has one (a file's path)

    def texts(self) -> list[str]:
        """The captions' texts, best first."""
        return [c["caption"] for c in self.captions]


class Captioner:
    """A trained caption model with its CLIP encoder, loaded once."""

    def __init__(
        self,
        model: ClipCaptionModel,
        tokenizer,
        config: dict,
        encoder: ClipEncoder | None = None,
        name: str = "checkpoint",
    ):
        if encoder is not None:
            checkpoint.check_clip_match(
                config, encoder.name, encoder.embedding_dim, f"CLIP model {encoder.name}", name
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.encoder = encoder
        self.name = name
        self.device = next(model.parameters()).device
        self.autocast = inference_autocast(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        load_encoder: bool = True,
        image_processor: str = "torchvision",
    ) -> "Captioner":
        """Load a checkpoint (or a run's best) and the CLIP model it names.

        Without `load_encoder` only cached embeddings can be captioned (`caption_embeddings`).
        """
        device = resolve_device(device) if isinstance(device, str) else device
        directory = checkpoint.resolve(path)
        model, tokenizer, config = checkpoint.load_checkpoint(directory, device)
        encoder = load_clip(config["clip_model"], device, image_processor) if load_encoder else None
        return cls(model, tokenizer, config, encoder, f"the checkpoint {directory}")

    def __call__(self, images: list[ImageInput], **options) -> list[list[dict]]:
        """Caption images given as paths, PIL images or encoded bytes; one list per image.

        `options` are named like the command line's (`beams`, `greedy`, `sample`, `num_captions`,
        `max_tokens`, `top_p`, `temperature`, `seed`, `prompt`): with `prompt`, every caption
        begins with that text. An unreadable image raises `ClipcapError`;
        `caption` reports it per image instead.
        """
        results = self.caption(images, decode_config(**options))
        for i, result in enumerate(results):
            if result.error is not None:
                raise ClipcapError(f"image {i}: {result.error}")
        return [r.captions for r in results]

    def check_decode(self, decode: DecodeConfig) -> None:
        """Refuse decoding options the model cannot follow, before any image is read.

        That is a prompt too long for the model's positions.
        """
        check_positions(
            self.model, len(prompt_token_ids(self.tokenizer, decode.prompt)), decode.max_tokens
        )

    def caption(self, images: list[ImageInput], decode: DecodeConfig) -> list[ImageCaptions]:
        """Caption images in one batch; an unreadable one gets an error and the others captions."""
        results = [ImageCaptions() for _ in images]
        good, pixels = [], []
        for i, image in enumerate(images):
            try:
                pixels.append(self.preprocess(image))
                good.append(i)
            except ImageLoadError as e:
                results[i].error = str(e)
        if good:
            captions = self.caption_pixels(torch.stack(pixels), decode)
            for i, found in zip(good, captions, strict=True):
                results[i].captions = found
        return results

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image as CLIP's (3, S, S) pixels; raises `ImageLoadError` for an unusable one."""
        if self.encoder is None:
            raise ClipcapError("this Captioner was loaded without its CLIP encoder")
        if isinstance(image, Image.Image):
            image = to_rgb(ImageOps.exif_transpose(image))
        elif isinstance(image, bytes | bytearray):
            image = decode_image(bytes(image))
        elif isinstance(image, str | Path):
            image = load_image(image)
        else:
            raise ImageLoadError(f"not an image, a path or bytes ({type(image).__name__})")
        return self.encoder.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def caption_pixels(self, pixel_values: torch.Tensor, decode: DecodeConfig) -> list[list[dict]]:
        """Caption preprocessed images (B, 3, S, S) with one CLIP forward and one `generate()`."""
        return self.caption_embeddings(self.encoder.encode(pixel_values), decode, len(pixel_values))

    def caption_embeddings(
        self,
        embeddings: torch.Tensor,
        decode: DecodeConfig,
        batch_size: int = 64,
        progress: bool = False,
    ) -> list[list[dict]]:
        """Caption CLIP embeddings (N, D), such as a feature cache's rows."""
        found = generate_captions(
            self.model,
            self.tokenizer,
            embeddings,
            decode,
            batch_size=batch_size,
            autocast=self.autocast,
            progress=progress,
            with_scores=True,
        )
        return [[{"caption": text, "score": score} for text, score in image] for image in found]
