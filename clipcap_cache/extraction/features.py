"""Stage 1: run a frozen CLIP image encoder over a dataset once and cache the embeddings.

    clipcap extract-features data/coco/dataset_coco.json --images data/coco --out data/coco_vitb32.h5
    torchrun --nproc-per-node 8 --no-python clipcap extract-features ...   # every GPU of a node

    clipcap extract-features 'shards/{00000..00099}.tar' --out cc3m.h5   # WebDataset tars
    clipcap extract-features user/flickr30k --out flickr30k.h5           # Hugging Face datasets

Images are decoded and preprocessed in DataLoader workers (`images.ImageDataset`,
`webdataset.TarShardDataset` streaming tars, or `hf_datasets.DatasetPartsDataset` reading the
rows of a Hugging Face dataset) while the encoder runs in the main process, in half
precision under `torch.inference_mode()` on a GPU. With `--decode gpu` (the default on CUDA) the
workers of image files and tars pass JPEGs on as bytes, and `gpu_decode.GpuDecoder` decodes and
preprocesses them on the GPU; other images still take the CPU path in the workers.

Progress is crash-safe. Work goes to a folder beside the output, `FEATURES.h5.parts/`, as shards
of `shard_size` images (or one shard per tar), each written to a temporary name and renamed; a
shard holds its embeddings and, as a tensor of JSON bytes, its images' records and failures.
Rerunning the same command after a crash (even kill -9) skips the finished shards. When every
shard is done they are gathered into the HDF5 file (`cache.write_cache`, also atomic, a shard at
a time) and the folder is removed, so the final file holds exactly the rows an uninterrupted run
would. Under torchrun each rank encodes every N-th pending shard and rank 0 gathers.
"""

import contextlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from clipcap_cache import __version__, distributed
from clipcap_cache.checkpoint import check_clip_match
from clipcap_cache.checks import at_least, check_types
from clipcap_cache.data import cache, hf_datasets, webdataset
from clipcap_cache.data.annotations import (
    FORMATS,
    SPLIT_CHOICES,
    SPLITS,
    ImageRecord,
    fingerprint,
    read_annotations,
    select_split,
    without_captions,
)
from clipcap_cache.data.images import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ShardBatch,
    collate_images,
    default_num_workers,
)
from clipcap_cache.devices import DEVICE, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.extraction.encoder import (
    DEFAULT_CLIP_MODEL,
    IMAGE_PROCESSORS,
    ClipEncoder,
    load_clip,
)
from clipcap_cache.extraction.gpu_decode import (
    DECODE_CHOICES,
    GpuDecoder,
    JpegFileDataset,
    WorkerDecoder,
    collate_jpegs,
    resolve_decode,
)
from clipcap_cache.files import (
    atomic_path,
    exclusive_lock,
    os_errors,
    read_json,
    refuse_folder,
    write_json_atomic,
)
from clipcap_cache.hub import resolve_name
from clipcap_cache.options import check_choices, option
from clipcap_cache.preemption import Preempted, StopSignals, ignore_stop_signals, signal_name

log = logging.getLogger(__name__)
STORAGE_DTYPES = ("float16", "float32")


