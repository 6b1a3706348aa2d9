"""Self-critical training's advantage and loss, on the tiny caption model."""

import pytest
import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.generate import token_log_probs
from clipcap_cache.model import ModelConfig, build_model
from clipcap_cache.scst import advantages, scst_loss

EOS = 0


@pytest.fixture
def model(gpt2_no_dropout_dir):
    torch.manual_seed(0)
    config = ModelConfig(
        gpt2_model=str(gpt2_no_dropout_dir), clip_embedding_dim=64, prefix_length=3, freeze_layers=0
    )
    return build_model(config)


def sequence_log_prob(model, embeddings, tokens):
    with torch.no_grad():
        log_probs, counted = token_log_probs(
            model, model.prefix_embeddings(embeddings), tokens, EOS
        )
    return (log_probs * counted).sum(1)


def test_mean_of_others_and_greedy_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    # Each sample against the mean of the image's other two.
    assert advantages(rewards).tolist() == [[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]
    greedy = torch.tensor([2.0, 0.5])
    assert advantages(rewards, "greedy", greedy).tolist() == [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ClipcapError, match="needs --samples 2"):
        advantages(rewards[:, :1])


def test_a_sample_above_the_baseline_becomes_more_likely(model):
    embeddings = torch.randn(1, 64).repeat(2, 1)
    tokens = torch.tensor([[5, 9, 12, EOS], [7, 3, EOS, EOS]])
    before = sequence_log_prob(model, embeddings, tokens)
    rewards = torch.tensor([[2.0, 0.0]])  # one image, two samples: the first is better
    loss = scst_loss(model, embeddings, tokens, advantages(rewards).flatten(), EOS)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = sequence_log_prob(model, embeddings, tokens)
    assert after[0] > before[0] + 0.01  # the rewarded sample went up
    assert after[1] < before[1] - 0.01  # the other went down


def test_padding_after_eos_carries_no_gradient(model):
    embeddings = torch.randn(2, 64)
    advantage = torch.tensor([1.0, -0.5])
    clean = torch.tensor([[5, 9, EOS, EOS, EOS], [7, 3, 4, EOS, EOS]])
    noisy = clean.clone()
    noisy[0, 3:] = torch.tensor([11, 17])  # garbage after the first EOS
    noisy[1, 4] = 21

    def gradients(tokens):
        model.zero_grad()
        scst_loss(model, embeddings, tokens, advantage, EOS).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = gradients(clean), gradients(noisy)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_identical_samples_give_zero_advantage_and_no_gradient(model, baseline):
    embeddings = torch.randn(1, 64).repeat(3, 1)
    tokens = torch.tensor([[5, 9, EOS]]).repeat(3, 1)
    rewards = torch.full((1, 3), 1.7)  # identical samples score alike
    advantage = advantages(rewards, baseline, torch.tensor([1.7])).flatten()
    assert advantage.abs().max() < 1e-6  # zero, up to the rounding of a float mean
    model.zero_grad()
    scst_loss(model, embeddings, tokens, advantage, EOS).backward()
    largest = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    assert largest < 1e-5
