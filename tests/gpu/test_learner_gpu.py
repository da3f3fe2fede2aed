"""The learner on a GPU: bf16 FSDP2 updates under each memory option, and the planner's
prediction against the measured peak. Skipped without CUDA (CI has none; run on a lent GPU
with ``python -m pytest tests/gpu``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cluster.bench_learner import build_model, in_fresh_process, measure_option, POLICY_ONLY, OPTIONS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Qwen2-like, grouped k/v heads, tied head: big enough that the allocator's rounding is small.
SHAPE = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1408,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-model")
    build_model(out, SHAPE)
    return out


@pytest.mark.parametrize("option", ["full", "grad_op", "none", "full+ckpt", "full+offload", "ppo-full", "full+logits",
                                    "full+packed"])
def test_bf16_update_runs_and_the_plan_matches_the_measured_peak(model_dir, option):
    spec = dict(model_dir=str(model_dir), overrides=POLICY_ONLY + OPTIONS[option], gpu=True, seq_len=1024,
                prompt_len=512, micro_batch=4, micro_steps=2, steps=1)
    figures = in_fresh_process(measure_option, spec, timeout=600)
    assert "error" not in figures, figures.get("traceback", figures.get("error"))
    print(option, json.dumps({k: v for k, v in figures.items() if k != "flops_per_s"}))
    assert all(math.isfinite(s) and s > 0 for s in figures["update_s"]["runs"])
    # The planner is an estimate before launch: within 25 % of torch's own peak either way.
    assert 0.75 <= figures["planned_over_measured"] <= 1.25, figures


def test_packed_rows_match_padded_rows_in_bf16(model_dir, monkeypatch):
    """``learner.pack_sequences`` on CUDA runs FlashAttention's variable-length kernel; its
    log-probs and gradients must match the padded SDPA path to bf16 rounding."""
    from learner import packing
    from learner.batch import RolloutBatch
    from learner.models import load_policy, sequence_logprobs

    varlen_calls = []  # the kernel, not the per-row SDPA fallback, must be what ran

    def counted_varlen(*args, **kwargs):
        varlen_calls.append(1)
        return varlen(*args, **kwargs)

    varlen = packing._varlen
    monkeypatch.setattr(packing, "_varlen", counted_varlen)

    g = torch.Generator().manual_seed(0)
    prompts, responses = torch.tensor([40, 17, 64, 5]), torch.tensor([60, 90, 12, 33])
    width, t = int((prompts + responses).max()), int(responses.max())
    attention = (torch.arange(width) < (prompts + responses)[:, None]).long()
    rollouts = RolloutBatch(
        input_ids=torch.randint(1, SHAPE["vocab_size"], (4, width), generator=g) * attention,
        attention_mask=attention, prompt_lengths=prompts,
        response_mask=(torch.arange(t) < responses[:, None]).float(), rollout_logprobs=torch.zeros(4, t))
    rollouts = RolloutBatch(**{k: getattr(rollouts, k).cuda() for k in
                               ("input_ids", "attention_mask", "prompt_lengths", "response_mask", "rollout_logprobs")})
    results = []
    for packed in (False, True):
        model = load_policy(str(model_dir), torch.bfloat16, packed=packed).cuda()
        lp, _ = sequence_logprobs(model, rollouts, 1.0, packed=packed)
        lp.sum().backward()
        results.append((lp.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    (ref_lp, ref_grad), (lp, grad) = results
    assert varlen_calls, "the packed pass fell back to per-row SDPA (torch without torch.nn.attention.varlen?)"
    mask = rollouts.response_mask.bool()
    assert float((lp - ref_lp)[mask].abs().mean()) < 2e-2, float((lp - ref_lp)[mask].abs().max())
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 5e-2
