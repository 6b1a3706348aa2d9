"""Captioning new images with a trained checkpoint.

    clipcap caption photos/ cat.jpg "shots/*.png" --checkpoint runs/coco

CLIP and GPT-2 are loaded from the names recorded in the checkpoint, by `captioner.Captioner`.
Images are decoded and preprocessed in DataLoader workers by the same code as extraction
(`images.ImageDataset`), then captioned a batch at a time by the `Captioner`. An unreadable image becomes an
error entry in the output; the others are still captioned.
"""

import csv
import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clipcap_cache.checks import check_types
from clipcap_cache.data.images import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    collate_images,
    find_images,
    glob_images,
    unique_files,
)
from clipcap_cache.devices import DEVICE
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import os_errors, refuse_folder, write_text_atomic
from clipcap_cache.inference.captioner import Captioner, ImageCaptions
from clipcap_cache.inference.generate import DecodeConfig
from clipcap_cache.options import check_choices, option

OUTPUT_FORMATS = ("text", "json", "jsonl", "csv")


@dataclass
class CaptionConfig:
    """Settings of `clipcap caption`: which images, which checkpoint, how, and where to."""

    inputs: list = option(
        help="Image files, directories or globs.", argument=True, cli_type=list[str]
    )
    checkpoint: str = option(help="Checkpoint folder, run directory or hub id (USER/NAME).")
    recursive: bool = option(False, help="Walk subfolders.")
    batch_size: int = option(16, help="Images per batch.")
    device: str = DEVICE.field()
    format: str = option("text", help="Output format.", choices=OUTPUT_FORMATS)
    out: str | None = option(None, help="Write to this file.", default_text="stdout")
    num_workers: int = option(0, help="Image decoding workers.")
    datastore: str | None = option(
        None,
        help="Retrieve from this text file instead of the one the checkpoint was trained with.",
    )
    # The command line takes DecodeConfig's own options.
    decode: DecodeConfig = option(default_factory=DecodeConfig, cli=False)

    def __post_init__(self):
        check_types(self)
        check_choices(self)  # batch_size and num_workers: by caption_images, for every caller


def caption(config: CaptionConfig) -> list[ImageCaptions]:
    """Caption the images `config` names and write them out; returns one result per image.

    The output format and file are checked before any model is loaded.
    """
    check_output(config.out, config.format)
    paths = expand_inputs(config.inputs, config.recursive)
    check_output(config.out, config.format, paths)  # never over one of the images
    results = caption_images(
        paths,
        config.checkpoint,
        config.decode,
        config.batch_size,
        config.device,
        config.num_workers,
        datastore=config.datastore,
    )
    write_output(format_results(results, config.format), config.out)
    return results


def expand_inputs(inputs: list[str], recursive: bool = False) -> list[Path]:
    """Files, directories and glob patterns -> image paths, in the order given, without repeats.

    A file named twice, by any path (a symlink, `./a.png` beside `a.png`), is captioned once.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_images(path, recursive)
            if not found:
                raise ClipcapError(f"no images in directory {path}")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(item):
            matches = glob_images(item, recursive)
            if not matches:
                raise ClipcapError(f"no images match {item}")
            paths.extend(matches)
        else:
            paths.append(path)  # reported as a missing file, like any other unreadable image
    return unique_files(paths)


def caption_images(
    paths: list[Path],
    checkpoint_path: str,
    decode: DecodeConfig,
    batch_size: int = 16,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    datastore: str | None = None,
) -> list[ImageCaptions]:
    """Caption image files with a checkpoint; returns one result per path, in order.

    A retrieval-augmented checkpoint retrieves from `datastore`, or from its own.
    """
    if batch_size < 1 or num_workers < 0:
        raise ClipcapError("--batch-size must be at least 1 and --num-workers at least 0")
    captioner = Captioner.from_checkpoint(checkpoint_path, device, datastore=datastore)
    decode.check_positions(captioner.model)  # before any image is decoded
    captioner.check_decode(decode)
    results = [ImageCaptions(image=str(p)) for p in paths]
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, captioner.encoder.processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    with tqdm(total=len(paths), unit="img", desc="caption", disable=not progress) as bar:
        for positions, pixel_values, failed in loader:
            for position, reason in failed:
                results[position].error = reason
            if pixel_values is not None:
                found = captioner.caption_batch(pixel_values, decode)
                for position, result in zip(positions, found, strict=True):
                    results[position].captions = result.captions
                    results[position].retrieved = result.retrieved
            bar.update(len(positions) + len(failed))
    return results


def format_results(results: list[ImageCaptions], output_format: str = "text") -> str:
    """Render results as tab-separated text, JSON, JSON lines or CSV."""
    check_output(None, output_format)

    def as_dict(r: ImageCaptions) -> dict:
        found = {"image": r.image, "captions": r.texts()}
        if r.retrieved is not None:  # a retrieval-augmented model: what its prompt held
            found["retrieved"] = r.retrieved
        return {**found, **({"error": r.error} if r.error else {})}

    if output_format == "json":
        return json.dumps([as_dict(r) for r in results], indent=2) + "\n"
    if output_format == "jsonl":
        return "".join(json.dumps(as_dict(r)) + "\n" for r in results)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "caption", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.image, "", "", r.error])
            for rank, caption in enumerate(r.texts(), start=1):
                writer.writerow([r.image, rank, caption, ""])
        return buffer.getvalue()
    lines = []
    for r in results:
        # A tab or line break in a file name would break the two-column lines: escape them.
        image = _escape(r.image)
        if r.error:
            lines.append(f"{image}\tERROR: {r.error}")
        lines.extend(f"{image}\t{caption}" for caption in r.texts())
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def check_output(
    out: str | None, output_format: str = "text", inputs: list[Path] | tuple = ()
) -> None:
    """Refuse an output format or file that cannot be written, before any captioning work.

    The output may not replace one of the images being captioned, any other image, or a file of
    a checkpoint folder: the captions would overwrite the user's data.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ClipcapError(
            f"unknown output format '{output_format}': choose {', '.join(OUTPUT_FORMATS)}"
        )
    if out is None:
        return
    path = Path(out)
    refuse_folder(path, f"--out {out} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ClipcapError(f"--out {out}: the folder {path.parent} does not exist")
    if path.exists() and any(_same_file(path, image) for image in inputs):
        raise ClipcapError(f"--out {out} is one of the images to caption; give another file")
    if path.exists() and path.suffix.lower() in IMAGE_EXTENSIONS:
        raise ClipcapError(f"--out {out} is an image; captions go to a text file")
    if (path.parent / "model.safetensors").is_file():
        raise ClipcapError(f"--out {out} is inside a checkpoint folder; give a file elsewhere")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def write_output(text: str, out: str | None) -> None:
    """Write to a file atomically, or to stdout."""
    if out is None:
        print(text, end="")
        return
    with os_errors(f"cannot write {out}"):
        write_text_atomic(out, text)
