"""The policy through the critic's warm-up (``algorithm.critic_warmup_steps``): a checkpoint
taken before the policy's first update leaves its later updates as they would have been, and
its learning-rate schedule spans the steps it trains, not the warm-up too."""

from __future__ import annotations

import pytest

from probes import run_probe

PROBE = r"""
import json, sys, torch
from torch.distributed.tensor import DTensor
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.batch import Minibatch, TrainBatch
from learner.worker import LearnerRank

model_dir, ckpt = sys.argv[1], sys.argv[2]
batch = bench_batch(4, 4, 4, 16, False, torch.Generator().manual_seed(0))
g = torch.Generator().manual_seed(1)
advantages = torch.randn(4, 4, generator=g) * batch.response_mask
returns = torch.randn(4, 4, generator=g) * batch.response_mask

def rank_for(total_updates=4):
    cfg = load_config(None, ["algorithm.advantage_estimator=gae", "algorithm.critic_warmup_steps=1", "trainer.steps=4",
                             "learner.world_size=1", "learner.num_gpus=0", "learner.num_threads=1",
                             "rollout.max_new_tokens=4", "learner.lr=1e-3", "learner.critic_lr=1e-3",
                             "learner.lr_schedule=constant"])
    rank = LearnerRank(0, 1, model_dir, cfg.learner, cfg.algorithm, temperature=1.0, total_updates=total_updates)
    rank.setup("127.0.0.1", rank.free_port())
    return rank

def update(rank, train_policy):
    fwd = rank.forward(batch, [4])
    train = TrainBatch(rollouts=batch, old_logprobs=fwd.old_logprobs, advantages=advantages, returns=returns,
                       old_values=fwd.values, ref_logprobs=None, importance_weights=None)
    rank.update([Minibatch(batch=train, micro_sizes=[4], num_tokens=float(batch.response_mask.sum()), num_seqs=4)],
                train_policy)

def policy(rank):
    return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in rank.policy.parameters()]

def gap(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))

out = {}
rank = rank_for()
update(rank, False)  # the critic's warm-up step: the policy's optimizer has not stepped
update(rank, True)
update(rank, True)
plain = policy(rank)
rank.shutdown()

rank = rank_for()
update(rank, False)
state = rank.save_checkpoint(ckpt)
out["unstepped"] = state.unstepped
out["policy_state_after_save"] = len(rank.policy_opt.state)
update(rank, True)
update(rank, True)
out["saved_gap"] = gap(policy(rank), plain)
rank.shutdown()

rank = rank_for()
rank.load_checkpoint(ckpt, state)
out["policy_state_after_load"] = len(rank.policy_opt.state)
update(rank, True)
update(rank, True)
out["resumed_gap"] = gap(policy(rank), plain)
out["totals"] = {name: s.total_updates for name, s in rank.schedules.items()}
rank.shutdown()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tiny_model_dir, tmp_path_factory) -> dict:
    ckpt = tmp_path_factory.mktemp("warmup") / "learner"
    return run_probe(PROBE, str(tiny_model_dir), str(ckpt))


def test_a_checkpoint_before_the_policys_first_update_does_not_change_its_updates(probe):
    # torch's get_state_dict fills an empty optimizer with a zero-lr step: left in place, the
    # policy's first real update was Adam's second, 0.74x its size, in every run that saved.
    assert probe["unstepped"] == ["policy"]
    assert probe["policy_state_after_save"] == 0 and probe["policy_state_after_load"] == 0
    assert probe["saved_gap"] == 0.0
    assert probe["resumed_gap"] == 0.0


def test_the_policys_schedule_leaves_out_the_critics_warm_up(probe):
    # 4 steps of one update each, the first the critic's alone: the policy takes 3 updates, and
    # its cosine, sized for 4, ended above learner.min_lr_ratio.
    assert probe["totals"] == {"policy": 3, "critic": 4}
