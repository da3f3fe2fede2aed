"""What a resume takes from the checkpoint and what from the job's config.

The config rules the settings (the fixed KL coefficient; learning rates, weight decay and
the LR schedule, its length from the current ``trainer.steps``); the checkpoint supplies the
state (an adaptive KL coefficient, the optimizer moments and step counts). They used to be
the checkpoint's: a run started with ``kl_coef=0`` and resumed with 0.05 trained without
KL, and a changed ``learner.lr`` was ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from cluster.checkpoints import DriverState
from cluster.config import load_config
from cluster.controller import Controller
from cluster.data import PromptSampler
from learner.kl_control import AdaptiveKLController, FixedKLController
from probes import run_probe

BASE = ["algorithm.advantage_estimator=grpo", "algorithm.kl_place=loss", "algorithm.kl_estimator=k3", "rollout.samples_per_prompt=4"]


def checkpoint(root: Path, kl_controller: dict) -> Path:
    """A checkpoint directory holding only the driver's plain state (the learner is a fake)."""
    path = root / "step-000010"
    (path / "learner").mkdir(parents=True)
    state = DriverState(step=10, version=0, sampler_epoch=0, sampler_position=0, kl_controller=kl_controller,
                        reward_normalizer=None, wandb_run_id=None, eval_before=None)
    (path / "driver.json").write_text(json.dumps(dataclasses.asdict(state)))
    (path / "learner_ranks.json").write_text("[]")
    return path


def restored_coef(tmp_path: Path, overrides: list[str], kl_controller: dict) -> float:
    """The KL coefficient of a real Controller after ``restore`` of such a checkpoint."""
    cfg = load_config(None, [*BASE, *overrides])
    collector = MagicMock()
    collector.sampler, collector.reward_norm = PromptSampler([], 0), None
    controller = Controller(cfg, collector=collector, eval_prompts=[], learner=MagicMock(), tracker=MagicMock(),
                            checkpoints=MagicMock(), model_path="/nonexistent", pad_token_id=0)
    assert controller.restore(checkpoint(tmp_path, kl_controller)) == 10
    return controller.kl_ctl.coef


def test_a_fixed_kl_coefficient_comes_from_the_config_and_a_change_is_logged(tmp_path, caplog):
    # The reviewer's case: started without KL, resumed with kl_coef=0.05 (a reference model is
    # built): the coefficient came back as 0, so KL was silently off.
    with caplog.at_level(logging.WARNING, logger="rlrelay"):
        assert restored_coef(tmp_path, ["algorithm.kl_coef=0.05"], {"coef": 0.0}) == 0.05
    assert any("algorithm.kl_coef=0.05" in r.getMessage() and "used 0" in r.getMessage()
               for r in caplog.records), caplog.text


def test_an_unchanged_fixed_kl_coefficient_resumes_quietly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlrelay"):
        assert restored_coef(tmp_path, ["algorithm.kl_coef=0.05"], FixedKLController(0.05).state_dict()) == 0.05
    assert not [r for r in caplog.records if "kl_coef" in r.getMessage()]


def test_an_adaptive_coefficient_is_restored_and_follows_the_new_target(tmp_path):
    adapted = AdaptiveKLController(init_coef=0.05, target=6.0, horizon=1000)
    adapted.coef = 0.2
    overrides = ["algorithm.kl_coef=0.05", "algorithm.kl_target=3.0", "algorithm.kl_horizon=100"]
    assert restored_coef(tmp_path, overrides, adapted.state_dict()) == 0.2
    # The new target (3) and horizon (100) steer from the adapted value: KL 3.3 is 10 % over.
    ctl = AdaptiveKLController(init_coef=0.05, target=3.0, horizon=100)
    ctl.load_state_dict(json.loads(json.dumps(adapted.state_dict())))
    ctl.update(current_kl=3.3, n_steps=10)
    assert ctl.coef == pytest.approx(0.2 * (1 + 0.1 * 10 / 100))


def test_an_adaptive_controller_starts_from_the_config_after_a_fixed_run(tmp_path):
    overrides = ["algorithm.kl_coef=0.05", "algorithm.kl_target=3.0"]
    # A fixed run's checkpoint holds no adapted coefficient: the configured start applies.
    assert restored_coef(tmp_path, overrides, FixedKLController(0.3).state_dict()) == 0.05
    # Older checkpoints do not say which controller wrote them; a coefficient of 0 cannot be an
    # adapted one (the adaptive controller starts above 0 and stays there): it came from a run
    # without KL, and restoring it would have kept the controller at 0 for ever.
    assert restored_coef(tmp_path / "old0", overrides, {"coef": 0.0}) == 0.05
    # Any other coefficient of an older checkpoint is taken as adapted, as before.
    assert restored_coef(tmp_path / "old", overrides, {"coef": 0.07}) == 0.07


