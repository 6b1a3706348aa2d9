"""WebDataset input: image-caption samples streamed out of tar shards, never unpacked to disk.

    clipcap extract-features 'shards/{00000..00099}.tar' --out cc3m.h5

This is the layout img2dataset writes. A sample is the consecutive members of a tar that share a
key, the member name up to the first dot of its file name: `000012345.jpg`, `000012345.txt`,
`000012345.json`. For each sample:

- the image is its first member with an image extension (jpg, png, webp, ...);
- the captions are the json sidecar's `captions` list if it has one, else the `.txt` member (one
  caption), else the json's `caption` string;
- the split is the json's `split` if it has one, else the default split (`--split-default`);
- the image id is the key, and the image path is `SHARD.tar/MEMBER`.

Shards are given as a brace pattern (`shards/{00000..00099}.tar`), a glob, or a directory of tars.
A tar is a unit of work: each one is read by one DataLoader worker of one rank, in order, and its
samples become one crash-safe progress shard of the extraction. A bad member (an image that does
not decode, an unreadable sidecar, a sample with no image) or a truncated tar becomes a recorded
failure; a sample with no caption is skipped and counted.
"""

import glob
import hashlib
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipcap_cache.data.annotations import ALL, SPLIT_ALIASES, SPLITS, TRAIN, ImageRecord
from clipcap_cache.data.images import IMAGE_EXTENSIONS, ImageLoadError, ShardBatch, decode_image
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import parse_json

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# WebDataset's own rule: the key is everything up to the first dot of the file name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/)?[^./][^.]*)\.([^/]+)$")


MAX_SHARD_NAMES = 1_000_000  # names a brace pattern may stand for; more is a typo, not a dataset
MAX_BRACE_DEPTH = 20  # braces within braces, at most
# The largest members read: a tar member is read into memory whole, and its header's size (which a
# sparse member of a few kB may put at terabytes) is checked first. An image beyond its limit would
# be a bomb anyway; a caption file of more than a few kB is not a caption.
MAX_IMAGE_MEMBER_BYTES = 128 * 2**20
MAX_TEXT_MEMBER_BYTES = 16 * 2**20


def is_webdataset(source: str, format: str = "auto") -> bool:
    """Whether an extraction source names tar shards rather than an annotation file."""
    if format == "webdataset":
        return True
    if format != "auto":
        return False
    path = Path(source)
    if _is_dir(path):
        return True
    if _is_file(path) or not ("{" in source or "}" in source):
        return source.lower().endswith(TAR_SUFFIXES)
    names = expand_braces(source)
    if names is None:  # unbalanced: a pattern of tars if it names one, for shard_paths to report
        return any(suffix in source.lower() for suffix in TAR_SUFFIXES)
    return bool(names) and names[0].lower().endswith(TAR_SUFFIXES)


def expand_braces(source: str) -> list[str] | None:
    """The names a brace pattern stands for (None if its braces do not balance).

    The names are counted first, without making them (`count_brace_names`): a pattern of 10^8
    names is refused at once instead of filling the memory. braceexpand is imported here, not with
    the module, so that extraction from annotation files works where it is not installed; only a
    pattern with braces needs it.
    """
    if "{" not in source and "}" not in source:
        return [source]
    try:
        from braceexpand import UnbalancedBracesError, braceexpand
    except ImportError:
        raise ClipcapError(
            f"'{source}' is a brace pattern, which needs the braceexpand package "
            "(pip install braceexpand)"
        ) from None
    depth = deepest = 0
    for char in source:
        depth += {"{": 1, "}": -1}.get(char, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_BRACE_DEPTH:
        raise ClipcapError(
            f"'{source}' nests its braces {deepest} deep, more than {MAX_BRACE_DEPTH}"
        )
    try:
        count = count_brace_names(source)
    except UnbalancedBracesError:
        return None
    if count > MAX_SHARD_NAMES:
        raise ClipcapError(
            f"'{source}' stands for {count:,} names, more than {MAX_SHARD_NAMES:,}: give a "
            "pattern of the shards that exist, or a directory of tars"
        )
    return list(braceexpand(source))


def count_brace_names(pattern: str) -> int:
    """How many names `braceexpand(pattern)` yields, computed without making them.

    The rules are braceexpand's own (its parser, step for step, with counts for strings):
    a pattern is the product of its parts, a `{a,b}` sequence the sum of its items, `{1..9..2}`
    and `{a..e}` ranges their lengths, and a brace group that is neither counts as its content.
    Raises braceexpand's `UnbalancedBracesError` for unbalanced braces.
    """
    from braceexpand import UnbalancedBracesError, alphabet, char_range_re, int_range_re

    def in_pattern(text: str) -> int:
        start = pos = depth = 0
        total = 1
        while pos < len(text):
            if text[pos] == "\\":
                pos += 2
                continue
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    inner = text[start + 1 : pos]
                    found = in_expression(inner)
                    total *= in_pattern(inner) if found is None else found
                    start = pos + 1
            if text[pos] == "{" and depth == 1:
                start = pos
            pos += 1
        if depth != 0:
            raise UnbalancedBracesError(f"Unbalanced braces: '{text}'")
        return total

    def in_expression(expr: str) -> int | None:
        match = int_range_re.match(expr)
        if match:
            first, last, step = match.groups()
            step = (int(step) or 1) if step else 1
            first, last = int(first), int(last)
            if first < last:
                return len(range(first, last + 1, step))
            return len(range(first, last - 1, -step))
        match = char_range_re.match(expr)
        if match:
            first, last, step = match.groups()
            step = (int(step) or 1) if step else 1
            first, last = alphabet.index(first), alphabet.index(last)
            if first < last:
                return len(alphabet[first : last + 1 : step])
            last = last or -len(alphabet)
            return len(alphabet[first : last - 1 : -step])
        return in_sequence(expr)

    def in_sequence(seq: str) -> int | None:
        start = pos = depth = 0
        items = []
        while pos < len(seq):
            if seq[pos] == "\\":
                pos += 2
                continue
            if seq[pos] == "{":
                depth += 1
            elif seq[pos] == "}":
                depth -= 1
            elif seq[pos] == "," and depth == 0:
                items.append(seq[start:pos])
                start = pos + 1
            pos += 1
        if depth != 0 or not items:
            return None
        items.append(seq[start:])
        return sum(in_pattern(item) for item in items)

    return in_pattern(pattern)


def shard_paths(source: str) -> list[Path]:
    """The tar shards a brace pattern, glob or directory names, in order; all must exist.

    A shard named twice (`'{a,a}.tar'`, or a link and its target) is refused: its samples would
    be extracted twice, under the same image ids.
    """
    directory = Path(source)
    if _is_dir(directory):
        shards = sorted(
            p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES)
        )
        if not shards:
            raise ClipcapError(f"{source} holds no tar shards (*.tar, *.tar.gz, *.tgz)")
        return _refuse_repeats(shards, source)
    return _refuse_repeats(pattern_paths(source, "tar shard", "shards"), source)


