"""JPEG decoding on the GPU for extraction (`clipcap extract-features --decode gpu`).

On a GPU, extraction is bound by decoding JPEGs with PIL in the DataLoader workers. With GPU
decoding the work is split in two:

- In the workers, `WorkerDecoder` reads each file's bytes and looks at its header only (PIL reads
  no pixels for that): a baseline-sized 8-bit RGB or greyscale JPEG within the decompression-bomb
  limit, whose data ends with the JPEG end marker, travels on as its raw bytes (`EncodedJpeg`,
  with its EXIF orientation). Every other file (PNG, WebP, CMYK JPEG, a truncated or missing
  file, ...) takes the CPU path of `images.py` in the worker, so it is decoded, or recorded as a
  failure with its reason, exactly as without GPU decoding.
- In the main process, `GpuDecoder.finish` decodes a batch's JPEG bytes with one batched
  `torchvision.io.decode_jpeg(device=...)` call (nvJPEG on CUDA), applies the EXIF orientation,
  and resizes, crops and normalises them with tensor operations on the device (`preprocess`),
  the operations of the CLIP image processor. A JPEG the GPU cannot decode is decoded again on the
  CPU path, which decodes it or records why it cannot.

`preprocess` is device-agnostic: on the CPU, with `decode_jpeg` on the CPU, it is the same code,
which is how the tests check it against the Hugging Face processor (cosine >= 0.999 per
embedding, `tests/test_gpu_decode.py`).
"""

import io
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from clipcap_cache.data.images import (
    MAX_IMAGE_PIXELS,
    ImageDataset,
    ImageLoadError,
    ShardBatch,
    decode_image,
    load_image,
)
from clipcap_cache.errors import ClipcapError

log = logging.getLogger(__name__)
DECODE_CHOICES = ("auto", "cpu", "gpu")
EXIF_ORIENTATION = 0x0112
# torchvision 0.29 deprecates its decoders in favour of TorchCodec's; they still work, and
# TorchCodec is not part of the environment this runs in.
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchV")


@dataclass(frozen=True)
class PreprocessSpec:
    """The steps of a CLIP image processor, as `preprocess` performs them on tensors."""

    shortest_edge: int | None  # resize the short side to this (None: no resize)
    crop: tuple[int, int] | None  # (height, width) of the center crop (None: no crop)
    interpolation: str  # a torchvision InterpolationMode value: "bicubic", "bilinear", ...
    rescale_factor: float | None  # 1/255 (None: no rescale)
    mean: tuple[float, ...] | None  # per channel (None: no normalisation)
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, processor) -> "PreprocessSpec":
        """The spec of a Hugging Face CLIP image processor (either backend).

        Raises:
            ClipcapError: the processor does something `preprocess` does not (a square resize,
                padding, ...), so GPU decoding could not match it.

        """
        from transformers.image_utils import PILImageResampling

        def get(size, key):
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

        size, crop_size = processor.size, processor.crop_size
        shortest = get(size, "shortest_edge") if processor.do_resize else None
        others = {k: get(size, k) for k in ("height", "width", "longest_edge", "max_height")}
        if processor.do_resize and (
            shortest is None or any(v is not None for v in others.values())
        ):
            raise ClipcapError(f"GPU decoding mirrors a shortest-edge resize only, not size={size}")
        if getattr(processor, "do_pad", False):
            raise ClipcapError("GPU decoding does not mirror an image processor that pads")
        names = {
            PILImageResampling.NEAREST: "nearest",
            PILImageResampling.BILINEAR: "bilinear",
            PILImageResampling.BICUBIC: "bicubic",
        }
        resample = PILImageResampling(processor.resample)
        if processor.do_resize and resample not in names:
            raise ClipcapError(f"GPU decoding does not mirror resampling with {resample.name}")
        return cls(
            shortest_edge=shortest,
            crop=(get(crop_size, "height"), get(crop_size, "width"))
            if processor.do_center_crop
            else None,
            interpolation=names.get(resample, "bicubic"),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=tuple(float(m) for m in processor.image_mean) if processor.do_normalize else None,
            std=tuple(float(s) for s in processor.image_std) if processor.do_normalize else None,
        )


