"""The tracker: which W&B mode a run starts in, and W&B failures that must not cost the run."""

import json
import logging

import pytest

from cluster import tracking
from cluster.tracking import Tracker, wandb_mode


@pytest.mark.parametrize("requested,environ,expected", [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "k"}, "online"),
    ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, "disabled"),
    ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
    ("auto", {"WANDB_MODE": " Online "}, "online"),
    ("auto", {"WANDB_MODE": "nonsense"}, "offline"),
    ("offline", {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}, "offline"),  # the config's own choice wins
])
def test_wandb_mode(requested, environ, expected):
    assert wandb_mode(requested, environ) == expected


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_disabled_run_keeps_every_number_on_disk_and_records_no_wandb_id(tmp_path):
    t = Tracker(tmp_path, project="p", name="n", mode="disabled", config={}, total_steps=2)
    t.log(1, {"reward/mean": 0.25})
    t.log(2, {"reward/mean": 0.5})
    t.finish({"steps_completed": 2})
    assert rows(tmp_path) == [{"step": 1, "reward/mean": 0.25}, {"step": 2, "reward/mean": 0.5}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_completed"] == 2 and summary["wandb_run_id"] is None
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_resume_leaves_out_a_metrics_line_torn_by_a_crash(tmp_path, caplog):
    # A bare JSONDecodeError (or KeyError 'step') ended the resume, naming neither file nor line.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": 0.2}\n'
                                            '{"other": 1}\n{"step": 3, "rew')
    with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
        t = Tracker(tmp_path, project="p", name="n", mode="disabled", config={}, total_steps=4, resume_step=2)
    t.finish({"steps_completed": 2})
    assert rows(tmp_path) == [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2}]
    assert "left out line(s) 3, 4, which hold no metrics row" in caplog.text


class BrokenRun:
    """A W&B run whose service died: every call raises, as wandb does once wandb-core is gone."""
    id = "broken"

    def __init__(self):
        self.calls = 0

    def log(self, *args, **kwargs):
        self.calls += 1
        raise BrokenPipeError("wandb-core went away")

    def finish(self, *args, **kwargs):
        self.calls += 1
        raise BrokenPipeError("wandb-core went away")


def test_a_wandb_failure_mid_run_is_one_warning_and_the_metrics_go_on(tmp_path, caplog):
    t = Tracker(tmp_path, project="p", name="n", mode="disabled", config={}, total_steps=3)
    broken = BrokenRun()
    t.run = broken
    with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
        for step in (1, 2, 3):
            t.log(step, {"reward/mean": step / 10})
        t.finish({"steps_completed": 3})
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    assert broken.calls == 1  # W&B is off after its first failure, not retried every step
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "BrokenPipeError" in warnings[0] and "metrics.jsonl" in warnings[0]
    assert json.loads((tmp_path / "summary.json").read_text())["steps_completed"] == 3


def test_online_start_that_fails_falls_back_to_offline_then_to_none(tmp_path, monkeypatch, caplog):
    tried = []

    def init(mode, **kwargs):
        tried.append(mode)
        raise RuntimeError(f"cannot start in {mode}")

    monkeypatch.setattr(tracking.wandb, "init", init)
    with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
        t = Tracker(tmp_path, project="p", name="n", mode="online", config={}, total_steps=1)
    assert tried == ["online", "offline"]
    assert t.run is None and t.run_id is None and t.mode == "disabled"
    assert "cannot start in online" in caplog.text and "W&B is off for this run" in caplog.text
    t.log(1, {"reward/mean": 1.0})
    t.abort()
    assert rows(tmp_path) == [{"step": 1, "reward/mean": 1.0}]


def test_online_start_that_fails_runs_offline(tmp_path, monkeypatch):
    real_init = tracking.wandb.init

    def init(mode, **kwargs):
        if mode == "online":
            raise RuntimeError("server unreachable")
        return real_init(mode="disabled", **kwargs)  # stands in for offline without writing a W&B dir

    monkeypatch.setattr(tracking.wandb, "init", init)
    t = Tracker(tmp_path, project="p", name="n", mode="online", config={}, total_steps=1)
    assert t.mode == "offline" and t.run is not None
    t.finish({})


class ClosedPipe:
    def write(self, text):
        raise BrokenPipeError("the reader of stderr went away")

    def flush(self):
        raise BrokenPipeError("the reader of stderr went away")


def test_a_closed_stderr_stops_the_progress_line_not_the_run(tmp_path, monkeypatch):
    # With SIGPIPE ignored in a training driver, the progress print raised BrokenPipeError
    # out of log() once `| tee` or an ssh session went away: the run failed unsaved.
    t = Tracker(tmp_path, project="p", name="n", mode="disabled", config={}, total_steps=2)
    monkeypatch.setattr("sys.stderr", ClosedPipe())
    t.log(1, {"reward/mean": 0.25})
    t.log(2, {"reward/mean": 0.5})
    t.finish({"steps_completed": 2})
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