@dataclass
class FeatureConfig:
    """Settings of one extraction run; saved in the cache's attributes."""

    annotations: str = option(
        help="Annotation file (COCO, Karpathy, JSON lines, CSV); WebDataset tar shards (a quoted "
        "brace pattern such as 'shards/{00000..00099}.tar', or a directory of tars); or a "
        "Hugging Face dataset (a save_to_disk or imagefolder directory, Parquet files, a hub id).",
        argument=True,
        metavar="source",
    )
    images: str | None = option(
        help="Image root of an annotation file (not used with tars; with a dataset, the root "
        "of image paths that are relative).",
        cli_default=None,
    )
    out: str = option(help="HDF5 cache to write.")
    format: str = option(
        "auto", help="Annotation format.", choices=(*FORMATS, "webdataset", "datasets")
    )
    split: str = option("all", help="Which split to extract.", choices=SPLIT_CHOICES)
    split_default: str = option(
        "train",
        help="WebDataset and datasets: split of samples that name none.",
        choices=SPLITS,
    )
    image_column: str | None = option(None, help="Datasets: the image column (default: found).")
    caption_column: str | None = option(
        None, help="Datasets: the caption column, text or a list of texts (default: found)."
    )
    split_column: str | None = option(
        None, help="Datasets: the column of each row's split (default: 'split' if there)."
    )
    id_column: str | None = option(
        None, help="Datasets: the image id column (default: image_id, id, ..., else the path)."
    )
    clip_model: str = option(DEFAULT_CLIP_MODEL, help="CLIP hub name or local directory.")
    batch_size: int = option(64, help="Images per encoder batch.")
    num_workers: int = option(
        default_factory=default_num_workers,
        help="Image decoding workers.",
        default_text="up to 4, one per CPU core",
    )
    device: str = DEVICE.field()
    dtype: str = option("float16", help="Storage dtype of /embeddings.", choices=STORAGE_DTYPES)
    limit: int | None = option(None, help="Only the first N images (annotation files), for trials.")
    strict: bool = option(False, help="Stop at the first unreadable image.")
    overwrite: bool = option(False, help="Replace an existing cache made from other inputs.")
    shard_size: int = option(
        2048, help="Images per crash-safe progress shard (a tar, or a streamed file, is one)."
    )
    image_processor: str = option(
        "torchvision",
        help="Backend of the CLIP image processor (torchvision is faster).",
        choices=IMAGE_PROCESSORS,
    )
    decode: str = option(
        "auto",
        help="Where JPEGs are decoded and preprocessed: gpu (nvJPEG, other images on the CPU), "
        "cpu (PIL in the workers), or auto: gpu when the encoder runs on CUDA.",
        choices=DECODE_CHOICES,
    )

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "batch_size", "limit", "shard_size")
        at_least(self, 0, "num_workers")
        check_choices(self)


@dataclass
class ExtractSummary:
    """What an extraction run did, for the closing summary."""

    out: str
    images_written: int = 0
    images_failed: int = 0
    failure_reasons: dict = field(default_factory=dict)
    images_encoded_now: int = 0
    resumed_images: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    images_without_captions: int = 0  # left out: nothing to train on or score against

    @property
    def images_per_second(self) -> float:
        return self.images_encoded_now / self.seconds if self.seconds > 0 else 0.0


def extract_features(config: FeatureConfig) -> ExtractSummary:
    """Run extraction (or resume it) and write the cache; returns a summary of the run.

    Every input (annotations or shards, image root, device, output path, CLIP model) is checked
    before anything on disk changes. With `overwrite`, an existing cache is replaced only by the
    renaming of the complete new one, so a failed run leaves it as it was.
    """
    out = Path(config.out)
    refuse_folder(out, f"--out {out} is a directory; give the HDF5 file to write in it")
    device = resolve_device(config.device)
    if config.decode == "gpu" and device.type != "cuda":
        resolve_decode(config.decode, device)  # the one error line, before anything is opened
    layout = hf_datasets.layout_of(config.annotations, config.format)
    if layout is not None:
        source = _DatasetParts.open(config, layout)
    elif webdataset.is_webdataset(config.annotations, config.format):
        source = _TarShards.open(config)
    else:
        source = _AnnotatedImages.open(config)
    _check_out(out, config, source)
    identity = {
        "source": source.identity,
        # The images read, not only the list of them: progress made under a wrong root (every
        # image "missing") is not progress for the right one.
        "image_root": source.image_root_name,
        "clip_model": resolve_name(config.clip_model),
        "split": config.split,
        "limit": config.limit or 0,
        "storage_dtype": config.dtype,
        "image_processor": config.image_processor,
    }
    summary = ExtractSummary(out=str(out), images_without_captions=source.uncaptioned)
    device = distributed.setup(device)
    try:
        with (
            exclusive_lock(out) if distributed.is_main_process() else contextlib.nullcontext(),
            StopSignals() as stop,
        ):
            _extract(config, source, device, identity, summary, stop)
    finally:
        distributed.teardown()
    return summary