def pattern_paths(source: str, kind: str, kinds: str) -> list[Path]:
    """The files a brace pattern or glob (or one file name) names, in order; all must exist.

    `kind` and `kinds` name the files in errors: "tar shard" and "shards".
    """
    names = expand_braces(source)
    if names is None:
        raise ClipcapError(f"'{source}' is not a valid brace pattern: unbalanced braces")
    files, missing = [], []
    for name in names:
        if glob.has_magic(name):
            files.extend(Path(p) for p in sorted(glob.glob(name)) if Path(p).is_file())
        elif _is_file(Path(name)):
            files.append(Path(name))
        else:
            missing.append(name)
    if not files:
        raise ClipcapError(f"'{source}' matches no {kind} (no file {names[0]})")
    if missing:
        raise ClipcapError(
            f"{len(missing)} of {len(names)} {kinds} of '{source}' do not exist (first: "
            f"{missing[0]}); give a pattern that names only existing {kinds}"
        )
    return files


def _is_dir(path: Path) -> bool:
    """`Path.is_dir`, False for a name the system cannot even look up (too long, say)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _refuse_repeats(shards: list[Path], source: str) -> list[Path]:
    seen: dict[Path, Path] = {}
    for shard in shards:
        real = shard.resolve()
        if real in seen:
            raise ClipcapError(
                f"'{source}' names the shard {seen[real]} twice (again as {shard}): each tar "
                "may be given once"
            )
        seen[real] = shard
    return shards


def fingerprint_shards(shards: list[Path]) -> str:
    """A short hash of the shards' names and sizes: hashing terabytes of content is too slow."""
    digest = hashlib.sha256()
    for path in shards:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class Sample:
    """The members of one sample, as bytes, keyed by extension."""

    key: str
    shard: str  # the tar's file name
    members: dict[str, bytes] = field(default_factory=dict)
    failure: str | None = None  # why the rest of its tar could not be read
    error: str | None = None  # why this sample cannot be used (a member too large to read)

    def path(self) -> str:
        """`SHARD.tar/KEY.jpg` (or `SHARD.tar/KEY` with no image): how failures and the cache name it."""
        if not self.key:
            return self.shard
        extension = self.image_extension()
        return f"{self.shard}/{self.key}" + (f".{extension}" if extension else "")

    def image_extension(self) -> str | None:
        return next((e for e in self.members if e in _IMAGE_EXTENSIONS), None)


