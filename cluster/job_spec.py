"""What a Ray job of rlrelay is made of: its submission id and W&B tag, the entrypoint and the
environment ``rlrelay submit`` sends, and what a driver reads of the job it runs in.

Pure functions of their arguments and the environment (no Ray import), so the security checks
and the tests use them without a cluster.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.security import is_secret_name

# Uploaded with every job: the repository minus environments, outputs and caches (Ray also
# honours the working directory's .gitignore).
EXCLUDES = [".venv/", ".git/", "runs/", ".cache/", "wandb/", "__pycache__/", ".pytest_cache/", "*.egg-info/"]
# Non-secret W&B settings that follow the user into the job when set locally.
FORWARDED_ENV = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL")
JOB_TAG_PREFIX = "ray-job:"

STOP_GRACE_S = 300
"""How long a stopped job's driver has from SIGTERM to SIGKILL, given to Ray's job supervisor
as RAY_JOB_STOP_WAIT_TIME_S (Ray's own default is 3 s): the driver finishes the step in progress
and writes its checkpoint, as on any SIGTERM."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def new_submission_id(run_name: str) -> str:
    """``rlrelay-<run name>-<8 hex>``: readable in ``ray job list``, unique per submission."""
    name = "".join(c if c.isalnum() else "-" for c in run_name.lower()).strip("-")[:40] or "run"
    return f"rlrelay-{name}-{secrets.token_hex(4)}"


def job_tag(submission_id: str) -> str:
    """The W&B tag that names a run's Ray job."""
    return f"{JOB_TAG_PREFIX}{submission_id}"


def job_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The job config (``runtime_env``, ``metadata``) of the Ray job this process is the driver
    of; {} outside a job.

    Ray's job supervisor gives the driver its job config in the environment variable
    RAY_JOB_CONFIG_JSON_ENV_VAR; this holds for jobs from ``rlrelay submit``, ``ray job submit``
    and KubeRay RayJobs alike.
    """
    raw = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def current_submission_id(env: Mapping[str, str]) -> str | None:
    """The submission id of the Ray job this process is the driver of, or None outside a job."""
    metadata = job_config(env).get("metadata")
    value = metadata.get("job_submission_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


def job_env_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the runtime env of the Ray job this process is the driver of sets ({} outside
    a job): ``ray.init`` in such a job refuses a runtime env that sets any of them again."""
    runtime_env = job_config(env).get("runtime_env")
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    return env_vars if isinstance(env_vars, dict) else {}


def train_entrypoint(config: str, overrides: Sequence[str], resume: str | None = None) -> str:
    """The job's shell command: the cluster's ``python`` runs the uploaded ``cluster.cli``."""
    return shlex.join(["python", "-m", "cluster.cli", "train", config, *overrides,
                       *(["--resume", resume] if resume else [])])


def job_env(specs: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """The job's environment variables: the stop grace period, the non-secret W&B settings set
    here, then ``--env`` ``NAME`` (value from ``env``) or ``NAME=VALUE``. Raises ValueError for a
    secret's name.

    A variable that ``rlrelay train`` also sets for its workers (``cluster.launch.WORKER_ENV``,
    PYTHONPATH) is no conflict: in a job, ``init_ray`` leaves the variables the job sets to the
    job (Ray's ``ray.init`` refuses a variable set by both), so the value given here wins, and
    Ray puts the job's working directory first on PYTHONPATH whatever it holds."""
    out = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)}
    out.update({name: env[name] for name in FORWARDED_ENV if env.get(name)})
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"--env {spec!r}: expected NAME or NAME=VALUE, NAME of letters, digits and _ "
                             f"(not starting with a digit)")
        if is_secret_name(name):
            raise ValueError(f"--env {name}: secrets are not sent with a job (a job's environment is readable "
                             f"by anyone with access to the job API); set {name} in the cluster's environment "
                             f"(a Kubernetes Secret, or the shell that runs `ray start`)")
        if not sep:
            if name not in env:
                raise ValueError(f"--env {name}: not set here; use --env {name}=VALUE")
            value = env[name]
        if name == "RAY_JOB_STOP_WAIT_TIME_S" and not (value.isascii() and value.isdigit() and int(value) > 0):
            # Ray reads it when the job is stopped: a bad value would fail the stop itself.
            raise ValueError(f"--env RAY_JOB_STOP_WAIT_TIME_S={value!r}: expected a whole number of seconds > 0")
        out[name] = value
    return out
