"""Secure defaults: which clusters rlrelay refuses to start, join or submit to, and secrets kept
out of command lines, job environments and dumps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.job_spec import current_submission_id, job_env, job_tag, new_submission_id, train_entrypoint
from cluster.jobs import resolve_address
from cluster import security
from cluster.security import (InsecureClusterError, address_host, check_cluster_auth, client_auth_env, is_loopback,
                              is_secret_name, leaked_secrets, redact, require_token_auth, token_source)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("address, host", [
    (None, None), ("local", None), ("auto", None), ("", None),
    ("http://127.0.0.1:8265", "127.0.0.1"), ("https://ray.example.com", "ray.example.com"),
    ("ray://10.0.0.5:10001", "10.0.0.5"), ("10.0.0.5:6379", "10.0.0.5"), ("[::1]:6379", "::1"),
    ("localhost:6379", "localhost"), ("head-node", "head-node"),
])
def test_address_host(address, host):
    assert address_host(address) == host


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True), ("LOCALHOST", True),
    ("0.0.0.0", False), ("10.0.0.5", False), ("192.0.2.2", False), ("::", False),
    ("localhost.evil.example", False), ("head-node", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.fixture
def home(tmp_path) -> Path:
    """A home without ~/.ray/auth_token (the real one may hold a token)."""
    return tmp_path / "home"


def with_default_token(home: Path) -> Path:
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("f" * 64)
    return home


def test_token_sources_in_rays_order(tmp_path, home):
    assert token_source({}, home) is None
    assert token_source({}, with_default_token(home)) == str(home / ".ray" / "auth_token")
    path = tmp_path / "tok"
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, home) is None  # names a missing file
    path.write_text("x" * 64)
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, home) == str(path)
    assert token_source({"RAY_AUTH_TOKEN": "t" * 64, "RAY_AUTH_TOKEN_PATH": str(path)}, home) == "RAY_AUTH_TOKEN"


REMOTE = ["10.0.0.5:6379", "http://10.0.0.5:8265", "ray://head.example.com:10001", "head-node:6379"]
LOOPBACK = ["auto", "127.0.0.1:6379", "http://127.0.0.1:8265", "http://localhost:8265", "[::1]:6379"]


@pytest.mark.parametrize("address", REMOTE)
@pytest.mark.parametrize("mode", ["", "disabled"])
def test_remote_cluster_without_token_mode_is_refused(address, mode, home):
    env = {"RAY_AUTH_MODE": mode} if mode else {}
    with pytest.raises(InsecureClusterError, match="RAY_AUTH_MODE=token"):
        check_cluster_auth(address, allow_insecure=False, env=env, home=home)


@pytest.mark.parametrize("address", REMOTE)
def test_remote_cluster_is_allowed_with_token_mode_and_a_token(address, home):
    check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t" * 64},
                       home=home)
    check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": "token"}, home=with_default_token(home))


@pytest.mark.parametrize("address", REMOTE + LOOPBACK)
def test_token_mode_without_a_token_is_refused_when_joining(address, home):
    with pytest.raises(InsecureClusterError, match="no Ray auth token"):
        check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": "token"}, home=home)


@pytest.mark.parametrize("address", REMOTE)
def test_acknowledged_risk_lets_an_insecure_remote_cluster_through_with_a_warning(address, home, caplog):
    check_cluster_auth(address, allow_insecure=True, env={"RAY_AUTH_MODE": "disabled"}, home=home)
    assert "anyone who can reach the cluster can run code" in caplog.text


@pytest.mark.parametrize("address", LOOPBACK)
@pytest.mark.parametrize("mode", ["", "disabled"])
def test_a_cluster_on_this_machine_is_joined_over_loopback(address, mode, home):
    check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": mode} if mode else {}, home=home)


@pytest.mark.parametrize("address", [None, "local"])
def test_a_fresh_local_instance_keeps_token_auth(address, home):
    # Unset: Ray 2.60 turns tokens on for a new local instance (and generates one).
    check_cluster_auth(address, allow_insecure=False, env={}, home=home)
    check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": "token"}, home=home)
    # Disabled: Ray's servers listen on every interface, so this is refused like a remote cluster.
    with pytest.raises(InsecureClusterError, match="every network interface"):
        check_cluster_auth(address, allow_insecure=False, env={"RAY_AUTH_MODE": "disabled"}, home=home)
    check_cluster_auth(address, allow_insecure=True, env={"RAY_AUTH_MODE": "disabled"}, home=home)


def test_a_token_file_other_users_can_read_is_warned_about(tmp_path, home, caplog):
    path = tmp_path / "tok"
    path.write_text("t" * 64)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    path.chmod(0o600)
    check_cluster_auth("10.0.0.5:6379", allow_insecure=False, env=env, home=home)
    assert "readable by other users" not in caplog.text
    path.chmod(0o644)  # what Ray 2.60 leaves with the usual umask
    check_cluster_auth("10.0.0.5:6379", allow_insecure=False, env=env, home=home)
    assert f"chmod 600 {path}" in caplog.text


def test_a_client_with_a_token_turns_token_mode_on(home):
    assert client_auth_env({}, home) == {}
    assert client_auth_env({"RAY_AUTH_TOKEN": "t" * 64}, home) == {"RAY_AUTH_MODE": "token"}
    assert client_auth_env({}, with_default_token(home)) == {"RAY_AUTH_MODE": "token"}
    # An explicit choice is the user's, either way.
    assert client_auth_env({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t" * 64}, home) == {}


def test_token_auth_is_what_ray_reports():
    """`token_auth_active` asks Ray itself, which reads RAY_AUTH_MODE at import."""
    code = "from cluster.security import token_auth_active; print(token_auth_active())"
    for mode, expected in (("token", "True"), ("disabled", "False")):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": mode, "HOME": str(REPO)})
        assert out.stdout.strip() == expected, out.stderr[-2000:]


# -- secrets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, secret", [
    ("WANDB_API_KEY", True), ("RAY_AUTH_TOKEN", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_ACCESS_KEY_ID", True), ("DB_PASSWORD", True), ("GOOGLE_APPLICATION_CREDENTIALS_JSON", True),
    ("TOKENIZERS_PARALLELISM", False), ("RAY_AUTH_TOKEN_PATH", False), ("WANDB_MODE", False),
    ("MONKEY", False), ("KEYBOARD_LAYOUT", False), ("SSH_KEY_FILE", False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


ENV = {"WANDB_API_KEY": "wandb-0123456789abcdef", "RAY_AUTH_TOKEN": "a" * 64, "HF_TOKEN": "x",
       "WANDB_MODE": "offline"}


def test_leaked_secrets_names_the_secret_found_in_a_text():
    assert leaked_secrets(["python -m cluster.cli train c.yaml run.name=x"], ENV) == []
    assert leaked_secrets(["train run.name=wandb-0123456789abcdef"], ENV) == ["WANDB_API_KEY"]
    # Values too short to be keys ("x") are not searched for: they would match anything.
    assert leaked_secrets(["x" * 10], ENV) == []


def test_redact_replaces_secrets_in_nested_dumps():
    dump = {"run": {"name": "r", "note": f"key={ENV['WANDB_API_KEY']}"}, "tags": [ENV["RAY_AUTH_TOKEN"], 3],
            "steps": 2, "pair": ("offline", None)}
    assert redact(dump, ENV) == {"run": {"name": "r", "note": "key=***"}, "tags": ["***", 3], "steps": 2,
                                 "pair": ("offline", None)}
    assert redact("nothing secret", ENV) == "nothing secret"


# -- the job's command line and environment ---------------------------------------------------

def test_job_env_forwards_w_and_b_settings_and_refuses_secrets():
    env = {**ENV, "WANDB_PROJECT": "gsm8k", "MY_FLAG": "on"}
    assert job_env(["MY_FLAG", "OTHER=1"], env) == {"RAY_JOB_STOP_WAIT_TIME_S": "300", "WANDB_MODE": "offline",
                                                     "WANDB_PROJECT": "gsm8k", "MY_FLAG": "on", "OTHER": "1"}
    # A stopped job's driver gets time to checkpoint (Ray's own default is 3 s); --env may change it.
    assert job_env(["RAY_JOB_STOP_WAIT_TIME_S=900"], {})["RAY_JOB_STOP_WAIT_TIME_S"] == "900"
    for spec in ("WANDB_API_KEY", "HF_TOKEN=hf_abc", "RAY_AUTH_TOKEN"):
        with pytest.raises(ValueError, match="secrets are not sent"):
            job_env([spec], env)
    with pytest.raises(ValueError, match="not set here"):
        job_env(["UNSET_VARIABLE"], env)
    for spec in ("MY VAR=1", "1ST=x", "=x", "A-B=1"):  # "MY VAR" was sent on as a variable name
        with pytest.raises(ValueError, match=r"expected NAME or NAME=VALUE, NAME of letters, digits and _"):
            job_env([spec], env)
    for wait in ("soon", "-5", "0", "1.5", "", "\u00b2"):  # Ray reads it only when the job is stopped
        with pytest.raises(ValueError, match="RAY_JOB_STOP_WAIT_TIME_S=.*expected a whole number of seconds > 0"):
            job_env([f"RAY_JOB_STOP_WAIT_TIME_S={wait}"], env)


def test_entrypoint_quotes_overrides_for_the_shell():
    entry = train_entrypoint("deploy/jobs/demo.yaml", ["run.name=a b", 'run.wandb_tags=["ray-job:x"]'])
    assert entry == ("python -m cluster.cli train deploy/jobs/demo.yaml 'run.name=a b' "
                     "'run.wandb_tags=[\"ray-job:x\"]'")
    resumed = train_entrypoint("deploy/jobs/demo.yaml", [], resume="/runs/my run/checkpoints/step-000010")
    assert resumed == "python -m cluster.cli train deploy/jobs/demo.yaml --resume '/runs/my run/checkpoints/step-000010'"


def test_submission_ids_and_tags():
    a, b = new_submission_id("GSM8K 0.5B/verifier"), new_submission_id("GSM8K 0.5B/verifier")
    assert a != b and a.startswith("rlrelay-gsm8k-0-5b-verifier-")
    assert job_tag(a) == f"ray-job:{a}"


def test_current_submission_id_reads_rays_job_config():
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}
    assert current_submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(config)}) == "raysubmit_abc"
    assert current_submission_id({}) is None
    assert current_submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}) is None


def test_address_resolution_order():
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "x", "RAY_API_SERVER_ADDRESS": "http://api:8265"}) == "http://api:8265"
    assert resolve_address("http://flag:8265", {"RAY_API_SERVER_ADDRESS": "http://api:8265"}) == "http://flag:8265"


# -- through the CLI (all refused before any cluster is contacted) ----------------------------

def rlrelay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home"}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**base, **env})


def test_submit_to_a_remote_cluster_without_tokens_is_refused():
    result = rlrelay("submit", "deploy/jobs/demo.yaml", "--address", "http://192.0.2.10:8265",
                     env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 2
    assert "refused" in result.stderr and "--allow-insecure" in result.stderr


def test_submit_refuses_a_secret_on_the_command_line():
    key = "0123456789abcdef0123456789abcdef"
    result = rlrelay("submit", "deploy/jobs/demo.yaml", f"run.name={key}", env={"WANDB_API_KEY": key})
    assert result.returncode == 2
    assert "WANDB_API_KEY" in result.stderr and key not in result.stderr


def test_submit_refuses_a_config_outside_the_working_directory(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("trainer: {steps: 2}\n")
    result = rlrelay("submit", str(config), env={})
    assert result.returncode == 2 and "not inside the uploaded working directory" in result.stderr


def test_a_local_instance_that_started_without_token_auth_is_refused(monkeypatch, caplog):
    # What Ray reports after start-up decides, whatever the environment said before it.
    monkeypatch.setattr(security, "token_auth_active", lambda: False)
    with pytest.raises(InsecureClusterError, match="started without token authentication"):
        require_token_auth(allow_insecure=False)
    require_token_auth(allow_insecure=True)
    assert "going on: allow_insecure" in caplog.text
    monkeypatch.setattr(security, "token_auth_active", lambda: True)
    require_token_auth(allow_insecure=False)
