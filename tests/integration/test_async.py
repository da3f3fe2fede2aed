"""Asynchronous mode (trainer.async_staleness=1): generation of step k+1 overlaps the update
on step k. Versions are recorded right, staleness never exceeds the bound, no prompt is lost
or used twice, and a run killed mid-way and resumed still trains on exactly the data order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.data import PromptSampler, load_prompts
from helpers import ESTIMATOR_CASES, REPO, check_estimator_steps, run_cli, write_addition_data

pytestmark = pytest.mark.integration

PROMPTS, SAMPLES, STEPS = 8, 4, 4


def args(model, train, run_dir) -> list[str]:
    return ["train", "deploy/jobs/demo.yaml", f"trainer.steps={STEPS}", "trainer.save_every=2",
            "trainer.async_staleness=1", "rollout.num_workers=1", f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}", "model.max_model_len=64", f"model.path={model}",
            f"data.train_path={train}", f"run.dir={run_dir}", "trainer.sample_table_every=0",
            "reward.functions=[rewards_for_tests:paced_length]", "learner.lr=1e-3", *ESTIMATOR_CASES["rloo"],
            "algorithm.normalize_rewards=true"]


def expected_prompt_sums(train: Path) -> list[float]:
    """The data order of the run: step k trains on the k-th batch of the seeded sampler."""
    sampler = PromptSampler(load_prompts(train), seed=0)
    return [float(sum(p.index for p in sampler.next_batch(PROMPTS))) for _ in range(STEPS)]


def step_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def test_async_run_killed_and_resumed_loses_nothing(tmp_path, tiny_model_dir):
    train = write_addition_data(tmp_path / "train.jsonl", 64, seed=0)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args(tiny_model_dir, train, run_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt2 = run_dir / "checkpoints" / "step-000002"
    deadline = time.time() + 300
    while not ckpt2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert ckpt2.exists() and not (run_dir / "checkpoints" / "step-000004").exists()
    # The checkpoint's data position excludes the batch that was being generated for step 3.
    driver = json.loads((ckpt2 / "driver.json").read_text())
    assert driver["sampler_position"] == 2 * PROMPTS
    # Nor do the reward normaliser's statistics count it: steps 1 and 2's samples, not step 3's
    # too (which the resume regenerates and would count again).
    assert driver["reward_normalizer"]["count"] == 2 * PROMPTS * SAMPLES

    before_kill = step_rows(run_dir)
    for k in (1, 2):
        r = before_kill[k]
        # Step 1 trains on version 0 samples; from step 2 on, samples come from one version back.
        assert r["rollout/policy_version"] == r["rollout/policy_version_max"] == max(0, k - 2)
        assert r["rollout/staleness_max"] == (0 if k == 1 else 1)
        assert "tis/weight_mean" in r  # the off-policy correction is on by default
        # The engine/learner mismatch is measured on samples of the learner's own version only;
        # older samples' gap (the policy's move since) is logged apart.
        if k == 1:
            assert r["rollout/logprob_mismatch"] <= 1e-3 and "rollout/logprob_drift" not in r
        else:
            assert "rollout/logprob_mismatch" not in r and r["rollout/logprob_drift"] > 0
        assert {"timing/wait_rollout", "timing/rollout_idle"} <= r.keys()  # the overlap is logged

    result = run_cli(*args(tiny_model_dir, train, run_dir), "--resume", "auto", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = step_rows(run_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    check_estimator_steps("rloo", [rows[k] for k in sorted(rows)])
    sums = expected_prompt_sums(train)
    for k, r in rows.items():
        assert r["data/prompt_index_sum"] == sums[k - 1], f"step {k} trained on the wrong prompts"
        assert r["rollout/samples"] == PROMPTS * SAMPLES
        assert 0 <= r["rollout/staleness_max"] <= 1
    # After the resume, step 3's batch is generated from the checkpoint's weights (version 2).
    assert rows[3]["rollout/policy_version"] == 2 and rows[4]["rollout/policy_version"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps_completed"] == STEPS
