"""Stage 1: run a frozen CLIP image encoder over a dataset once and cache the embeddings.

    clipcap extract-features data/coco/dataset_coco.json --images data/coco --out data/coco_vitb32.h5
    torchrun --nproc-per-node 8 --no-python clipcap extract-features ...   # every GPU of a node

Images are decoded and preprocessed in DataLoader workers (`images.ImageDataset`) while the
encoder runs in the main process, in half precision under `torch.inference_mode()` on a GPU.

Progress is crash-safe. Work goes to a folder beside the output, `FEATURES.h5.parts/`, as shards
of `shard_size` images, each written to a temporary name and renamed. Rerunning the same command
after a crash (even kill -9) skips the finished shards. When every shard is done they are gathered
into the HDF5 file (`cache.write_cache`, also atomic, a shard at a time) and the folder is removed,
so the final file holds exactly the rows an uninterrupted run would. Under torchrun each rank
encodes every N-th pending shard and rank 0 gathers.
"""

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModelWithProjection

from clipcap_cache import __version__, cache, distributed
from clipcap_cache.datasets import (
    FORMATS,
    SPLITS,
    ImageRecord,
    fingerprint,
    read_annotations,
    select_split,
    without_captions,
)
from clipcap_cache.devices import DEVICES, inference_dtype, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import exclusive_lock, write_json_atomic
from clipcap_cache.hub import load_pretrained, resolve_name
from clipcap_cache.images import ImageDataset, collate_images, default_num_workers
from clipcap_cache.validation import at_least, check_types, one_of

log = logging.getLogger(__name__)
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


@dataclass
class FeatureConfig:
    """Settings of one extraction run; saved in the cache's attributes."""

    annotations: str  # annotation file (COCO, Karpathy, JSON lines or CSV)
    images: str  # image root; annotation paths are relative to it
    out: str  # the HDF5 file to write
    format: str = "auto"  # auto | coco | karpathy | jsonl | csv
    split: str = "all"  # train | val | test | all
    clip_model: str = DEFAULT_CLIP_MODEL  # hub name or local directory
    batch_size: int = 64
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "auto"
    dtype: str = "float16"  # storage dtype of /embeddings: float16 | float32
    limit: int | None = None  # only the first N images, for trial runs
    strict: bool = False  # stop at the first unreadable image
    overwrite: bool = False  # replace an existing cache made from other inputs
    shard_size: int = 2048  # images per crash-safe progress shard

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "batch_size", "limit", "shard_size")
        at_least(self, 0, "num_workers")
        one_of(self, "dtype", ("float16", "float32"))
        one_of(self, "format", FORMATS)
        one_of(self, "split", (*SPLITS, "all"))
        one_of(self, "device", DEVICES)


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


@dataclass
class ClipEncoder:
    """A frozen CLIP vision tower with its projection, and the matching image processor."""

    name: str
    model: CLIPVisionModelWithProjection
    processor: object
    device: torch.device
    dtype: torch.dtype

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


