"""GPU JPEG decoding (`--decode gpu`), checked on the CPU: the same tensor code, with
`decode_jpeg` on the CPU, against the Hugging Face image processor's path.

The CUDA run of the same path is `test_gpu_decoding_matches_cpu_decoding` in test_cuda.py.
"""

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from matplotlib import cbook
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor

from clipcap_cache.data.annotations import ImageRecord
from clipcap_cache.data.images import ImageLoadError, ShardBatch, decode_image, load_image
from clipcap_cache.extraction.encoder import load_clip
from clipcap_cache.extraction.gpu_decode import (
    EncodedJpeg,
    GpuDecoder,
    PendingPixels,
    WorkerDecoder,
)

PHOTO = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # 512x600, RGB


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    return jpeg(image, exif=exif)


def photo_jpegs() -> dict[str, bytes]:
    """A real photograph as JPEGs of several sizes, aspect ratios, modes and orientations."""
    photo = Image.open(PHOTO).convert("RGB")
    return {
        "original 512x600": PHOTO.read_bytes(),
        "wide 640x480": jpeg(photo.resize((640, 480))),
        "tall 150x700": jpeg(photo.resize((150, 700))),
        "panorama 1200x200": jpeg(photo.resize((1200, 200))),
        "smaller than the crop 90x60": jpeg(photo.resize((90, 60))),
        "square 224x224": jpeg(photo.resize((224, 224))),
        "greyscale": jpeg(photo.convert("L")),
        "progressive": jpeg(photo, progressive=True),
        "no chroma subsampling": jpeg(photo, subsampling=0),
        **{
            f"EXIF orientation {o}": with_orientation(photo.resize((300, 200)), o)
            for o in (3, 6, 8)
        },
    }


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """CLIP's image processor (224 pixels) through `from_pretrained`, in both backends."""
    directory = tmp_path_factory.mktemp("processor")
    CLIPImageProcessor().save_pretrained(directory)
    return {
        b: AutoImageProcessor.from_pretrained(directory, backend=b) for b in ("torchvision", "pil")
    }


def record(path: str) -> ImageRecord:
    return ImageRecord(image_id=path, path=path, split="train", captions=["a caption"])


def cpu_path(processor, files: dict[str, bytes]) -> torch.Tensor:
    """(N, 3, S, S) pixels of the CPU path: PIL decoding, EXIF orientation, the processor."""
    worker = WorkerDecoder(processor)
    return torch.stack([worker.pixels(decode_image(data)) for data in files.values()])


def gpu_path(processor, files: dict[str, bytes]) -> torch.Tensor:
    """(N, 3, S, S) pixels of the GPU path, run on the CPU: `decode_jpeg`, then tensor ops."""
    worker = WorkerDecoder(processor)
    items = [worker.from_bytes(data) for data in files.values()]
    assert all(isinstance(i, EncodedJpeg) for i in items)  # every one took the tensor path
    batch = ShardBatch(
        0, records=[record(name) for name in files], pixel_values=PendingPixels(items)
    )
    done = GpuDecoder(processor, torch.device("cpu")).finish(batch)
    assert not done.failures and len(done.records) == len(files)
    return done.pixel_values


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tensor_path_matches_the_image_processor(processors, backend):
    files = photo_jpegs()
    cpu, gpu = cpu_path(processors[backend], files), gpu_path(processors[backend], files)
    assert gpu.shape == cpu.shape == (len(files), 3, 224, 224)
    cosine = torch.nn.functional.cosine_similarity(gpu.flatten(1), cpu.flatten(1), dim=1)
    assert cosine.min() >= 0.9999, dict(zip(files, cosine.tolist(), strict=True))
    if backend == "torchvision":
        # The same decoder (libjpeg-turbo) and the same tensor operations: equal to rounding.
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
    else:
        # PIL's bicubic resize differs from torch's by a grey level here and there.
        assert (gpu - cpu).abs().mean() < 2e-3


