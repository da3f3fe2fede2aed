"""Every advantage estimator (and the DAPO/normalisation options) runs a real job without NaN:
`rlrelay train ... algorithm.advantage_estimator=X`. The cases in ``ESTIMATOR_HOSTS`` ride on
jobs other tests run anyway; the others run here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import ESTIMATOR_CASES, ESTIMATOR_HOSTS, check_estimator_steps, run_cli_many, write_addition_data
from learner.config import ADVANTAGE_ESTIMATORS

pytestmark = pytest.mark.integration

HERE = [name for name in ESTIMATOR_CASES if name not in ESTIMATOR_HOSTS]


def test_every_estimator_has_a_job():
    assert set(ESTIMATOR_CASES) == set(ADVANTAGE_ESTIMATORS)
    assert set(ESTIMATOR_HOSTS) < set(ESTIMATOR_CASES)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case here trained once, side by side (each its own local Ray instance)."""
    root = tmp_path_factory.mktemp("estimators")
    train = write_addition_data(root / "train.jsonl", 64, seed=0)
    commands = {}
    for name in HERE:
        run_dir = root / name
        commands[name] = (run_dir, ["train", "deploy/jobs/demo.yaml", "trainer.steps=3", "rollout.num_workers=1",
                                    "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                                    "model.max_model_len=64", f"model.path={tiny_model_dir}",
                                    f"data.train_path={train}", f"run.dir={run_dir}", f"run.name=estimator-{name}",
                                    "trainer.sample_table_every=0", *ESTIMATOR_CASES[name]])
    results = run_cli_many({name: args for name, (_, args) in commands.items()}, parallel=len(HERE))
    return {name: (commands[name][0], results[name]) for name in HERE}


@pytest.mark.parametrize("name", HERE)
def test_estimator_runs_three_steps_without_nan(finished_runs, name):
    run_dir, result = finished_runs[name]
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    check_estimator_steps(name, steps)