def test_a_checkpoint_records_the_lr_schedule_it_was_saved_under(tmp_path, tiny_model_dir):
    from cluster.checkpoints import CheckpointManager, read_checkpoint
    from learner.checkpoint import RankState
    from learner.schedule import LRSchedule

    schedule = LRSchedule(kind="cosine", warmup_steps=2, min_lr_ratio=0.1, total_updates=120)
    groups, schedulers = {"policy": [{"lr": 1e-4, "initial_lr": 2e-4, "params": ["w"]}]}, {"policy": {"last_epoch": 60}}
    manager = CheckpointManager(tmp_path, keep_last=2)
    tmp = manager.begin(60)
    (tmp / "learner").mkdir()
    path = manager.commit(tmp, 60, DriverState(step=20, version=20, sampler_epoch=0, sampler_position=0,
                                               kl_controller={"coef": 0.1}, reward_normalizer=None, wandb_run_id=None,
                                               eval_before=None),
                          [RankState(param_groups=groups, schedulers=schedulers, rng="AAAA", schedule=schedule)],
                          str(tiny_model_dir))
    assert read_checkpoint(path)[1][0].schedule == schedule
    # A checkpoint written before the schedule was kept still loads, without it.
    older = json.loads((path / "learner_ranks.json").read_text())
    (path / "learner_ranks.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "schedule"}
                                                         for r in older]))
    assert read_checkpoint(path)[1][0].schedule is None


# One gloo rank at a time in a fresh process (a process group must not outlive the test).
# Policy and critic (gae) train 2 updates on a 4-update schedule and are checkpointed; the
# straight run trains 2 more. Ranks built anew then load the checkpoint: with the same settings
# (from a checkpoint in the current format and in the older one without its schedule) and with
# changed ones (lr, critic_lr, weight_decay; trainer.steps doubled, so 8 updates).
PROBE = """
import dataclasses, json, sys, torch
from torch.distributed.tensor import DTensor
from cluster.bench_learner import bench_batch
from cluster.config import load_config
from learner.batch import Minibatch, TrainBatch
from learner.checkpoint import RankState
from learner.worker import LearnerRank

model_dir, ckpt = sys.argv[1], sys.argv[2]
warnings = []  # what load_checkpoint returns for the driver to log
batch = bench_batch(4, 4, 4, 16, False, torch.Generator().manual_seed(0))
g = torch.Generator().manual_seed(1)
advantages = torch.randn(4, 4, generator=g) * batch.response_mask
returns = torch.randn(4, 4, generator=g) * batch.response_mask

def rank_for(overrides, total_updates):
    cfg = load_config(None, ["algorithm.advantage_estimator=gae", "learner.world_size=1", "learner.num_gpus=0",
                             "learner.num_threads=1", "rollout.max_new_tokens=4", "learner.lr=1e-3",
                             "learner.critic_lr=2e-3", "learner.warmup_steps=1", *overrides])
    rank = LearnerRank(0, 1, model_dir, cfg.learner, cfg.algorithm, temperature=1.0, total_updates=total_updates)
    rank.setup("127.0.0.1", rank.free_port())
    return rank

def train(rank, n):
    rates = []
    for _ in range(n):
        fwd = rank.forward(batch, [4])
        train = TrainBatch(rollouts=batch, old_logprobs=fwd.old_logprobs, advantages=advantages, returns=returns,
                           old_values=fwd.values, ref_logprobs=None, importance_weights=None)
        # The rates this update uses: the optimizers apply their groups' lr before the schedulers step.
        rates.append([rank.policy_opt.param_groups[0]["lr"], rank.critic_opt.param_groups[0]["lr"]])
        rank.update([Minibatch(batch=train, micro_sizes=[4], num_tokens=float(batch.response_mask.sum()), num_seqs=4)])
    return rates

def weights(rank):
    return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone()
            for m in (rank.policy, rank.critic) for p in m.parameters()]

def resumed(rank, state):
    warning = rank.load_checkpoint(ckpt, state)
    if warning is not None:
        warnings.append(warning)
    step = next(iter(rank.policy_opt.state.values()))["step"]
    group = rank.policy_opt.param_groups[0]
    return {"adam_step": float(step), "weight_decay": [group["weight_decay"], rank.critic_opt.param_groups[0]["weight_decay"]],
            "kernels": [group.get("fused"), group.get("foreach")]}

out = {}
rank = rank_for([], 4)
train(rank, 2)
state = rank.save_checkpoint(ckpt)
straight_rates = train(rank, 2)
straight = weights(rank)
rank.shutdown()
older = RankState(**{k: v for k, v in dataclasses.asdict(state).items() if k not in ("schedule",)})
for name, st in (("same", state), ("same_older_format", older)):
    warnings.clear()
    rank = rank_for([], 4)
    info = resumed(rank, st)
    rates = train(rank, 2)
    info.update(rates_equal=rates == straight_rates,
                weights_equal=all(torch.equal(a, b) for a, b in zip(weights(rank), straight)),
                warnings=list(warnings))
    out[name] = info
    rank.shutdown()
for name, st in (("changed", state), ("changed_older_format", older)):
    warnings.clear()
    rank = rank_for(["learner.lr=3e-3", "learner.critic_lr=4e-3", "learner.weight_decay=0.1"], 8)
    info = resumed(rank, st)
    info.update(rates=train(rank, 1), warnings=list(warnings))
    out[name] = info
    rank.shutdown()
# The optimizer's kernel choice is the learner's (fused on a GPU without offload), not the saved one.
warnings.clear()
rank = rank_for([], 4)
out["configured_kernels"] = [rank.policy_opt.param_groups[0].get(k) for k in ("fused", "foreach")]
flagged = dataclasses.replace(state, param_groups={name: [{**g, "fused": True, "foreach": True} for g in groups]
                                                   for name, groups in state.param_groups.items()})
out["kernels_after_resume"] = resumed(rank, flagged)["kernels"]
rank.shutdown()
print(json.dumps(out))
"""


