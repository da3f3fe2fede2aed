"""Helpers of the integration tests: datasets, running the CLI, reading W&B offline runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
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