def _check_out(out: Path, config: FeatureConfig, source: "Source") -> None:
    """Refuse an --out that would replace an input, or (with --overwrite) a file not a cache.

    `--overwrite` replaces a clipcap cache (or an empty file, or an HDF5 file too damaged to
    read, such as a truncated cache), never an annotation file, a tar, an image or another
    program's HDF5 file.
    """
    if not out.exists():
        return
    inputs = source.tars if isinstance(source, _TarShards) else [Path(config.annotations)]
    if any(_same_file(out, path) for path in inputs):
        raise ClipcapError(
            f"--out {out} is one of the inputs (an annotation file or tar); give another file "
            "for the cache"
        )
    if out.suffix.lower() in IMAGE_EXTENSIONS:
        raise ClipcapError(f"--out {out} is an image; give another file for the cache")
    if config.overwrite and not _replaceable(out):
        raise ClipcapError(
            f"--out {out} exists and is not a clipcap feature cache: --overwrite replaces only a "
            "cache; give another file"
        )


def _replaceable(out: Path) -> bool:
    """Whether --overwrite may replace the file: a cache, an empty file or an unreadable HDF5."""
    if out.stat().st_size == 0:
        return True
    try:
        cache.read_attrs(out)
        return True
    except ClipcapError:
        pass
    try:
        with h5py.File(out, "r"):
            return False  # a readable HDF5 file without a cache's attributes: someone else's
    except OSError:
        return h5py.is_hdf5(out)  # an HDF5 signature, unreadable: a damaged cache


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


# Layout of the progress shards; progress of another layout is not resumed. Layout 3 keeps a
# shard's records in a tensor, not in the safetensors header, which holds at most 100 MB.
PARTS_FORMAT = 3


class Source(Protocol):
    """An extraction input: annotated image files, tar shards, or a Hugging Face dataset.

    Its work comes in shards, numbered in order; each becomes one crash-safe progress shard.
    """

    identity: str  # what the cache's `source` attribute records, to recognise the same input
    format: str  # the cache's `annotation_format`
    uncaptioned: int  # images left out for having no caption, when known before reading
    image_root_name: str  # the resolved image root ("" when the images are inside the input)

    def shards(self, shard_size: int) -> list:
        """The units of work, in the cache's order."""

    def images_in(self, shards: list[int], shard_size: int) -> int | None:
        """How many images some shards hold, for the progress bar (None: not known yet)."""

    def batches(self, shards: list[int], shard_size, encoder, config) -> Iterator[ShardBatch]:
        """The decoded images of some shards, each shard's last batch marked `last`."""


