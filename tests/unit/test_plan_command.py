"""``rlrelay plan`` as a command: it runs on every job config, prints JSON and its verdicts,
sizes the rollout engines' KV cache, and agrees with the README's fit table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.memory_model import GIB, LearnerShape, memory_options
from cluster.plan import KNOWN_CONFIGS, build_report, resolve_architecture

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((REPO / "deploy" / "jobs").glob("*.yaml"))
GPU_JOB_CONFIGS = [p for p in JOB_CONFIGS if p.name != "demo.yaml"]


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: p.name)
def test_plan_runs_on_every_job_config(config, capsys):
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and "optimizer state" in out and "logits" in out
    assert "verdict: FITS" in out  # every shipped job is sized to fit its GPUs
    if config in GPU_JOB_CONFIGS:
        assert "built-in table entry 'Qwen2.5-0.5B-Instruct'" in out and "per GPU" in out
        assert "vLLM weights 942.29 MiB in bf16 per engine" in out
    else:
        assert "demo's own model" in out


def test_plan_json_and_a_verdict_that_does_not_fit(capsys):
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "model.path=/models/Qwen2.5-7B-Instruct", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and report["total_bytes"] > report["usable_bytes"]
    assert report["advice"][0]["setting"] == "learner.activation_checkpointing=true"
    assert report["advice"][-1]["fits"]
    assert set(report["per_gpu"]) == {"policy", "reference", "peak"}
    assert main(["plan", config, "model.path=/models/Qwen2.5-7B-Instruct", "learner.activation_checkpointing=true",
                 "--reference-offload", "--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "verdict: FITS" in out and "activation checkpointing on" in out and "cpu offload on" in out
    assert main(["plan", config, "model.path=/models/Qwen2.5-7B-Instruct", "learner.micro_batch_tokens=65536"]) == 0
    out = capsys.readouterr().out
    assert "micro-batches of up to 65536 tokens" in out and "learner.micro_batch_tokens=" in out


def test_plan_says_when_nothing_is_left_to_turn_on_and_when_the_rollout_weights_cannot_fit(capsys):
    # It printed "with all of these on, also:" after an empty list, and "about -0.50 GiB is left".
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "learner.gpu_memory_gib=0.5", "learner.activation_checkpointing=true",
                 "learner.sharding=full", "--reference-offload", "--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "with every option already on: no micro-batch fits" in out
    assert "THE WEIGHTS DO NOT FIT in rollout.gpu_memory_utilization of a 0.5 GiB GPU" in out and "about -" not in out


def test_the_rollout_line_sizes_the_kv_cache_of_engines_that_share_a_gpu(capsys):
    # An engine on a fraction of a GPU takes gpu_memory_utilization of the whole GPU; the plan
    # printed no KV-cache figure for it, as for a CPU engine.
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.4", "--json"]) == 0
    rollout = json.loads(capsys.readouterr().out)["rollout"]
    assert rollout["kv_cache_bytes"] == int(0.4 * 80 * GIB) - rollout["weights_bytes_bf16"]
    assert main(["plan", config, "rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.4"]) == 0
    assert "x 0.5 GPU; at rollout.gpu_memory_utilization of a 80 GiB GPU about 31" in capsys.readouterr().out


def test_plan_names_the_missing_model(capsys):
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "model.path=/models/unknown-model"]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_plan_reads_a_model_under_the_home_directory(tmp_path, monkeypatch, capsys):
    # `~/mymodel` was looked up as is, then by its name in the built-in table.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text(json.dumps(KNOWN_CONFIGS["Qwen2.5-0.5B-Instruct"]))
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "model.path=~/mymodel", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["source"] == str(tmp_path / "mymodel" / "config.json")


def test_plan_module_does_not_import_torch():
    code = ("import sys, cluster.plan, cluster.memory_model, cluster.memory_advice; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def readme_fit_table() -> list[list[str]]:
    """The rows of the README's "What fits, by the planner" table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("What fits, by the planner"):]
    section = section[:section.index("\n\n", section.index("| policy |"))]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| Qwen")]


def test_the_readme_fit_table_is_what_the_planner_prints():
    # The table is the planner's output; a change to the memory model must reprint it.
    def plan(model: str, ranks: str, chunked: bool) -> tuple[str, bool, str | None]:
        cfg = load_config(REPO / "deploy/jobs/gsm8k-0.5b-rm-1node.yaml", [
            f"model.path=/models/{model}-Instruct", f"learner.world_size={ranks}", "model.max_model_len=2048",
            "rollout.max_new_tokens=1024", "learner.micro_batch_size=4", f"learner.chunked_head={str(chunked).lower()}"])
        arch, _ = resolve_architecture(cfg, None)
        report = build_report(arch, LearnerShape.from_config(cfg), memory_options(cfg.learner), cfg)
        alternative = (report["advice"] or [None])[0]
        return (f"{report['total_bytes'] / GIB:.1f}", report["fits"],
                alternative and f"{alternative['setting']}: {alternative['total_bytes'] / GIB:.1f}")

    rows = readme_fit_table()
    assert len(rows) == 6
    for model, ranks, planned, fits, if_not, unchunked in rows:
        total, fit, alternative = plan(model, ranks.split()[0], chunked=True)
        assert (planned, fits) == (total, "yes" if fit else "no"), (model, ranks)
        assert if_not == ("" if alternative is None else f"`{alternative.split(':')[0]}`:{alternative.split(':')[1]} GiB")
        total, _, alternative = plan(model, ranks.split()[0], chunked=False)
        assert unchunked == total + ("" if alternative is None else f" ({alternative.split(': ')[1]})"), (model, ranks)