def cosine(step: int, warmup: int, total: int) -> float:
    """The schedule's factor worked out by hand (warm-up, then cosine to 0)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def resumes(tiny_model_dir, tmp_path_factory) -> dict:
    ckpt = tmp_path_factory.mktemp("resume") / "learner"
    return run_probe(PROBE, str(tiny_model_dir), str(ckpt))


@pytest.mark.parametrize("case", ["same", "same_older_format"])
def test_a_resume_with_the_same_settings_continues_exactly(resumes, case):
    got = resumes[case]
    assert got["adam_step"] == 2
    assert got["rates_equal"] and got["weights_equal"]
    assert got["warnings"] == []


def test_a_resume_applies_changed_learning_rates_weight_decay_and_schedule_length(resumes):
    got = resumes["changed"]
    # Moments and step count from the checkpoint; lr, critic_lr, weight_decay and the schedule's
    # length (8 updates: trainer.steps doubled) from the config. Update 3 is step 2 of 8.
    assert got["adam_step"] == 2
    assert got["weight_decay"] == [0.1, 0.1]
    assert got["rates"][0] == pytest.approx([3e-3 * cosine(2, 1, 8), 4e-3 * cosine(2, 1, 8)], rel=1e-12)
    # One warning, from the rate the checkpoint's next update would have used to the new one, and why.
    assert len(got["warnings"]) == 1, got["warnings"]
    text = got["warnings"][0]
    before, after = 1e-3 * cosine(2, 1, 4), 3e-3 * cosine(2, 1, 8)
    assert f"{before:.3g}" in text and f"{after:.3g}" in text, text
    assert "learner.lr" in text and "learner.critic_lr" in text and "4 to 8" in text, text
    # A checkpoint older than the record of its schedule resumes the same way; the warning says
    # what it cannot name.
    older = resumes["changed_older_format"]
    assert older["rates"] == got["rates"] and older["weight_decay"] == [0.1, 0.1]
    assert len(older["warnings"]) == 1 and "predates" in older["warnings"][0], older["warnings"]


def test_a_resume_keeps_the_optimizer_kernels_the_learner_chose(resumes):
    # A checkpoint saved with fused AdamW (a GPU without offload) resumed with offload, or the
    # reverse, ran the saved kernel choice: optimizer.load_state_dict restores it with the groups.
    assert resumes["kernels_after_resume"] == resumes["configured_kernels"]
