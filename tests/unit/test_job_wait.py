"""Waiting on a Ray job (`rlrelay submit --wait`, `stop`) rides out a dashboard that answers with
server errors while it restarts, as it does one that does not answer, and still stops at once
on a real refusal (an unknown job id)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cluster import jobs
from cluster.cli import main


def ray_http_error(status: int, text: str) -> RuntimeError:
    """The error Ray's job client raises for an HTTP answer other than 200, made by its own code."""
    from ray.dashboard.modules.job.sdk import JobSubmissionClient

    with pytest.raises(RuntimeError) as raised:
        JobSubmissionClient._raise_error(None, SimpleNamespace(status_code=status, text=text))
    return raised.value


class Client:
    """A job API answering ``get_job_status`` from a list; the last answer repeats."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.stops = 0
        self.stop_errors: list[Exception] = []

    def get_job_status(self, submission_id: str):
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(value=answer)

    def stop_job(self, submission_id: str) -> bool:
        self.stops += 1
        if self.stop_errors:
            raise self.stop_errors.pop(0)
        return True


def answering(*answers):
    """A call returning (or raising, for an exception) its answers in turn."""
    queue = list(answers)

    def call():
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    return call


def test_server_errors_of_a_restarting_dashboard_are_ridden_out(monkeypatch, capsys):
    # Ray's client turns a 502/503 (the dashboard restarting, or the proxy in front of it) into
    # a RuntimeError: --wait and stop crashed on it instead of retrying until their deadline.
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    client = Client(ray_http_error(503, "Service Unavailable"), ray_http_error(502, "Bad Gateway"), "RUNNING",
                    "SUCCEEDED")
    assert jobs.wait_until_done(client, "job-1", deadline=time.monotonic() + 30) == "SUCCEEDED"
    assert "status code 503" in capsys.readouterr().err


def test_an_unknown_job_is_refused_at_once_not_retried():
    unknown = ray_http_error(404, "Job job-1 does not exist")
    client = Client(unknown)
    with pytest.raises(RuntimeError, match="status code 404"):
        jobs.wait_until_done(client, "job-1", deadline=time.monotonic() + 3600)
    assert client.calls == 1


def test_stop_names_a_job_api_that_failed_until_the_deadline(monkeypatch, capsys):
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    monkeypatch.setattr(jobs, "_connect", lambda address, *, allow_insecure, timeout_s=None: Client(ray_http_error(503, "down")))
    assert main(["stop", "job-1", "--timeout", "0.2", "--address", "http://127.0.0.1:1"]) == jobs.TIMED_OUT
    err = capsys.readouterr().err
    assert "job job-1 was asked to stop, but the job API still failed after 0.2 s" in err
    assert "status code 503" in err and "whether it has stopped is unknown" in err
    monkeypatch.setattr(jobs, "_connect", lambda address, *, allow_insecure, timeout_s=None: Client(ray_http_error(404, "no job")))
    assert main(["stop", "job-1", "--timeout", "0.2", "--address", "http://127.0.0.1:1"]) == 1
    assert "job job-1: Request failed with status code 404: no job" in capsys.readouterr().err


def test_following_a_job_rides_out_a_restarting_dashboard(monkeypatch, capsys):
    # `rlrelay submit --wait` gave up (exit 1) when its first status request met a 503.
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    client = Client(ray_http_error(503, "Service Unavailable"), ray_http_error(503, "Service Unavailable"),
                    "RUNNING", "SUCCEEDED")

    async def tail_job_logs(submission_id: str):
        raise ray_http_error(503, "Service Unavailable")
        yield  # an async generator, as Ray's

    client.tail_job_logs = tail_job_logs
    client.get_job_info = lambda submission_id: SimpleNamespace(message="done")
    assert jobs.follow(client, "job-1", timeout=30) == 0
    assert "job job-1: SUCCEEDED" in capsys.readouterr().out


def test_stop_asks_again_when_its_request_meets_a_restarting_dashboard(monkeypatch, capsys):
    # The stop request itself was sent once: a 503 or no answer ended `rlrelay stop` with exit 1.
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    client = Client("STOPPED")
    client.stop_errors = [ray_http_error(503, "Service Unavailable"), TimeoutError("no answer")]
    monkeypatch.setattr(jobs, "_connect", lambda address, *, allow_insecure, timeout_s=None: client)
    assert main(["stop", "job-1", "--timeout", "30", "--address", "http://127.0.0.1:1"]) == 0
    assert client.stops == 3
    assert "job job-1: STOPPED" in capsys.readouterr().out


def test_listing_jobs_names_a_job_api_that_fails(monkeypatch, capsys):
    # `rlrelay jobs` printed a traceback for a refusal, and gave up at once on a server error.
    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    client = Client("RUNNING")
    client.list_jobs = answering(ray_http_error(503, "Service Unavailable"), [SimpleNamespace(submission_id=None)])
    monkeypatch.setattr(jobs, "_connect", lambda address, *, allow_insecure, timeout_s=None: client)
    assert main(["jobs", "--address", "http://127.0.0.1:1"]) == 0
    assert "SUBMISSION ID" in capsys.readouterr().out
    client.list_jobs = answering(ray_http_error(403, "Forbidden"))
    assert main(["jobs", "--address", "http://127.0.0.1:1"]) == 1
    assert "rlrelay: cannot list the jobs: Request failed with status code 403: Forbidden" in capsys.readouterr().err


def test_following_a_job_keeps_to_its_timeout_after_a_slow_status_request(monkeypatch, capsys):
    # The log tail got the whole --timeout again after a status request that took part of it.
    import asyncio

    monkeypatch.setattr(jobs, "POLL_S", 0.01)
    given = []

    def wait_for(coroutine, timeout):
        coroutine.close()
        given.append(timeout)
        raise TimeoutError

    monkeypatch.setattr(asyncio, "wait_for", wait_for)
    client = Client("RUNNING")
    slow_status = client.get_job_status

    def get_job_status(submission_id):
        time.sleep(0.5 if not given else 0)
        return slow_status(submission_id)

    client.get_job_status = get_job_status
    client.tail_job_logs = lambda submission_id: None
    assert jobs.follow(client, "job-1", timeout=3) == jobs.TIMED_OUT
    assert given and given[0] <= 2.5
