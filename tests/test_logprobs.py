"""Token log-probabilities in chunks (`model.chunked_log_probs`) against the full logits."""

import pytest
import torch
import torch.nn.functional as F

from clipcap_cache.model import ClipCaptionModel, ModelConfig, build_model, chunked_log_probs


def full_logits_log_probs(model: ClipCaptionModel, prefix, tokens):
    """The computation chunking replaces: all (B, T, V) float32 logits at once."""
    k = prefix.shape[1]
    embeds = torch.cat([prefix, model.gpt2.transformer.wte(tokens).to(prefix.dtype)], dim=1)
    hidden = model.gpt2.transformer(inputs_embeds=embeds).last_hidden_state
    logits = model.gpt2.lm_head(hidden[:, k - 1 : -1]).float()  # (B, T, V)
    return F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def model(gpt2_no_dropout_dir):
    torch.manual_seed(0)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_no_dropout_dir), clip_embedding_dim=16))
    return model.train()


def values_and_grads(model, compute, embeddings, tokens, weights):
    model.zero_grad(set_to_none=True)
    prefix = model.prefix_embeddings(embeddings)
    log_probs = compute(model, prefix, tokens)
    (log_probs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return log_probs.detach(), grads


@pytest.mark.parametrize("unfreeze_head", [False, True])
def test_chunked_log_probs_and_gradients_equal_the_full_logits(model, unfreeze_head, monkeypatch):
    if unfreeze_head:  # the head (tied to the token embeddings) gets a gradient too
        model.gpt2.requires_grad_(True)
    vocab = model.gpt2.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(6, 16, generator=generator)
    tokens = torch.randint(0, vocab, (6, 9), generator=generator)
    weights = torch.randn(6, 9, generator=generator)
    # Chunks of 5 rows: 54 rows in 11 chunks, the last one short.
    monkeypatch.setattr("clipcap_cache.model.LOG_PROB_CHUNK_ELEMENTS", 5 * vocab)
    reference, reference_grads = values_and_grads(
        model, full_logits_log_probs, embeddings, tokens, weights
    )
    chunked, grads = values_and_grads(
        model, lambda m, p, t: m.token_log_probs(p, t), embeddings, tokens, weights
    )
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-6)
    assert set(grads) == set(reference_grads)
    assert ("gpt2.transformer.wte.weight" in grads) == unfreeze_head  # lm_head is tied to it
    for name, grad in grads.items():
        # A parameter's gradient sums over the chunks in another order: float rounding of a
        # sum of 54 rows (1.6e-6 of 0.016 measured).
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6)
        assert grad.abs().max() > 0, name


def test_chunk_sizes_change_nothing_but_rounding():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8)
    tokens = torch.randint(0, 50, (3, 7))
    whole = chunked_log_probs(head, hidden, tokens, chunk_elements=10**9)
    expected = F.log_softmax(head(hidden), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    for elements in (1, 50, 149, 1000):  # one row a chunk (at least), and uneven splits
        torch.testing.assert_close(
            chunked_log_probs(head, hidden, tokens, elements), whole, rtol=0, atol=1e-6
        )
    with torch.no_grad():  # no graph, no checkpoint: the same values
        torch.testing.assert_close(chunked_log_probs(head, hidden, tokens, 50), whole)


def test_the_backward_pass_does_not_keep_every_chunks_logits():
    # Logits saved for backward are what chunking removes: count the tensors of V columns that
    # autograd keeps between the forward and the backward pass.
    torch.manual_seed(0)
    vocab = 1000
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(4, 25, 16, requires_grad=True)
    tokens = torch.randint(0, vocab, (4, 25))
    saved = []

    def pack(tensor):
        if tensor.shape[-1:] == (vocab,) and tensor.dim() >= 2:
            saved.append(tensor.numel())
        return tensor

    def logits_kept(compute):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compute()
        kept = sum(saved)
        out.sum().backward()
        return kept

    full = logits_kept(
        lambda: F.log_softmax(head(hidden), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    )
    chunked = logits_kept(lambda: chunked_log_probs(head, hidden, tokens, 10 * vocab))
    assert full >= 100 * vocab  # at least the whole (4 * 25, V) logits
    assert chunked == 0, chunked  # checkpointed: recomputed in the backward pass instead


def test_under_autocast_the_chunks_match_the_full_logits(model):
    vocab = model.gpt2.config.vocab_size
    embeddings = torch.randn(4, 16)
    tokens = torch.randint(0, vocab, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prefix = model.prefix_embeddings(embeddings)
        reference = full_logits_log_probs(model, prefix, tokens)
        chunked = model.token_log_probs(prefix, tokens)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-6)