@dataclass
class _AnnotatedImages:
    """Image files under a root, listed by an annotation file; a shard is `shard_size` images."""

    records: list[ImageRecord]
    image_root: Path
    identity: str
    format: str
    uncaptioned: int

    @property
    def image_root_name(self) -> str:
        """The image root, resolved, as the progress records it."""
        return str(self.image_root.resolve())

    @classmethod
    def open(cls, config: FeatureConfig) -> "_AnnotatedImages":
        if config.images is None:
            raise ClipcapError("--images is required with an annotation file: the image root")
        image_root = Path(config.images)
        if not image_root.is_dir():
            raise ClipcapError(f"image root not found or not a directory: {image_root}")
        records = read_annotations(config.annotations, config.format)
        records = select_split(records, config.split)
        uncaptioned = without_captions(records)
        if uncaptioned:
            log.warning(
                "%d images have no caption and are left out (first: %s)",
                len(uncaptioned),
                uncaptioned[0].path,
            )
            records = [r for r in records if r.captions]
        if not records:
            raise ClipcapError(
                f"{config.annotations} has no captioned images in split '{config.split}'"
            )
        name = Path(config.annotations).name
        return cls(
            records=records[: config.limit] if config.limit else records,
            image_root=image_root,
            identity=f"{name}:{fingerprint(config.annotations)}",
            format=config.format,
            uncaptioned=len(uncaptioned),
        )

    def shards(self, shard_size: int) -> list[tuple[int, int]]:
        """(start, stop) of each shard in the record list."""
        n = len(self.records)
        return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]

    def images_in(self, shards: list[int], shard_size: int) -> int:
        bounds = self.shards(shard_size)
        return sum(bounds[s][1] - bounds[s][0] for s in shards)

    def batches(self, shards: list[int], shard_size, encoder, config) -> Iterator[ShardBatch]:
        """The images of some shards, decoded in DataLoader workers, in order."""
        bounds = self.shards(shard_size)
        batches, batch_shard = [], []
        for shard in shards:
            start, stop = bounds[shard]
            for b in range(start, stop, config.batch_size):
                batches.append(list(range(b, min(b + config.batch_size, stop))))
                batch_shard.append(shard)
        paths = [self.image_root / r.path for r in self.records]
        if config.decode == "gpu":
            dataset, collate = JpegFileDataset(paths, encoder.processor), collate_jpegs
        else:
            dataset, collate = ImageDataset(paths, encoder.processor), collate_images
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=config.num_workers,
            collate_fn=collate,
            pin_memory=encoder.device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
        )
        for i, (positions, pixel_values, failed) in enumerate(loader):
            shard = batch_shard[i]
            yield ShardBatch(
                shard=shard,
                records=[self.records[p] for p in positions],
                pixel_values=pixel_values,
                failures=[(self.records[p].path, reason) for p, reason in failed],
                last=i + 1 == len(batch_shard) or batch_shard[i + 1] != shard,
            )


@dataclass
class _TarShards:
    """WebDataset tar shards (`webdataset.py`); a tar is one shard."""

    tars: list[Path]
    identity: str
    format: str = "webdataset"
    uncaptioned: int = 0  # counted as the tars are read
    image_root_name: str = ""  # the images are in the tars, which `identity` fingerprints

    @classmethod
    def open(cls, config: FeatureConfig) -> "_TarShards":
        if config.images is not None:
            raise ClipcapError(
                "--images is not used with WebDataset shards: the images are inside the tars"
            )
        if config.limit is not None:
            raise ClipcapError(
                "--limit does not apply to WebDataset shards; for a trial run give fewer "
                "shards, such as 'shards/{00000..00001}.tar'"
            )
        tars = webdataset.shard_paths(config.annotations)
        identity = f"webdataset:{len(tars)} shards:{webdataset.fingerprint_shards(tars)}"
        return cls(tars=tars, identity=f"{identity}:default {config.split_default}")

    def shards(self, shard_size: int) -> list[Path]:
        return self.tars

    def images_in(self, shards: list[int], shard_size: int) -> None:
        return None  # unknown until the tars are read

    def batches(self, shards: list[int], shard_size, encoder, config) -> Iterator[ShardBatch]:
        dataset = webdataset.TarShardDataset(
            [(s, self.tars[s]) for s in shards],
            encoder.processor,
            config.batch_size,
            split=config.split,
            split_default=config.split_default,
            decoder=WorkerDecoder(encoder.processor) if config.decode == "gpu" else None,
        )
        yield from _shard_loader(dataset, len(shards), config)