def preprocess(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(3, H, W) uint8 pixels -> (3, h, w) float32 model input, on the image's own device.

    The operations and their order are those of the processor's torchvision backend: resize the
    uint8 image (antialiased, rounded back to uint8), center-crop (zero-padding an image smaller
    than the crop), then rescale and normalise in float32.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    if spec.shortest_edge is not None:
        height, width = image.shape[-2:]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(spec.shortest_edge * long / short)  # truncated, as the processor does
        size = (new_long, spec.shortest_edge) if width <= height else (spec.shortest_edge, new_long)
        image = tvf.resize(image, list(size), InterpolationMode(spec.interpolation), antialias=True)
    if spec.crop is not None:
        image = _center_crop(image, *spec.crop)
    image = image.float()
    if spec.rescale_factor is not None and spec.mean is not None:
        # Fused, as the processor does: (x * f - mean) / std == (x - mean / f) / (std / f).
        mean = torch.tensor(spec.mean, device=image.device) / spec.rescale_factor
        std = torch.tensor(spec.std, device=image.device) / spec.rescale_factor
        return (image - mean[:, None, None]) / std[:, None, None]
    if spec.rescale_factor is not None:
        image = image * spec.rescale_factor
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, device=image.device)[:, None, None]
        image = (image - mean) / torch.tensor(spec.std, device=image.device)[:, None, None]
    return image


