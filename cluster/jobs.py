"""Training jobs on a Ray cluster through the Ray Jobs API: ``rlrelay submit | jobs | logs | stop``.

    rlrelay submit CONFIG [key=value ...] --address http://HOST:8265 [--wait]
        └─ JobSubmissionClient.submit_job(entrypoint="python -m cluster.cli train CONFIG ...",
                                          runtime_env={working_dir, excludes, env_vars})
              on the cluster: Ray unpacks the working directory, sets RAY_ADDRESS, and runs the
              entrypoint there; `rlrelay train` sees RAY_ADDRESS and joins the cluster.

The job's submission id is chosen here and given to the run as the W&B tag ``ray-job:<id>`` (it is
in the W&B config too, under ``run.wandb_tags``), so a W&B run leads back to its Ray job.

Equivalents with Ray's own CLI: ``ray job submit --working-dir . -- python -m cluster.cli train
CONFIG``, ``ray job list``, ``ray job logs [-f] JOB``, ``ray job stop JOB``.

Nothing here imports ray at module level: the client is imported in the handlers, after the
security checks have set the environment Ray reads once at import (``cluster.security``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cluster.argtypes import positive_number
from cluster.job_spec import EXCLUDES, STOP_GRACE_S, job_env, job_tag, new_submission_id, train_entrypoint
from cluster.security import InsecureClusterError, check_cluster_auth, client_auth_env, leaked_secrets

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TIMED_OUT = 124  # like timeout(1)
POLL_S = 2.0
API_TIMEOUT_S = 60.0
"""Longest one request to the job API may take, but a submission."""
SUBMIT_TIMEOUT_S = 600.0
"""Longest a submission may take: it uploads the working directory first."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
T = TypeVar("T")


def register(sub) -> None:
    epilog = ("Exit status of --wait: 0 if the job SUCCEEDED, 1 if it FAILED or was STOPPED, "
              f"{TIMED_OUT} if --timeout passed first, 130 on Ctrl-C (in both cases the job keeps running).")
    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs API)", epilog=epilog,
                       description="Validate the config here, upload the working directory and run "
                                   "`rlrelay train CONFIG key=value...` as a Ray job. Secrets are not sent: "
                                   "the cluster's own environment provides them (deploy/README.md).")
    p.add_argument("config", help="job config YAML inside the working directory, e.g. deploy/jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    _add_connection_args(p)
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory "
                                                      "(default: the current one)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="environment variable for the job (value from here if only NAME); repeatable. "
                        "Secret-looking names are refused. One rlrelay also sets for its workers "
                        "(PYTHONPATH, TOKENIZERS_PARALLELISM, VLLM_LOGGING_LEVEL, VLLM_CONFIGURE_LOGGING) "
                        "keeps the value given here")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="passed on to `rlrelay train`: continue from the run's latest checkpoint or from the "
                        "checkpoint directory PATH (a path on the cluster)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.add_argument("--timeout", type=positive_number, default=3600.0, help="longest --wait, in seconds (default 3600)")
    p.set_defaults(handler=submit_command)

    p = sub.add_parser("jobs", help="list the Ray jobs of a cluster")
    _add_connection_args(p)
    p.set_defaults(handler=jobs_command)

    p = sub.add_parser("logs", help="print (or --follow) a Ray job's logs")
    p.add_argument("job", help="submission id, as printed by `rlrelay submit`")
    _add_connection_args(p)
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--timeout", type=positive_number, default=3600.0, help="longest --follow, in seconds")
    p.set_defaults(handler=logs_command)

    p = sub.add_parser("stop", help="stop a Ray job and wait until it has stopped",
                       description="Stop a Ray job. A training job submitted by `rlrelay submit` finishes the "
                                   f"step in progress and writes a checkpoint first (up to {STOP_GRACE_S} s, "
                                   "RAY_JOB_STOP_WAIT_TIME_S, before Ray kills it); `--resume auto` continues it. "
                                   "A job submitted with a longer RAY_JOB_STOP_WAIT_TIME_S needs a --timeout to match.")
    p.add_argument("job", help="submission id")
    _add_connection_args(p)
    p.add_argument("--timeout", type=positive_number, default=STOP_GRACE_S + 30.0,
                   help=f"longest wait for the job to stop, in seconds (default {STOP_GRACE_S + 30})")
    p.set_defaults(handler=stop_command)


