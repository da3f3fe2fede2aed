"""The run directory: one job holds it at a time, and a job refused before it wrote anything
removes the directories it made for itself, and nothing else."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from test_cli_errors import run_overrides
from transformers import LlamaConfig

from cluster.cli import main
from cluster.config import ConfigError, load_config
from cluster.launch import train
from cluster.run_dir import LOCK_NAME, exclusive, missing_dirs, remove_if_unused
from learner.tokenizer import build_char_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "jobs" / "demo.yaml"


def test_a_job_refused_by_its_pre_checks_leaves_no_empty_run_directory(tmp_path):
    """The run and checkpoint directories are made (and locked) before the model and data are
    checked; a refused job left them behind, empty but for the lock."""
    gone = f"model.path={tmp_path / 'gone'}"
    cfg = load_config(DEMO, [f"run.dir={tmp_path / 'runs' / 'a'}", f"trainer.checkpoint_dir={tmp_path / 'ck' / 'a'}",
                             gone])
    with pytest.raises(ConfigError, match="model.path .* is not a directory"):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # What was there before, or written by the job, stays.
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    cfg = load_config(DEMO, [f"run.dir={kept}", gone])
    with pytest.raises(ConfigError, match="model.path .* is not a directory"):
        train(cfg)
    assert sorted(p.name for p in kept.iterdir()) == [".rlrelay.lock", "notes"]


def test_a_checkpoint_dir_that_cannot_be_made_leaves_no_run_directory(tmp_path):
    (tmp_path / "a-file").write_text("")
    cfg = load_config(DEMO, [f"run.dir={tmp_path / 'runs' / 'a'}", f"trainer.checkpoint_dir={tmp_path / 'a-file' / 'ck'}"])
    with pytest.raises(ConfigError, match="trainer.checkpoint_dir: .* is not a writable directory"):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_job_refused_because_another_holds_the_directory_removes_nothing(tmp_path):
    # Two jobs starting at once on a new directory both see it missing; the one refused used to
    # delete the other's lock and directory, so a third job could take it too.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with exclusive(run_dir):
        with pytest.raises(ConfigError, match="is in use by a running job"):
            with exclusive(run_dir, made=[run_dir / "checkpoints", run_dir]):
                pass
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "checkpoints"]


def test_a_lock_taken_on_a_file_its_failed_holder_removed_is_taken_again(tmp_path, monkeypatch):
    # A job that fails while starting removes its lock file and directory, then lets go of the
    # lock. One that opened the file just before gets the lock of a file no longer there; a third
    # job would then create a new lock file and take that too: two jobs on one directory.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flock = fcntl.flock
    raced = []

    def after_the_failed_job_gave_up(f, op):
        if not raced:  # between this job's open and its flock, the other's clean-up
            raced.append(op)
            remove_if_unused([run_dir], run_dir, locked=True)
        return flock(f, op)

    monkeypatch.setattr(fcntl, "flock", after_the_failed_job_gave_up)
    with exclusive(run_dir):
        assert raced and (run_dir / LOCK_NAME).read_text().startswith("pid ")
        with pytest.raises(ConfigError, match="is in use by a running job"):
            with exclusive(run_dir):
                pass


def test_made_directories_with_anything_in_them_stay(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / LOCK_NAME).write_text("")
    remove_if_unused([run_dir / "checkpoints", run_dir], run_dir, locked=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "metrics.jsonl"]
    # Not holding the lock, a lock file is another job's: the directory stays with it.
    (run_dir / "metrics.jsonl").unlink()
    remove_if_unused([run_dir], run_dir, locked=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


def test_a_parent_that_cannot_be_entered_makes_nothing_to_undo(tmp_path, monkeypatch):
    # Path.exists raises PermissionError under a directory this user may not enter (checked
    # here by standing in for it: these tests run as root, who may enter any).
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", refused)
    assert missing_dirs(tmp_path / "private" / "run") == []


def test_a_home_directory_of_a_user_unknown_here_is_left_to_the_cluster():
    # Path.expanduser raises for ~user of an unknown user; submit sends the path on as it is.
    cfg = load_config(DEMO, ["run.dir=~no-such-user-here/runs/a"])
    assert cfg.run.path == Path("~no-such-user-here/runs/a")


def test_a_run_or_checkpoint_directory_that_cannot_be_written_is_named_before_start(tmp_path, capsys):
    # Found when the first checkpoint was written, it lost the whole run's training.
    (tmp_path / "a-file").write_text("x")
    unwritable = f"trainer.checkpoint_dir={tmp_path / 'a-file' / 'ck'}"
    assert main(["train", str(DEMO), *run_overrides(tmp_path, unwritable)]) == 2
    assert "trainer.checkpoint_dir: " in capsys.readouterr().err
    assert main(["train", str(DEMO), *run_overrides(tmp_path), f"run.dir={tmp_path / 'a-file'}"]) == 2
    err = capsys.readouterr().err
    assert "run.dir: " in err and "is not a writable directory" in err


def test_a_second_job_in_the_same_run_directory_is_refused(tmp_path, capsys):
    # Two jobs with one run.name interleaved their metrics and replaced each other's checkpoints.
    from cluster.config import load_config
    from cluster.run_dir import exclusive

    overrides = run_overrides(tmp_path)
    run_dir = load_config(DEMO, overrides).run.path
    run_dir.mkdir(parents=True)
    with exclusive(run_dir):  # the first job, holding it
        assert main(["train", str(DEMO), *overrides]) == 2
    assert f"run directory {run_dir} is in use by a running job (pid {os.getpid()} on" in capsys.readouterr().err


def test_a_run_that_continues_none_of_its_checkpoints_keeps_an_earlier_runs_metrics(tmp_path, monkeypatch, capsys):
    # `--resume auto` that found no checkpoint (a crashed run with trainer.save_every=0) started
    # afresh and emptied the earlier run's metrics.jsonl with only an info line; so did
    # `--resume PATH` of another run's checkpoint into a run directory holding a run.
    import dataclasses

    import cluster.launch
    from cluster.checkpoints import DriverState, run_signature

    class StartedRay(Exception):
        pass

    def start_ray(cfg):
        raise StartedRay

    monkeypatch.setattr(cluster.launch, "init_ray", start_ray)
    model = tmp_path / "model"
    build_char_tokenizer("0123456789+=", model)
    LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    other = tmp_path / "other" / "checkpoints" / "step-000004"
    (other / "learner").mkdir(parents=True)
    state = DriverState(step=4, version=4, sampler_epoch=0, sampler_position=32, kl_controller={},
                        reward_normalizer=None, wandb_run_id=None, eval_before=None,
                        extra={"signature": run_signature(False, str(model))})
    (other / "driver.json").write_text(json.dumps(dataclasses.asdict(state)))
    (other / "learner_ranks.json").write_text("[]")
    overrides = run_overrides(tmp_path, f"model.path={model}", "run.wandb_mode=disabled")
    metrics = tmp_path / "runs" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 1, "reward/mean": 0.5}\n')

    assert main(["train", str(DEMO), *overrides, "--resume", "auto"]) == 2
    assert f"holds an earlier run ({metrics}): it left no checkpoint to continue from" in capsys.readouterr().err
    assert main(["train", str(DEMO), *overrides, "--resume", str(other)]) == 2
    assert f"holds an earlier run ({metrics})" in capsys.readouterr().err
    assert metrics.read_text() == '{"step": 1, "reward/mean": 0.5}\n'
    # run.overwrite=true replaces the earlier run, and the job goes on to start.
    with pytest.raises(StartedRay):
        main(["train", str(DEMO), *overrides, "run.overwrite=true", "--resume", "auto"])
    assert metrics.read_text() == ""
