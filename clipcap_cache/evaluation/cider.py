"""CIDEr-D, fast enough to be a training reward, equal to pycocoevalcap's `Cider` on the same input.

    scorer = CiderD(train_references)            # document frequencies, computed once
    scorer.score(candidates, references)         # one score per candidate, numpy array

CIDEr-D (Vedantam et al., 2015, "CIDEr: Consensus-based Image Description Evaluation") compares a
caption's TF-IDF weighted n-grams (n = 1..4) with each reference's by cosine similarity, with the
candidate's weights clipped at the reference's, a Gaussian penalty on the length difference
(sigma = 6), the mean over n and references, and a scale of 10. This module reproduces the
computation of pycocoevalcap's `CiderScorer` exactly, quirks included: the length it penalises is
the number of bigrams, and IDF is log(images) - log(max(1, document frequency)).

Unlike pycocoevalcap, the document frequencies come from a fixed corpus (the training split's
references), as self-critical training needs, and captions are tokenized in Python by
`ptb_tokenize`, which follows the PTB tokenizer that COCO evaluation runs in Java: lower case,
clitics split off (`do n't`, `man 's`), brackets as `-lrb-` and so on, punctuation removed.
Evaluation itself keeps using pycocoevalcap.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

ORDER = 4  # n-grams of 1..4 words
SIGMA = 6.0  # width of the length penalty

# Tokens that COCO evaluation's PTB tokenizer drops (pycocoevalcap's list, plus the bare quote
# that Java's tokenizer turns into `` or '').
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(
    r"-[lr][rsc]b-"  # brackets, already renamed
    r"|n't|'(?:s|d|ll|m|ve)\b"  # clitics
    r"|\d+(?:[.:,/]\d+)+"  # 3.5, 6:30, 1,000
    r"|[^\W_]+(?:-[^\W_]+)*"  # words, hyphenated ones whole
    r"|\.\.\.|--|``|''"
    r"|\S"  # anything else, one character at a time
)


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens without punctuation, as COCO evaluation tokenizes captions."""
    text = text.lower()
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"n't\b", " n't", text)  # do n't, ca n't, wo n't
    text = re.sub(r"'re\b", " re", text)  # the PTB tokenizer leaves "re" of you're
    return [t for t in _TOKEN.findall(text) if t not in _PUNCTUATION]


def ngrams(tokens: list[str], order: int = ORDER) -> Counter:
    """Counts of every n-gram of 1..order tokens, as tuples."""
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1)
    )


@dataclass
class _Vector:
    """A caption's TF-IDF vector over n-gram ids, sorted by id."""

    ids: np.ndarray  # (G,) int64
    weights: np.ndarray  # (G,) float64
    orders: np.ndarray  # (G,) int64, n - 1 of each n-gram
    norms: np.ndarray  # (ORDER,) the vector's length per n
    length: int  # bigram count: pycocoevalcap's "length" (it counts n-grams with n == 2)


class CiderD:
    """CIDEr-D with document frequencies from a fixed corpus of references."""

    def __init__(self, corpus: list[list[str]], sigma: float = SIGMA):
        self.sigma = sigma
        self.ids: dict[tuple, int] = {}
        self.document_frequency: Counter = Counter()
        for references in corpus:
            seen = set()
            for reference in references:
                seen.update(ngrams(ptb_tokenize(reference)))
            self.document_frequency.update(seen)
        self.log_images = math.log(float(len(corpus)))
        self._references: dict[str, _Vector] = {}

    def score(self, candidates: list[str], references: list[list[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its own references (one list per candidate)."""
        scores = np.zeros(len(candidates))
        for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            hypothesis = self._vector(ptb_tokenize(candidate))
            total = np.zeros(ORDER)
            for reference in refs:
                total += self._similarity(hypothesis, self._reference(reference))
            scores[i] = total.mean() / len(refs) * 10.0
        return scores

    def _reference(self, text: str) -> _Vector:
        """A reference's vector, kept: in training every image's references recur each epoch."""
        found = self._references.get(text)
        if found is None:
            found = self._references[text] = self._vector(ptb_tokenize(text))
        return found

    def _vector(self, tokens: list[str]) -> _Vector:
        counts = ngrams(tokens)
        ids = np.fromiter((self._id(g) for g in counts), np.int64, len(counts))
        orders = np.fromiter((len(g) - 1 for g in counts), np.int64, len(counts))
        frequency = np.fromiter(counts.values(), np.float64, len(counts))
        document = np.fromiter(
            (self.document_frequency.get(g, 0) for g in counts), np.float64, len(counts)
        )
        weights = frequency * (self.log_images - np.log(np.maximum(1.0, document)))
        norms = np.sqrt(np.bincount(orders, weights**2, minlength=ORDER))
        length = int(frequency[orders == 1].sum())
        order = np.argsort(ids)
        return _Vector(ids[order], weights[order], orders[order], norms, length)

    def _id(self, gram: tuple) -> int:
        found = self.ids.get(gram)
        if found is None:
            found = self.ids[gram] = len(self.ids)
        return found

    def _similarity(self, hypothesis: _Vector, reference: _Vector) -> np.ndarray:
        """Per n: the clipped cosine of two vectors, times the length penalty."""
        _, h, r = np.intersect1d(
            hypothesis.ids, reference.ids, assume_unique=True, return_indices=True
        )
        overlap = np.minimum(hypothesis.weights[h], reference.weights[r]) * reference.weights[r]
        value = np.bincount(hypothesis.orders[h], overlap, minlength=ORDER).astype(np.float64)
        both = (hypothesis.norms != 0) & (reference.norms != 0)
        value[both] /= hypothesis.norms[both] * reference.norms[both]
        delta = float(hypothesis.length - reference.length)
        return value * math.exp(-(delta**2) / (2 * self.sigma**2))
