"""The sections of the two worker pools: ``rollout.*`` (vLLM engines) and ``reward.*`` (reward
functions and an optional reward model), each with its own range checks. ``cluster/config.py``
composes them into the full tree and checks what spans sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config_parse import ConfigError
from reward.rules import BUILTINS
from reward.types import ISOLATIONS


SHARED_GPU_MARGIN = 0.05
"""Of a shared GPU, what the CUDA contexts and non-KV memory of the engines beside one take."""

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
    killed, replaced, and its prompts re-dispatched; a share that overruns it on two workers in
    turn stops the run (it needs a longer timeout)."""
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

    def validate(self) -> None:
        check_pool("rollout", self)
        for key, value in (("rollout.prompts_per_step", self.prompts_per_step),
                           ("rollout.samples_per_prompt", self.samples_per_prompt),
                           ("rollout.max_new_tokens", self.max_new_tokens)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1 (got {value})")
        if not self.kv_cache_gib > 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.kv_cache_gib must be > 0 and rollout.gpu_memory_utilization in (0, 1] "
                              f"(got {self.kv_cache_gib}, {self.gpu_memory_utilization})")
        if 0 < self.num_gpus < 1 and self.gpu_memory_utilization > self.num_gpus - SHARED_GPU_MARGIN:
            # Engines sharing a GPU: vLLM refuses to start unless that share of the whole GPU is
            # free, and the other engines (and every process's CUDA context) hold the rest.
            raise ConfigError(f"rollout.gpu_memory_utilization ({self.gpu_memory_utilization}) must stay below "
                              f"rollout.num_gpus ({self.num_gpus}) - {SHARED_GPU_MARGIN} when engines share a "
                              f"GPU: each engine asks for that share of the whole GPU")
        if self.weight_transport not in WEIGHT_TRANSPORTS:
            raise ConfigError(f"rollout.weight_transport: {self.weight_transport!r} is not one of "
                              f"{', '.join(WEIGHT_TRANSPORTS)}")
        if self.autoscale:
            if not 1 <= self.min_workers <= self.num_workers <= self.max_workers:
                raise ConfigError(f"rollout.autoscale needs 1 <= rollout.min_workers ({self.min_workers}) <= "
                                  f"rollout.num_workers ({self.num_workers}) <= rollout.max_workers "
                                  f"({self.max_workers})")
            if not 0 <= self.autoscale_low < self.autoscale_high <= 1 or self.autoscale_patience < 1:
                raise ConfigError(f"rollout.autoscale needs 0 <= autoscale_low ({self.autoscale_low}) < "
                                  f"autoscale_high ({self.autoscale_high}) <= 1 and autoscale_patience >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for training (got {self.temperature})")
        if any(not s for s in self.stop):  # most often an unset shell variable in a list
            raise ConfigError(f"rollout.stop holds an empty string ({self.stop!r}): every response would "
                              f"stop at once")


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

    def validate(self) -> None:
        check_pool("reward", self)
        for i, function in enumerate(self.functions):
            check_function_spec(f"reward.functions[{i}].name", function.name)
        if self.on_failure not in ("error", "zero", "drop"):
            raise ConfigError(f"reward.on_failure: {self.on_failure!r} is not one of error, zero, drop")
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"reward.isolation: {self.isolation!r} is not one of {', '.join(ISOLATIONS)}")
        if not self.functions and self.model is None:
            raise ConfigError("reward: configure at least one of reward.functions and reward.model")
        weights = [f.weight for f in self.functions] + ([self.model.weight] if self.model else [])
        if not any(weights):
            raise ConfigError("reward: every weight is 0, so every sample would score 0 and no step would learn")
        if self.model is not None and self.model.batch_size < 1:
            raise ConfigError(f"reward.model.batch_size must be >= 1 (got {self.model.batch_size})")
        if self.model is not None and self.model.max_length is not None and self.model.max_length < 1:
            raise ConfigError(f"reward.model.max_length must be >= 1 or null (got {self.model.max_length})")


def check_pool(section: str, pool: RolloutConfig | RewardConfig) -> None:
    """Range checks of the settings both worker pools have, each error naming ``section.key``."""
    for key in ("num_workers", "num_threads"):
        if getattr(pool, key) < 1:
            raise ConfigError(f"{section}.{key} must be >= 1 (got {getattr(pool, key)})")
    # A zero would make every call overrun at once, and every worker be replaced as hung.
    for key in ("timeout_s", "start_timeout_s", "health_interval_s", "health_timeout_s"):
        if not getattr(pool, key) > 0:
            raise ConfigError(f"{section}.{key} must be > 0 seconds (got {getattr(pool, key)})")
    for key in ("max_restarts", "num_cpus", "num_gpus"):
        if not getattr(pool, key) >= 0:  # also NaN
            raise ConfigError(f"{section}.{key} must be >= 0 (got {getattr(pool, key)})")
    if pool.num_gpus > 1:  # the engine and the reward model run on one device (no tensor parallelism)
        raise ConfigError(f"{section}.num_gpus must be <= 1 (got {pool.num_gpus}): a worker uses one GPU, and "
                          f"tensor parallelism is not supported, so the others would sit idle; a fraction "
                          f"shares a GPU, more workers use more GPUs")


def check_function_spec(key: str, spec: str) -> None:
    """A reward function's name has the form of a built-in or ``module:function`` (whether the
    module imports is checked where it runs): a misspelt built-in fails here, before a job is
    submitted, not when it starts on the cluster."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        if not module.strip() or not attr.strip():
            raise ConfigError(f"{key}: {spec!r} must look like 'module:function'")
    elif spec not in BUILTINS:
        raise ConfigError(f"{key}: unknown reward function {spec!r}: built-ins are {', '.join(sorted(BUILTINS))}; "
                          f"a user function is given as 'module:function'")
