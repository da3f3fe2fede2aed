"""The frozen reference is resharded after its forward whatever the trained models' sharding:
under grad_op and none it used to keep its whole compute copy gathered for the entire job (no
backward follows that would free it), about 2 bytes a parameter on every GPU."""

from __future__ import annotations

import pytest

from probes import run_probe


# One gloo rank in a fresh process (a process group must not outlive the test).
PROBE = """
import json, sys, torch
from torch.distributed.tensor import DTensor
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.worker import LearnerRank

model_dir, sharding = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["algorithm.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
                         "algorithm.kl_coef=0.1", "algorithm.kl_place=loss", "algorithm.kl_estimator=k3",
                         f"learner.sharding={sharding}", "learner.world_size=1",
                         "learner.num_gpus=0", "learner.num_threads=1", "rollout.max_new_tokens=4"])
rank = LearnerRank(0, 1, model_dir, cfg.learner, cfg.algorithm, temperature=1.0, total_updates=10)
rank.setup("127.0.0.1", rank.free_port())
rank.forward(bench_batch(4, 4, 4, 16, False, torch.Generator().manual_seed(0)), [4])

def sharded(model):  # FSDP2 registers DTensor shards while resharded, plain tensors while gathered
    blocks = model.model.layers
    return [isinstance(p, DTensor) for b in blocks for p in b.parameters()]

print(json.dumps({"policy": all(sharded(rank.policy)), "reference": all(sharded(rank.reference))}))
"""


@pytest.mark.parametrize("sharding,policy_resharded", [("full", True), ("grad_op", False)])
def test_the_reference_is_resharded_after_its_forward(tiny_model_dir, sharding, policy_resharded):
    state = run_probe(PROBE, str(tiny_model_dir), sharding)
    # The policy shows the sharding took effect (grad_op keeps its blocks gathered after a
    # forward); the reference is resharded either way.
    assert state == {"policy": policy_resharded, "reference": True}
