"""Checkpoint directories: atomic commit, rotation, resume resolution, plain-JSON state, and
DCP with JSON metadata (single process)."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cluster.checkpoints import CheckpointManager, DriverState, read_checkpoint, resolve_resume
from cluster.config import ConfigError
from learner.checkpoint import CheckpointError, JsonMetadataReader, JsonMetadataWriter
from learner.checkpoint import RankState


def driver(step):
    return DriverState(step=step, version=step, sampler_epoch=0, sampler_position=8 * step,
                       kl_controller={"coef": 0.1}, reward_normalizer=None, wandb_run_id="abc", eval_before=0.2)


def rank():
    return RankState(param_groups={"policy": [{"lr": 1e-4, "params": ["w"]}]}, schedulers={"policy": {"last_epoch": 1}},
                     rng="AAAA")


def bare_model_dir(root):
    """A model directory with only a config.json: what a commit copies beside the state."""
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    return root / "model"


def write(manager, step, model_dir):
    tmp = manager.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / ".metadata.json").write_text("{}")
    return manager.commit(tmp, step, driver(step), [rank()], str(model_dir))


def test_commit_rotates_and_latest_ignores_unfinished(tmp_path):
    model_dir = bare_model_dir(tmp_path)
    m = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (2, 4, 6):
        write(m, step, model_dir)
    assert [p.name for p in m.checkpoints()] == ["step-000004", "step-000006"]
    unfinished = m.begin(8)  # a crash mid-write leaves only a hidden temporary directory
    assert m.latest().name == "step-000006"
    assert resolve_resume("auto", m) == m.latest()
    assert unfinished.exists() and unfinished.name.startswith(".step-000008.tmp-")
    state, ranks = read_checkpoint(m.latest())
    assert state.step == 6 and state.wandb_run_id == "abc" and ranks[0].schedulers["policy"]["last_epoch"] == 1
    assert (m.latest() / "model" / "config.json").is_file()


def test_a_step_written_again_replaces_the_old_one_only_once_the_new_one_is_in_place(tmp_path, monkeypatch, caplog):
    import cluster.checkpoints as checkpoints

    model_dir = bare_model_dir(tmp_path)
    m = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    write(m, 4, model_dir)
    (m.latest() / "marker").write_text("old")
    write(m, 4, model_dir)  # a resume that redoes the run's end
    assert [p.name for p in m.root.iterdir()] == ["step-000004"] and not (m.latest() / "marker").exists()
    (m.latest() / "marker").write_text("old")
    rename = checkpoints.os.rename

    def fails_to_place_the_new_one(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(checkpoints.os, "rename", fails_to_place_the_new_one)
    with pytest.raises(OSError, match="No space left"):
        write(m, 4, model_dir)
    monkeypatch.setattr(checkpoints.os, "rename", rename)
    # The old one is whole and in place (it used to be deleted first); no copy is left aside.
    assert (m.latest() / "marker").read_text() == "old"
    assert not [p for p in m.root.iterdir() if ".replaced-" in p.name]
    # A checkpoint rotation cannot remove is said, not hidden.
    rmtree = checkpoints.shutil.rmtree

    def cannot_remove(path, ignore_errors=False, **kw):
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))
        rmtree(path, ignore_errors=True)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", cannot_remove)
    for step in (6, 8):
        write(m, step, model_dir)
    assert "checkpoint rotation could not remove all of" in caplog.text and "step-000004" in caplog.text


def test_resume_resolution_errors(tmp_path):
    m = CheckpointManager(tmp_path / "none", keep_last=1)
    assert resolve_resume("auto", m) is None and resolve_resume(None, m) is None
    with pytest.raises(ConfigError, match="not a complete rlrelay checkpoint"):
        resolve_resume(str(tmp_path), m)


def test_dcp_round_trip_with_json_metadata_and_no_pickle(tmp_path):
    state = {"policy/w": torch.randn(4, 3), "policy_optim/w/step": torch.tensor(3.0),
             "policy/b": torch.arange(5, dtype=torch.bfloat16)}
    dcp.save(state, storage_writer=JsonMetadataWriter(str(tmp_path)))
    assert not (tmp_path / ".metadata").exists()
    json.loads((tmp_path / ".metadata.json").read_text())
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=JsonMetadataReader(str(tmp_path)))
    for k in state:
        assert torch.equal(target[k], state[k]), k


def test_non_tensor_entries_are_refused(tmp_path):
    # DCP wraps errors raised on a rank in its own CheckpointException; the message survives.
    with pytest.raises(BaseException, match="'note' is not a tensor"):  # CheckpointException is a BaseException
        dcp.save({"w": torch.ones(2), "note": "hello"}, storage_writer=JsonMetadataWriter(str(tmp_path)))


def test_missing_metadata_is_a_clear_error(tmp_path):
    # The reader itself, as load_trained and export call it before dcp.load: torch 2.11's
    # dcp.load replaces a reader's error with a bare "metadata is None" (2.13 keeps it).
    with pytest.raises(CheckpointError, match="not a complete rlrelay checkpoint"):
        JsonMetadataReader(str(tmp_path)).read_metadata()


def test_a_fresh_run_never_mixes_with_an_earlier_one_in_its_directory(tmp_path):
    from cluster.config import ConfigError
    from cluster.run_dir import clear_earlier_run

    run = tmp_path / "run"
    run.mkdir()
    manager = CheckpointManager(run / "checkpoints", keep_last=2)
    clear_earlier_run(run, manager, overwrite=False)  # nothing there: a fresh start is fine
    (run / "metrics.jsonl").write_text("")
    clear_earlier_run(run, manager, overwrite=False)  # an empty metrics file is no earlier run

    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    # No checkpoint (a run with trainer.save_every=0 that ended early): nothing to continue from.
    with pytest.raises(ConfigError, match=r"holds an earlier run \(.*metrics.jsonl\): it left no checkpoint"):
        clear_earlier_run(run, manager, overwrite=False)
    for step in (20, 30):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"2 checkpoint\(s\), the latest .*step-000030\).*run.overwrite=true"):
        clear_earlier_run(run, manager, overwrite=False)
    assert (run / "metrics.jsonl").read_text()  # refusing touched nothing

    (run / "summary.json").write_text("{}")
    (run / "final_model").mkdir()
    (run / "curves.png").write_bytes(b"png")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)  # else `wandb sync .../offline-run-*` uploads it too
    clear_earlier_run(run, manager, overwrite=True)
    assert manager.checkpoints() == []
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]

    # A run that failed before its first step left only an offline W&B run: not refused
    # without overwrite (nothing would mix), removed with it.
    (run / "wandb" / "offline-run-2").mkdir(parents=True)
    clear_earlier_run(run, manager, overwrite=False)
    assert (run / "wandb").exists()
    clear_earlier_run(run, manager, overwrite=True)
    assert not (run / "wandb").exists()


def test_only_a_runs_own_checkpoint_continues_its_wandb_run(tmp_path):
    from cluster.run_dir import is_own_checkpoint

    manager = CheckpointManager(tmp_path / "runs" / "b" / "checkpoints", keep_last=2)
    assert is_own_checkpoint(tmp_path / "runs" / "b" / "checkpoints" / "step-000010", manager)
    assert is_own_checkpoint(tmp_path / "runs" / "b" / "checkpoints" / ".." / "checkpoints" / "step-000010", manager)
    assert not is_own_checkpoint(tmp_path / "runs" / "a" / "checkpoints" / "step-000010", manager)


def test_resuming_a_completed_run_returns_its_summary_and_logs_nothing_again(tmp_path):
    # It used to redo its end and append the final eval/accuracy to metrics.jsonl a second time.
    from pathlib import Path

    from cluster.config import load_config
    from cluster.controller import RunSummary
    from cluster.launch import train

    run = tmp_path / "run"
    model_dir = bare_model_dir(tmp_path)
    write(CheckpointManager(run / "checkpoints", keep_last=2), 4, model_dir)
    metrics = '{"step": 0, "eval/accuracy": 0.2}\n{"step": 4, "reward/mean": 0.5}\n{"step": 4, "eval/accuracy": 0.6}\n'
    (run / "metrics.jsonl").write_text(metrics)
    (run / "summary.json").write_text(json.dumps({"steps_completed": 4, "eval_before": 0.2, "eval_after": 0.6,
                                                  "stopped_early": False, "wandb_run_id": "abc"}))
    demo = Path(__file__).resolve().parents[2] / "deploy" / "jobs" / "demo.yaml"
    # A model.path that is not there: the completed run is answered before anything is looked at.
    cfg = load_config(demo, [f"run.dir={run}", "trainer.steps=4", f"model.path={tmp_path / 'gone'}"])
    assert train(cfg, resume="auto") == RunSummary(steps_completed=4, eval_before=0.2, eval_after=0.6)
    assert (run / "metrics.jsonl").read_text() == metrics

    # Not complete: its summary is of fewer steps (then trained on past its end): the resume goes on.
    (run / "summary.json").write_text(json.dumps({"steps_completed": 2, "eval_after": 0.4, "stopped_early": False}))
    with pytest.raises(ConfigError, match="model.path .* is not a directory"):
        train(cfg, resume="auto")


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """They belong to the abandoned timeline: left in place, rotation (highest steps kept) would
    delete the new timeline's checkpoints before them, and `--resume auto` would pick them."""
    model_dir = bare_model_dir(tmp_path)
    m = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    for step in (2, 4, 6):
        write(m, step, model_dir)
    assert m.set_aside_after(6) is None
    aside = m.set_aside_after(2)
    assert [p.name for p in m.checkpoints()] == ["step-000002"]
    assert sorted(p.name for p in aside.iterdir()) == ["step-000004", "step-000006"]
    write(m, 3, model_dir)
    assert resolve_resume("auto", m).name == "step-000003"
