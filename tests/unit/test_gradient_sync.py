"""Under learner.sharding=none gradients are all-reduced once per optimizer step, not once per
micro-batch (DDP's no_sync); full sharding still reduce-scatters in every backward, which is
what keeps a rank's gradients sharded. Counted on two real gloo ranks with torch's profiler;
that the update is the same is test_learner_equivalence.py's job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# One rank of a two-rank gloo group: one update of 4 micro-batches, one of a single micro-batch
# over the same rows, and the gradient collectives each made.
RANK = """
import json, sys, torch
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.batch import Minibatch, TrainBatch
from learner.worker import LearnerRank

model_dir, sharding, rank, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(None, ["algorithm.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
                         f"learner.sharding={sharding}", "learner.world_size=2", "learner.num_gpus=0",
                         "learner.num_threads=1", "learner.timeout_s=120", "rollout.max_new_tokens=4"])
learner = LearnerRank(rank, 2, model_dir, cfg.learner, cfg.algorithm, temperature=1.0, total_updates=10)
learner.setup("127.0.0.1", port)
rows = bench_batch(4, 4, 4, 16, False, torch.Generator().manual_seed(rank))
mask = rows.response_mask
batch = TrainBatch(rollouts=rows, old_logprobs=-3 * mask, advantages=torch.randn(mask.shape) * mask,
                   returns=None, old_values=None, ref_logprobs=None, importance_weights=None)
counts = {}
for sizes in ([1, 1, 1, 1], [4]):
    mb = Minibatch(batch=batch, micro_sizes=sizes, num_tokens=2 * float(mask.sum()), num_seqs=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner.update([mb])
    names = [e.name for e in prof.events()]
    counts[len(sizes)] = {"all_reduce": names.count("c10d::allreduce_"),
                          "reduce_scatter": sum("reduce_scatter" in n for n in names)}
learner.shutdown()
print(json.dumps(counts))
"""


def collectives(model_dir: Path, sharding: str) -> dict[str, dict[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(model_dir), sharding, str(r), str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for proc in ranks:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in ranks:
            proc.kill()
    assert outs[0] == outs[1]  # both ranks made the same calls
    return outs[0]


def test_replicated_gradients_are_all_reduced_once_per_step(tiny_model_dir):
    counts = collectives(tiny_model_dir, "none")
    # One all-reduce per FSDP group (2 blocks and the root), in the last backward: four
    # micro-batches cost what one does (each reduced, it was 12).
    assert counts["4"]["all_reduce"] == counts["1"]["all_reduce"] > 0, counts


@pytest.mark.parametrize("sharding", ["full", "grad_op"])
def test_sharded_gradients_are_reduce_scattered_in_every_backward(tiny_model_dir, sharding):
    counts = collectives(tiny_model_dir, sharding)
    assert counts["4"]["reduce_scatter"] == 4 * counts["1"]["reduce_scatter"] > 0, counts
