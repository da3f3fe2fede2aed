"""The PPO ratio's extremes are the largest and smallest over a step's micro-batches, not a
token-weighted mean of per-micro-batch extremes (which hides the spike they exist to show)."""

from __future__ import annotations

from probes import run_probe


# One gloo rank in a fresh process. The old log-probs are the model's own plus noise, so the
# ratios exp(new - old) are known; a learning rate of ~0 keeps the weights between updates.
PROBE = """
import json, sys, torch
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.batch import Minibatch, TrainBatch
from learner.worker import LearnerRank

cfg = load_config(None, ["algorithm.advantage_estimator=grpo", "rollout.samples_per_prompt=4", "learner.world_size=1",
                         "learner.num_gpus=0", "learner.num_threads=1", "learner.lr=1e-12", "rollout.max_new_tokens=4"])
rank = LearnerRank(0, 1, sys.argv[1], cfg.learner, cfg.algorithm, temperature=1.0, total_updates=10)
rank.setup("127.0.0.1", rank.free_port())
batch = bench_batch(4, 4, 4, 16, True, torch.Generator().manual_seed(0))
fwd = rank.forward(batch, [4])
noise = 0.3 * torch.randn(fwd.old_logprobs.shape, generator=torch.Generator().manual_seed(1))
noise[0] += 1.0  # the first row (its own micro-batch below) holds the smallest ratios
old = (fwd.old_logprobs + noise) * batch.response_mask
train = TrainBatch(rollouts=batch, old_logprobs=old, advantages=torch.ones_like(batch.response_mask) * batch.response_mask,
                   returns=None, old_values=None, ref_logprobs=None, importance_weights=None)
out = {}
for sizes in ([4], [1, 3]):
    res = rank.update([Minibatch(batch=train, micro_sizes=sizes, num_tokens=float(batch.response_mask.sum()),
                                 num_seqs=4)])
    out[str(sizes)] = res.metric_extremes
ratio = torch.exp(-noise)[batch.response_mask.bool()]
out["expected"] = {"policy/ratio_max": float(ratio.max()), "policy/ratio_min": float(ratio.min())}
print(json.dumps(out))
"""


def test_ratio_extremes_are_taken_over_every_micro_batch(tiny_model_dir):
    out = run_probe(PROBE, str(tiny_model_dir))
    for key in ("policy/ratio_max", "policy/ratio_min"):
        for sizes in ("[4]", "[1, 3]"):
            assert abs(out[sizes][key] - out["expected"][key]) < 1e-4 * out["expected"][key], (sizes, key, out)
    assert out["expected"]["policy/ratio_max"] > 1.2 and out["expected"]["policy/ratio_min"] < 0.5


def test_extremes_merge_as_extremes():
    from learner.batch import merge_extreme

    assert merge_extreme("policy/ratio_max", None, 1.5) == 1.5
    assert merge_extreme("policy/ratio_max", 1.5, 1.1) == 1.5
    assert merge_extreme("policy/ratio_min", 0.9, 0.4) == 0.4
