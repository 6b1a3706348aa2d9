"""Training batches: a cache's captions, tokenized and memory-mapped, and their image embeddings.

With retrieval (`--retrieval K`), each image also has a prompt, the K captions retrieved for it
(`retrieval.Retriever`), put before each of its captions with no label: the loss is on the
target caption alone.

`MappedFiles` watches the files training maps: one changed in place while mapped (a copy over
the cache, a truncated token file) is found at the next read-back of the loss, and stops the run
with one line, before its pages are read as garbage or a read past the new end kills the process
with a bus error.
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data import tokens
from clipcap_cache.model import IGNORE_INDEX
from clipcap_cache.retrieval import Retriever


@dataclass
class Prompts:
    """The retrieval prompt of some cache rows, as token ids, and the captions it holds."""

    token_ids: list[np.ndarray]  # (P_n,) the prompt of each cache row; empty for rows not used
    retrieved: dict[int, list[str]]  # the captions retrieved for each row that has a prompt

    @property
    def longest(self) -> int:
        return max((len(p) for p in self.token_ids), default=0)


def retrieval_prompts(
    retriever: Retriever, cache: feature_cache.MappedCache, rows: np.ndarray
) -> Prompts:
    """Retrieve for some rows of a cache, their own image's captions skipped, and tokenize."""
    retrieved = retriever.retrieve(cache.embeddings[rows], cache.image_ids_of(rows))
    token_ids = [np.zeros(0, dtype=np.int64)] * cache.num_images
    for row, ids in zip(rows.tolist(), retriever.prompt_ids(retrieved), strict=True):
        token_ids[row] = np.asarray(ids, dtype=np.int64)
    return Prompts(token_ids, dict(zip(rows.tolist(), retrieved, strict=True)))


@dataclass
class CaptionData:
    """Some captions of a cache, tokenized, and the embeddings of their images.

    The arrays span the whole cache and are memory-mapped in training (`cache.open_cache`,
    `tokens.load_token_table`); `captions` picks the ones this set uses. A sample is a position
    in `captions`.
    """

    embeddings: np.ndarray  # (N, D) every row of the cache, as stored (float16 by default)
    token_ids: np.ndarray  # (T,) every caption's tokens, EOS included, concatenated
    offsets: np.ndarray  # (M+1,) caption m is token_ids[offsets[m]:offsets[m+1]]
    caption_rows: np.ndarray  # (M,) embedding row of each caption
    captions: np.ndarray  # (C,) the captions of this set, as indices into the M
    prompts: Prompts | None = None  # with retrieval: each row's prompt, put before its captions

    def __len__(self) -> int:
        return len(self.captions)

    def count_tokens(self, samples: np.ndarray) -> int:
        """Labelled tokens (caption tokens plus EOS) of some samples."""
        m = self.captions[samples]
        return int((self.offsets[m + 1] - self.offsets[m]).sum())

    def batch(self, samples: np.ndarray, pad_id: int):
        """Embeddings (B, D) and right-padded input_ids, labels (B, T) of some samples.

        With prompts, a sample's input_ids are its image's prompt, then its caption; only the
        caption (and EOS) is labelled.
        """
        m = self.captions[samples]
        lengths = self.offsets[m + 1] - self.offsets[m]
        rows = self.caption_rows[m]
        prompts = [
            self.prompts.token_ids[r] if self.prompts is not None else np.zeros(0, np.int64)
            for r in rows.tolist()
        ]
        width = max(len(p) + int(n) for p, n in zip(prompts, lengths, strict=True))
        input_ids = np.full((len(m), width), pad_id, dtype=np.int64)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        for j, (start, n) in enumerate(zip(self.offsets[m], lengths, strict=True)):
            tokens = self.token_ids[start : start + n]
            p = len(prompts[j])
            input_ids[j, :p] = prompts[j]
            input_ids[j, p : p + n] = tokens
            labels[j, p : p + n] = tokens
        embeddings = torch.from_numpy(np.asarray(self.embeddings[self.caption_rows[m]]))
        return embeddings.float(), torch.from_numpy(input_ids), torch.from_numpy(labels)


def caption_data(
    cache: feature_cache.MappedCache,
    rows: np.ndarray,
    tokenizer,
    max_tokens: int,
    retriever: Retriever | None = None,
) -> tuple[CaptionData, int]:
    """The captions of some rows of a cache, and how many of the cache's captions were cut.

    With a `retriever`, every row gets its retrieval prompt.
    """
    table = tokens.load_token_table(cache, tokenizer, max_tokens)
    data = CaptionData(
        embeddings=cache.embeddings,
        token_ids=table.token_ids,
        offsets=table.offsets,
        caption_rows=cache.caption_image_index,
        captions=cache.captions_of_rows(rows),
        prompts=retrieval_prompts(retriever, cache, rows) if retriever is not None else None,
    )
    return data, table.truncated


@dataclass
class MappedFiles:
    """The files behind some memory-mapped arrays, each held open to notice a change in place.

    Each file is kept open, so its own inode is watched: a file replaced by a rename, or deleted,
    leaves the mapping (and this watch) on the old one, which is harmless. A write or a truncation
    of the mapped file itself changes its size or modification time.
    """

    files: dict[str, tuple[int, tuple[int, int]]] = field(default_factory=dict)  # fd, stat

    @classmethod
    def of(cls, *arrays) -> "MappedFiles":
        """Watch the file of every `np.memmap` among `arrays` (in-memory arrays are skipped)."""
        watched = cls()
        for array in arrays:
            name = getattr(array, "filename", None)
            if isinstance(array, np.memmap) and name and name not in watched.files:
                fd = os.open(name, os.O_RDONLY)
                watched.files[name] = (fd, _stamp(os.fstat(fd)))
        return watched

    def changed(self) -> str | None:
        """The first watched file that changed since it was opened, or None."""
        for name, (fd, stamp) in self.files.items():
            if _stamp(os.fstat(fd)) != stamp:
                return name
        return None

    def close(self) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files = {}


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns
