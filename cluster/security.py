"""Secure defaults: who may reach the Ray cluster a job starts, joins or submits to, and where
secrets may appear.

Anyone who can reach a Ray cluster's job API (the dashboard, port 8265) or its GCS (6379) can
run arbitrary code on every node of it. Ray 2.60's protection is token authentication
(``RAY_AUTH_MODE=token``; the token comes from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``). Ray's servers listen on every interface even
when the node address is 127.0.0.1 (DESIGN, "Ray: clusters, jobs, security"), so even a
"local" instance is reachable from the network: token authentication is its protection too.

The rules (README, "Security and threat model"):
- a fresh local instance keeps Ray's default token authentication; ``RAY_AUTH_MODE=disabled``
  is refused unless the risk is acknowledged, and after start-up ``require_token_auth`` checks
  with Ray itself that authentication is on;
- joining or submitting to a cluster on another host needs ``RAY_AUTH_MODE=token`` and a token,
  unless the risk is acknowledged; a loopback address (or ``auto``) is this machine's own;
- secrets come from the environment or files only: never from argv (visible in ``ps``, stored
  in the Ray job's entrypoint and in W&B's run metadata), config dumps, logs or the W&B config.

Ray reads ``RAY_AUTH_MODE`` once, when ``ray`` is first imported, so every decision here is made
from the environment, and this module imports ``ray`` only inside ``token_auth_active``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("rlrelay")

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"

# Names of environment variables that hold secrets: WANDB_API_KEY, RAY_AUTH_TOKEN, HF_TOKEN,
# AWS_SECRET_ACCESS_KEY, ... A word boundary is an underscore, so TOKENIZERS_PARALLELISM is not
# one. Names that point at a secret (RAY_AUTH_TOKEN_PATH, ..._FILE) are not secrets themselves.
_SECRET_WORD = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:_|$)", re.IGNORECASE)
_POINTER_SUFFIX = re.compile(r"_(?:PATH|FILE|DIR)$", re.IGNORECASE)
# Shorter values ("1", "true") would match ordinary text; real keys and tokens are far longer.
MIN_SECRET_LENGTH = 8
REDACTED = "***"


class InsecureClusterError(RuntimeError):
    """Refused: the cluster would be reachable without token authentication and the risk was
    not acknowledged. The message says what to set."""


# -- addresses --------------------------------------------------------------------------------

def address_host(address: str | None) -> str | None:
    """The host a Ray address names, or None for one that means this machine without a host
    (None, ``local``, ``auto``).

    Accepts ``http(s)://HOST:PORT`` (job API), ``ray://HOST:PORT`` (Ray Client), ``HOST:PORT``
    (GCS), ``[::1]:6379`` and a bare host.
    """
    if address is None or address.strip().lower() in ("", "local", "auto"):
        return None
    address = address.strip()
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.hostname is None:
        raise ValueError(f"cannot read a host from the Ray address {address!r}")
    return parts.hostname


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1).

    Other names are not resolved: a name's address can change or differ per resolver, so only
    a literal loopback address counts.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- token authentication ---------------------------------------------------------------------

def auth_mode(env: Mapping[str, str]) -> str:
    """``token``, ``disabled`` or ``""`` (unset: Ray 2.60 decides), as the environment sets it."""
    return env.get(AUTH_MODE_VAR, "").strip().lower()


def token_source(env: Mapping[str, str], home: Path | None = None) -> str | None:
    """Where Ray will read the auth token from (in Ray's order), or None if there is none."""
    if env.get(TOKEN_VAR, "").strip():
        return TOKEN_VAR
    path = env.get(TOKEN_PATH_VAR, "").strip()
    if path:
        return path if Path(os.path.expanduser(path)).is_file() else None
    default = (home or Path.home()) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def warn_if_token_readable_by_others(env: Mapping[str, str], home: Path | None = None) -> None:
    """Log a warning when the token file other local users could read (Ray 2.60 writes
    ~/.ray/auth_token with the process umask, typically mode 644): anyone holding the token can
    run code in the cluster."""
    source = token_source(env, home)
    if source is None or source == TOKEN_VAR:
        return
    path = Path(os.path.expanduser(source))
    if path.stat().st_mode & 0o077:
        log.warning("the Ray auth token file %s is readable by other users of this machine, who could use it "
                    "to run code in the cluster: chmod 600 %s", path, path)


def client_auth_env(env: Mapping[str, str], home: Path | None = None) -> dict[str, str]:
    """Environment settings that turn on token authentication for a client process that has
    a token but did not set ``RAY_AUTH_MODE`` (a job-API client in another process is refused
    by a token-auth cluster unless the mode is set). Apply them before ``ray`` is imported."""
    if auth_mode(env) == "" and token_source(env, home) is not None:
        return {AUTH_MODE_VAR: "token"}
    return {}


def check_cluster_auth(address: str | None, *, allow_insecure: bool, env: Mapping[str, str],
                       home: Path | None = None) -> None:
    """Refuse to start or reach a Ray cluster that would run without token authentication.

    ``address``: None or ``local`` starts a fresh local instance; ``auto`` joins one on this
    machine; anything else (``HOST:PORT``, ``http://HOST:8265``, ``ray://...``) names a cluster.
    Call it before ``ray.init`` or any contact with the cluster, with the environment Ray read
    when it was imported (RAY_AUTH_MODE set later does not reach Ray). Raises
    InsecureClusterError naming what to set; with ``allow_insecure`` the refusal becomes a
    logged warning.
    """
    mode = auth_mode(env)
    local_start = address is None or address.strip().lower() in ("", "local")
    if mode == "token":
        # A new local instance generates its own token; a client must already hold one.
        if not local_start and token_source(env, home) is None:
            raise InsecureClusterError(
                f"{AUTH_MODE_VAR}=token but no Ray auth token was found: set {TOKEN_VAR}, or "
                f"{TOKEN_PATH_VAR} to a file holding it, or write it to ~/.ray/auth_token "
                f"(`ray get-auth-token` prints a cluster's token on its head node)")
        warn_if_token_readable_by_others(env, home)
        return
    if local_start:
        if mode != "disabled":
            return  # Ray turns token authentication on for a new local instance; require_token_auth checks it.
        problem = (f"{AUTH_MODE_VAR}={env.get(AUTH_MODE_VAR)} starts a local Ray instance without token "
                   f"authentication, and Ray's servers listen on every network interface")
    else:
        host = address_host(address)
        if host is None or is_loopback(host):
            return  # this machine's own cluster, reached over loopback
        problem = (f"the Ray cluster at {address} is on another host and {AUTH_MODE_VAR} is "
                   f"{mode or 'unset'}: requests to it would carry no auth token")
    if allow_insecure:
        log.warning("%s; going on because the risk was acknowledged (allow_insecure): anyone who can "
                    "reach the cluster can run code on it", problem)
        return
    raise InsecureClusterError(
        f"{problem}. Anyone who can reach it can run code on it. Set {AUTH_MODE_VAR}=token with the "
        f"cluster's token in {TOKEN_VAR}, {TOKEN_PATH_VAR} or ~/.ray/auth_token, or acknowledge the "
        f"risk explicitly (rlrelay submit --allow-insecure, or the config key ray.allow_insecure=true)")


def token_auth_active() -> bool:
    """Whether this process's Ray uses token authentication, asked of Ray itself (call it
    after ``ray.init``: Ray enables the mode while starting a local instance)."""
    # Ray has no public query for the mode; this is the function its own HTTP and gRPC servers use.
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def require_token_auth(*, allow_insecure: bool) -> None:
    """After starting a local instance: fail unless Ray reports token authentication on."""
    if token_auth_active():
        warn_if_token_readable_by_others(os.environ)
        return
    message = ("the local Ray instance started without token authentication; its servers listen on "
               "every network interface, so anyone who can reach this machine can run code in it")
    if allow_insecure:
        log.warning("%s (going on: allow_insecure)", message)
        return
    raise InsecureClusterError(f"{message}. Unset {AUTH_MODE_VAR} (Ray then enables tokens) or set it to "
                               f"'token', or acknowledge the risk with ray.allow_insecure=true")


# -- secrets ----------------------------------------------------------------------------------

def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (WANDB_API_KEY, HF_TOKEN...)."""
    return bool(_SECRET_WORD.search(name)) and not _POINTER_SUFFIX.search(name)


def secret_values(env: Mapping[str, str]) -> dict[str, str]:
    """The secrets this environment holds, by variable name (values too short to be keys skipped)."""
    return {name: value for name, value in env.items()
            if is_secret_name(name) and len(value.strip()) >= MIN_SECRET_LENGTH}


def leaked_secrets(texts: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """Names of the environment's secrets whose values appear in any of ``texts``."""
    texts = list(texts)
    return sorted(name for name, value in secret_values(env).items()
                  if any(value.strip() in text for text in texts))


def redact(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with every secret of ``env`` replaced by ``***``: strings, and the strings inside
    dicts, lists and tuples (a config dump, a message); other values are returned as they are."""
    secrets = sorted({v.strip() for v in secret_values(env).values()}, key=len, reverse=True)
    return _redact(value, secrets)


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, Mapping):
        return {k: _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v, secrets) for v in value)
    return value
