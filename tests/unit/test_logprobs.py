"""Log-probs and entropy from logits (chunked, fused, at a temperature) against loop
references, hand values and torch's own functions."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits


def ref_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def test_entropy_matches_loop_and_hand_values():
    torch.manual_seed(7)
    logits = torch.randn(2, 3, 5, dtype=torch.float64) * 3
    out = entropy_from_logits(logits)
    assert out.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            lp = ref_log_softmax(logits[b, t].tolist())
            assert out[b, t].item() == pytest.approx(-sum(math.exp(x) * x for x in lp), rel=1e-6)
    # Uniform over V: log V. One dominant logit (1e4 apart, overflows a naive exp): 0.
    flat = entropy_from_logits(torch.zeros(1, 1, 8))
    peaked = entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0], [5e4, 5e4, -5e4]]]))
    assert flat.item() == pytest.approx(math.log(8))
    assert peaked[0].tolist() == pytest.approx([0.0, math.log(2)], abs=1e-6)


def test_entropy_across_chunks_and_gradient_match_torch():
    torch.manual_seed(8)
    logits = torch.randn(3, 700, 11, requires_grad=True)  # 2100 tokens: several chunks
    ours = entropy_from_logits(logits)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_loop(temperature):
    torch.manual_seed(9)
    logits = torch.randn(2, 4, 6, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (2, 4))
    out = logprobs_from_logits(logits, labels, temperature)
    for b in range(2):
        for t in range(4):
            lp = ref_log_softmax([x / temperature for x in logits[b, t].tolist()])
            assert out[b, t].item() == pytest.approx(lp[labels[b, t]], rel=1e-6)


def test_logprobs_from_logits_across_chunks_with_bf16_input():
    torch.manual_seed(10)
    logits = (torch.randn(2, 900, 32) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 32, (2, 900))
    out = logprobs_from_logits(logits, labels, 0.5)
    ref = torch.log_softmax(logits.float() / 0.5, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert out.dtype == torch.float32  # computed in float32 even for bf16 logits
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_logprobs_from_logits_rejects_non_positive_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), bad)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_equal_the_separate_functions_values_and_gradients(temperature):
    torch.manual_seed(11)
    logits = (torch.randn(2, 700, 40) * 3).to(torch.bfloat16).requires_grad_()  # bf16 in, several chunks
    labels = torch.randint(0, 40, (2, 700))
    lp, ent = logprobs_and_entropy(logits, labels, temperature)
    ref_lp = logprobs_from_logits(logits, labels, temperature)
    ref_ent = entropy_from_logits(logits.float() / temperature)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    # Gradients in float32 (in bf16 the two paths round their sums at different points).
    full = logits.detach().float().requires_grad_()
    lp32, ent32 = logprobs_and_entropy(full, labels, temperature)
    g = torch.autograd.grad((lp32 * 0.3 + ent32).sum(), full)[0]
    ref = logprobs_from_logits(full, labels, temperature) * 0.3 + entropy_from_logits(full / temperature)
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), full)[0])
    only_lp, none = logprobs_and_entropy(logits, labels, temperature, with_entropy=False)
    assert none is None
    torch.testing.assert_close(only_lp, ref_lp)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, labels, 0.0)
