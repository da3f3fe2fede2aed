"""Calls to Ray's job API are bounded: its client sends HTTP requests with no timeout, so a
dashboard that stops answering must not hold `rlrelay submit --wait`, `stop` or `logs` past
their own deadlines, and a dashboard that restarts must not lose the job's outcome."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import requests

from cluster import jobs


def test_bounded_returns_the_value_or_raises_the_error():
    assert jobs.bounded(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="gone"):
        jobs.bounded(lambda: {}["gone"])


def test_bounded_gives_up_on_an_http_request_that_never_gets_an_answer():
    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api/jobs/x"
        # Unbounded, the request would wait for ever (until pytest's timeout fails the test).
        with pytest.raises(TimeoutError, match="did not answer get within 0.5 s"):
            jobs.bounded(requests.get, url, timeout_s=0.5)


class FlakyClient:
    """A job API that fails twice (a dashboard restarting), then reports the job running, then done."""

    def __init__(self) -> None:
        self.answers = [ConnectionError("connection refused"), TimeoutError("no answer"), "RUNNING", "SUCCEEDED"]

    def get_job_status(self, submission_id: str):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(value=answer)


def test_waiting_for_a_job_rides_out_a_dashboard_restart(monkeypatch, capsys):
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    assert jobs.wait_until_done(FlakyClient(), "job-1", deadline=time.monotonic() + 30) == "SUCCEEDED"
    assert capsys.readouterr().err.count("did not answer") == 1  # warned once, not per retry


def test_waiting_past_the_deadline_raises_the_last_error(monkeypatch):
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    client = FlakyClient()
    client.answers = [ConnectionError("connection refused")] * 1000
    with pytest.raises(ConnectionError, match="refused"):
        jobs.wait_until_done(client, "job-1", deadline=time.monotonic() + 0.2)


def test_stop_keeps_to_its_timeout_while_connecting_to_a_job_api_that_never_answers(monkeypatch, capsys):
    # Connecting took the fixed 60 s whatever --timeout said, and ended as unreachable (1),
    # not as the timeout's "status unknown" (124).
    from cluster.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SystemExit) as exit_:
            main(["stop", "raysubmit_x", "--timeout", "2", "--address", address, "--allow-insecure"])
        assert exit_.value.code == jobs.TIMED_OUT and time.monotonic() - started < 30
    assert "did not answer JobSubmissionClient within 2 s" in capsys.readouterr().err
