"""Robust image decoding and CLIP preprocessing.

`load_image` opens any file PIL can read the way a careful user would: the first frame of a
multi-frame file, EXIF orientation applied, any mode converted to RGB. Files that cannot be used
(missing, empty, truncated, not an image, or a decompression bomb) raise `ImageLoadError` with a
short reason, so that callers can record the failure and carry on.

`ImageDataset` wraps that with the model's Hugging Face image processor so that decoding and
preprocessing run in DataLoader workers, away from the encoder.
"""

import glob
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb limit, about 89 megapixels

# Set once here, not per image: decoding runs in threads (the server's) and workers, and neither a
# PIL global nor `warnings.catch_warnings()` may be changed from a thread. A partial file is never
# decoded into a half-grey image, and PIL's bomb warning is redundant: `_decode` checks the size
# against `max_pixels` itself before decoding (PIL still raises beyond twice its limit).
ImageFile.LOAD_TRUNCATED_IMAGES = False
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageLoadError(Exception):
    """An image file that cannot be used; `str(error)` is the reason."""


def load_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied; raises `ImageLoadError`."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError("missing file")
    if path.is_dir():
        raise ImageLoadError("is a directory")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    return _decode(path, max_pixels)


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` for an image held in memory, such as a member of a tar shard."""
    if not data:
        raise ImageLoadError("empty file")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(source, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"too large ({width}x{height} pixels, limit {max_pixels}): "
                    "possible decompression bomb"
                )
            image.seek(0)  # first frame of a GIF or multi-page TIFF
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        if "truncated" in message.lower() or isinstance(e, EOFError):
            raise ImageLoadError(f"truncated file ({message})") from None
        raise ImageLoadError(f"cannot decode ({message})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16- and 32-bit integer images are rescaled to 8 bits first; PIL's own conversion would clip
    them to white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        scaled = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


def find_images(directory: Path, recursive: bool = False) -> list[Path]:
    """All image files in a directory, sorted, optionally walking subfolders.

    `**` does not descend into symlinked folders (pathlib's rule), and a file reached twice (a
    link beside its target) is listed once, at its first path.
    """
    pattern = "**/*" if recursive else "*"
    return unique_files(
        sorted(
            p
            for p in directory.glob(pattern)
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    )


def glob_images(pattern: str, recursive: bool = False) -> list[Path]:
    """The image files a glob pattern matches, sorted, each file once.

    With `recursive`, `**` matches any depth of folders but, like `find_images`, does not follow a
    symlinked folder: a link to a parent (a loop) would otherwise match every file again at each
    depth until the system's path limit, and two such links would take exponential time. The
    standard `glob` module follows them; pathlib's glob, used here, does not.
    """
    if recursive and "**" in pattern:
        path = Path(pattern)
        anchor = Path(path.anchor or ".")
        matches = anchor.glob(str(path.relative_to(path.anchor)) if path.anchor else pattern)
    else:
        matches = (Path(p) for p in glob.glob(pattern))
    return unique_files(sorted(p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS))


def unique_files(paths: list[Path]) -> list[Path]:
    """`paths` without those that name a file already listed (by resolved path), order kept."""
    seen, kept = set(), []
    for path in paths:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop: keep the name, for its error
            real = path
        if real not in seen:
            seen.add(real)
            kept.append(path)
    return kept


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images for a CLIP encoder, one item per path.

    Each item is `(position, pixel_values or None, failure reason or None)`, so that a bad image
    travels through the DataLoader as a recorded failure instead of an exception.
    """

    def __init__(self, paths: list[str | Path], processor, positions: list[int] | None = None):
        self.paths = [Path(p) for p in paths]
        self.processor = processor
        self.positions = positions if positions is not None else list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i])
            pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
            return self.positions[i], pixel_values, None
        except ImageLoadError as e:
            return self.positions[i], None, str(e)


def collate_images(items):
    """Stack the good images of a batch and keep the failures aside, order preserved."""
    good = [(pos, pixels) for pos, pixels, _ in items if pixels is not None]
    failed = [(pos, reason) for pos, pixels, reason in items if pixels is None]
    pixel_values = torch.stack([p for _, p in good]) if good else None
    return [pos for pos, _ in good], pixel_values, failed


@dataclass
class ShardBatch:
    """A batch of decoded images that all belong to one progress shard of an extraction."""

    shard: int
    records: list = field(default_factory=list)  # ImageRecords, one per row of pixel_values
    pixel_values: torch.Tensor | None = None  # (B, 3, S, S), None when no image decoded
    failures: list = field(default_factory=list)  # (image path, reason)
    uncaptioned: int = 0  # samples skipped for having no caption
    last: bool = False  # the shard's final batch: once encoded, the shard can be written


def default_num_workers() -> int:
    """A worker count that keeps decoding off the main process without oversubscribing."""
    return min(4, os.cpu_count() or 1)
