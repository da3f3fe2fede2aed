"""The one typed config tree: YAML file + ``key=value`` overrides → validated ``Config``.

Every field is a typed dataclass field with a docstring. Unknown keys and values of the
wrong type fail before anything starts, with a message naming the key. The learner's
sections are defined in ``learner/config.py`` (the learner reads them without ``cluster``);
turning YAML and overrides into these dataclasses is ``cluster/config_parse.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config_parse import ConfigError, build, check_key, parse_yaml, set_path
from cluster.demo import DemoSettings
from learner.config import GROUP_ESTIMATORS, AlgorithmConfig, LearnerConfig
from reward.types import ISOLATIONS


SHARED_GPU_MARGIN = 0.05
"""Of a shared GPU, what the CUDA contexts and non-KV memory of the engines beside one take."""


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


WEIGHT_TRANSPORTS = ("auto", "shared_memory", "object_store")


@dataclass(kw_only=True)
class RolloutConfig:
    """The rollout pool: vLLM engines as Ray actors."""

    num_workers: int = 1
    """Rollout workers (one vLLM engine each)."""
    prompts_per_step: int = 64
    """Prompts per training step."""
    samples_per_prompt: int = 8
    """Samples per prompt (the group size of grpo/rloo)."""
    max_new_tokens: int = 64
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature (the learner's log-probs use the same)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings besides end-of-sequence."""
    num_cpus: float = 0.5
    """Ray CPUs reserved per worker."""
    num_gpus: float = 0.0
    """Ray GPUs per worker; > 0 runs the CUDA build of vLLM."""
    num_threads: int = 2
    """torch threads per CPU engine (fixed before the engine starts)."""
    kv_cache_gib: float = 0.5
    """KV-cache size per CPU engine."""
    gpu_memory_utilization: float = 0.5
    """Share of the whole GPU one CUDA engine takes (weights, activations, KV cache); below
    ``num_gpus`` - 0.05 when engines share a GPU (``num_gpus`` < 1)."""
    timeout_s: float = 300.0
    """Longest one worker may take for its share of a step before it is treated as hung,
    killed, replaced, and its prompts re-dispatched."""
    max_restarts: int = 8
    """Replacements of dead or hung rollout workers allowed over the whole job."""
    start_timeout_s: float = 600.0
    """Longest a worker may take to start (engine load, weights) before it is treated as hung; a
    replacement waiting for cluster resources may wait longer while other workers serve, but a
    pool with no worker able to generate for this long stops the run."""
    health_interval_s: float = 10.0
    """A worker busy this long gets a health ping (answered concurrently with its work)."""
    health_timeout_s: float = 30.0
    """A worker that does not answer a health ping within this is treated as dead."""
    weight_transport: str = "auto"
    """How a weight push reaches the workers: ``shared_memory`` (the learner writes it once into
    shared memory; workers on its host read it in place), ``object_store`` (Ray's object store:
    any host), or ``auto``: shared memory when the Ray cluster has one node and
    ``rollout.autoscale`` is off, the object store otherwise (decided at every push)."""
    autoscale: bool = False
    """Resize the pool by itself (``cluster/autoscale.py``): grow by one worker while the learner
    waits on rollouts for more than ``autoscale_high`` of each step, shrink by one while it
    waits less than ``autoscale_low``, within ``[min_workers, max_workers]``."""
    min_workers: int = 1
    """Autoscaling never goes below this many workers."""
    max_workers: int = 4
    """Autoscaling never goes above this many workers."""
    autoscale_high: float = 0.5
    """Grow when the learner's wait on rollouts is above this share of the step..."""
    autoscale_low: float = 0.2
    """...shrink when it is below this share."""
    autoscale_patience: int = 3
    """Steps a condition must hold before a change, and steps between two changes."""


@dataclass(kw_only=True)
class RewardFunctionConfig:
    """One rule/verifier reward function."""

    name: str
    """Built-in name (``exact_match``, ``keyword_contains``, ...) or ``module:function``."""
    weight: float = 1.0
    """Weight in the total reward."""


@dataclass(kw_only=True)
class RewardModelConfig:
    """A reward model (Hugging Face sequence classification, one logit)."""

    path: str
    """Local model directory (Hugging Face sequence classification, one logit; checked for a
    ``config.json`` before Ray starts). ``reward.train.train_reward_model`` trains one."""
    weight: float = 1.0
    """Weight in the total reward."""
    batch_size: int = 32
    """Sequences per forward pass (a pass that fails is run again one sequence at a time, so
    only the sequence the model cannot take fails)."""
    max_length: int | None = None
    """Tokens of prompt + response the model scores; a longer text loses its start (the
    response's end, where the score is read, stays). None: the model's own context, from its
    ``max_position_embeddings`` or its tokenizer's ``model_max_length``; above it is refused."""