def test_embeddings_match_the_processor_path(clip_dir):
    """Through the tiny CLIP with its own processor: cosine >= 0.999 per embedding."""
    encoder = load_clip(str(clip_dir), "cpu")
    files = photo_jpegs()
    a = encoder.encode(cpu_path(encoder.processor, files))
    b = encoder.encode(gpu_path(encoder.processor, files))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cosine.min() >= 0.999, dict(zip(files, cosine.tolist(), strict=True))
    # The orientation matters: an unrotated image gives another embedding.
    photo = Image.open(PHOTO).convert("RGB").resize((300, 200))
    unrotated = encoder.encode(WorkerDecoder(encoder.processor).pixels(photo)[None])
    rotated = list(files).index("EXIF orientation 6")
    assert torch.nn.functional.cosine_similarity(unrotated, b[rotated : rotated + 1]) < 0.999


@pytest.mark.bad_input("silent wrong result")
def test_files_the_gpu_path_cannot_take_get_the_cpu_path(tmp_path, processors):
    """CMYK, PNG, truncated, empty, missing, not an image: exactly what the CPU path does."""
    photo = Image.open(PHOTO).convert("RGB")
    good = jpeg(photo)
    files = {
        "cmyk.jpg": jpeg(photo.convert("CMYK")),
        "image.png": None,
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.jpg": b"not an image at all",
    }
    photo.save(tmp_path / "image.png")
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    worker = WorkerDecoder(processors["torchvision"])
    for name in [*files, "missing.jpg"]:
        path = tmp_path / name
        try:
            expected = worker.pixels(load_image(path))
        except ImageLoadError as e:
            with pytest.raises(ImageLoadError) as gpu_error:
                worker.from_file(path)
            assert str(gpu_error.value) == str(e), name
            continue
        item = worker.from_file(path)
        assert isinstance(item, torch.Tensor), name
        torch.testing.assert_close(item, expected, rtol=0, atol=0)
    assert isinstance(worker.from_file(tmp_path / "cmyk.jpg"), torch.Tensor)


@pytest.mark.bad_input("silent wrong result")
def test_a_jpeg_that_fails_to_decode_on_the_device_is_recorded_as_the_cpu_path_would(
    processors,
):
    data = bytearray(PHOTO.read_bytes())
    table = data.index(b"\xff\xc4")  # a Huffman table whose code counts add up to nonsense
    data[table + 5 : table + 21] = b"\xff" * 16
    broken = bytes(data)
    with pytest.raises(ImageLoadError) as cpu_error:
        decode_image(broken)
    worker = WorkerDecoder(processors["torchvision"])
    items = [worker.from_bytes(broken), worker.from_bytes(PHOTO.read_bytes())]
    assert all(isinstance(i, EncodedJpeg) for i in items)  # the header alone looks fine
    batch = ShardBatch(
        0, records=[record("broken.jpg"), record("good.jpg")], pixel_values=PendingPixels(items)
    )
    done = GpuDecoder(processors["torchvision"], torch.device("cpu")).finish(batch)
    assert done.failures == [("broken.jpg", str(cpu_error.value))]
    assert [r.path for r in done.records] == ["good.jpg"] and done.pixel_values.shape[0] == 1