def _add_connection_args(p) -> None:
    p.add_argument("--address", help=f"the cluster's job API (dashboard) URL; default RAY_API_SERVER_ADDRESS, "
                                     f"RAY_ADDRESS, or {DEFAULT_ADDRESS}")
    p.add_argument("--allow-insecure", action="store_true",
                   help="acknowledge that the cluster is on another host without Ray token authentication "
                        "(anyone who can reach it can run code on it); submit passes it on to the job "
                        "as ray.allow_insecure=true")


# -- commands ---------------------------------------------------------------------------------

def submit_command(args) -> int:
    from cluster.config import ConfigError, load_config

    working_dir = Path(args.working_dir).resolve()
    try:
        config_in_job = Path(args.config).resolve().relative_to(working_dir)
    except ValueError:
        return _fail(f"the config {args.config} is not inside the uploaded working directory {working_dir}", 2)
    try:
        env_vars = job_env(args.env, os.environ)
        cfg = load_config(args.config, args.overrides)
        submission_id = new_submission_id(cfg.run.name)
        overrides = [*args.overrides, f"run.wandb_tags={json.dumps([*cfg.run.wandb_tags, job_tag(submission_id)])}"]
        if args.allow_insecure:
            overrides.append("ray.allow_insecure=true")
        load_config(args.config, overrides)  # exactly what the job will load
        # Each job runs in a fresh copy of the working directory: checkpoints under a relative
        # path went away with the job that wrote them. They go to trainer.checkpoint_dir when
        # set (whatever run.dir is), else to run.dir.
        key, checkpoints = (("trainer.checkpoint_dir", cfg.trainer.checkpoint_dir) if cfg.trainer.checkpoint_dir
                            else ("run.dir", str(cfg.run.path)))
        if args.resume and not (checkpoints.startswith("~") or Path(checkpoints).is_absolute()):  # ~: the job's home
            raise ConfigError(f"--resume needs the checkpoints on storage the cluster keeps (an absolute {key}); "
                              f"{key} {checkpoints} is relative to the job's copy of the working directory")
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    except ValueError as e:
        return _fail(str(e), 2)
    entrypoint = train_entrypoint(config_in_job.as_posix(), overrides, resume=args.resume)
    leaked = leaked_secrets([entrypoint, *env_vars.values()], os.environ)
    if leaked:
        return _fail(f"the job's command line or environment would carry the value of {', '.join(leaked)}; "
                     f"secrets reach a job only through the cluster's own environment", 2)

    address = resolve_address(args.address, os.environ)
    client = _connect(address, allow_insecure=args.allow_insecure)
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    try:
        bounded(client.submit_job, entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                metadata={"rlrelay_run": cfg.run.name}, timeout_s=SUBMIT_TIMEOUT_S)
    except Exception as e:  # the job server reports every refusal as a RuntimeError with its text
        return _fail(f"submission refused by {address}: {e}", 1)
    print(f"submitted job {submission_id} to {address}")
    print(f"  follow: rlrelay logs {submission_id} --follow --address {address}")
    print(f"  stop:   rlrelay stop {submission_id} --address {address}")
    print(f"  W&B:    run {cfg.run.name!r}, tag {job_tag(submission_id)}")
    if not Path(cfg.run.path).is_absolute():
        print(f"  note: run.dir {cfg.run.path} is relative, so the run directory stays in the job's copy of the "
              f"working directory on the cluster; set run.dir to shared storage to keep it")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return follow(client, submission_id, timeout=args.timeout)