def read_samples(path: Path) -> Iterator[Sample]:
    """Stream the samples of one tar in order, reading only image, txt and json members.

    A tar that is not a tar, or that ends in the middle of a member, yields one last sample whose
    `failure` says so; the samples before it are complete.
    """
    wanted = (*_IMAGE_EXTENSIONS, "txt", "json")
    current: Sample | None = None
    try:
        # Seekable mode, not the stream mode ("r|*"): a stream skips a member by reading its
        # declared size in 10 kB blocks even past the end of the file, so a header claiming
        # terabytes took minutes; a seek takes no time, and a gzip seek stops at the end.
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by the `with tar` below)
    except (tarfile.TarError, EOFError, zlib.error):
        # Its message lists every compression tried, on several lines.
        yield Sample("", path.name, failure="not a tar file, or an empty or damaged one")
        return
    except OSError as e:
        yield Sample("", path.name, failure=f"cannot read the tar ({e.strerror or e})")
        return
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_AND_EXTENSION.match(member.name)
                if match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key, path.name)
                if extension in wanted and extension not in current.members:
                    limit = (
                        MAX_IMAGE_MEMBER_BYTES
                        if extension in _IMAGE_EXTENSIONS
                        else MAX_TEXT_MEMBER_BYTES
                    )
                    if member.size > limit:  # the header's size, before anything is read
                        current.error = current.error or (
                            f"member too large ({member.name}: {member.size:,} bytes, limit "
                            f"{limit:,})"
                        )
                        continue
                    current.members[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        message = " ".join((str(e) or type(e).__name__).split())
        failed = current or Sample("", path.name)
        failed.failure = f"truncated or corrupt tar ({message})"
        if failed.error is not None:  # both: the member that was too large comes first
            failed.failure = f"{failed.error}; {failed.failure}"
        yield failed
        return
    if current is not None:
        yield current


def parse_sample(sample: Sample, split_default: str) -> ImageRecord:
    """The sample's captions and split; raises `ImageLoadError` for an unreadable sidecar."""
    if sample.error is not None:
        raise ImageLoadError(sample.error)
    sidecar = {}
    if "json" in sample.members:
        try:
            sidecar = parse_json(sample.members["json"].decode("utf-8-sig"), f"{sample.key}.json")
        except UnicodeDecodeError:
            raise ImageLoadError(f"{sample.key}.json is not UTF-8 text") from None
        except ClipcapError as e:  # malformed, nested too deeply, a number too long
            raise ImageLoadError(str(e)) from None
        if not isinstance(sidecar, dict):
            raise ImageLoadError(f"{sample.key}.json is not a JSON object")
    if "captions" in sidecar:
        captions = sidecar["captions"]
        if not isinstance(captions, list):
            raise ImageLoadError(f"{sample.key}.json: 'captions' is not a list")
    elif "txt" in sample.members:
        try:
            captions = [sample.members["txt"].decode("utf-8-sig")]
        except UnicodeDecodeError:
            raise ImageLoadError(f"{sample.key}.txt is not UTF-8 text") from None
    else:
        captions = [sidecar["caption"]] if sidecar.get("caption") is not None else []
    if not all(isinstance(c, str) for c in captions):
        raise ImageLoadError(f"{sample.key}: a caption is not a string")
    split = str(sidecar.get("split", split_default)).strip().lower()
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ImageLoadError(f"{sample.key}.json has unknown split {sidecar['split']!r}")
    captions = [c.strip() for c in captions if c.strip()]
    return ImageRecord(image_id=sample.key, path=sample.path(), split=split, captions=captions)


class TarShardDataset(torch.utils.data.IterableDataset):
    """Decoded, preprocessed batches of tar shards, one shard after another in each worker.

    DataLoader workers share the shards out (worker w reads every W-th), and each yields
    `ShardBatch`es of at most `batch_size` images that belong to one shard; the last batch of a
    shard has `last=True`, even when it holds nothing, so the shard can be written.
    """

    def __init__(
        self,
        shards: list[tuple[int, Path]],  # (progress shard number, tar path)
        processor,
        batch_size: int,
        split: str = ALL,
        split_default: str = TRAIN,
        decoder=None,
    ):
        self.shards = shards
        self.processor = processor
        self.batch_size = batch_size
        self.split = split
        self.split_default = split_default
        # GPU decoding (`gpu_decode.WorkerDecoder`): JPEGs pass on as bytes, in `PendingPixels`.
        self.decoder = decoder

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = torch.utils.data.get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for number, path in shards:
            yield from self._batches(number, path)

    def _batches(self, number: int, path: Path) -> Iterator[ShardBatch]:
        batch = ShardBatch(number)
        pixels = []
        for sample in read_samples(path):
            if sample.failure is not None:
                batch.failures.append((sample.path(), sample.failure))
                break
            try:
                record = parse_sample(sample, self.split_default)
            except ImageLoadError as e:
                batch.failures.append((sample.path(), str(e)))
                continue
            if self.split != ALL and record.split != self.split:
                continue
            if not record.captions:
                batch.uncaptioned += 1
                continue
            extension = sample.image_extension()
            try:
                if extension is None:
                    raise ImageLoadError("no image in the sample")
                pixels.append(self._prepare(sample.members[extension]))
            except ImageLoadError as e:
                batch.failures.append((record.path, str(e)))
                continue
            batch.records.append(record)
            if len(pixels) == self.batch_size:
                batch.pixel_values = self._stack(pixels)
                yield batch
                batch, pixels = ShardBatch(number), []
        batch.pixel_values = self._stack(pixels) if pixels else None
        batch.last = True
        yield batch

    def _prepare(self, data: bytes):
        if self.decoder is not None:
            return self.decoder.from_bytes(data)
        image = decode_image(data)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def _stack(self, pixels: list):
        if self.decoder is not None:
            from clipcap_cache.extraction.gpu_decode import pending_pixels

            return pending_pixels(pixels)
        return torch.stack(pixels)