def test_extraction_batches_match_with_gpu_decoding(tmp_path, clip_dir):
    """The extraction's own batches, CPU decoding against GPU decoding on the CPU device."""
    from clipcap_cache.extraction.features import FeatureConfig, _AnnotatedImages

    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for name, data in photo_jpegs().items():
        file = name.replace(" ", "_") + ".jpg"
        (root / file).write_bytes(data)
        rows.append({"image": file, "caption": name})
    Image.open(PHOTO).save(root / "photo.png")
    (root / "cut.jpg").write_bytes(PHOTO.read_bytes()[:3000])
    rows += [{"image": "photo.png", "caption": "png"}, {"image": "cut.jpg", "caption": "cut"}]
    annotations = tmp_path / "data.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = FeatureConfig(
        annotations=str(annotations),
        images=str(root),
        out=str(tmp_path / "f.h5"),
        clip_model=str(clip_dir),
        batch_size=5,
        num_workers=1,
        shard_size=8,
        device="cpu",
    )
    encoder = load_clip(str(clip_dir), "cpu")
    source = _AnnotatedImages.open(config)
    shards = list(range(len(source.shards(8))))
    cpu = list(source.batches(shards, 8, encoder, replace(config, decode="cpu")))
    decoder = GpuDecoder(encoder.processor, torch.device("cpu"))
    gpu = [
        decoder.finish(b) for b in source.batches(shards, 8, encoder, replace(config, decode="gpu"))
    ]
    assert [(b.shard, b.last) for b in gpu] == [(b.shard, b.last) for b in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert b.records == a.records and b.failures == a.failures
        if a.pixel_values is None:  # a batch of failures only
            assert b.pixel_values is None
            continue
        cosine = torch.nn.functional.cosine_similarity(
            encoder.encode(a.pixel_values), encoder.encode(b.pixel_values), dim=1
        )
        assert cosine.min() >= 0.999
    assert [p for b in gpu for p, _ in b.failures] == ["cut.jpg"]


@pytest.mark.bad_input("bad option")
def test_decode_gpu_without_cuda_is_one_error_line(tmp_path, shapes, clip_dir):
    annotations, root = shapes
    out = tmp_path / "f.h5"
    args = ["--clip-model", clip_dir, "--device", "cpu", "--decode", "gpu"]
    result = run_cli("extract-features", annotations, "--images", root, "--out", out, *args)
    assert "--decode gpu needs the encoder on a CUDA GPU" in assert_one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_decode_cpu_and_auto_on_the_cpu_write_the_same_cache(tmp_path, shapes, clip_dir):
    from clipcap_cache.data.cache import read_cache

    annotations, root = shapes
    caches = []
    for decode in ("cpu", "auto"):
        out = tmp_path / f"{decode}.h5"
        run_cli(
            "extract-features",
            annotations,
            "--images",
            root,
            "--out",
            out,
            "--clip-model",
            clip_dir,
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--limit",
            "8",
            "--decode",
            decode,
            check=0,
        )
        caches.append(read_cache(out))
    np.testing.assert_array_equal(caches[0].embeddings, caches[1].embeddings)


def test_a_processor_the_tensor_path_cannot_follow_is_refused():
    from clipcap_cache.errors import ClipcapError
    from clipcap_cache.extraction.gpu_decode import PreprocessSpec

    square = CLIPImageProcessor(size={"height": 224, "width": 224})
    with pytest.raises(ClipcapError, match="shortest-edge resize only"):
        PreprocessSpec.from_processor(square)
    assert PreprocessSpec.from_processor(CLIPImageProcessor()).shortest_edge == 224


def test_tar_batches_match_with_gpu_decoding(tmp_path, clip_dir):
    """WebDataset tars: the JPEG members pass as bytes, the rest (a PNG, a cut JPEG) as before."""
    import tarfile

    from clipcap_cache.data.webdataset import TarShardDataset

    members = {f"{i:04d}": data for i, data in enumerate(photo_jpegs().values())}
    png = io.BytesIO()
    Image.open(PHOTO).save(png, format="PNG")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        samples = [(key, "jpg", data) for key, data in members.items()]
        samples += [("png", "png", png.getvalue()), ("cut", "jpg", PHOTO.read_bytes()[:3000])]
        for key, extension, data in samples:
            for name, payload in ((f"{key}.{extension}", data), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    encoder = load_clip(str(clip_dir), "cpu")
    cpu = list(TarShardDataset([(0, shard)], encoder.processor, 5))
    worker = WorkerDecoder(encoder.processor)
    decoder = GpuDecoder(encoder.processor, torch.device("cpu"))
    handed_over = list(TarShardDataset([(0, shard)], encoder.processor, 5, decoder=worker))
    items = [i for b in handed_over if b.pixel_values is not None for i in b.pixel_values.items]
    assert sum(isinstance(i, EncodedJpeg) for i in items) == len(members)  # the PNG: CPU path
    gpu = [decoder.finish(b) for b in handed_over]
    assert [b.last for b in gpu] == [b.last for b in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert b.records == a.records and b.failures == a.failures
        cosine = torch.nn.functional.cosine_similarity(
            encoder.encode(a.pixel_values), encoder.encode(b.pixel_values), dim=1
        )
        assert cosine.min() >= 0.999
    assert [path for b in gpu for path, _ in b.failures] == ["00000.tar/cut.jpg"]