@dataclass(kw_only=True)
class RewardConfig:
    """The reward pool: the total reward is the weighted sum of every function and the model."""

    functions: list[RewardFunctionConfig] = field(
        default_factory=lambda: [RewardFunctionConfig(name="exact_match")])
    """Rule/verifier functions with weights."""
    model: RewardModelConfig | None = None
    """Optional reward model."""
    num_workers: int = 1
    """Reward workers (Ray actors)."""
    num_cpus: float = 0.25
    """Ray CPUs per reward worker."""
    num_gpus: float = 0.0
    """Ray GPUs per reward worker (for a reward model on GPU)."""
    num_threads: int = 1
    """torch threads per reward worker."""
    timeout_s: float = 30.0
    """Timeout of one reward-function call. The driver waits for a worker's chunk as long as its
    calls may take: this plus a child's restart (``process`` isolation) per function and sample."""
    isolation: str = "process"
    """Where reward functions run: ``process`` (a child process per worker, killed and restarted
    when a call overruns, even one holding the GIL) or ``thread`` (saves the pipe round trip, ~17 us
    a call, `rlrelay bench reward`; an overrunning call is abandoned, and one holding the GIL cannot be timed out)."""
    max_restarts: int = 8
    """Replacements of dead or hung reward workers allowed over the whole job."""
    start_timeout_s: float = 600.0
    """Longest a reward worker may take to start (a large reward model loading) before it is
    treated as hung."""
    health_interval_s: float = 10.0
    """A reward worker busy this long gets a health ping (answered concurrently with its work)."""
    health_timeout_s: float = 30.0
    """A reward worker that does not answer a health ping within this is treated as dead."""
    on_failure: str = "error"
    """A sample whose reward failed: ``error`` stops the run naming it; ``drop`` counts it and leaves
    its prompt's group out of the batch (refilled under dynamic sampling); ``zero`` counts it and
    scores 0 (not neutral for a reward whose wrong answers score below 0)."""


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

    def target(self, env: Mapping[str, str]) -> str:
        """``local`` (start a fresh instance) unless ``address`` or RAY_ADDRESS names a cluster."""
        return self.address or env.get("RAY_ADDRESS") or "local"


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
        """Range checks across sections (types were checked while loading)."""
        self.learner.validate()
        self.algorithm.validate()
        r = self.rollout
        for key, value in (("rollout.num_workers", r.num_workers), ("rollout.prompts_per_step", r.prompts_per_step),
                           ("rollout.samples_per_prompt", r.samples_per_prompt),
                           ("rollout.max_new_tokens", r.max_new_tokens), ("trainer.steps", self.trainer.steps),
                           ("reward.num_workers", self.reward.num_workers)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1 (got {value})")
        # A zero would make every call overrun at once, and every worker be replaced as hung.
        for key, seconds in (("rollout.timeout_s", r.timeout_s), ("rollout.start_timeout_s", r.start_timeout_s),
                             ("rollout.health_interval_s", r.health_interval_s),
                             ("rollout.health_timeout_s", r.health_timeout_s), ("reward.timeout_s", self.reward.timeout_s),
                             ("reward.start_timeout_s", self.reward.start_timeout_s),
                             ("reward.health_interval_s", self.reward.health_interval_s),
                             ("reward.health_timeout_s", self.reward.health_timeout_s)):
            if not seconds > 0:
                raise ConfigError(f"{key} must be > 0 seconds (got {seconds})")
        rw = self.reward
        for key, value in (("rollout.max_restarts", r.max_restarts), ("reward.max_restarts", rw.max_restarts),
                           ("data.eval_limit", self.data.eval_limit), ("rollout.num_cpus", r.num_cpus),
                           ("rollout.num_gpus", r.num_gpus), ("reward.num_cpus", rw.num_cpus),
                           ("reward.num_gpus", rw.num_gpus)):
            if not value >= 0:  # also NaN
                raise ConfigError(f"{key} must be >= 0 (got {value})")
        for key, value in (("rollout.num_gpus", r.num_gpus), ("reward.num_gpus", rw.num_gpus)):
            if value > 1:  # the engine and the reward model run on one device (no tensor parallelism)
                raise ConfigError(f"{key} must be <= 1 (got {value}): a worker uses one GPU, and tensor "
                                  f"parallelism is not supported, so the others would sit idle; a fraction "
                                  f"shares a GPU, more workers use more GPUs")
        lc = self.learner
        if not (lc.num_cpus > 0 or lc.num_gpus > 0):
            # Ray refuses a placement-group bundle that reserves nothing, after it has started.
            raise ConfigError("learner.num_cpus and learner.num_gpus are both 0: each learner rank's placement "
                              "bundle must reserve some CPU or GPU (set learner.num_cpus > 0)")
        for key, value in (("rollout.num_threads", r.num_threads), ("reward.num_threads", rw.num_threads),
                           ("ray.num_cpus", 1 if self.ray.num_cpus is None else self.ray.num_cpus)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1 (got {value})")
        if not r.kv_cache_gib > 0 or not 0 < r.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.kv_cache_gib must be > 0 and rollout.gpu_memory_utilization in (0, 1] "
                              f"(got {r.kv_cache_gib}, {r.gpu_memory_utilization})")
        if 0 < r.num_gpus < 1 and r.gpu_memory_utilization > r.num_gpus - SHARED_GPU_MARGIN:
            # Engines sharing a GPU: vLLM refuses to start unless that share of the whole GPU is
            # free, and the other engines (and every process's CUDA context) hold the rest.
            raise ConfigError(f"rollout.gpu_memory_utilization ({r.gpu_memory_utilization}) must stay below "
                              f"rollout.num_gpus ({r.num_gpus}) - {SHARED_GPU_MARGIN} when engines share a GPU: "
                              f"each engine asks for that share of the whole GPU")
        if r.weight_transport not in WEIGHT_TRANSPORTS:
            raise ConfigError(f"rollout.weight_transport: {r.weight_transport!r} is not one of "
                              f"{', '.join(WEIGHT_TRANSPORTS)}")
        if self.data.too_long not in ("error", "skip"):
            raise ConfigError(f"data.too_long must be 'error' or 'skip' (got {self.data.too_long!r})")
        if r.autoscale:
            if not 1 <= r.min_workers <= r.num_workers <= r.max_workers:
                raise ConfigError(f"rollout.autoscale needs 1 <= rollout.min_workers ({r.min_workers}) <= "
                                  f"rollout.num_workers ({r.num_workers}) <= rollout.max_workers ({r.max_workers})")
            if not 0 <= r.autoscale_low < r.autoscale_high <= 1 or r.autoscale_patience < 1:
                raise ConfigError(f"rollout.autoscale needs 0 <= autoscale_low ({r.autoscale_low}) < autoscale_high "
                                  f"({r.autoscale_high}) <= 1 and autoscale_patience >= 1")
        if self.trainer.async_staleness not in (0, 1):
            # The pipeline is one batch deep: a k above 1 would run exactly as 1.
            raise ConfigError(f"trainer.async_staleness must be 0 (synchronous) or 1 (generation overlaps the "
                              f"update, samples one version stale); got {self.trainer.async_staleness}: deeper "
                              f"pipelines are not implemented")
        if self.algorithm.uses_critic and self.algorithm.critic_warmup_steps >= self.trainer.steps:
            raise ConfigError(f"algorithm.critic_warmup_steps ({self.algorithm.critic_warmup_steps}) must be below "
                              f"trainer.steps ({self.trainer.steps}): the policy trains only after the critic's "
                              f"warm-up, so it would never train")
        if self.trainer.keep_last < 1 or self.trainer.save_every < 0 or self.trainer.max_skipped_updates < 1:
            raise ConfigError("trainer.keep_last and trainer.max_skipped_updates must be >= 1, "
                              "trainer.save_every >= 0")
        if r.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for training (got {r.temperature})")
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
        if self.reward.on_failure not in ("error", "zero", "drop"):
            raise ConfigError(f"reward.on_failure: {self.reward.on_failure!r} is not one of error, zero, drop")
        if self.reward.isolation not in ISOLATIONS:
            raise ConfigError(f"reward.isolation: {self.reward.isolation!r} is not one of {', '.join(ISOLATIONS)}")
        name = self.run.name
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            # It names the run directory (runs/<name>) and the job's registry entry: one path part.
            raise ConfigError(f"run.name {name!r} must be one non-empty path component (no '/', not '.' or '..')")
        if self.run.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"run.wandb_mode: {self.run.wandb_mode!r} is not one of auto, online, offline, disabled")
        if self.algorithm.overlong_buffer > r.max_new_tokens:
            raise ConfigError(f"algorithm.overlong_buffer ({self.algorithm.overlong_buffer}) exceeds "
                              f"rollout.max_new_tokens ({r.max_new_tokens})")
        if not self.reward.functions and self.reward.model is None:
            raise ConfigError("reward: configure at least one of reward.functions and reward.model")
        weights = [f.weight for f in self.reward.functions] + ([self.reward.model.weight] if self.reward.model else [])
        if not any(weights):
            raise ConfigError("reward: every weight is 0, so every sample would score 0 and no step would learn")
        if self.reward.model is not None and self.reward.model.batch_size < 1:
            raise ConfigError(f"reward.model.batch_size must be >= 1 (got {self.reward.model.batch_size})")
        if self.reward.model is not None and self.reward.model.max_length is not None \
                and self.reward.model.max_length < 1:
            raise ConfigError(f"reward.model.max_length must be >= 1 or null (got {self.reward.model.max_length})")
        if not 0 <= self.run.seed < 2**32:  # numpy's and vLLM's seeds are unsigned 32-bit
            raise ConfigError(f"run.seed must lie in [0, 2**32) (got {self.run.seed})")
        for key, value in (("trainer.eval_every", self.trainer.eval_every),
                           ("trainer.sample_table_every", self.trainer.sample_table_every)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (got {value})")
        if any(not s for s in r.stop):  # most often an unset shell variable in a list
            raise ConfigError(f"rollout.stop holds an empty string ({r.stop!r}): every response would stop at once")


# -- loading ---------------------------------------------------------------------------------

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