def load_clip(name_or_dir: str, device: str | torch.device = "auto") -> ClipEncoder:
    """Load the vision tower and projection of a CLIP checkpoint, and its image processor.

    A full `CLIPModel` checkpoint works: only the vision weights are loaded, and the top-level
    `projection_dim` is carried into the vision config.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    config = load_pretrained(AutoConfig.from_pretrained, name_or_dir, "CLIP model")
    if config.model_type == "clip":
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise ClipcapError(f"'{name_or_dir}' is a '{config.model_type}' model, not a CLIP model")
    dtype = inference_dtype(device)
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
        backend="torchvision",
    )
    model.to(device).eval().requires_grad_(False)
    return ClipEncoder(resolve_name(name_or_dir), model, processor, device, dtype)


def extract_features(config: FeatureConfig) -> ExtractSummary:
    """Run extraction (or resume it) and write the cache; returns a summary of the run.

    Every input (annotations, image root, device, output path, CLIP model) is checked before
    anything on disk changes. With `overwrite`, an existing cache is replaced only by the renaming
    of the complete new one, so a failed run leaves it as it was.
    """
    out = Path(config.out)
    image_root = Path(config.images)
    if not image_root.is_dir():
        raise ClipcapError(f"image root not found or not a directory: {image_root}")
    if out.is_dir():
        raise ClipcapError(f"--out {out} is a directory; give the HDF5 file to write in it")
    device = resolve_device(config.device)
    records = select_split(read_annotations(config.annotations, config.format), config.split)
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
    records = records[: config.limit] if config.limit else records
    identity = {
        "source": f"{Path(config.annotations).name}:{fingerprint(config.annotations)}",
        "clip_model": resolve_name(config.clip_model),
        "split": config.split,
        "limit": config.limit or 0,
        "storage_dtype": config.dtype,
    }
    summary = ExtractSummary(out=str(out), images_without_captions=len(uncaptioned))
    device = distributed.setup(device)
    try:
        with exclusive_lock(out) if distributed.is_main_process() else contextlib.nullcontext():
            _extract(config, records, image_root, device, identity, summary)
    finally:
        distributed.teardown()
    return summary


def _extract(
    config: FeatureConfig,
    records: list[ImageRecord],
    image_root: Path,
    device: torch.device,
    identity: dict,
    summary: ExtractSummary,
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
    manifest = _read_manifest(parts)
    if manifest is not None and any(manifest.get(k) != v for k, v in identity.items()):
        if not config.overwrite:
            _check_same_inputs(identity, manifest, parts)
        manifest = None  # progress of other inputs, cleared once the new model has loaded
    shard_size = manifest["shard_size"] if manifest else config.shard_size
    shards = [
        (start, min(start + shard_size, len(records)))
        for start in range(0, len(records), shard_size)
    ]
    pending = [
        i for i in range(len(shards)) if manifest is None or not _shard_path(parts, i).exists()
    ]
    summary.resumed_images = sum(
        shards[i][1] - shards[i][0] for i in range(len(shards)) if i not in pending
    )
    if summary.resumed_images:
        log.info("resuming: %d of %d images already done", summary.resumed_images, len(records))

    world = distributed.world()
    started = time.perf_counter()
    if pending:
        encoder = load_clip(config.clip_model, device)
        started = time.perf_counter()  # throughput counts encoding, not model loading
        if manifest is None:
            manifest = {
                **identity,
                "shard_size": shard_size,
                "num_images": len(records),
                "format": config.format,
                "annotations": Path(config.annotations).name,
                "embedding_dim": encoder.embedding_dim,
                "image_size": encoder.image_size,
            }
            if world.is_main:
                _start_parts(parts, manifest, out)
        distributed.barrier()  # the progress folder exists before any rank writes a shard
        # Under torchrun each rank encodes every N-th pending shard; the shards are files, so a
        # rerun with any number of processes, or none, finds what is left.
        mine = pending[world.rank :: world.size]
        _encode_shards(encoder, records, image_root, shards, mine, parts, config, summary)
    distributed.barrier()  # every shard is written
    encoded = torch.tensor(summary.images_encoded_now, device=device)
    summary.images_encoded_now = int(distributed.all_reduce_sum(encoded).item())
    summary.seconds = time.perf_counter() - started
    if world.is_main:
        _gather(parts, out, records, shards, manifest, summary)
        shutil.rmtree(parts, ignore_errors=True)


def _start_parts(parts: Path, manifest: dict, out: Path) -> None:
    """Replace any progress of other inputs with an empty folder holding the new manifest."""
    try:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        write_json_atomic(parts / "manifest.json", manifest)
    except OSError as e:
        raise ClipcapError(f"cannot write next to {out}: {e.strerror or e}") from None


def _check_same_inputs(identity: dict, found: dict, where: Path) -> None:
    """Refuse to mix a cache or its progress with different inputs."""
    for key, wanted in identity.items():
        if found.get(key) != wanted:
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
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or "embedding_dim" not in manifest:
        raise ClipcapError(f"{path} is corrupt; pass --overwrite to start over")
    return manifest


def _shard_path(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.safetensors"


def _encode_shards(
    encoder: ClipEncoder,
    records: list[ImageRecord],
    image_root: Path,
    shards,
    pending: list[int],
    parts: Path,
    config: FeatureConfig,
    summary: ExtractSummary,
) -> None:
    """Encode the pending shards, writing each one as soon as its last batch is done."""
    batches, batch_shard = [], []
    for shard in pending:
        start, stop = shards[shard]
        for b in range(start, stop, config.batch_size):
            batches.append(list(range(b, min(b + config.batch_size, stop))))
            batch_shard.append(shard)
    dataset = ImageDataset([image_root / r.path for r in records], encoder.processor)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=config.num_workers,
        collate_fn=collate_images,
        pin_memory=encoder.device.type == "cuda",
    )
    total = sum(shards[s][1] - shards[s][0] for s in pending)
    rows: dict[int, list] = {}
    failures: dict[int, list] = {}
    with tqdm(
        total=total,
        unit="img",
        desc="extract",
        dynamic_ncols=True,
        disable=not distributed.is_main_process(),
    ) as bar:
        for shard, (positions, pixel_values, failed) in zip(batch_shard, loader, strict=True):
            if failed and config.strict:
                position, reason = failed[0]
                raise ClipcapError(
                    f"{records[position].path}: {reason} (--strict stops at the "
                    "first unreadable image)"
                )
            if pixel_values is not None:
                embeds = encoder.encode(pixel_values)  # (B, D)
                rows.setdefault(shard, []).extend(zip(positions, embeds.numpy(), strict=True))
                summary.images_encoded_now += len(positions)
            failures.setdefault(shard, []).extend(failed)
            bar.update(len(positions) + len(failed))
            start, stop = shards[shard]
            if len(rows.get(shard, [])) + len(failures.get(shard, [])) == stop - start:
                _write_shard(
                    parts,
                    shard,
                    rows.pop(shard, []),
                    failures.pop(shard, []),
                    encoder.embedding_dim,
                    config.dtype,
                )


def _write_shard(parts: Path, shard: int, rows, failures, dim: int, dtype: str) -> None:
    embeddings = np.stack([e for _, e in rows]) if rows else np.zeros((0, dim), np.float32)
    tensors = {
        "embeddings": embeddings.astype(dtype),
        "positions": np.array([p for p, _ in rows], dtype=np.int64),
    }
    path = _shard_path(parts, shard)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"failures": json.dumps(failures)})
    os.replace(tmp, path)


def _gather(
    parts: Path,
    out: Path,
    records: list[ImageRecord],
    shards,
    manifest: dict,
    summary: ExtractSummary,
) -> None:
    """Gather the finished shards into the final HDF5 cache, streaming their embeddings.

    Only the row positions are read up front; the embeddings go into the file a shard at a time,
    so the gather never holds more than one shard of them.
    """
    shard_paths = [_shard_path(parts, shard) for shard in range(len(shards))]
    positions, failed = [], []
    for path in shard_paths:
        with safe_open(str(path), "np") as f:
            positions.extend(f.get_tensor("positions").tolist())
            failed.extend(json.loads(f.metadata()["failures"]))
    summary.images_written = len(positions)
    summary.images_failed = len(failed)
    summary.failure_reasons = dict(Counter(reason.split(" (")[0] for _, reason in failed))
    if not positions:
        first = f" (first: {records[failed[0][0]].path}: {failed[0][1]})" if failed else ""
        raise ClipcapError(f"no image could be read: {len(failed)} failed{first}")

    kept = [records[p] for p in positions]
    captions, caption_rows = [], []
    for row, record in enumerate(kept):
        captions.extend(record.captions)
        caption_rows.extend([row] * len(record.captions))
    attrs = {
        "clip_model": manifest["clip_model"],
        "embedding_dim": manifest["embedding_dim"],
        "image_size": manifest["image_size"],
        "source": manifest["source"],
        "split": manifest["split"],
        "limit": manifest["limit"],
        "storage_dtype": manifest["storage_dtype"],
        "annotation_format": manifest["format"],
        "package_version": __version__,
    }
    try:
        embeddings = cache.EmbeddingStream(
            rows=len(positions),
            dim=manifest["embedding_dim"],
            dtype=np.dtype(manifest["storage_dtype"]),
            chunks=(load_file(str(path))["embeddings"] for path in shard_paths),
        )
        cache.write_cache(
            out,
            embeddings=embeddings,
            image_ids=[r.image_id for r in kept],
            image_paths=[r.path for r in kept],
            splits=[r.split for r in kept],
            captions=captions,
            caption_image_index=np.array(caption_rows, dtype=np.int64),
            failed_paths=[records[p].path for p, _ in failed],
            failed_reasons=[reason for _, reason in failed],
            attrs=attrs,
        )
    except OSError as e:
        raise ClipcapError(f"cannot write {out}: {e.strerror or e}") from None


def summary_dict(summary: ExtractSummary) -> dict:
    """The summary as plain data, with the derived throughput."""
    return {**asdict(summary), "images_per_second": round(summary.images_per_second, 2)}
