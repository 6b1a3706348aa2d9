"""Training batches: a cache's captions, tokenized and memory-mapped, and their image embeddings."""

from dataclasses import dataclass

import numpy as np
import torch

from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data import tokens
from clipcap_cache.model import IGNORE_INDEX


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

    def __len__(self) -> int:
        return len(self.captions)

    def count_tokens(self, samples: np.ndarray) -> int:
        """Labelled tokens (caption tokens plus EOS) of some samples."""
        m = self.captions[samples]
        return int((self.offsets[m + 1] - self.offsets[m]).sum())

    def batch(self, samples: np.ndarray, pad_id: int):
        """Embeddings (B, D) and right-padded input_ids, labels (B, T) of some samples."""
        m = self.captions[samples]
        lengths = self.offsets[m + 1] - self.offsets[m]
        input_ids = np.full((len(m), int(lengths.max())), pad_id, dtype=np.int64)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        for j, (start, n) in enumerate(zip(self.offsets[m], lengths, strict=True)):
            tokens = self.token_ids[start : start + n]
            input_ids[j, :n] = tokens
            labels[j, :n] = tokens
        embeddings = torch.from_numpy(np.asarray(self.embeddings[self.caption_rows[m]]))
        return embeddings.float(), torch.from_numpy(input_ids), torch.from_numpy(labels)


def caption_data(
    cache: feature_cache.MappedCache, rows: np.ndarray, tokenizer, max_tokens: int
) -> tuple[CaptionData, int]:
    """The captions of some rows of a cache, and how many of the cache's captions were cut."""
    table = tokens.load_token_table(cache, tokenizer, max_tokens)
    data = CaptionData(
        embeddings=cache.embeddings,
        token_ids=table.token_ids,
        offsets=table.offsets,
        caption_rows=cache.caption_image_index,
        captions=cache.captions_of_rows(rows),
    )
    return data, table.truncated
