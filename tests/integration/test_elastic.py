"""Elastic rollout pool: during `rlrelay train ... rollout.num_workers=1`, `rlrelay scale
--rollout 2` from another process makes `rlrelay status` show two workers serving the current
weights, `--rollout 12` is more than the local instance holds (said, not refused), `--rollout 1`
drains back to one, and the run, stopped with SIGTERM once scaling is
over, ends cleanly after the step in progress with every prompt generated exactly once by the
weights of its step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ESTIMATOR_CASES, REPO, check_estimator_steps, run_cli, write_addition_data

pytestmark = pytest.mark.integration

# More steps than the test will ever reach: SIGTERM ends the run, and `n < STEPS` checks it
# stopped early however slowly the machine runs.
PROMPTS, SAMPLES, STEPS = 8, 4, 100_000


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_scale_up_and_down_while_training(tmp_path, tiny_model_dir):
    train = write_addition_data(tmp_path / "train.jsonl", 64, seed=0)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parent),
           "RLRELAY_STATE_DIR": str(tmp_path / "jobs")}
    # A slow reward (20 ms a sample) keeps every step >= 0.6 s. The job's output goes to files:
    # a pipe nobody reads until the end would fill and block the job.
    out_path, err_path = tmp_path / "train.out", tmp_path / "train.err"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        job = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "train", "deploy/jobs/demo.yaml", f"trainer.steps={STEPS}",
             "rollout.num_workers=1", f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
             "model.max_model_len=64", f"model.path={tiny_model_dir}", f"data.train_path={train}", f"run.dir={run_dir}",
             "run.name=elastic-test", "trainer.sample_table_every=0", "trainer.eval_every=0",
             "reward.functions=[rewards_for_tests:slow_length]"],
            cwd=REPO, env=env, stdout=out_file, stderr=err_file, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(r.get("step", 0) >= 2 and "reward/mean" in r for r in rows(run_dir)):
            assert job.poll() is None and time.time() < deadline, "the job did not reach step 2"
            time.sleep(0.5)

        up = run_cli("scale", "--rollout", "2", "--job", "elastic-test", "--wait", "240", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "warning" not in up.stdout  # two half-CPU workers fit the local instance
        status = json.loads(run_cli("status", "--job", "elastic-test", "--json", env=env).stdout)
        serving = [w for w in status["rollout_workers"] if w["state"] == "serving"]
        assert len(serving) == 2 and {w["policy_version"] for w in serving} == {status["policy_version"]}

        # Beyond what the local instance holds: not refused, but said; the workers without
        # room wait, the others serve, and scaling down retires the waiting ones first.
        over = run_cli("scale", "--rollout", "12", "--job", "elastic-test", env=env)
        assert over.returncode == 0, over.stdout + over.stderr
        assert "rlrelay: warning: the cluster has room for" in over.stdout and "of the 10 new" in over.stdout

        down = run_cli("scale", "--rollout", "1", "--job", "elastic-test", "--wait", "240", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        status = json.loads(run_cli("status", "--job", "elastic-test", "--json", env=env).stdout)
        assert len(status["rollout_workers"]) == 1

        # The job needs no more steps: a first SIGTERM ends it after the step in progress. Sent
        # to its process group, as timeout(1), SLURM and systemd do: the local Ray instance's
        # processes are in it too, and died with it before they started with SIGTERM blocked.
        at_stop = len([r for r in rows(run_dir) if "reward/mean" in r])
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=300)
        out, err = out_path.read_text(), err_path.read_text()
        assert job.returncode == 0, err[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)

    steps = [r for r in rows(run_dir) if "reward/mean" in r]
    n = len(steps)
    assert at_stop <= n < STEPS and [r["step"] for r in steps] == list(range(1, n + 1))
    assert json.loads(out.strip().splitlines()[-1])["stopped_early"] is True
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_completed"] == n and summary["stopped_early"] is True
    assert (run_dir / "checkpoints" / f"step-{n:06d}").is_dir()  # the stop wrote its step's checkpoint
    assert "stopping after the step in progress" in err
    sizes = [int(r["cluster/rollout_workers"]) for r in steps]
    assert 2 in sizes and sizes[0] == 1 and sizes[-1] == 1  # 1 -> 2 -> 1
    for r in steps:
        assert r["rollout/samples"] == PROMPTS * SAMPLES  # nothing lost (duplicates stop the run)
        # In synchronous mode every sample of step k comes from the weights after k-1 updates.
        assert r["rollout/policy_version"] == r["rollout/policy_version_max"] == r["step"] - 1
        assert r["cluster/worker_restarts"] == 0  # leaving workers drain, they are not "lost"


def test_autoscaler_grows_the_pool_while_the_learner_waits(tmp_path, tiny_model_dir):
    """rollout.autoscale with a threshold every synchronous step exceeds (the learner idles
    while the pool generates): the pool grows from 1 to max_workers=2 and stays there."""
    train = write_addition_data(tmp_path / "train.jsonl", 64, seed=0)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parent),
           "RLRELAY_STATE_DIR": str(tmp_path / "jobs")}
    done = run_cli("train", "deploy/jobs/demo.yaml", "trainer.steps=5", "rollout.num_workers=1",
                   "rollout.autoscale=true", "rollout.min_workers=1", "rollout.max_workers=2",
                   "rollout.autoscale_high=0.01", "rollout.autoscale_low=0.005", "rollout.autoscale_patience=1",
                   f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
                   "model.max_model_len=64", f"model.path={tiny_model_dir}", f"data.train_path={train}",
                   f"run.dir={run_dir}", "trainer.sample_table_every=0", "trainer.eval_every=0",
                   "reward.functions=[rewards_for_tests:length]", *ESTIMATOR_CASES["reinforce_pp"], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in rows(run_dir) if "cluster/autoscale_target" in r]
    assert len(steps) == 5
    check_estimator_steps("reinforce_pp", steps)
    assert all(0.01 < r["cluster/rollout_wait_share"] <= 1 for r in steps)
    assert [r["cluster/autoscale_target"] for r in steps] == [2.0] * 5  # decided after step 1, capped at max
    workers = [r["cluster/rollout_workers"] for r in steps]
    assert workers[0] == 1.0 and workers[-1] == 2.0 and max(workers) == 2.0
    # A cluster that may gain nodes gets its weights through the object store, the update the
    # learner builds (share_state_dict) loaded exactly: by the first worker and by the joiner.
    assert all(r["sync/shared_memory"] == 0.0 for r in steps)
    assert all(r["rollout/logprob_mismatch"] <= 1e-3 for r in steps)
    assert all(r["sync/workers_loaded"] >= 1 for r in steps)