@dataclass
class _DatasetParts:
    """A Hugging Face dataset (`hf_datasets.py`); a part is one shard."""

    opened: hf_datasets.DatasetSource
    identity: str
    format: str
    uncaptioned: int = 0  # counted as the rows are read
    image_root_name: str = ""  # the resolved --images, for rows that name image files
    _parts: dict = field(default_factory=dict)  # shard size -> parts

    @classmethod
    def open(cls, config: FeatureConfig, layout: str) -> "_DatasetParts":
        if config.limit is not None:
            raise ClipcapError(
                "--limit does not apply to Hugging Face datasets; for a trial run save a slice "
                "with dataset.select(range(N)).save_to_disk(DIR) and extract that"
            )
        if config.images is not None and not Path(config.images).is_dir():
            raise ClipcapError(f"image root not found or not a directory: {config.images}")
        opened = hf_datasets.open_source(
            config.annotations,
            layout,
            split=config.split,
            split_default=config.split_default,
            columns={
                "image": config.image_column,
                "caption": config.caption_column,
                "split": config.split_column,
                "image_id": config.id_column,
            },
            images=config.images,
        )
        identity = f"{opened.identity}:default {config.split_default}"
        root = str(Path(config.images).resolve()) if config.images is not None else ""
        return cls(opened=opened, identity=identity, format=layout, image_root_name=root)

    def shards(self, shard_size: int) -> list[hf_datasets.Part]:
        if shard_size not in self._parts:
            self._parts[shard_size] = self.opened.parts(shard_size)
        return self._parts[shard_size]

    def images_in(self, shards: list[int], shard_size: int) -> int | None:
        parts = [self.shards(shard_size)[s] for s in shards]
        if any(p.shard is not None for p in parts):
            return None  # a streamed shard's length is known once it is read
        return sum(p.stop - p.start for p in parts)

    def batches(self, shards: list[int], shard_size, encoder, config) -> Iterator[ShardBatch]:
        dataset = hf_datasets.DatasetPartsDataset(
            [(s, self.shards(shard_size)[s]) for s in shards],
            self.opened.columns,
            encoder.processor,
            config.batch_size,
            split=config.split,
            split_default=config.split_default,
            root=self.opened.root,
        )
        yield from _shard_loader(dataset, len(shards), config)


