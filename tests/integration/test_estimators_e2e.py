"""Every advantage estimator (and the DAPO/normalisation options) runs 3 steps of a real job
without NaN: `rlrelay train ... trainer.steps=3 algorithm.advantage_estimator=X`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli_many, write_addition_data

pytestmark = pytest.mark.integration

CASES = {
    "gae": ["algorithm.advantage_estimator=gae", "algorithm.critic_warmup_steps=1", "algorithm.kl_coef=0.05"],
    "grpo": ["algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.05", "algorithm.kl_place=loss",
             "algorithm.kl_estimator=k3", "algorithm.dual_clip=3", "algorithm.clip_high=0.28"],
    "dr_grpo": ["algorithm.advantage_estimator=dr_grpo", "algorithm.loss_agg=seq_mean_token_sum"],
    "rloo": ["algorithm.advantage_estimator=rloo", "algorithm.kl_coef=0.05", "algorithm.kl_target=0.01",
             "algorithm.tis_cap=2.0"],
    "reinforce_pp": ["algorithm.advantage_estimator=reinforce_pp", "algorithm.kl_coef=0.05",
                     "algorithm.normalize_rewards=true"],
    "reinforce_pp_baseline": ["algorithm.advantage_estimator=reinforce_pp_baseline",
                              "algorithm.dynamic_sampling=true", "algorithm.overlong_buffer=4",
                              "algorithm.loss_agg=seq_mean_token_mean"],
}


PARALLEL = 3
"""Runs at once, each its own local Ray instance. A run is mostly start-up (Ray, the actors'
processes, vLLM); on 2 cores three side by side took 238 s for the six against 278 s one after
another (measured): the start-ups are CPU-bound too, so more at once gains little."""


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case trained once (``PARALLEL`` at a time); each test below checks one of them."""
    root = tmp_path_factory.mktemp("estimators")
    train = write_addition_data(root / "train.jsonl", 64, seed=0)
    commands = {}
    for name, overrides in CASES.items():
        run_dir = root / name
        commands[name] = (run_dir, ["train", "deploy/jobs/demo.yaml", "trainer.steps=3", "rollout.num_workers=1",
                                    "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                                    "model.max_model_len=64", f"model.path={tiny_model_dir}",
                                    f"data.train_path={train}", f"run.dir={run_dir}", f"run.name=estimator-{name}",
                                    "trainer.sample_table_every=0", *overrides])
    results = run_cli_many({name: args for name, (_, args) in commands.items()}, parallel=PARALLEL)
    return {name: (commands[name][0], results[name]) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_runs_three_steps_without_nan(finished_runs, name):
    run_dir, result = finished_runs[name]
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {r['step']}: non-finite metrics {bad}"
        assert "policy/pg_loss" in r or name == "gae"
    if name == "gae":
        assert "policy/pg_loss" not in steps[0] and "value/vf_loss" in steps[0]  # critic warm-up
        assert "policy/pg_loss" in steps[1] and "value/explained_variance" in steps[1]
    if name in ("gae", "rloo", "reinforce_pp", "grpo"):
        assert all("kl/value" in r for r in steps)  # a reference model was built and used
    if name == "dr_grpo":
        assert not any("kl/value" in r for r in steps)  # no KL, no reference model
    if name == "rloo":
        assert steps[-1]["kl/coef"] != 0.05  # the adaptive controller moved
        assert "tis/weight_mean" in steps[0]
    if name == "reinforce_pp_baseline":
        assert all("rollout/filtered_groups" in r for r in steps)
