"""The one typed config tree: YAML file + ``key=value`` overrides → validated ``Config``.

Every field is a typed dataclass field with a docstring. Unknown keys and values of the
wrong type fail before anything starts, with a message naming the key. The learner's
sections are defined in ``learner/config.py`` (the learner reads them without ``cluster``);
turning YAML and overrides into these dataclasses is ``cluster/config_parse.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config_parse import ConfigError, build, check_key, parse_yaml, set_path
from cluster.config_pools import RewardConfig, RolloutConfig, check_function_spec
from cluster.demo import DemoSettings
from learner.config import GROUP_ESTIMATORS, AlgorithmConfig, LearnerConfig


@dataclass(kw_only=True)
class RunConfig:
    """Identity of the run and where its outputs go."""

    name: str = "rlrelay"
    """Run name: the W&B run name and the default run directory ``runs/<name>``."""
    dir: str | None = None
    """Run directory (metrics.jsonl, summary.json, plots); default ``runs/<name>``."""
    seed: int = 0
    """Run seed: data order and every sample's sampling seed derive from it."""
    wandb_project: str = "rlrelay"
    """W&B project."""
    wandb_mode: str = "auto"
    """``auto`` (a ``WANDB_MODE`` set in the environment decides; else online with
    WANDB_API_KEY set, offline otherwise), ``online``, ``offline``, ``disabled``. An online
    start that fails falls back to offline with a warning."""
    wandb_tags: list[str] = field(default_factory=list)
    """Extra W&B tags."""
    cache_dir: str = ".cache/rlrelay"
    """Where built assets (the demo's warm-started model and data) are cached between runs."""
    overwrite: bool = False
    """A run that resumes none of its own checkpoints (no ``--resume``, ``--resume auto`` finding
    none, or another run's checkpoint) whose run directory holds an earlier run's checkpoints or
    metrics is refused, since the two would mix (checkpoint rotation, ``--resume auto``);
    true removes the earlier run's checkpoints, metrics, summary, plot, final model and
    offline W&B runs first."""

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name

    def validate(self) -> None:
        name = self.name
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            # It names the run directory (runs/<name>) and the job's registry entry: one path part.
            raise ConfigError(f"run.name {name!r} must be one non-empty path component (no '/', not '.' or '..')")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"run.wandb_mode: {self.wandb_mode!r} is not one of auto, online, offline, disabled")
        if not 0 <= self.seed < 2**32:  # numpy's and vLLM's seeds are unsigned 32-bit
            raise ConfigError(f"run.seed must lie in [0, 2**32) (got {self.seed})")


@dataclass(kw_only=True)
class ModelConfig:
    """The policy model."""

    path: str | None = None
    """Local Hugging Face model directory; None builds the demo's own warm-started model."""
    max_model_len: int = 256
    """Longest prompt + response, for the rollout engines."""


@dataclass(kw_only=True)
class DataConfig:
    """Prompt datasets: JSONL, one object per line with ``prompt`` (text, or a list of chat
    messages ``{"role": system|user|assistant|tool, "content"}``) and optional ``answer``; UTF-8."""

    train_path: str | None = None
    """Training prompts; None uses the demo's generated arithmetic problems."""
    eval_path: str | None = None
    """Held-out prompts for ``eval/accuracy``; None uses the demo's, or no eval if train_path is set."""
    eval_limit: int = 0
    """Evaluate on at most this many eval prompts (0 = all)."""
    too_long: str = "error"
    """A prompt that leaves fewer than ``rollout.max_new_tokens`` of ``model.max_model_len``:
    ``error`` stops before anything starts, naming the first such prompt; ``skip`` drops each
    one, counts them, and logs the count (``data/skipped_too_long`` in the W&B config)."""

    def validate(self) -> None:
        if not self.eval_limit >= 0:
            raise ConfigError(f"data.eval_limit must be >= 0 (got {self.eval_limit})")
        if self.too_long not in ("error", "skip"):
            raise ConfigError(f"data.too_long must be 'error' or 'skip' (got {self.too_long!r})")


