"""With ``algorithm.kl_place=loss`` the KL term uses the step's coefficient, the adaptive
controller's current value, which the loss ignored (it used the configured start value)."""

from __future__ import annotations

from probes import run_probe


# One gloo rank in a fresh process; zero advantages, so the loss is the KL term alone and
# the gradient norm is proportional to its coefficient (a learning rate of ~0 keeps the
# weights, and so the KL's gradient, the same between the updates).
PROBE = """
import json, sys, torch
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.batch import Minibatch, TrainBatch
from learner.worker import LearnerRank

cfg = load_config(None, ["algorithm.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
                         "algorithm.kl_coef=0.05", "algorithm.kl_place=loss", "algorithm.kl_estimator=k2",
                         "learner.world_size=1", "learner.num_gpus=0", "learner.num_threads=1", "learner.lr=1e-12",
                         "learner.max_grad_norm=1e6", "rollout.max_new_tokens=4"])
rank = LearnerRank(0, 1, sys.argv[1], cfg.learner, cfg.algorithm, temperature=1.0, total_updates=10)
rank.setup("127.0.0.1", rank.free_port())
batch = bench_batch(4, 4, 4, 16, False, torch.Generator().manual_seed(0))
fwd = rank.forward(batch, [4])
train = TrainBatch(rollouts=batch, old_logprobs=fwd.old_logprobs, advantages=torch.zeros_like(batch.response_mask),
                   returns=None, old_values=None, ref_logprobs=fwd.old_logprobs - 0.5, importance_weights=None)
norms = {}
for name, coef in (("configured", None), ("same", 0.05), ("twenty_times", 1.0)):
    out = rank.update([Minibatch(batch=train, micro_sizes=[4], num_tokens=float(batch.response_mask.sum()),
                                 num_seqs=4, kl_coef=coef)])
    norms[name] = out.metric_sums["policy/grad_norm"] / out.metric_weights["policy/grad_norm"]
print(json.dumps(norms))
"""


def test_the_kl_loss_term_uses_the_steps_coefficient(tiny_model_dir):
    norms = run_probe(PROBE, str(tiny_model_dir))
    assert norms["configured"] > 0
    assert abs(norms["same"] / norms["configured"] - 1) < 1e-3
    assert abs(norms["twenty_times"] / norms["configured"] - 20) < 0.02
