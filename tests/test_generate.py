import pytest
import torch

from clipcap_cache.cache import read_cache
from clipcap_cache.checkpoint import load_checkpoint
from clipcap_cache.errors import ClipcapError
from clipcap_cache.generate import DecodeConfig, generate_captions


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    model, tokenizer, _ = load_checkpoint(trained_run)
    return model, tokenizer


@pytest.mark.parametrize(
    "decode",
    [
        DecodeConfig(strategy="greedy"),
        DecodeConfig(strategy="beam", beams=4, num_captions=3),
        DecodeConfig(strategy="sample", num_captions=2, top_p=0.8, temperature=0.7, seed=5),
    ],
)
def test_each_mode_gives_the_requested_number_of_captions(
    model_and_tokenizer, shapes_cache, decode
):
    model, tokenizer = model_and_tokenizer
    embeddings = torch.from_numpy(read_cache(shapes_cache).embeddings[:5])
    captions = generate_captions(model, tokenizer, embeddings, decode, batch_size=2)
    assert len(captions) == 5 and all(len(c) == decode.num_captions for c in captions)
    assert all(isinstance(t, str) for c in captions for t in c)
    assert sum(bool(t) for c in captions for t in c) >= 4


def test_sampling_is_reproducible_with_a_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    embeddings = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    decode = DecodeConfig(strategy="sample", num_captions=2, temperature=1.5, seed=11)
    assert generate_captions(model, tokenizer, embeddings, decode) == generate_captions(
        model, tokenizer, embeddings, decode
    )


def plain_greedy(model, tokenizer, embeddings, max_tokens):
    """Re-run GPT-2 over the whole sequence at every step: no KV cache, no generate()."""
    captions = []
    with torch.no_grad():
        for embedding in embeddings:
            sequence = model.prefix_embeddings(embedding[None])  # (1, K, H)
            tokens = []
            for _ in range(max_tokens):
                logits = model.gpt2(inputs_embeds=sequence).logits[0, -1]
                token = int(logits.argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                sequence = torch.cat(
                    [sequence, model.gpt2.transformer.wte.weight[token][None, None]], 1
                )
            captions.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return captions


def test_greedy_with_kv_cache_equals_a_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    embeddings = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    fast = generate_captions(
        model, tokenizer, embeddings, DecodeConfig(strategy="greedy", max_tokens=12)
    )
    assert [c[0] for c in fast] == plain_greedy(model, tokenizer, embeddings, 12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="beam", beams=2, num_captions=3),
        dict(strategy="greedy", num_captions=2),
        dict(strategy="nucleus"),
        dict(strategy="sample", top_p=0.0),
    ],
)
def test_impossible_decoding_options_are_refused(kwargs):
    with pytest.raises(ClipcapError):
        DecodeConfig(**kwargs)


def test_captions_are_single_clean_lines():
    from clipcap_cache.generate import clean_caption

    assert clean_caption(" a\r\nred\tcircle\x03 ") == "a red circle"
