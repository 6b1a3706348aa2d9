"""`Captioner`: load a checkpoint and its CLIP encoder once, then caption many images.

    from clipcap_cache import Captioner

    captioner = Captioner.from_checkpoint("runs/coco", device="auto")  # or a hub id, USER/NAME
    captioner(["a.jpg", pil_image, jpeg_bytes], beams=5, num_captions=3)
    # -> one list per image of {"caption": str, "score": float}
    captioner(["a.jpg"], prompt="a photo of")  # captions that begin with "a photo of"

A score is the caption's mean log-probability per generated token under the model, its EOS
included and a prompt's tokens not (`generate.sequence_scores`): 0 is certain, and lower is less
likely. A retrieval-augmented checkpoint retrieves from the datastore it was trained with, or from
`datastore=OTHER.h5` (a datastore of another domain, with no retraining); `caption` and
`caption_batch` then give each image's retrieved captions too (`ImageCaptions.retrieved`).
`clipcap caption`, `clipcap serve` and `clipcap evaluate` all caption through this class, so the
checkpoint, the CLIP model named in it, the check that the two match and the inference precision
are decided here once.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clipcap_cache import checkpoint
from clipcap_cache.data.images import (
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    decode_image,
    load_image,
    to_rgb,
)
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
from clipcap_cache.retrieval import Datastore, RetrievalSettings, Retriever, check_datastore

ImageInput = str | Path | bytes | Image.Image


@dataclass
class ImageCaptions:
    """The captions of one image, best first, or why it has none.

    The one result type of captioning: `Captioner.caption`, `clipcap caption` and the server.
    """

    captions: list[dict] = field(default_factory=list)  # {"caption": str, "score": float}
    error: str | None = None
    image: str | None = None  # the image's name, where it has one (a file's path)
    retrieved: list[str] | None = None  # with retrieval: the captions put in the prompt

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
        datastore: Datastore | None = None,
    ):
        if encoder is not None:
            checkpoint.check_clip_match(
                config,
                encoder.name,
                encoder.embedding_dim,
                f"CLIP model {encoder.name}",
                name,
                encoder.fingerprint,
            )
        settings = RetrievalSettings.from_checkpoint(config)
        if datastore is not None and settings is None:
            raise ClipcapError(
                f"{name} was trained without retrieval: a datastore does not apply to it"
            )
        self.retriever = None
        if settings is not None:
            datastore = datastore or Datastore.open(settings.datastore)
            check_datastore(datastore, config, name)
            self.retriever = Retriever(datastore, settings, tokenizer)
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
        datastore: str | Path | None = None,
    ) -> "Captioner":
        """Load a checkpoint (a folder, a run's best, or a hub id `USER/NAME`) and its CLIP model.

        Without `load_encoder` only cached embeddings can be captioned (`caption_embeddings`).
        A retrieval-augmented checkpoint retrieves from `datastore` where one is given, else from
        the datastore it was trained with.
        """
        device = resolve_device(device) if isinstance(device, str) else device
        directory = checkpoint.resolve(path)
        config = checkpoint.read_config(directory)
        name = f"the checkpoint {directory}"
        settings = RetrievalSettings.from_checkpoint(config)
        if datastore is not None and settings is None:
            raise ClipcapError(f"{name} was trained without retrieval: --datastore does not apply")
        store = None
        if settings is not None:  # checked before any model loads
            store = Datastore.open(datastore or settings.datastore)
            check_datastore(store, config, name)
        model, tokenizer, config = checkpoint.load_checkpoint(directory, device)
        encoder = load_clip(config["clip_model"], device, image_processor) if load_encoder else None
        return cls(model, tokenizer, config, encoder, name, store)

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
            for i, found in zip(good, self.caption_batch(torch.stack(pixels), decode), strict=True):
                results[i].captions, results[i].retrieved = found.captions, found.retrieved
        return results

    def preprocess(
        self, image: ImageInput, max_pixels: int | None = MAX_IMAGE_PIXELS
    ) -> torch.Tensor:
        """One image as CLIP's (3, S, S) pixels; raises `ImageLoadError` for an unusable one.

        A file or bytes whose header declares more than `max_pixels` pixels is refused before
        it is decoded (the server lowers the bound: a decode costs memory in proportion).
        """
        if self.encoder is None:
            raise ClipcapError("this Captioner was loaded without its CLIP encoder")
        if isinstance(image, Image.Image):
            image = to_rgb(ImageOps.exif_transpose(image))
        elif isinstance(image, bytes | bytearray):
            image = decode_image(bytes(image), max_pixels)
        elif isinstance(image, str | Path):
            image = load_image(image, max_pixels)
        else:
            raise ImageLoadError(f"not an image, a path or bytes ({type(image).__name__})")
        return self.encoder.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def caption_pixels(self, pixel_values: torch.Tensor, decode: DecodeConfig) -> list[list[dict]]:
        """Caption preprocessed images (B, 3, S, S) with one CLIP forward and one `generate()`."""
        return [r.captions for r in self.caption_batch(pixel_values, decode)]

    def caption_batch(
        self, pixel_values: torch.Tensor, decode: DecodeConfig
    ) -> list[ImageCaptions]:
        """`caption_pixels`, each result with the captions retrieved for it (with retrieval)."""
        embeddings = self.encoder.encode(pixel_values)
        retrieved = self.retrieve(embeddings)
        captions = self.caption_embeddings(
            embeddings, decode, len(pixel_values), retrieved=retrieved
        )
        return [
            ImageCaptions(captions=found, retrieved=retrieved[i] if retrieved else None)
            for i, found in enumerate(captions)
        ]

    def retrieve(self, embeddings, image_ids: list[str] | None = None) -> list[list[str]] | None:
        """The captions retrieved for CLIP embeddings (N, D); None for a model without retrieval.

        With `image_ids` (known for a cache's rows), each image's own captions are skipped.
        """
        if self.retriever is None:
            return None
        return self.retriever.retrieve(torch.as_tensor(embeddings).float().numpy(), image_ids)

    def caption_embeddings(
        self,
        embeddings: torch.Tensor,
        decode: DecodeConfig,
        batch_size: int = 64,
        progress: bool = False,
        retrieved: list[list[str]] | None = None,
    ) -> list[list[dict]]:
        """Caption CLIP embeddings (N, D), such as a feature cache's rows.

        A retrieval-augmented model puts `retrieved` (each image's retrieved captions, from
        `retrieve`) in its prompts; left out, they are retrieved here.
        """
        prompts = None
        if self.retriever is not None:
            retrieved = retrieved if retrieved is not None else self.retrieve(embeddings)
            prompts = self.retriever.prompt_ids(retrieved)
        found = generate_captions(
            self.model,
            self.tokenizer,
            embeddings,
            decode,
            batch_size=batch_size,
            autocast=self.autocast,
            progress=progress,
            with_scores=True,
            prompts=prompts,
        )
        return [[{"caption": text, "score": score} for text, score in image] for image in found]
