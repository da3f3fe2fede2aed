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