def jobs_command(args) -> int:
    client = _connect(resolve_address(args.address, os.environ), allow_insecure=args.allow_insecure)
    try:
        listed = asked_until(time.monotonic() + API_TIMEOUT_S, client.list_jobs)
    except (RuntimeError, OSError) as e:
        return _fail(f"cannot list the jobs: {e}", 1)
    jobs = [j for j in listed if j.submission_id]
    print(f"{'SUBMISSION ID':<36} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        print(f"{job.submission_id:<36} {job.status.value:<10} {started:<19} {entrypoint}")
    return 0


def logs_command(args) -> int:
    client = _connect(resolve_address(args.address, os.environ), allow_insecure=args.allow_insecure,
                      timeout_s=args.timeout if args.follow else None)
    if args.follow:
        return follow(client, args.job, timeout=args.timeout)
    try:
        print(bounded(client.get_job_logs, args.job), end="")
    except (RuntimeError, OSError) as e:
        return _fail(str(e), 1)
    return 0


def stop_command(args) -> int:
    client = _connect(resolve_address(args.address, os.environ), allow_insecure=args.allow_insecure,
                      timeout_s=args.timeout)
    deadline = time.monotonic() + args.timeout
    try:
        # Asked again on no answer or a server error: a request that timed out may have been
        # delivered, and asking a stopping job to stop again does no harm.
        asked_until(deadline, client.stop_job, args.job)
        status = wait_until_done(client, args.job, deadline=deadline)
    except (RuntimeError, OSError) as e:
        if not is_transient(e):
            return _fail(f"job {args.job}: {e}", 1)
        return _fail(f"job {args.job} was asked to stop, but the job API still failed after {args.timeout:g} s "
                     f"({e}): whether it has stopped is unknown", TIMED_OUT)
    if status is None:
        return _fail(f"job {args.job} has not stopped after {args.timeout:.0f} s", TIMED_OUT)
    print(f"job {args.job}: {status}")
    return 0


# -- following a job --------------------------------------------------------------------------

def follow(client, submission_id: str, *, timeout: float) -> int:
    """Print the job's logs as they come until it ends; 0 only if it SUCCEEDED."""
    import asyncio

    deadline = time.monotonic() + timeout
    try:
        bounded(client.get_job_status, submission_id, timeout_s=min(API_TIMEOUT_S, max(1.0, timeout)))
    except (RuntimeError, OSError) as e:
        if not is_transient(e):  # an unknown id: the job API's own words
            return _fail(str(e), 1)
        # else the job API is restarting: the log stream fails too, and the wait below asks again

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        try:
            # What is left of --timeout after the status request, not all of it again.
            asyncio.run(asyncio.wait_for(tail(), timeout=max(1.0, deadline - time.monotonic())))
        except (asyncio.TimeoutError, TimeoutError):
            pass  # the deadline decides below
        except Exception as e:  # a dropped log stream must not lose the job's outcome: poll for it
            print(f"rlrelay: log stream ended ({type(e).__name__}: {e}); waiting for the job's status",
                  file=sys.stderr)
        status = wait_until_done(client, submission_id, deadline=deadline)
    except KeyboardInterrupt:
        print(f"\nrlrelay: stopped following; job {submission_id} keeps running "
              f"(`rlrelay stop {submission_id}` stops it)", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as e:
        if not is_transient(e):
            return _fail(f"job {submission_id}: {e}", 1)
        return _fail(f"the job API still failed after {timeout:g} s ({e}): the status of job {submission_id} is "
                     f"unknown (it may still be running)", TIMED_OUT)
    if status is None:
        print(f"rlrelay: job {submission_id} still running after {timeout:.0f} s (it keeps running; "
              f"`rlrelay stop {submission_id}` stops it)", file=sys.stderr)
        return TIMED_OUT
    try:
        message = bounded(client.get_job_info, submission_id).message
    except (RuntimeError, OSError):  # the outcome is known; its message is a nicety
        message = None
    print(f"job {submission_id}: {status}" + (f" ({message})" if status != "SUCCEEDED" and message else ""))
    return 0 if status == "SUCCEEDED" else 1


def wait_until_done(client, submission_id: str, *, deadline: float) -> str | None:
    """The job's terminal status, or None if it has none by ``deadline`` (time.monotonic).
    A job API that does not answer, or answers with a server error, is asked again until the
    deadline, then its last error is raised; any other answer (an unknown job) is raised at once."""
    while True:
        status = asked_until(deadline, client.get_job_status, submission_id).value
        if status in TERMINAL:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def asked_until(deadline: float, call: Callable[..., T], *args) -> T:
    """``bounded(call, *args)``, asked again while it fails in a way that may pass (``is_transient``)
    until ``deadline`` (time.monotonic), then its last error is raised; any other error at once."""
    warned = False
    while True:
        try:
            return bounded(call, *args)
        except (RuntimeError, OSError) as e:
            if not is_transient(e) or time.monotonic() >= deadline:
                raise
            if not warned:
                print(f"rlrelay: the job API did not answer ({e}); retrying until the deadline", file=sys.stderr)
                warned = True
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def is_transient(e: BaseException) -> bool:
    """Whether a job API error may pass by itself, as while the dashboard restarts: no connection
    or no answer (requests' errors and ``bounded``'s TimeoutError are OSErrors), or a server error.
    Ray's client raises a RuntimeError "Request failed with status code N: ..." for every answer
    but 200, with no other way to tell them apart: a 5xx (the dashboard, or a proxy or port-forward
    in front of it, failing) may pass; a 4xx (an unknown job id) will not."""
    if isinstance(e, OSError):
        return True
    code = re.search(r"status code (\d{3})", str(e)) if isinstance(e, RuntimeError) else None
    return code is not None and code.group(1).startswith("5")


def resolve_address(flag: str | None, env: Mapping[str, str]) -> str:
    """The job API address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else loopback."""
    return flag or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _connect(address: str, *, allow_insecure: bool, timeout_s: float | None = None):
    """A JobSubmissionClient for ``address`` after the security checks; exits (2: refused,
    1: unreachable) with a message otherwise. A command with a ``--timeout`` passes it: the
    connection is then bounded by it too, and running out is ``TIMED_OUT`` (status unknown)."""
    if "://" not in address and address.rstrip("/").endswith(":8265"):
        # Ray's client reads a scheme-less HOST:PORT as the cluster's own (GCS) address, which
        # works for HOST:6379 (as RAY_ADDRESS holds it) but not for the dashboard's port.
        raise SystemExit(_fail(f"the job API address {address!r} names the dashboard's port without a scheme: "
                               f"use http://{address}", 2))
    # Ray reads the auth mode once, at import: settle it first (a token found → token mode).
    os.environ.update(client_auth_env(os.environ))
    try:
        check_cluster_auth(address, allow_insecure=allow_insecure, env=os.environ)
    except (InsecureClusterError, ValueError) as e:
        raise SystemExit(_fail(f"refused: {e}", 2)) from None
    # The client prefers these variables over its argument; make them name what was checked.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    from ray.job_submission import JobSubmissionClient

    try:
        return bounded(JobSubmissionClient, address,
                       timeout_s=API_TIMEOUT_S if timeout_s is None else min(API_TIMEOUT_S, timeout_s))
    except TimeoutError as e:
        raise SystemExit(_fail(f"cannot use the Ray job API at {address}: {e}",
                               1 if timeout_s is None else TIMED_OUT)) from None
    except Exception as e:  # unreachable, refused, wrong version: Ray words each differently
        raise SystemExit(_fail(f"cannot use the Ray job API at {address}: {e}", 1)) from None


def bounded(call: Callable[..., T], *args, timeout_s: float | None = None, **kwargs) -> T:
    """``call(*args, **kwargs)`` with a deadline. Ray's job client sends its HTTP requests with no
    timeout, so a dashboard that accepts a connection and never answers would block a command
    past its own ``--timeout``; the call runs in a daemon thread, abandoned if it overruns."""
    timeout_s = API_TIMEOUT_S if timeout_s is None else timeout_s
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True, name="rlrelay-job-api")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"the Ray job API did not answer {getattr(call, '__name__', 'a call')} "
                           f"within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


JOIN_TIMEOUT_S = 60.0
"""Longest a command waits to join a running cluster: ``ray.init`` retries an address where
nothing answers for many minutes, printing only its own retry warnings."""


class ClusterUnreachable(RuntimeError):
    """No Ray cluster answered at the address within ``JOIN_TIMEOUT_S``."""


def join_cluster(address: str, *, timeout_s: float | None = None, **init_kwargs) -> None:
    """``ray.init(address=address, **init_kwargs)`` with a deadline (default ``JOIN_TIMEOUT_S``),
    for an existing cluster."""
    import ray

    timeout_s = JOIN_TIMEOUT_S if timeout_s is None else timeout_s
    if threading.current_thread() is threading.main_thread():
        # What ray.init does on the main thread, and cannot from the thread it runs in here:
        # SIGTERM raises SystemExit, so a driver being stopped still shuts its workers down.
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        logging.getLogger("ray._private.worker").addFilter(_NotMainThreadWarning())
    try:
        bounded(ray.init, address=address, timeout_s=timeout_s, **init_kwargs)
    except TimeoutError:
        raise ClusterUnreachable(f"no Ray cluster answered at {address!r} within {timeout_s:.0f} s: is it running, "
                                 f"and is this its head node's address (HOST:6379)?") from None
    except ConnectionError as e:  # nothing at `auto`, or a refused connection
        raise ClusterUnreachable(f"cannot reach a Ray cluster at {address!r}: {e}") from None


class _NotMainThreadWarning(logging.Filter):
    """Drops ray.init's warning that it could not set its SIGTERM handler (join_cluster sets it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def _fail(message: str, code: int) -> int:
    print(f"rlrelay: {message}", file=sys.stderr)
    return code
