"""The learner's sections of the config tree: optimisation (``learner.*``) and the RL
algorithm (``algorithm.*``). ``cluster/config.py`` composes them into the full tree; they live
here so the learner takes its own settings without importing ``cluster``."""

from __future__ import annotations

from dataclasses import dataclass

# Names only, no torch: the CLI, the config and every actor import this module, and importing
# torch costs ~0.7 s and ~130 MiB a process.
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACES = ("reward", "loss")


@dataclass(kw_only=True)
class AlgorithmConfig:
    """The RL algorithm: advantage estimator, PPO clipping, KL control."""

    advantage_estimator: str = "grpo"
    """How advantages are estimated: gae | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline.
    Only ``gae`` builds and trains a critic."""
    gamma: float = 1.0
    """Discount factor over response tokens (GAE and REINFORCE++)."""
    lam: float = 0.95
    """GAE lambda."""
    ppo_epochs: int = 1
    """Passes over each step's batch."""
    minibatches: int = 1
    """Optimizer steps per epoch: the batch is split into this many shuffled minibatches."""
    clip_low: float = 0.2
    """Lower PPO clip: ratios below 1 - clip_low stop pushing down."""
    clip_high: float = 0.2
    """Upper PPO clip: ratios above 1 + clip_high stop pushing up (DAPO's clip-higher when > clip_low)."""
    dual_clip: float | None = None
    """Dual-clip bound (> 1) on the loss of negative-advantage tokens; None turns it off."""
    loss_agg: str = "token_mean"
    """How token losses become one number: token_mean | seq_mean_token_sum | seq_mean_token_mean."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus in the policy loss."""
    value_clip: float | None = 0.2
    """Clip range of the value loss around the old values; None for an unclipped loss."""
    critic_warmup_steps: int = 0
    """Steps at the start in which only the critic trains (gae only)."""
    kl_coef: float = 0.0
    """KL-to-reference coefficient (the start value when adaptive); 0 builds no reference model."""
    kl_place: str = "reward"
    """Where the KL acts: ``reward`` (per-token penalty, k1) or ``loss`` (a loss term)."""
    kl_estimator: str = "k1"
    """KL estimator for the loss term: k2 | k3 (k1 is refused there: its gradient is 0 in
    expectation); the reward penalty always uses k1."""
    kl_target: float | None = None
    """Target KL of the adaptive controller; None keeps the coefficient fixed."""
    kl_horizon: int = 10000
    """Horizon (samples) of the adaptive KL controller."""
    whiten_advantages: bool = False
    """Whiten advantages over the batch after estimation: gae to mean 0 and std 1; grpo, dr_grpo and
    rloo to std 1 only (they are centred per group already)."""
    tis_cap: float | None = None
    """Cap of the truncated importance weight exp(old - rollout log-prob). None: 2.0 when
    samples are off-policy (``trainer.async_staleness >= 1``), off otherwise; 0 turns it off."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop prompt groups whose rewards are all equal (no signal) and
    generate more prompts to refill the batch."""
    dynamic_sampling_max_rounds: int = 3
    """Extra generation rounds at most per step when refilling; then train on what was kept."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: responses within this many tokens of max_new_tokens get a penalty
    rising linearly to ``overlong_penalty`` (0 turns it off)."""
    overlong_penalty: float = 1.0
    """Penalty at max_new_tokens (and beyond) for overlong shaping."""
    normalize_rewards: bool = False
    """Normalise scores by the running mean/std of all scores seen so far."""

    def validate(self) -> None:
        _choice("algorithm.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("algorithm.loss_agg", self.loss_agg, LOSS_AGG_MODES)
        _choice("algorithm.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("algorithm.kl_place", self.kl_place, KL_PLACES)
        _positive("algorithm.ppo_epochs", self.ppo_epochs)
        _positive("algorithm.minibatches", self.minibatches)
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("algorithm.gamma and algorithm.lam must lie in [0, 1]")
        if self.clip_low <= 0 or self.clip_high <= 0:
            raise ValueError("algorithm.clip_low and algorithm.clip_high must be > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"algorithm.dual_clip must be > 1 (got {self.dual_clip})")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef must be >= 0 (got {self.kl_coef})")
        if self.tis_cap is not None and self.tis_cap < 0:
            raise ValueError(f"algorithm.tis_cap must be >= 0 (got {self.tis_cap})")
        if self.dynamic_sampling_max_rounds < 0 or self.overlong_buffer < 0:
            raise ValueError("algorithm.dynamic_sampling_max_rounds and algorithm.overlong_buffer must be >= 0")
        if self.kl_target is not None:
            if not self.kl_target > 0 or self.kl_horizon < 1:
                raise ValueError(f"algorithm.kl_target must be > 0 and algorithm.kl_horizon >= 1 "
                                 f"(got {self.kl_target}, {self.kl_horizon})")
            if self.kl_coef == 0:  # the controller scales the coefficient: from 0 it stays 0
                raise ValueError("algorithm.kl_target adapts algorithm.kl_coef, which is 0 (no reference model): "
                                 "set a starting kl_coef > 0, or kl_target=null")
        if self.advantage_estimator == "grpo" and self.kl_place == "reward" and self.kl_coef > 0:
            # GRPO divides a group's scores by their std: a KL penalty among them is scaled by
            # 1/std, so a group whose rewards are all equal gets unit-size advantages from its
            # KL differences alone, whatever kl_coef is.
            raise ValueError("algorithm.advantage_estimator=grpo with algorithm.kl_place=reward would divide the KL "
                             "penalty by each group's reward std (a group with equal rewards would train on KL noise "
                             "at full scale): set algorithm.kl_place=loss with algorithm.kl_estimator=k3 (as GRPO "
                             "does), or use dr_grpo or rloo")
        if self.kl_place == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            # d/dθ of mean(log π - log ref) over tokens drawn from π is ∇log π, whose expectation
            # under π is 0: the term would add variance and no pull towards the reference.
            raise ValueError("algorithm.kl_estimator=k1 as a loss term (algorithm.kl_place=loss) has zero expected "
                             "gradient on samples of the policy: use k2 (its gradient is that of KL(policy || ref)) "
                             "or k3 (GRPO's), or kl_place=reward, where k1 is the classic penalty")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"algorithm.critic_warmup_steps must be >= 0 (got {self.critic_warmup_steps})")
        if self.critic_warmup_steps and not self.uses_critic:
            raise ValueError(f"algorithm.critic_warmup_steps={self.critic_warmup_steps} warms up a critic, which only "
                             f"advantage_estimator=gae has (this one is {self.advantage_estimator}): set it to 0")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


@dataclass(kw_only=True)
class LearnerConfig:
    """The learner group: size, placement, optimiser."""

    world_size: int = 1
    """Number of learner ranks (one Ray actor each) in the FSDP2 group."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per rank."""
    num_gpus: float = 0.0
    """Ray GPUs per rank: 1 trains on CUDA over NCCL in bf16, 0 on CPU over gloo in fp32."""
    num_threads: int = 2
    """torch CPU threads per rank (set explicitly: Ray sets OMP_NUM_THREADS from num_cpus). Under
    ``cpu_offload`` the optimizer step runs on them: give each rank its share of the host's cores
    (and ``num_cpus`` to match)."""
    lr: float = 1e-5
    """Peak policy learning rate."""
    critic_lr: float = 1e-5
    """Peak critic learning rate."""
    lr_schedule: str = "cosine"
    """``constant`` or ``cosine`` (decay to min_lr_ratio * lr over the run; the policy's over the
    steps after ``algorithm.critic_warmup_steps``)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    min_lr_ratio: float = 0.0
    """End of the cosine decay as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns it off."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank; gradients accumulate over micro-batches."""
    micro_batch_tokens: int = 0
    """When > 0, micro-batches are cut by size instead of row count: a rank's rows, longest
    first, fill a micro-batch while rows x its longest row (with ``pack_sequences``: the sum
    of its rows' lengths) stay within this many tokens (a longer row runs alone), and ``micro_batch_size`` does not apply. Short sequences then run
    many to a pass and long ones few, so every pass does about the same work; ``rlrelay plan``
    sizes activations by this budget. 0: ``micro_batch_size`` rows per micro-batch."""
    sharding: str = "full"
    """How FSDP2 spreads state over ranks: ``full`` shards parameters, gradients and optimizer
    state and re-gathers parameters for backward (ZeRO-3-like, least memory); ``grad_op`` keeps
    each block's parameters gathered from forward to backward (ZeRO-2-like: one all-gather per
    block instead of two, the gathered block stays in memory); ``none`` replicates everything
    (plain data parallel: fastest for small models, most memory; gradients add up locally
    over a step's micro-batches and are all-reduced once per optimizer step)."""
    cpu_offload: bool = False
    """Keep parameters, gradients and optimizer state in CPU memory, moving each block to the GPU
    only while it computes (FSDP2 CPUOffloadPolicy); the optimizer step runs on the CPU. Saves
    most GPU memory, costs PCIe traffic every step. No effect when training on CPU."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of storing them:
    activation memory drops to about one block's worth, at ~30% more compute."""
    compile: bool = False
    """``torch.compile`` each transformer block: fuses the elementwise work of norms, rotary
    embedding and MLP that eager mode launches kernel by kernel. The first step pays for
    compiling; on CPU it needs a C++ compiler."""
    chunked_head: bool = True
    """Compute response log-probs (and entropy) from the final hidden states a chunk of 1024
    tokens at a time, recomputing each chunk's logits in backward (``learner/head.py``), instead
    of keeping ``[B, T, V]`` logits and their float32 copies for backward: on a 150k vocabulary
    that is ~14 bytes per response token per vocabulary entry, most of a step's memory. Costs
    one more head matmul in backward. Turn it off for a model whose head does more than a
    linear layer (the learner checks on its first pass and says so)."""
    pack_sequences: bool = False
    """Run each micro-batch padding-free: its rows' real tokens as one sequence, attention kept
    within each row (``learner/packing.py``: FlashAttention's variable-length kernel on GPU in
    bf16, one causal SDPA call per row elsewhere). No position computes padding, and with
    ``micro_batch_tokens`` a micro-batch is filled up to that many real tokens. Models with
    sliding-window attention or attention dropout are refused."""
    reference_offload: bool = False
    """Keep the frozen reference model in CPU memory between uses (blocks move to the GPU only
    during its forward). No effect when training on CPU."""
    gpus_per_node: int = 8
    """GPUs per node of the cluster, for ``rlrelay plan``'s node count only: placement packs the
    learner's bundles onto the nodes Ray reports, whatever this says."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU (for ``rlrelay plan``)."""
    seed: int = 0
    """Seed of model init pieces (value head) on the learner."""
    timeout_s: float = 600.0
    """Longest the driver waits on one learner call before declaring the rank failed."""

    def validate(self) -> None:
        _positive("learner.world_size", self.world_size)
        _positive("learner.micro_batch_size", self.micro_batch_size)
        if self.micro_batch_tokens < 0:
            raise ValueError(f"learner.micro_batch_tokens must be >= 0 (got {self.micro_batch_tokens})")
        _positive("learner.num_threads", self.num_threads)
        _choice("learner.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("learner.sharding", self.sharding, ("full", "grad_op", "none"))
        _positive("learner.gpus_per_node", self.gpus_per_node)
        if not (self.lr > 0 and self.critic_lr > 0):
            raise ValueError("learner.lr and learner.critic_lr must be > 0")
        # A ratio outside [0, 1] makes the cosine end below zero (a negative rate trains away
        # from the reward) or above the peak.
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"learner.min_lr_ratio must lie in [0, 1] (got {self.min_lr_ratio})")
        for key, value in (("learner.weight_decay", self.weight_decay), ("learner.max_grad_norm", self.max_grad_norm),
                           ("learner.warmup_steps", self.warmup_steps)):
            if not value >= 0:  # also NaN
                raise ValueError(f"{key} must be >= 0 (got {value})")
        if self.timeout_s <= 0:
            raise ValueError("learner.timeout_s must be > 0")
        if not (self.num_cpus >= 0 and self.num_gpus >= 0 and self.gpu_memory_gib > 0):
            raise ValueError(f"learner.num_cpus and learner.num_gpus must be >= 0 and learner.gpu_memory_gib > 0 "
                             f"(got {self.num_cpus}, {self.num_gpus}, {self.gpu_memory_gib})")
        if self.num_gpus not in (0, 1):
            # A rank drives exactly one GPU: at 0.5 Ray would put two ranks on one device (NCCL
            # refuses), at 2 the second GPU would sit idle. More GPUs: more ranks (world_size).
            raise ValueError(f"learner.num_gpus must be 0 (CPU) or 1 (one GPU per rank; more GPUs means a larger "
                             f"learner.world_size), got {self.num_gpus}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key} must be >= 1 (got {value})")
