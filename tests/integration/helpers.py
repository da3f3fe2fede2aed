"""Helpers of the integration tests: datasets, running the CLI, reading W&B offline runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_addition_data(path: Path, n: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``rlrelay`` command as a user would; output is kept for failure messages."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_cli_many(commands: dict[str, list[str]], parallel: int, timeout: float = 900,
                 env: dict | None = None) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``rlrelay`` commands, ``parallel`` at a time (each its own process, so a
    ``train`` starts its own local Ray instance); results by name, in ``commands``' order.
    Output goes to files, not pipes: a run blocked on a full pipe nobody reads would hang."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen, float, Any, Any]] = {}
    done: dict[str, subprocess.CompletedProcess] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, args = pending.pop(0)
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=full_env,
                                        stdout=out, stderr=err, text=True)
                running[name] = (proc, time.monotonic() + timeout, out, err)
            for name, (proc, deadline, out, err) in list(running.items()):
                if proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rlrelay {' '.join(commands[name][:2])} ({name}) ran past {timeout} s")
                    continue
                out.seek(0)
                err.seek(0)
                done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
                out.close()
                err.close()
                del running[name]
            time.sleep(0.2)
    finally:
        for proc, _, out, err in running.values():
            proc.kill()
            proc.wait()
            out.close()
            err.close()
    return {name: done[name] for name in commands}


def read_wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """History rows of the W&B offline run(s) under ``run_dir``, read from the ``.wandb`` file.

    The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers: crc32, length,
    type) of wandb's protobuf ``Record`` messages; wandb 0.31 ships no Python reader for it.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for payload in _log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def _log_records(data: bytes, block: int = 32768) -> list[bytes]:
    records, partial, pos = [], b"", 7  # 7-byte file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    return records


ESTIMATOR_CASES: dict[str, list[str]] = {
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
"""Every advantage estimator with the options that go with it, each run as a real job.

A job is mostly start-up (~50 s here), so four cases ride on jobs other tests run anyway
(``ESTIMATOR_HOSTS``) and check their steps with ``check_estimator_steps``; the rest run in
test_estimators_e2e."""

ESTIMATOR_HOSTS = {"gae": "test_resume", "grpo": "test_train_e2e", "rloo": "test_async",
                   "reinforce_pp": "test_elastic (autoscale)"}


def check_estimator_steps(name: str, steps: list[dict]) -> None:
    """The step rows of a job run with ``ESTIMATOR_CASES[name]``: finite, and the parts of the
    algorithm the case turns on show in its metrics where a metric shows them (reward
    normalisation and ``loss_agg`` have none: their math is unit-tested, here they only run)."""
    import math

    assert len(steps) >= 2, f"{name}: needs at least two steps, got {len(steps)}"
    for r in steps:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"{name}, step {r['step']}: non-finite metrics {bad}"
        assert "policy/pg_loss" in r or name == "gae", (name, r["step"])
    if name == "gae":
        assert "policy/pg_loss" not in steps[0] and "value/vf_loss" in steps[0]  # critic warm-up
        assert "policy/pg_loss" in steps[1] and "value/explained_variance" in steps[1]
    if name in ("gae", "rloo", "reinforce_pp", "grpo"):
        assert all("kl/value" in r for r in steps), name  # a reference model was built and used
    if name == "dr_grpo":
        assert not any("kl/value" in r for r in steps)  # no KL, no reference model
    if name != "reinforce_pp_baseline":  # the only case with an overlong buffer
        assert all(r["reward/overlong_penalty_mean"] == 0 for r in steps), name
    if name == "rloo":
        assert steps[-1]["kl/coef"] != 0.05  # the adaptive controller moved
        assert "tis/weight_mean" in steps[0]
    if name == "grpo":  # the KL is a loss term (not in the reward), with a dual clip
        assert all("kl/loss_term" in r and "policy/dual_clipfrac" in r for r in steps)
    if name == "reinforce_pp_baseline":
        # An untrained policy scores 0 on most prompts, so dynamic sampling drops uniform groups
        # and generates again (the metric itself is logged with 0 when the option is off).
        assert sum(r["rollout/filtered_groups"] for r in steps) > 0
        assert max(r["rollout/generation_rounds"] for r in steps) > 1
        # Responses run to max_new_tokens, inside the 4-token buffer: the penalty bites.
        assert min(r["reward/overlong_penalty_mean"] for r in steps) < 0