def _center_crop(image: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """The processor's center crop: pad a smaller image with zeros, then take the middle."""
    from torchvision.transforms.v2 import functional as tvf

    height, width = image.shape[-2:]
    if crop_width > width or crop_height > height:
        pad_width, pad_height = max(crop_width - width, 0), max(crop_height - height, 0)
        padding = [pad_width // 2, pad_height // 2, (pad_width + 1) // 2, (pad_height + 1) // 2]
        image = tvf.pad(image, padding, fill=0)
        height, width = image.shape[-2:]
    top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
    return image[..., top : top + crop_height, left : left + crop_width]


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) pixels as `PIL.ImageOps.exif_transpose` turns them for an EXIF orientation."""
    if orientation == 2:  # mirrored left to right
        return image.flip(-1)
    if orientation == 3:  # upside down
        return image.flip(-1, -2)
    if orientation == 4:  # mirrored top to bottom
        return image.flip(-2)
    if orientation == 5:  # transposed
        return image.transpose(-1, -2)
    if orientation == 6:  # turned 90 degrees clockwise on display
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # transversed
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # turned 90 degrees counter-clockwise on display
        return torch.rot90(image, 1, dims=(-2, -1))
    return image  # 1, or a value PIL ignores too


@dataclass
class EncodedJpeg:
    """A JPEG file's bytes, to be decoded on the device, and its EXIF orientation."""

    data: torch.Tensor  # (N,) uint8, the whole file
    orientation: int = 1

    def raw(self) -> bytes:
        return self.data.numpy().tobytes()


def inspect_jpeg(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> EncodedJpeg | None:
    """The bytes as an `EncodedJpeg` when the GPU path can take them, else None (CPU path).

    Only the header is parsed. The end-marker check keeps truncated files on the CPU path, where
    PIL refuses them: a decoder that fills the missing rows with grey must not see them.
    """
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None  # MPO, CMYK and YCCK JPEGs: PIL's conversion on the CPU path
            if max_pixels is not None and width * height > max_pixels:
                return None  # the CPU path records it as a possible decompression bomb
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # whatever a bad header raises, the CPU path says what is wrong
        return None
    array = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return EncodedJpeg(array, orientation if isinstance(orientation, int) else 1)


@dataclass
class PendingPixels:
    """A batch's images as the workers hand them over, one per record of the batch."""

    items: list  # per image: an EncodedJpeg, or the CPU path's (3, S, S) float32 pixels


def pending_pixels(items: list) -> PendingPixels | None:
    """The workers' batch of items (None for a batch with no good image)."""
    return PendingPixels(items) if items else None


class WorkerDecoder:
    """The workers' half of GPU decoding: JPEGs pass as bytes, anything else takes the CPU path."""

    def __init__(self, processor, max_pixels: int | None = MAX_IMAGE_PIXELS):
        self.processor = processor
        self.max_pixels = max_pixels

    def from_file(self, path: Path) -> "torch.Tensor | EncodedJpeg":
        """A file's item; raises `ImageLoadError` as `load_image` does."""
        try:
            data = Path(path).read_bytes()
        except OSError:  # missing, a directory, unreadable: the CPU path gives the reason
            data = b""
        jpeg = inspect_jpeg(data, self.max_pixels) if data else None
        return jpeg if jpeg is not None else self.pixels(load_image(path, self.max_pixels))

    def from_bytes(self, data: bytes) -> "torch.Tensor | EncodedJpeg":
        """An in-memory file's item (a tar member); raises `ImageLoadError`."""
        jpeg = inspect_jpeg(data, self.max_pixels) if data else None
        return jpeg if jpeg is not None else self.pixels(decode_image(data, self.max_pixels))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The CPU path's (3, S, S) pixels of a decoded image."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class JpegFileDataset(ImageDataset):
    """`ImageDataset` for GPU decoding: each item is an `EncodedJpeg` or the CPU path's pixels."""

    def __init__(self, paths, processor, positions=None):
        super().__init__(paths, processor, positions)
        self.decoder = WorkerDecoder(processor)

    def __getitem__(self, i: int):
        try:
            return self.positions[i], self.decoder.from_file(self.paths[i]), None
        except ImageLoadError as e:
            return self.positions[i], None, str(e)


def collate_jpegs(items):
    """`collate_images` for `JpegFileDataset`: the good images as `PendingPixels`, in order."""
    good = [(pos, item) for pos, item, _ in items if item is not None]
    failed = [(pos, reason) for pos, item, reason in items if item is None]
    return [pos for pos, _ in good], pending_pixels([item for _, item in good]), failed


class GpuDecoder:
    """The main process's half: decode a batch's JPEGs on the device and preprocess them there."""

    def __init__(self, processor, device: torch.device):
        self.spec = PreprocessSpec.from_processor(processor)
        self.cpu = WorkerDecoder(processor)
        self.device = device
        self.cpu_logged = False
        self.fallback_logged = False

    def finish(self, batch: ShardBatch) -> ShardBatch:
        """The batch with its pixels on the device; a JPEG that fails there takes the CPU path."""
        if not isinstance(batch.pixel_values, PendingPixels):
            return batch
        pending = batch.pixel_values
        on_cpu = [i for i, item in enumerate(pending.items) if not isinstance(item, EncodedJpeg)]
        if on_cpu and not self.cpu_logged:
            log.info(
                "GPU decoding takes 8-bit RGB and greyscale JPEGs; other images are decoded on "
                "the CPU (first: %s)",
                batch.records[on_cpu[0]].path,
            )
            self.cpu_logged = True
        jpegs = [i for i, item in enumerate(pending.items) if isinstance(item, EncodedJpeg)]
        decoded = self.decode([pending.items[i] for i in jpegs])
        pixels: list[torch.Tensor | None] = [
            item if isinstance(item, torch.Tensor) else None for item in pending.items
        ]
        failures = list(batch.failures)
        for i, image in zip(jpegs, decoded, strict=True):
            if image is not None:
                pixels[i] = preprocess(image, self.spec)
                continue
            try:  # what nvJPEG cannot decode, PIL may; if not, its reason is recorded
                pixels[i] = self.cpu.pixels(decode_image(pending.items[i].raw()))
            except ImageLoadError as e:
                failures.append((batch.records[i].path, str(e)))
        kept = [i for i, p in enumerate(pixels) if p is not None]
        stacked = torch.stack([pixels[i].to(self.device) for i in kept]) if kept else None
        return replace(
            batch,
            records=[batch.records[i] for i in kept],
            pixel_values=stacked,
            failures=failures,
        )

    def decode(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 images on the device, oriented; None where decoding failed."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        data = [jpeg.data for jpeg in jpegs]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batched call: decode one at a time
            images = []
            for one in data:
                try:
                    images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
            if not self.fallback_logged:
                log.info("a JPEG failed to decode on %s; it is decoded on the CPU", self.device)
                self.fallback_logged = True
        return [
            None if image is None else apply_orientation(image, jpeg.orientation)
            for image, jpeg in zip(images, jpegs, strict=True)
        ]


def resolve_decode(decode: str, device: torch.device, processor=None) -> str:
    """`--decode` as "gpu" or "cpu" for the encoder's device and image processor.

    `auto` is gpu when the encoder runs on CUDA, torchvision decodes JPEGs there and
    `preprocess` can follow the processor (given), else cpu with a warning saying why.

    Raises:
        ClipcapError: `gpu` where it is not possible.

    """
    if decode == "cpu":
        return "cpu"
    if device.type != "cuda":
        if decode == "gpu":
            raise ClipcapError(
                f"--decode gpu needs the encoder on a CUDA GPU, not {device.type}; "
                "pass --decode cpu (or auto)"
            )
        return "cpu"
    problem = _gpu_decoding_problem(device)
    if problem is None and processor is not None:
        try:
            PreprocessSpec.from_processor(processor)
        except ClipcapError as e:
            problem = str(e)
    if problem is None:
        log.info("decoding JPEGs on %s", device)
        return "gpu"
    if decode == "gpu":
        raise ClipcapError(f"--decode gpu: {problem}; pass --decode cpu (or auto)")
    log.warning("decoding JPEGs on the CPU: %s", problem)
    return "cpu"


def _gpu_decoding_problem(device: torch.device) -> str | None:
    """Why this torchvision cannot decode a JPEG on the device, or None when it can."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except Exception as e:  # an import error, a build without nvJPEG, a driver problem
        return f"torchvision cannot decode JPEGs on {device} ({type(e).__name__}: {e})"[:300]
    return None
