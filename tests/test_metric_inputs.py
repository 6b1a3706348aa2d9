"""Caption text that would shift the COCO tokenizer's lines is scored as its words say."""

import pytest

from clipcap_cache.evaluation.metrics import coco_tokenize, java_available

pytestmark = pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs Java")


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize("separator", ["\r", "\r\n", "\f", "\v", "\u2028", "\u2029", "\x85"])
def test_a_line_break_inside_a_caption_stays_with_its_image(separator):
    captions = {
        "1": [f"a red{separator}circle on blue", "a round red shape"],
        "2": ["a green square"],
        "3": ["a yellow triangle on black"],
    }
    tokens = coco_tokenize(captions)
    assert tokens == {
        "1": ["a red circle on blue", "a round red shape"],
        "2": ["a green square"],
        "3": ["a yellow triangle on black"],
    }
