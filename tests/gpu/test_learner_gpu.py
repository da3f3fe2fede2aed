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
    figures = in_fresh_process(measure_option, spec, timeout=240)  # 8 options within figures.sh's 570 s
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


# One learner rank on the GPU in a fresh process (its NCCL group must not outlive the test):
# rank 0 reads the checkpoint into meta-built shards, exports bf16 weights, and a checkpoint
# round trip restores the CUDA generator.
RANK_PROBE = """
import json, sys, tempfile, torch
from transformers import AutoModelForCausalLM
from cluster.config import load_config
from learner.weight_bucket import drop_aliases
from learner.worker import LearnerRank

cfg = load_config(None, ["learner.world_size=1", "learner.num_gpus=1", "algorithm.kl_coef=0.1", "algorithm.kl_place=loss",
                          "algorithm.kl_estimator=k3"])
rank = LearnerRank(0, 1, sys.argv[1], cfg.learner, cfg.algorithm, temperature=1.0, total_updates=4)
rank.setup("127.0.0.1", rank.free_port())
state = rank.full_policy_state()
# The tied head's second name (lm_head.weight) is not exported: every weight once.
want = drop_aliases(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).state_dict(keep_vars=True))
exact = all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.detach().to(torch.bfloat16)) for k, v in want.items())
with tempfile.TemporaryDirectory() as d:
    saved = rank.save_checkpoint(d)
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    rank.load_checkpoint(d, saved)
    restored = bool(torch.equal(torch.rand(4, device="cuda"), expected))
rank.shutdown()
print(json.dumps({"keys": sorted(state) == sorted(want), "exact": exact, "cuda_rng": saved.cuda_rng is not None,
                  "restored": restored}))
"""


def test_weights_arrive_from_rank_0_export_in_bf16_and_the_cuda_generator_is_checkpointed(model_dir):
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", RANK_PROBE, str(model_dir)], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"keys": True, "exact": True, "cuda_rng": True,
                                                               "restored": True}
