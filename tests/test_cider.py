"""The fast CIDEr-D against pycocoevalcap, the reference implementation COCO evaluation uses."""

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from clipcap_cache.evaluation.cider import CiderD, ptb_tokenize
from clipcap_cache.evaluation.metrics import java_available

needs_java = pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs Java")

REFERENCES = [
    [
        "A man's dog, running on the beach.",
        "A dog runs along the sandy beach near the water!",
        "The brown dog is running on a beach",
        "Dog running on the shore; waves behind it.",
    ],
    [
        "Two people don't like the black-and-white TV.",
        "Two men watching an old black-and-white television set",
        "People can't stop looking at the TV (it's old).",
    ],
    [
        "A cat sitting on a 'red' couch...",
        "A CAT SLEEPS ON THE RED SOFA",
        'The cat is on a "comfy" red couch in the living room',
        "A grey cat lying on a couch -- near a lamp.",
        "cat on couch",
    ],
    [
        "The kids' toys are on the floor; it's messy?",
        "Children's toys scattered across a wooden floor.",
        "Many toys on the floor of a kid's room",
    ],
    [
        "An airplane flying over the city at 6:30pm",
        "A jet plane flies above tall buildings.",
        "A large airplane in the sky over a city",
    ],
]
CANDIDATES = [
    "a dog running on the beach",
    "Two people watching a black-and-white TV!",
    "A cat on a red couch.",
    "toys on the floor",
    "a plane over a city, in the sky",
]


def ptb(texts_by_key: dict) -> dict:
    return PTBTokenizer().tokenize(
        {key: [{"caption": t} for t in texts] for key, texts in texts_by_key.items()}
    )


@needs_java
def test_tokenizer_matches_the_ptb_tokenizer():
    texts = [t for refs in REFERENCES for t in refs] + CANDIDATES
    java = ptb({i: [t] for i, t in enumerate(texts)})
    assert [" ".join(ptb_tokenize(t)) for t in texts] == [java[i][0] for i in range(len(texts))]


@needs_java
def test_cider_d_equals_pycocoevalcap_given_the_same_document_frequencies():
    gts = ptb(dict(enumerate(REFERENCES)))
    res = ptb({i: [c] for i, c in enumerate(CANDIDATES)})
    _, expected = Cider().compute_score(gts, res)
    # pycocoevalcap takes the document frequencies from the references it scores against.
    ours = CiderD(REFERENCES).score(CANDIDATES, REFERENCES)
    assert ours == pytest.approx(expected, abs=1e-6, rel=1e-9)
    # Unrelated text scores zero; a candidate that is one of the references scores high.
    found = CiderD(REFERENCES).score(["a bowl of soup", REFERENCES[0][2]], REFERENCES[:2][::-1])
    assert found[0] == 0 and found[1] > 2


# Candidates that exercise CIDEr-D's clipping of repeated n-grams and its length penalty.
HARD_CANDIDATES = [
    "dog dog dog dog running running on the beach beach beach",
    "TV",
    "a grey cat sitting on a red couch in the living room near a lamp on a rainy day "
    "while the people watch an old television set",
    "toys, toys and more toys on a wooden floor of a kid's room",
    "An airplane flying over the city at 6:30pm",
]


@pytest.mark.parametrize("candidates", [CANDIDATES, HARD_CANDIDATES], ids=["plain", "hard"])
def test_cider_d_equals_pycocoevalcap_on_our_tokens(candidates):
    # pycocoevalcap's Cider splits its input at spaces and does nothing else, so our PTB tokens,
    # joined by spaces, give it the input its Java tokenizer would: parity without Java.
    def tokens(text):
        return " ".join(ptb_tokenize(text))

    gts = {i: [tokens(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [tokens(c)] for i, c in enumerate(candidates)}
    _, expected = Cider().compute_score(gts, res)
    ours = CiderD(REFERENCES).score(candidates, REFERENCES)
    assert ours == pytest.approx(expected, abs=1e-6, rel=1e-9)
    assert len(set(ours.round(6))) == len(candidates)  # no two alike: a mix-up would show


def test_document_frequencies_come_from_the_corpus_given():
    # The same caption scores higher where its n-grams are rare in the corpus.
    candidate, references = ["a red bus on a street"], [["a red bus on a city street"]]
    rare = CiderD([["a red bus on a city street"], ["a cat"], ["a dog"], ["a bird"]])
    common = CiderD([["a red bus on a city street"], ["a red bus"], ["a red bus"], ["a bus"]])
    assert rare.score(candidate, references)[0] > common.score(candidate, references)[0] > 0
    assert rare.score(["a cat"], [["a red bus on a city street"]])[0] == 0
