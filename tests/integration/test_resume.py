"""Checkpoint, SIGKILL, resume: a run killed after its step-2 checkpoint and resumed with
`--resume auto` ends where an uninterrupted run ends (metrics and weights), in the same W&B
run; and `rlrelay export` writes a model transformers loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ESTIMATOR_CASES, REPO, check_estimator_steps, run_cli, write_addition_data

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent


def job_args(tiny_model_dir, train, run_dir) -> list[str]:
    return ["train", "deploy/jobs/demo.yaml", "trainer.steps=4", "trainer.save_every=2", "rollout.num_workers=1",
            "rollout.prompts_per_step=16", "rollout.samples_per_prompt=4", "model.max_model_len=64",
            f"model.path={tiny_model_dir}", f"data.train_path={train}", f"run.dir={run_dir}",
            "trainer.sample_table_every=0", "reward.functions=[rewards_for_tests:paced_length]",
            "learner.lr=1e-3", *ESTIMATOR_CASES["gae"]]  # a critic and a reference model to restore too


def env() -> dict:
    return {"PYTHONPATH": str(HERE)}


def steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("straight")
    train = write_addition_data(root / "train.jsonl", 64, seed=0)
    result = run_cli(*job_args(tiny_model_dir, train, root / "run"), env=env())
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run"


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, straight):
    train = write_addition_data(tmp_path / "train.jsonl", 64, seed=0)
    resumed = tmp_path / "resumed"

    # Start the same job, SIGKILL the driver (and its local Ray instance) right after the
    # step-2 checkpoint appears, then resume.
    full_env = {**os.environ, "WANDB_MODE": "offline", **env()}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *job_args(tiny_model_dir, train, resumed)],
                            cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt2 = resumed / "checkpoints" / "step-000002"
    deadline = time.time() + 300
    while not ckpt2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert ckpt2.exists(), "the run never wrote its step-2 checkpoint"
    assert not (resumed / "checkpoints" / "step-000004").exists(), "killed too late: the run had finished"
    first_id = json.loads((ckpt2 / "driver.json").read_text())["wandb_run_id"]

    result = run_cli(*job_args(tiny_model_dir, train, resumed), "--resume", "auto", env=env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps_completed"] == 4
    assert summary["wandb_run_id"] == first_id  # the same W&B run continues
    a, b = steps(straight), steps(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        for key in ("reward/mean", "policy/pg_loss", "value/vf_loss", "kl/value", "rollout/response_length"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-6), (s, key)
    wa = load_file(straight / "final_model" / "model.safetensors")
    wb = load_file(resumed / "final_model" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max(float((wa[k] - initial[k]).abs().max()) for k in wa) > 1e-4  # training moved the weights
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_the_run_is_the_gae_estimator_case(straight):
    rows = steps(straight)
    check_estimator_steps("gae", [rows[s] for s in sorted(rows)])


def test_export_writes_a_loadable_model(tmp_path, straight):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shutil

    run_dir = straight
    # A copy whose model carries generation defaults of its own, which the export keeps.
    ckpt = shutil.copytree(run_dir / "checkpoints" / "step-000004", tmp_path / "step-000004")
    generation = json.loads((ckpt / "model" / "generation_config.json").read_text())
    (ckpt / "model" / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.6}))
    out = tmp_path / "exported"
    result = run_cli("export", str(ckpt), str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("12+3=")) == "12+3="
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    for (name, p), q in zip(model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(p, q), name
    # vLLM serves the exported directory too.
    probe = ("import os, sys\nos.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
             "from actors.rollout_worker import EngineSettings, RolloutWorker\n"
             "from actors.types import GenerateRequest, Prompt, SamplingSettings\n"
             "w = RolloutWorker(0, EngineSettings(model_path=sys.argv[1], max_model_len=64, kv_cache_gib=0.1))\n"
             "r = w.generate(GenerateRequest(prompts=(Prompt(index=0, text='12+3='),), step=0, seed=0,\n"
             "    sampling=SamplingSettings(temperature=1.0, max_new_tokens=4)))\n"
             "print('TOKENS', len(r[0].response_token_ids))\n")
    served = subprocess.run([sys.executable, "-c", probe, str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0 and "TOKENS" in served.stdout, served.stderr[-3000:]
    # No pickle anywhere in a checkpoint's metadata: it is JSON.
    json.loads((ckpt / "learner" / ".metadata.json").read_text())
    assert not (ckpt / "learner" / ".metadata").exists()
