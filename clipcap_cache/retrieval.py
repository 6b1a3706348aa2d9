"""Retrieval-augmented captioning (SmallCap, Ramos et al. 2023): a datastore of captions and search.

    clipcap embed-text data/coco.json --split train --out data/coco_text.h5
    clipcap train data/coco_vitb32.h5 --retrieval 4 --datastore data/coco_text.h5 --out runs/rag

A datastore is a text file made by `clipcap embed-text` (`text_embeddings.py`): the CLIP text
embeddings of some captions. `Datastore` holds them, L2-normalised, in a FAISS `IndexFlatIP`, so
that an inner product is a cosine; an image is looked up with its cached (or freshly encoded)
CLIP image embedding, normalised likewise. `Retriever` adds the prompt: the K retrieved captions,
joined by a separator and put into a template, SmallCap's by default,

    Similar images show {c1} || {c2} || {c3} || {c4} This image shows

which the language model reads after the visual prefix and before the caption. An image's own
captions are never retrieved where its id is known (in training, validation and `evaluate`):
the search asks for K more than the most captions any one image has in the datastore, drops those
of the query's image and keeps the best K.

FAISS (`faiss-cpu`) is an optional dependency, the `retrieval` extra, imported only here and only
when a datastore is opened.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcap_cache.data import cache as feature_cache
from clipcap_cache.errors import ClipcapError

log = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "Similar images show {captions} This image shows"
DEFAULT_SEPARATOR = " || "
PLACEHOLDER = "{captions}"
SEARCH_BLOCK = 4096  # queries searched at a time: the (block, K) scores stay small


def import_faiss():
    """The `faiss` module, or one line naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise ClipcapError(
            "retrieval needs the faiss-cpu package: pip install 'clipcap-cache[retrieval]'"
        ) from None
    return faiss


def check_template(template: str, option: str = "--retrieval-template") -> None:
    """Refuse a prompt template without exactly one `{captions}`, or with other braces."""
    rest = template.replace(PLACEHOLDER, "")
    if template.count(PLACEHOLDER) != 1 or "{" in rest or "}" in rest:
        raise ClipcapError(
            f"{option} must hold {PLACEHOLDER} exactly once and no other braces, not {template!r}"
        )


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) rows scaled to unit length, as contiguous float32 (what FAISS takes)."""
    rows = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.ascontiguousarray(rows / np.maximum(norms, 1e-12))


@dataclass
class Datastore:
    """The captions of a text file and a FAISS index of their normalised CLIP text embeddings."""

    path: Path
    attrs: dict  # the text file's attributes: clip_model, embedding_dim, source, ...
    texts: list[str]  # (M,) each entry's caption
    image_ids: np.ndarray  # (M,) of str: the image each caption describes, "" where unknown
    index: object  # faiss.IndexFlatIP over the M normalised embeddings
    most_per_image: int  # the most entries any one image id has: the search's margin

    @classmethod
    def open(cls, path: str | Path) -> "Datastore":
        """Read a text file from `clipcap embed-text` and index it; refuses any other file."""
        faiss = import_faiss()
        path = Path(path).resolve()
        found = feature_cache.read_cache(path)
        if not feature_cache.is_text(found.attrs):
            raise ClipcapError(
                f"{path} is a feature cache of images, not a datastore: make one with "
                "`clipcap embed-text`"
            )
        if not found.captions:
            raise ClipcapError(f"{path} holds no captions to retrieve")
        embeddings = normalized(found.embeddings)
        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(embeddings)
        image_ids = np.array(found.image_ids, dtype=str)
        known = image_ids[image_ids != ""]
        most = int(np.unique(known, return_counts=True)[1].max()) if len(known) else 0
        log.info("datastore %s: %d captions", path, len(found.captions))
        return cls(path, found.attrs, found.captions, image_ids, index, most)

    @property
    def clip_model(self) -> str | None:
        return feature_cache.recorded_clip_model(self.attrs)

    @property
    def embedding_dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return len(self.texts)

    def search(
        self, embeddings: np.ndarray, k: int, image_ids: list[str] | None = None
    ) -> np.ndarray:
        """The K nearest entries (N, K) of each query embedding (N, D), best first.

        With `image_ids` (one per query), the entries of the query's own image are skipped:
        FAISS is asked for K + `most_per_image` neighbours, so K remain after the skip.
        """
        wanted = k + (self.most_per_image if image_ids is not None else 0)
        wanted = min(wanted, len(self))
        if k > len(self):
            raise ClipcapError(f"{self.path} holds {len(self)} captions, fewer than K={k}")
        queries = normalized(embeddings)
        found = np.zeros((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), SEARCH_BLOCK):
            _, neighbours = self.index.search(queries[start : start + SEARCH_BLOCK], wanted)
            for j, row in enumerate(neighbours):
                query = start + j
                if image_ids is not None and image_ids[query]:
                    row = row[self.image_ids[row] != image_ids[query]]
                if len(row) < k:
                    raise ClipcapError(
                        f"{self.path}: fewer than K={k} captions of other images for "
                        f"image {image_ids[query]}"
                    )
                found[query] = row[:k]
        return found

    def captions(self, neighbours: np.ndarray) -> list[list[str]]:
        """The texts of `search`'s result (N, K)."""
        return [[self.texts[i] for i in row] for row in neighbours.tolist()]