def _shard_loader(dataset, shards: int, config) -> torch.utils.data.DataLoader:
    """Read a dataset of whole shards' batches in up to `config.num_workers` workers."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=min(config.num_workers, shards),
        collate_fn=_as_is,
        worker_init_fn=ignore_stop_signals,
    )


def _as_is(batch):
    return batch


def _extract(
    config: FeatureConfig,
    source: Source,
    device: torch.device,
    identity: dict,
    summary: ExtractSummary,
    stop: StopSignals,
) -> None:
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        _check_same_inputs(identity, cache.read_attrs(out), out)
        done = cache.read_cache(out)
        summary.already_complete = True
        summary.images_written = len(done.image_ids)
        summary.images_failed = len(done.failed_paths)
        return
    parts = out.with_name(out.name + ".parts")
    # --overwrite starts afresh: the old progress is not read, and is cleared once the new model
    # has loaded.
    manifest = None if config.overwrite else _read_manifest(parts)
    if manifest is not None:
        _check_same_inputs(identity, manifest, parts)
    shard_size = manifest["shard_size"] if manifest else config.shard_size
    num_shards = len(source.shards(shard_size))
    pending = [
        i for i in range(num_shards) if manifest is None or not _shard_path(parts, i).exists()
    ]
    if manifest is not None and len(pending) < num_shards:
        done = [i for i in range(num_shards) if i not in set(pending)]
        summary.resumed_images = sum(_images_in_shard(_shard_path(parts, i)) for i in done)
        log.info("resuming: %d of %d shards already done", len(done), num_shards)

    world = distributed.world()
    started = time.perf_counter()
    if pending:
        encoder = load_clip(config.clip_model, device, config.image_processor)
        # Resolved here, before the progress folder changes: it needs the device and processor.
        config = replace(config, decode=resolve_decode(config.decode, device, encoder.processor))
        decoder = GpuDecoder(encoder.processor, device) if config.decode == "gpu" else None
        started = time.perf_counter()  # throughput counts encoding, not model loading
        if manifest is None:
            manifest = {
                **identity,
                "parts_format": PARTS_FORMAT,
                "shard_size": shard_size,
                "num_shards": num_shards,
                "format": source.format,
                "annotations": Path(config.annotations).name,
                "embedding_dim": encoder.embedding_dim,
                "image_size": encoder.image_size,
                "clip_fingerprint": encoder.fingerprint,
            }
            if world.is_main:
                _start_parts(parts, manifest, out)
        else:
            # The same name may hold other weights now: their embeddings must not join these.
            check_clip_match(
                manifest,
                encoder.name,
                encoder.embedding_dim,
                f"CLIP model {encoder.name}",
                f"the progress in {parts}",
                encoder.fingerprint,
            )
        distributed.barrier()  # the progress folder exists before any rank writes a shard
        # Under torchrun each rank encodes every N-th pending shard; the shards are files, so a
        # rerun with any number of processes, or none, finds what is left.
        mine = pending[world.rank :: world.size]
        batches = source.batches(mine, shard_size, encoder, config)
        if decoder is not None:
            batches = map(decoder.finish, batches)
        _encode(batches, source.images_in(mine, shard_size), encoder, parts, config, summary, stop)
    distributed.barrier()  # every shard is written
    encoded = torch.tensor(summary.images_encoded_now, device=device)
    summary.images_encoded_now = int(distributed.all_reduce_sum(encoded).item())
    summary.seconds = time.perf_counter() - started
    if world.is_main:
        names = [str(t) for t in source.tars] if isinstance(source, _TarShards) else None
        # Annotation files group captions by image themselves; tars and datasets are rows.
        unique = not isinstance(source, _AnnotatedImages)
        _gather(parts, out, num_shards, manifest, summary, names, unique_ids=unique)
        shutil.rmtree(parts, ignore_errors=True)


def _start_parts(parts: Path, manifest: dict, out: Path) -> None:
    """Replace any progress of other inputs with an empty folder holding the new manifest."""
    with os_errors(f"cannot write next to {out}"):
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        write_json_atomic(parts / "manifest.json", manifest)


def _check_same_inputs(identity: dict, found: dict, where: Path) -> None:
    """Refuse to mix a cache or its progress with different inputs."""
    for key, wanted in identity.items():
        if key == "image_root" and key not in found:
            continue  # caches and progress of earlier versions do not record their image root
        # Caches of earlier versions do not name their image processor: it was torchvision's.
        default = "torchvision" if key == "image_processor" else None
        if found.get(key, default) != wanted:
            raise ClipcapError(
                f"{where} was made with {key}={found.get(key)!r}, not {wanted!r}; choose another "
                "--out, or pass --overwrite to replace it"
            )


def _read_manifest(parts: Path) -> dict | None:
    """The progress folder's manifest, or None when there is no progress yet."""
    path = parts / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = read_json(path, "progress manifest")
    except ClipcapError:  # unreadable or not JSON: as corrupt as a manifest of the wrong shape
        manifest = None
    if not isinstance(manifest, dict) or "embedding_dim" not in manifest:
        raise ClipcapError(f"{path} is corrupt; pass --overwrite to start over")
    if manifest.get("parts_format") != PARTS_FORMAT:
        raise ClipcapError(
            f"{parts} holds progress of an older clipcap version; pass --overwrite to start over"
        )
    return manifest


