"""What a checkpoint and a run directory hold, and what a resume reads back from them.

Each of these could break without a test noticing: a commit that left the tokenizer out of
the checkpoint's ``model/`` (``rlrelay export`` reads it from there, nothing else); a resume
that took a directory without ``learner/`` for a checkpoint (it then failed deep in the
learner's load instead of at the start); the run signature of a multimodal config.json
(fields under ``text_config``) recorded as all None, so any policy passed the check; a run
that stopped early at its last step taken as complete (a resume then answered with its
summary instead of finishing it); the lock file appending a second owner line to the first;
and the scheduler of a resumed run reporting the peak as the rate of its first update
(the ``policy/lr`` metric reads ``get_last_lr``).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from torch import nn

from cluster.checkpoints import CheckpointManager, DriverState, resolve_resume, run_signature
from cluster.config import ConfigError
from cluster.controller import RunSummary
from cluster.run_dir import LOCK_NAME, completed_run, exclusive
from learner.checkpoint import RankState, load_trained, save_trained
from learner.schedule import LRSchedule


def driver(step: int) -> DriverState:
    return DriverState(step=step, version=step, sampler_epoch=0, sampler_position=0, kl_controller={"coef": 0.1},
                       reward_normalizer=None, wandb_run_id=None, eval_before=None)


# -- the checkpoint's model/ -------------------------------------------------------------------

def test_a_commit_copies_the_tokenizer_files_beside_the_config_and_not_the_weights(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    files = {"config.json": "{}", "tokenizer.json": '{"model": "bpe"}', "tokenizer_config.json": '{"eos": "</s>"}',
             "model.safetensors": "weights"}
    for name, text in files.items():
        (model / name).write_text(text)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    tmp = manager.begin(2)
    (tmp / "learner").mkdir()
    path = manager.commit(tmp, 2, driver(2), [], str(model))
    # The weights are the learner's shards; model/ holds what export needs besides them.
    assert sorted(p.name for p in (path / "model").iterdir()) == ["config.json", "tokenizer.json",
                                                                 "tokenizer_config.json"]
    assert (path / "model" / "tokenizer.json").read_text() == '{"model": "bpe"}'
    assert (path / "model" / "tokenizer_config.json").read_text() == '{"eos": "</s>"}'


# -- resume resolution and signature -----------------------------------------------------------

def test_a_directory_with_driver_json_but_no_learner_state_is_not_a_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "driver.json").write_text(json.dumps({"step": 4}))
    with pytest.raises(ConfigError) as refused:
        resolve_resume(str(tmp_path / "half"), manager)
    assert str(refused.value) == (f"--resume {tmp_path / 'half'}: not a complete rlrelay checkpoint "
                                  f"(needs driver.json and learner/)")
    # With learner/ beside it, the same directory is taken.
    (tmp_path / "half" / "learner").mkdir()
    assert resolve_resume(str(tmp_path / "half"), manager) == tmp_path / "half"


def test_the_run_signature_of_a_multimodal_config_is_its_text_models(tmp_path):
    # A vision-language config.json keeps the language model's shape under text_config; the
    # top level has none of these fields (or a vision tower's).
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "vision_config": {"hidden_size": 1280},
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936}}))
    assert run_signature(True, str(tmp_path)) == {
        "critic": True,
        "model": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936}}


# -- the run directory ---------------------------------------------------------------------------

def test_a_run_that_stopped_early_at_its_last_step_is_not_complete(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps_completed": 6, "stopped_early": True,
                                                       "eval_before": 0.2, "eval_after": None}))
    assert completed_run(tmp_path, 6) is None
    # The same summary without the early stop is the finished run's.
    (tmp_path / "summary.json").write_text(json.dumps({"steps_completed": 6, "stopped_early": False,
                                                       "eval_before": 0.2, "eval_after": 0.5}))
    assert completed_run(tmp_path, 6) == RunSummary(steps_completed=6, eval_before=0.2, eval_after=0.5)


def test_the_lock_file_names_only_the_current_holder(tmp_path):
    # The file is opened for appending ("a+"): without the truncate each holder's line was
    # added after the last one's, and a refused job quoted them all as the owner.
    for _ in range(2):
        with exclusive(tmp_path / "run"):
            pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


# -- the learner's scheduler after a resume -------------------------------------------------------

def test_a_resumed_scheduler_reports_the_next_updates_rate_not_the_peak(tmp_path, one_torch_thread):
    # A plain module (no FSDP, no process group): load_trained's scheduler restore is the same.
    schedule = LRSchedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.1, total_updates=4)

    def trained() -> tuple:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return "policy", model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)

    entry = trained()
    _, model, opt, sched = entry
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    groups, schedulers, unstepped = save_trained(str(tmp_path), [entry])
    assert schedulers["policy"]["last_epoch"] == 2

    resumed = trained()
    state = RankState(param_groups=groups, schedulers=schedulers, rng="", unstepped=unstepped)
    # Step 2 of 4 under a peak of 2e-3: 2e-3 x (0.1 + 0.9 x 0.5 x (1 + cos(pi / 2))) = 1.1e-3.
    rate = 2e-3 * schedule.factor(2)
    assert rate == pytest.approx(1.1e-3, rel=1e-12)
    load_trained(str(tmp_path), [resumed], state, {"policy": (2e-3, rate)}, weight_decay=0.0)
    _, _, opt, sched = resumed
    assert sched.get_last_lr() == [rate]  # what the worker logs as policy/lr for this update
    assert opt.param_groups[0]["lr"] == rate and sched.base_lrs == [2e-3]
