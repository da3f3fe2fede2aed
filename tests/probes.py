"""Running a probe script in a process of its own: a learner rank joins a torch.distributed
group, which a process can do once, so each probe gets a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_probe(code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` (a script that prints one JSON object last) from the repository root with
    ``args`` as its argv, and return that object; a failing script fails the test with its stderr."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