def _shard_path(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.safetensors"


def _encode(
    batches: Iterator[ShardBatch],
    total: int | None,
    encoder: ClipEncoder,
    parts: Path,
    config: FeatureConfig,
    summary: ExtractSummary,
    stop: StopSignals,
) -> None:
    """Encode batches, writing each shard as soon as its last batch is done.

    On SIGTERM or SIGUSR1 (`stop`) the shard being encoded is finished and written, and the run
    stops with `Preempted`; the same command continues from the next shard.
    """
    with tqdm(
        total=total,
        unit="img",
        desc="extract",
        dynamic_ncols=True,
        disable=not distributed.is_main_process(),
    ) as bar:
        try:
            _encode_batches(batches, encoder, parts, config, summary, stop, bar)
        except RuntimeError:
            if not stop.received:
                raise
            # The decoding workers were ended too (they ignore SIGTERM and SIGUSR1, so by another
            # signal): the shard being encoded is dropped, and the same command encodes it again.
            _stop(stop, parts, config)


def _encode_batches(
    batches: Iterator[ShardBatch],
    encoder: ClipEncoder,
    parts: Path,
    config: FeatureConfig,
    summary: ExtractSummary,
    stop: StopSignals,
    bar: tqdm,
) -> None:
    """`_encode`'s loop: encode each batch, and write its shard once the shard's last is done."""
    rows: dict[int, list] = {}
    failures: dict[int, list] = {}
    uncaptioned: dict[int, int] = {}
    for batch in batches:
        if batch.failures and config.strict:
            path, reason = batch.failures[0]
            raise ClipcapError(f"{path}: {reason} (--strict stops at the first unreadable image)")
        shard = batch.shard
        if batch.pixel_values is not None:
            embeds = encoder.encode(batch.pixel_values)  # (B, D)
            rows.setdefault(shard, []).extend(zip(batch.records, embeds.numpy(), strict=True))
            summary.images_encoded_now += len(batch.records)
        failures.setdefault(shard, []).extend(batch.failures)
        uncaptioned[shard] = uncaptioned.get(shard, 0) + batch.uncaptioned
        bar.update(len(batch.records) + len(batch.failures))
        if batch.last:
            _write_shard(
                _shard_path(parts, shard),
                rows.pop(shard, []),
                failures.pop(shard, []),
                uncaptioned.pop(shard),
                encoder.embedding_dim,
                config.dtype,
            )
            if stop.received:
                _stop(stop, parts, config)


def _stop(stop: StopSignals, parts: Path, config: FeatureConfig) -> None:
    done = len(list(parts.glob("shard-*.safetensors")))
    raise Preempted(
        stop.received,
        f"stopped by {signal_name(stop.received)} with {done} shard(s) of {config.out} written; "
        "run the same command again to continue",
    )


def _write_shard(path: Path, rows, failures, uncaptioned: int, dim: int, dtype: str) -> None:
    """One finished shard: its embeddings, and its records and failures as UTF-8 JSON bytes.

    The records go in a uint8 tensor, not in the header's metadata: safetensors refuses a header
    over 100 MB, which a tar of long captions passes, and then every rerun would fail alike.
    """
    embeddings = np.stack([e for _, e in rows]) if rows else np.zeros((0, dim), np.float32)
    records = [[r.image_id, r.path, r.split, r.captions] for r, _ in rows]
    index = json.dumps({"records": records, "failures": failures, "uncaptioned": uncaptioned})
    tensors = {
        "embeddings": embeddings.astype(dtype),
        "index": np.frombuffer(index.encode(), dtype=np.uint8),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _read_shard(path: Path) -> tuple[list[ImageRecord], list, int]:
    """A shard's records, failures and count of uncaptioned samples, without its embeddings."""
    with safe_open(str(path), "np") as f:
        index = json.loads(f.get_tensor("index").tobytes().decode())
    records = [ImageRecord(*fields) for fields in index["records"]]
    return records, index["failures"], int(index["uncaptioned"])


def _read_embeddings(path: Path) -> np.ndarray:
    with safe_open(str(path), "np") as f:
        return f.get_tensor("embeddings")


def _images_in_shard(path: Path) -> int:
    records, failures, _ = _read_shard(path)
    return len(records) + len(failures)


def _refuse_repeated_ids(
    kept_by_shard: list[list[ImageRecord]], shard_names: list[str] | None
) -> None:
    """Refuse two samples or rows of one image id: they would be two rows of the cache.

    Evaluation matches predictions and references by id, so an id that appears twice would
    silently score one of them only. WebDataset keys are the image ids (`shard_names` names the
    tars); a dataset's rows take theirs from the id column, else from the image's path.
    """
    seen: dict[str, tuple[int, str]] = {}
    for shard, records in enumerate(kept_by_shard):
        for record in records:
            if record.image_id in seen:
                first_shard, first_path = seen[record.image_id]
                if shard_names is None:
                    raise ClipcapError(
                        f"the image id {record.image_id!r} is that of {first_path} and again of "
                        f"{record.path}: a cache holds each image once, with all its captions; "
                        "put one image's captions in one row (a list), or name a column of "
                        "unique ids with --id-column, and run again with --overwrite"
                    )
                raise ClipcapError(
                    f"the key {record.image_id!r} is in {shard_names[first_shard]} "
                    f"({first_path}) and again in {shard_names[shard]} ({record.path}): "
                    "WebDataset keys are the image ids and must be unique; rename or drop one "
                    "and run again with --overwrite"
                )
            seen[record.image_id] = (shard, record.path)


def _gather(
    parts: Path,
    out: Path,
    num_shards: int,
    manifest: dict,
    summary: ExtractSummary,
    shard_names: list[str] | None = None,
    unique_ids: bool = False,
):
    """Gather the finished shards into the final HDF5 cache, streaming their embeddings.

    Only the records are read up front; the embeddings go into the file a shard at a time, so the
    gather never holds more than one shard of them. With `unique_ids` (tars and datasets) an
    image id that two samples share is refused, naming both (and their tars: `shard_names`).
    """
    shard_paths = [_shard_path(parts, shard) for shard in range(num_shards)]
    kept, failed, kept_by_shard = [], [], []
    for path in shard_paths:
        records, failures, uncaptioned = _read_shard(path)
        kept.extend(records)
        kept_by_shard.append(records)
        failed.extend(failures)
        summary.images_without_captions += uncaptioned
    if unique_ids:
        _refuse_repeated_ids(kept_by_shard, shard_names)
    summary.images_written = len(kept)
    summary.images_failed = len(failed)
    summary.failure_reasons = dict(Counter(reason.split(" (")[0] for _, reason in failed))
    if not kept:
        # Nothing to resume from: the corrected command (another root, a fixed tar) starts afresh.
        shutil.rmtree(parts, ignore_errors=True)
        first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
        raise ClipcapError(f"no image could be read: {len(failed)} failed{first}")

    captions, caption_rows = [], []
    for row, record in enumerate(kept):
        captions.extend(record.captions)
        caption_rows.extend([row] * len(record.captions))
    attrs = {
        "clip_model": manifest["clip_model"],
        "embedding_dim": manifest["embedding_dim"],
        "image_size": manifest["image_size"],
        "source": manifest["source"],
        "image_root": manifest["image_root"],
        "split": manifest["split"],
        "limit": manifest["limit"],
        "storage_dtype": manifest["storage_dtype"],
        "annotation_format": manifest["format"],
        "image_processor": manifest["image_processor"],
        "package_version": __version__,
    }
    if manifest.get("clip_fingerprint") is not None:  # progress of earlier versions has none
        attrs["clip_fingerprint"] = manifest["clip_fingerprint"]
    with os_errors(f"cannot write {out}"):
        embeddings = cache.EmbeddingStream(
            rows=len(kept),
            dim=manifest["embedding_dim"],
            dtype=np.dtype(manifest["storage_dtype"]),
            chunks=(_read_embeddings(path) for path in shard_paths),
        )
        cache.write_cache(
            out,
            embeddings=embeddings,
            image_ids=[r.image_id for r in kept],
            image_paths=[r.path for r in kept],
            splits=[r.split for r in kept],
            captions=captions,
            caption_image_index=np.array(caption_rows, dtype=np.int64),
            failed_paths=[path for path, _ in failed],
            failed_reasons=[reason for _, reason in failed],
            attrs=attrs,
        )


def summary_dict(summary: ExtractSummary) -> dict:
    """The summary as plain data, with the derived throughput."""
    return {**asdict(summary), "images_per_second": round(summary.images_per_second, 2)}