@dataclass(kw_only=True)
class TrainerConfig:
    """The loop."""

    steps: int = 20
    """Training steps (one batch of prompts each)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only before and after training)."""
    eval_function: str | None = None
    """How a greedy eval answer is judged right (``eval/accuracy``: the share scoring > 0): a
    built-in name or ``module:function``; None takes the first built-in of ``reward.functions``
    (``numeric_match`` for a GSM8K-style job), else ``exact_match``."""
    sample_table_every: int = 5
    """Log a table of sample generations every N steps (0 = never)."""
    async_staleness: int = 0
    """0: synchronous (generate, then train, then push). 1: generation of step s+1 overlaps the
    update on step s, so samples are at most one policy version stale; truncated importance
    sampling corrects for it unless algorithm.tis_cap=0. Deeper pipelines (> 1) are refused."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end); the end of training always checkpoints."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are removed once a newer one is complete."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; default ``<run dir>/checkpoints``. Must be reachable by every learner node."""
    max_skipped_updates: int = 3
    """Steps in a row whose update was skipped (NaN/inf loss or gradient) before the run stops,
    after writing a checkpoint."""
    export_final: bool = True
    """Write the final policy as a Hugging Face model directory to ``<run dir>/final_model``."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"trainer.steps must be >= 1 (got {self.steps})")
        if self.eval_function is not None:
            check_function_spec("trainer.eval_function", self.eval_function)
        if self.async_staleness not in (0, 1):
            # The pipeline is one batch deep: a k above 1 would run exactly as 1.
            raise ConfigError(f"trainer.async_staleness must be 0 (synchronous) or 1 (generation overlaps the "
                              f"update, samples one version stale); got {self.async_staleness}: deeper "
                              f"pipelines are not implemented")
        if self.keep_last < 1 or self.save_every < 0 or self.max_skipped_updates < 1:
            raise ConfigError("trainer.keep_last and trainer.max_skipped_updates must be >= 1, "
                              "trainer.save_every >= 0")
        for key, value in (("trainer.eval_every", self.eval_every),
                           ("trainer.sample_table_every", self.sample_table_every)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (got {value})")


@dataclass(kw_only=True)
class RayConfig:
    """Where the job runs."""

    address: str | None = None
    """None or ``local``: start a fresh local Ray instance; ``auto`` or ``HOST:PORT``: join a cluster
    (``RAY_ADDRESS`` is used when set and this is None)."""
    num_cpus: int | None = None
    """Logical CPUs of the local instance (default: the machine's cores)."""
    namespace: str = "rlrelay"
    """Ray namespace of the job's named actors."""
    allow_insecure: bool = False
    """Acknowledge running without Ray token authentication, where anyone who can reach the
    cluster can run code on it (otherwise such a start or join is refused)."""

    def validate(self) -> None:
        if self.address is not None and (problem := ray_address_problem(self.address)):
            raise ConfigError(f"ray.address {problem}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus must be >= 1 (got {self.num_cpus})")

    def target(self, env: Mapping[str, str]) -> str:
        """``local`` (start a fresh instance) unless ``address`` or RAY_ADDRESS names a cluster."""
        return self.address or env.get("RAY_ADDRESS") or "local"


def ray_address_problem(address: str) -> str | None:
    """What is wrong with ``address`` as a Ray cluster address, or None."""
    if not address.strip():  # most often an unset shell variable: `--address "$HEAD"`
        return "is empty (to start a local instance, leave it unset or give 'local')"
    if address.startswith(("http://", "https://")):
        return (f"{address!r} is a job API (dashboard) URL, which submit, jobs, logs and stop take; "
                f"this takes the cluster's Ray address: HOST:PORT (the head's GCS port, 6379 by default) or 'auto'")
    return None


@dataclass(kw_only=True)
class Config:
    """The whole job."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoSettings = field(default_factory=DemoSettings)

    def eval_judge(self) -> str:
        """The function that judges eval answers (``trainer.eval_function``, resolved)."""
        from reward.rules import BUILTINS

        if self.trainer.eval_function:
            return self.trainer.eval_function
        return next((f.name for f in self.reward.functions if f.name in BUILTINS), "exact_match")

    def validate(self) -> None:
        """Range checks of each section, then of what spans sections (types were checked
        while loading)."""
        for section in (self.learner, self.algorithm, self.data, self.rollout, self.reward, self.run, self.trainer,
                        self.ray):
            section.validate()
        r = self.rollout
        lc = self.learner
        if not (lc.num_cpus > 0 or lc.num_gpus > 0):
            # Ray refuses a placement-group bundle that reserves nothing, after it has started.
            raise ConfigError("learner.num_cpus and learner.num_gpus are both 0: each learner rank's placement "
                              "bundle must reserve some CPU or GPU (set learner.num_cpus > 0)")
        if self.algorithm.uses_critic and self.algorithm.critic_warmup_steps >= self.trainer.steps:
            raise ConfigError(f"algorithm.critic_warmup_steps ({self.algorithm.critic_warmup_steps}) must be below "
                              f"trainer.steps ({self.trainer.steps}): the policy trains only after the critic's "
                              f"warm-up, so it would never train")
        if r.max_new_tokens >= self.model.max_model_len:
            raise ConfigError(f"rollout.max_new_tokens ({r.max_new_tokens}) must be below model.max_model_len "
                              f"({self.model.max_model_len})")
        batch = r.prompts_per_step * r.samples_per_prompt
        per_minibatch = batch // self.algorithm.minibatches
        if per_minibatch < self.learner.world_size:
            raise ConfigError(f"each minibatch has {per_minibatch} samples, fewer than learner.world_size "
                              f"({self.learner.world_size}): lower algorithm.minibatches or the world size")
        # Only the keys that ask for groups are named: naming the estimator when dynamic
        # sampling alone asked sent the user to change an estimator that needs none.
        comparing = []
        if self.algorithm.advantage_estimator in GROUP_ESTIMATORS:
            comparing.append(f"algorithm.advantage_estimator={self.algorithm.advantage_estimator}")
        if self.algorithm.dynamic_sampling:
            comparing.append("algorithm.dynamic_sampling=true")
        if comparing and r.samples_per_prompt < 2:
            raise ConfigError(f"rollout.samples_per_prompt must be >= 2 (got {r.samples_per_prompt}): "
                              f"{' and '.join(comparing)} compare{'' if len(comparing) > 1 else 's'} "
                              f"the samples of a prompt")
        if self.algorithm.overlong_buffer > r.max_new_tokens:
            raise ConfigError(f"algorithm.overlong_buffer ({self.algorithm.overlong_buffer}) exceeds "
                              f"rollout.max_new_tokens ({r.max_new_tokens})")


# -- loading ---------------------------------------------------------------------------------

PATH_KEYS = ("run.dir", "run.cache_dir", "model.path", "data.train_path", "data.eval_path", "trainer.checkpoint_dir",
             "reward.model.path")
"""Keys whose leading ``~`` is expanded as the config loads: on the machine that runs the job,
which loads the config itself (``submit`` sends the file and the overrides, not their values).
``~user`` of a user unknown there stays as it is."""


def _expand_home(raw: dict) -> None:
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node: Any = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = os.path.expanduser(node[name])


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply ``key=value`` overrides (values parsed as YAML), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {e}") from None
        raw = parse_yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        check_key(Config, key)
        if not value.strip():  # most often an unset shell variable: `data.train_path=$TRAIN`
            raise ConfigError(f"override {item!r} has no value (write {key}=null to unset it)")
        set_path(raw, key.split("."), parse_yaml(value, f"override {item!r}"), key)
    _expand_home(raw)
    cfg = build(Config, raw)
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for W&B and the run directory)."""
    return dataclasses.asdict(cfg)
