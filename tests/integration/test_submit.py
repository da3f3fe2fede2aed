"""`rlrelay submit` against a real Ray head: `ray start --head` on loopback with token
authentication, a 2-step training job through the Ray Jobs API, its logs, its summary and its
W&B run, a failing job, a stopped job, and clients without the token refused.

The head runs in its own session with its own temp dir and ports, and is stopped by its own
process ids (not `ray stop`, which stops every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import _log_records, run_cli, write_addition_data

pytestmark = pytest.mark.integration

JOB_ID = re.compile(r"submitted job (\S+)")


class Head:
    """A Ray head started by `ray start --head --block`, and the environment of its clients."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        token_path = root / "auth_token"
        token_path.write_text(self.token)
        token_path.chmod(0o600)
        # What a user's shell would hold: token mode, the cluster's token in a file, the venv on
        # PATH (the job's `python` is the one on the head's PATH), W&B offline and without a key.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "WANDB_MODE": "offline",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        head_env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "WANDB_API_KEY")}
        head_env.update(self.env, RAY_USAGE_STATS_ENABLED="0")
        self.log = (root / "head.log").open("w")
        # Ports free now, not fixed ones: other tests' Ray instances and other jobs on a shared
        # machine may hold any given port.
        gcs, dashboard, agent, client = free_ports(4)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             "--num-cpus=4", f"--temp-dir={root / 'ray'}", "--disable-usage-stats"],
            env=head_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_text()}")
            if http_status(self.address, "/api/jobs/", token=self.token) == 200:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job API did not answer within {timeout} s:\n{self.log_text()}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGINT to `ray start --block` shuts its node down (~3 s); then SIGKILL what is left
        of the session it was started in."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while (self.process.poll() is None or self.session_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(10)
        self.log.close()

    def session_pids(self) -> list[int]:
        """Live processes in the head's session (zombies excluded)."""
        out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
        return [int(pid) for pid, sid, stat in (line.split() for line in out.splitlines())
                if int(sid) == self.process.pid and not stat.startswith("Z")]

    def log_text(self) -> str:
        self.log.flush()
        return (self.root / "head.log").read_text()[-4000:]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nothing listens on (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_status(address: str, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"{address}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def head():
    # A short path: Ray's unix sockets live under the temp dir (107-character limit).
    root = Path(tempfile.mkdtemp(prefix="rlrelay-head-", dir="/tmp"))
    head = Head(root)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


def submit(head: Head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("submit", *args, "--address", head.address, env=head.env, timeout=timeout)


def test_submit_two_steps_and_wait_for_success(head, tmp_path, tiny_model_dir):
    train = write_addition_data(tmp_path / "train.jsonl", 32, seed=0)
    evals = write_addition_data(tmp_path / "eval.jsonl", 8, seed=1)
    run_dir = tmp_path / "run"
    result = submit(head, "deploy/jobs/demo.yaml", "run.name=submit-test", "trainer.steps=2",
                    "rollout.num_workers=1", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                    "model.max_model_len=64", f"model.path={tiny_model_dir}", f"data.train_path={train}",
                    f"data.eval_path={evals}", f"run.dir={run_dir}", "--wait", "--timeout", "480",
                    timeout=540)  # a job's start-up alone is ~50 s here: room for a loaded machine
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    job_id = JOB_ID.search(result.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in result.stdout

    # The run wrote its outputs where the config said, from inside the cluster.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_completed"] == 2

    # The job's logs hold the training's own final line; `rlrelay jobs` lists the job.
    logs = run_cli("logs", job_id, "--address", head.address, env=head.env, timeout=60)
    assert logs.returncode == 0, logs.stderr
    final = json.loads(next(line for line in logs.stdout.splitlines() if line.startswith('{"run_dir"')))
    assert final["steps_completed"] == 2 and final["run_dir"] == str(run_dir)
    listed = run_cli("jobs", "--address", head.address, env=head.env, timeout=60)
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED", listed.stdout, re.M), listed.stdout + listed.stderr

    # The W&B run carries the Ray job id as a tag (and so in its config, under run.wandb_tags).
    assert f"ray-job:{job_id}" in wandb_run_tags(run_dir)


def test_wait_exits_nonzero_when_the_job_fails(head, tmp_path, tiny_model_dir):
    result = submit(head, "deploy/jobs/demo.yaml", f"model.path={tiny_model_dir}",
                    "data.train_path=/nonexistent/train.jsonl",
                    f"run.dir={tmp_path / 'run'}", "--wait", "--timeout", "120")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = JOB_ID.search(result.stdout).group(1)
    assert f"job {job_id}: FAILED" in result.stdout
    assert "/nonexistent/train.jsonl" in result.stdout  # the job's own error, streamed back


def test_stop_lets_a_running_job_checkpoint_first(head, tmp_path, tiny_model_dir):
    # Ray's job supervisor SIGKILLs 3 s after its SIGTERM by default: a run stopped mid-way lost
    # everything since its last checkpoint. `rlrelay submit` gives the driver time to finish the
    # step in progress and write its checkpoint, as on any SIGTERM.
    train = write_addition_data(tmp_path / "train.jsonl", 64, seed=0)
    run_dir = tmp_path / "run"
    result = submit(head, "deploy/jobs/demo.yaml", "run.name=stop-test", "trainer.steps=1000",
                    "rollout.num_workers=1", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                    "model.max_model_len=64", f"model.path={tiny_model_dir}", f"data.train_path={train}",
                    "data.eval_path=null", f"run.dir={run_dir}", timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = JOB_ID.search(result.stdout).group(1)
    deadline = time.monotonic() + 400
    while not trained_steps(run_dir / "metrics.jsonl"):
        assert time.monotonic() < deadline, "no step within 400 s:\n" + \
            run_cli("logs", job_id, "--address", head.address, env=head.env, timeout=60).stdout[-4000:]
        time.sleep(2)
    stopped = run_cli("stop", job_id, "--address", head.address, "--timeout", "240", env=head.env, timeout=270)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job_id}: STOPPED" in stopped.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps_completed"] >= 1
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{summary['steps_completed']:06d}", checkpoints
    assert trained_steps(run_dir / "metrics.jsonl") == summary["steps_completed"]


def trained_steps(metrics: Path) -> int:
    """Training steps logged so far (eval-only lines not counted)."""
    if not metrics.is_file():
        return 0
    return sum("reward/mean" in json.loads(line) for line in metrics.read_text().splitlines() if line.strip())


def test_clients_without_the_token_are_refused(head):
    # Plain HTTP without a token, and the CLI with a wrong one.
    assert http_status(head.address, "/api/jobs/") == 401
    wrong = run_cli("jobs", "--address", head.address, env={**head.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
                    timeout=60)
    assert wrong.returncode != 0
    assert "auth" in wrong.stderr.lower(), wrong.stderr[-2000:]


def wandb_run_tags(run_dir: Path) -> set[str]:
    """Tags of the W&B offline run(s) under ``run_dir``, read from the run record."""
    from wandb.proto import wandb_internal_pb2 as pb

    tags: set[str] = set()
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        for payload in _log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "run":
                tags.update(record.run.tags)
    return tags


def test_a_job_knows_its_submission_id(head):
    """What the tracker reads to tag a run submitted by other means (`ray job submit`, a KubeRay
    RayJob): Ray hands the driver its submission id in its job config."""
    code = "import os; from cluster.job_spec import current_submission_id; print('ID', current_submission_id(os.environ))"
    env = {**os.environ, **head.env}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.address,
                             "--submission-id", "plain-ray-job-1", "--working-dir", ".",
                             "--runtime-env-json", json.dumps({"excludes": [".venv/", ".git/", "runs/", ".cache/"]}),
                             "--", "python", "-c", code],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ID plain-ray-job-1" in result.stdout