@dataclass(frozen=True)
class RetrievalSettings:
    """How a retrieval-augmented model builds its prompt; recorded in its checkpoint."""

    k: int  # captions retrieved per image
    template: str  # holds {captions} once
    separator: str  # between the retrieved captions
    datastore: str  # the text file it was trained with (absolute)

    @classmethod
    def from_checkpoint(cls, config: dict) -> "RetrievalSettings | None":
        """The settings a checkpoint's config.json records, or None for a plain model."""
        found = config.get("retrieval")
        if found is None:
            return None
        try:
            settings = cls(**found)
        except TypeError as e:
            raise ClipcapError(f"the checkpoint's 'retrieval' section is malformed ({e})") from None
        check_template(settings.template, "the checkpoint's retrieval template")
        return settings


class Retriever:
    """A datastore, its prompt settings and the GPT-2 tokenizer: prompts for images."""

    def __init__(self, datastore: Datastore, settings: RetrievalSettings, tokenizer):
        self.datastore = datastore
        self.settings = settings
        self.tokenizer = tokenizer

    def retrieve(self, embeddings, image_ids: list[str] | None = None) -> list[list[str]]:
        """The K captions retrieved for each image embedding (N, D), best first."""
        neighbours = self.datastore.search(np.asarray(embeddings), self.settings.k, image_ids)
        return self.datastore.captions(neighbours)

    def prompt_text(self, captions: list[str]) -> str:
        """The template filled with some retrieved captions."""
        joined = self.settings.separator.join(captions)
        return self.settings.template.replace(PLACEHOLDER, joined)

    def prompt_ids(self, retrieved: list[list[str]]) -> list[list[int]]:
        """Each image's prompt as GPT-2 token ids (no special tokens)."""
        if not retrieved:
            return []
        texts = [self.prompt_text(captions) for captions in retrieved]
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)[
            "input_ids"
        ]


def check_datastore(datastore: Datastore, expected: dict, trained: str) -> None:
    """Refuse a datastore of another CLIP model, width or CLIP weights than `expected` records.

    The one compatibility check of embeddings (`checkpoint.check_clip_match`), applied to text.
    """
    from clipcap_cache.checkpoint import check_clip_match

    check_clip_match(
        expected,
        datastore.clip_model,
        datastore.embedding_dim,
        f"the datastore {datastore.path}",
        trained,
        feature_cache.recorded_clip_fingerprint(datastore.attrs),
    )
