"""Tokenized captions, cached beside the feature cache so that training tokenizes them once.

    data/coco_vitb32.h5                           the feature cache
    data/coco_vitb32.h5.tokens-3f9c0a1b2c4d5e6f.h5  its captions tokenized by one tokenizer

The name holds a hash of the tokenizer (its full definition, not its name) and of the caption
length limit, so two tokenizers never share a file. The file records which feature cache it was
made from (size, modification time, caption count) and is made again when that changes. Like the
feature cache it is written under a temporary name and renamed, and training memory-maps it, so
the processes of a node share one copy of the tokens.

Layout:

    /token_ids  [T]    uint16 (int32 for vocabularies over 65,536): every caption's tokens, cut
                       to the limit, each followed by EOS, all concatenated
    /offsets    [M+1]  int64: caption m is token_ids[offsets[m]:offsets[m+1]]
    attributes: tokenizer_hash, max_tokens, eos_token_id, truncated, content_hash (of both
                datasets' bytes), and the feature cache's features_size, features_mtime_ns and
                captions

A file is used only when its attributes match and its contents check out: the content hash,
offsets that start at 0, never fall and end at the number of tokens, every caption ending in
EOS and every id inside the vocabulary. Anything else (a corrupted or edited file) is made again.
"""

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from clipcap_cache import distributed
from clipcap_cache.data.cache import MappedCache, map_dataset
from clipcap_cache.files import atomic_path

log = logging.getLogger(__name__)
CHUNK = 8192  # captions read and tokenized at a time


@dataclass
class TokenTable:
    """Every caption of a cache as token ids, EOS appended; memory-mapped when read from disk."""

    token_ids: np.ndarray  # (T,) unsigned 16-bit or 32-bit ids
    offsets: np.ndarray  # (M+1,) int64
    truncated: int  # captions cut to the limit


def tokenizer_hash(tokenizer, max_tokens: int) -> str:
    """A short hash of everything that decides the token ids: the tokenizer and the limit."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab()))
    digest.update(definition.encode())
    digest.update(f"\neos={tokenizer.eos_token_id} max_tokens={max_tokens}".encode())
    return digest.hexdigest()[:16]


def token_table_path(cache: MappedCache, tokenizer, max_tokens: int) -> Path:
    key = tokenizer_hash(tokenizer, max_tokens)
    return cache.path.with_name(f"{cache.path.name}.tokens-{key}.h5")


def load_token_table(cache: MappedCache, tokenizer, max_tokens: int) -> TokenTable:
    """The cache's captions tokenized: mapped from the file beside it, made first if needed.

    Under torchrun the main process makes the file while the others wait, then all map it. Where
    the cache's folder is read-only, the tokens are made in memory instead, with a warning.
    """
    path = token_table_path(cache, tokenizer, max_tokens)
    source = _source_of(cache)
    expected = Expected(eos=int(tokenizer.eos_token_id), vocab=len(tokenizer))
    table = None
    if distributed.is_main_process() and _read(path, source, expected) is None:
        table = tokenize(tokenizer, cache, max_tokens)
        try:
            _write(path, table, source, tokenizer, max_tokens)
            log.info("tokenized captions cached in %s", path)
        except OSError as e:
            log.warning("cannot cache tokenized captions beside the features (%s)", e)
    distributed.barrier()
    found = _read(path, source, expected)
    if found is not None:
        return found
    return table if table is not None else tokenize(tokenizer, cache, max_tokens)


def tokenize(tokenizer, cache: MappedCache, max_tokens: int) -> TokenTable:
    """Tokenize every caption of a cache, a chunk at a time, into one flat array.

    The tokenizer's per-caption Python objects, and the caption strings, never exist for more
    than one chunk.
    """
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    total = len(cache.caption_image_index)
    token_chunks, length_chunks, truncated = [], [], 0
    for start in range(0, total, CHUNK):
        encoded = tokenizer(
            cache.captions(start, start + CHUNK),
            add_special_tokens=False,
            return_attention_mask=False,
        )["input_ids"]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        truncated += int((lengths > max_tokens).sum())
        token_chunks.append(
            np.fromiter(
                itertools.chain.from_iterable(ids[:max_tokens] + [eos] for ids in encoded),
                dtype,
            )
        )
        length_chunks.append(np.minimum(lengths, max_tokens) + 1)
    lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, np.int64)
    return TokenTable(
        token_ids=np.concatenate(token_chunks) if token_chunks else np.zeros(0, dtype),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        truncated=truncated,
    )


def _source_of(cache: MappedCache) -> dict:
    """What identifies the feature cache a token file was made from."""
    stat = cache.path.stat()
    return {
        "features_size": stat.st_size,
        "features_mtime_ns": stat.st_mtime_ns,
        "captions": len(cache.caption_image_index),
    }


@dataclass(frozen=True)
class Expected:
    """What a token file's contents must agree with: the tokenizer's EOS and vocabulary size."""

    eos: int
    vocab: int


def content_hash(token_ids: np.ndarray, offsets: np.ndarray) -> str:
    """A hash of a token table's two arrays, recorded in the file and checked when it is read."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (token_ids, offsets):
        for start in range(0, len(array), HASH_BLOCK):
            digest.update(np.ascontiguousarray(array[start : start + HASH_BLOCK]).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


HASH_BLOCK = 1 << 22  # elements hashed at a time


def _read(path: Path, source: dict, expected: Expected) -> TokenTable | None:
    """The token file mapped, or None if it is missing, unreadable, from another cache or bad."""
    try:
        with h5py.File(path, "r") as f:
            if any(f.attrs.get(k) != v for k, v in source.items()):
                return None
            if f.attrs.get("eos_token_id") != expected.eos:
                return None
            offsets = map_dataset(path, f["offsets"])
            if len(offsets) != source["captions"] + 1:
                return None
            table = TokenTable(
                token_ids=map_dataset(path, f["token_ids"]),
                offsets=offsets,
                truncated=int(f.attrs["truncated"]),
            )
            recorded = f.attrs.get("content_hash")
    except (OSError, KeyError, TypeError, ValueError):
        return None
    problem = _problem(table, expected, recorded)
    if problem is not None:
        log.warning("%s: %s; tokenizing the captions again", path, problem)
        return None
    return table


def _problem(table: TokenTable, expected: Expected, recorded) -> str | None:
    """What is wrong with a token table's contents, or None."""
    ids, offsets = table.token_ids, table.offsets
    if recorded is None:
        return "no content hash (made by an earlier version)"
    if content_hash(ids, offsets) != recorded:
        return "its contents do not match their recorded hash"
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids):
        return "its offsets do not span its tokens"
    if np.any(np.diff(offsets) < 1):
        return "its offsets are not increasing"
    if len(ids) and int(ids.max()) >= expected.vocab:
        return f"a token id is beyond the vocabulary of {expected.vocab}"
    if len(ids) and not np.all(ids[offsets[1:] - 1] == expected.eos):
        return "a caption does not end with EOS"
    return None


def _write(path: Path, table: TokenTable, source: dict, tokenizer, max_tokens: int) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("token_ids", data=table.token_ids)
        f.create_dataset("offsets", data=table.offsets)
        for name, value in source.items():
            f.attrs[name] = value
        f.attrs["tokenizer_hash"] = tokenizer_hash(tokenizer, max_tokens)
        f.attrs["max_tokens"] = max_tokens
        f.attrs["eos_token_id"] = int(tokenizer.eos_token_id)
        f.attrs["truncated"] = table.truncated
        f.attrs["content_hash"] = content_hash(table.token_ids, table.offsets)
