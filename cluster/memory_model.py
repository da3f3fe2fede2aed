"""The learner's memory model: bytes per GPU of a job, before anything starts (``rlrelay plan``).

From the policy's architecture and the job's shape it estimates, per learner rank, the
bytes of parameters, gradients, optimizer state, activations and the logits working set of
the policy, the critic and the reference, under the memory options (sharding, CPU offload,
activation checkpointing, reference offload), and says whether that fits the GPU with a
safety margin (``cluster/memory_advice.py`` says what to turn on when it does not). The model
follows what the learner does (``learner/worker.py``, ``learner/fsdp.py``, ``learner/models.py``,
``learner/head.py``, ``learner/losses.py``):

- **Weights and optimizer.** FSDP2 ``fully_shard`` per transformer block, then the root
  (embeddings, final norm, lm_head or value head). Each rank holds a 1/W shard of the fp32
  weights, of the fp32 gradients (reduced in fp32) and of AdamW's two fp32 moments. On GPU
  compute runs in bf16: the fp32 shard is then the *master* copy (counted under optimizer
  state) and the bf16 weights gathered for compute are the ``parameters`` row.
  ``sharding=full`` gathers a block for its forward and again for its backward: the root and
  two blocks (the one computing, the one prefetched) are gathered at once, during the
  blocks' backward; while the loss works on the logits only the root is (it stays gathered
  from forward to backward, the blocks are resharded after forward). ``grad_op`` and
  ``none`` (replicated: shard groups of one, still a separate compute copy) do not reshard
  after forward, and a no-grad forward has no backward to reshard after, so the trained
  models' full compute copies stay gathered between uses. The reference is resharded after
  its forward under every option (learner/worker.py), so it never holds a gathered copy.
  Gradients in flight during backward: the root's and two blocks' unsharded gradients
  (compute dtype, plus the fp32 copy that is reduce-scattered). CPU offload moves the fp32
  shards (and the optimizer step) to the host; gathered weights still live on the GPU.
  AdamW's step counters live in host memory (not counted).
- **Activations** (saved for backward), bytes per token per transformer block, ``c`` = 2 for
  bf16 and 4 for fp32, SDPA attention (flash / memory-efficient: no ``seq x seq`` scores are
  kept), a padding mask present (so transformers repeats grouped key/value heads to all query
  heads before attention)::

      2 RMSNorms    2 (4h + 2ch + 4)        fp32 input, normalised, weighted output, rsqrt
      attention     c (2q + 2kv') + 4 heads + c L
                                            roped q, k' and v' as SDPA takes them (kv' = q when
                                            2+ k/v heads are repeated, a copy; else kv), its
                                            output (also o_proj's input), log-sum-exp, the
                                            mask as a bias
      MLP           4 c i                   gate, up, silu(gate), silu(gate) * up

  with h hidden, q = heads x head_dim, kv = kv_heads x head_dim, i intermediate, L the
  sequence length (rotary embedding saves nothing per token: cos and sin need no gradient).
  Outside the blocks: the final norm (4h + 2ch + 4), the token ids (8), the boolean mask
  (L). With activation checkpointing each block keeps only its input (c h) and one block's
  activations exist again during its backward (after the logits are freed). Tokens = ``learner.micro_batch_size`` x
  ``model.max_model_len`` (the longest sequence the config allows); with a token budget
  (``learner.micro_batch_tokens``), the budget rounded up to whole rows of that length. Packed rows
  (``learner.pack_sequences``) hold only real tokens, so both remain upper bounds. Only one model's
  activations exist at a time: the update runs the policy's forward and backward, then the
  critic's, per micro-batch.
- **Logits.** With ``learner.chunked_head`` (the default) no ``[B, T, V]`` logits exist: the
  response positions' final hidden states (``[B T, H]``, kept for backward, and later their
  gradient) go through ``learner/head.py`` a chunk of N = min(B T, 1024) tokens at a time
  (T = ``rollout.max_new_tokens``). Its forward needs 12 bytes per chunk entry, its backward
  k = 12 (fp32) or 14 (bf16) bytes (recomputed logits, log p, p, the gradient, its cast), and
  the lm_head's gradient is summed in fp32 (plus, in bf16, one chunk's product and the cast
  back: 4 c)::

      logits = 2 c B T H + (4 [+ 4 c in bf16]) V H + k N V

  Without it, the policy computes logits for the window of positions that predict response
  tokens (``logits_to_keep``): T + 1 positions when a micro-batch's prompts have equal length,
  wider when they differ, up to L when one prompt has a single token, and then the response
  positions are gathered out of it, a second ``[B, T, V]`` copy, both in the compute dtype.
  Prompts of different lengths are the rule in RL, so the plan takes that worst case. The
  loss works on them in fp32 in chunks of N tokens, logprobs and entropy sharing one upcast
  per chunk; kept for backward: the scaled logits (4), the entropy's shifted logits and
  softmax (8); plus a chunk's temporaries (k = 16 bytes in fp32, 18 in bf16, fitted to the
  peaks measured with the learner's own functions in ``tests/integration/test_plan_measured.py``)::

      logits = c B L V + c B T V + 12 B T V + k N V

  (for a 150k vocabulary this term, not the model, then often decides the micro-batch.) The
  critic's value head has no vocabulary term; it runs in fp32, so under bf16 it keeps an fp32
  copy of the final hidden states for backward: 4 B L h.
- **Overhead**: 1.5 GiB fixed on a GPU (CUDA context, NCCL communicators, cuBLAS workspaces) plus 5 %
  of the tensors for caching-allocator fragmentation. **Fits** means the total is within
  90 % of the GPU's memory (a 10 % safety margin for what this model does not see).

The learner's peak is the training step (policy trains while critic and reference hold
their resident state); the no-grad forward pass (old/ref log-probs, values) and the optimizer
step (AdamW's foreach update allocates one more fp32 buffer of the shard's size) are also
planned, and the largest of the three is checked.

torch is not imported here: ``rlrelay --help`` stays instant and the arithmetic is plain;
``cluster/plan.py`` is the command around it (where the architecture comes from, the report).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.architecture import Architecture, PlanError

if TYPE_CHECKING:
    from cluster.config import Config
    from learner.config import LearnerConfig

GIB = 1024**3
FIXED_OVERHEAD_BYTES = int(1.5 * GIB)
FRAGMENTATION = 0.05
SAFETY_MARGIN = 0.10
SHARDING_MODES = ("full", "grad_op", "none")
LOSS_CHUNK_TOKENS = 1024  # learner/head.py and learner/losses.py process [N, V] logits this many tokens at a time

@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOptions:
    """The learner's memory options and GPU shape: the planner's inputs besides the job.

    The ``LearnerConfig`` fields of the same names; ``memory_options`` reads them (and lets
    command-line flags override them, to compare options without editing the config).

    Example: ``MemoryOptions(sharding="full", activation_checkpointing=True, gpu_memory_gib=80.0)``
    """

    sharding: str = "full"
    """``full`` (ZeRO-3-like), ``grad_op`` (ZeRO-2-like: not resharded after forward), ``none`` (replicated)."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: sharded params, gradients and optimizer state live on the host."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's forward in backward; only block inputs are kept."""
    reference_offload: bool = False
    """The reference model stays on the host between its forward passes."""
    chunked_head: bool = True
    """Log-probs from the final hidden states a chunk at a time (no ``[B, T, V]`` logits kept)."""
    gpus_per_node: int = 8
    """GPUs per node (how many nodes the learner ranks span)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, GiB."""

    def __post_init__(self) -> None:
        if self.sharding not in SHARDING_MODES:
            raise PlanError(f"sharding {self.sharding!r} is not one of {', '.join(SHARDING_MODES)}")
        if self.gpus_per_node < 1 or self.gpu_memory_gib <= 0:
            raise PlanError("gpus_per_node must be >= 1 and gpu_memory_gib > 0")
        if not math.isfinite(self.gpu_memory_gib * GIB):  # 1e300 GiB: no byte count to compare with
            raise PlanError(f"gpu_memory_gib {self.gpu_memory_gib:g} is too large to count in bytes")


def memory_options(learner: "LearnerConfig", **flags) -> MemoryOptions:
    """The job's memory options: ``learner.*``, overridden by each command-line flag given (not None)."""
    from_config = MemoryOptions(sharding=learner.sharding, cpu_offload=learner.cpu_offload,
                                activation_checkpointing=learner.activation_checkpointing,
                                reference_offload=learner.reference_offload, chunked_head=learner.chunked_head,
                                gpus_per_node=learner.gpus_per_node, gpu_memory_gib=learner.gpu_memory_gib)
    return dataclasses.replace(from_config, **{k: v for k, v in flags.items() if v is not None})


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnerShape:
    """What the job asks of each learner rank.

    Example: ``LearnerShape(world_size=4, micro_batch_size=8, seq_len=1024, response_len=512,
    mixed_precision=True, critic=True, reference=True)``
    """

    world_size: int
    micro_batch_size: int
    seq_len: int
    """Longest prompt + response (``model.max_model_len``)."""
    response_len: int
    """Longest response (``rollout.max_new_tokens``): the width of the loss's logits."""
    mixed_precision: bool
    """bf16 compute with fp32 master weights (GPU); False: fp32 throughout (CPU)."""
    critic: bool
    reference: bool
    micro_batch_tokens: int = 0
    """``learner.micro_batch_tokens``: when > 0, micro-batches are cut by this token budget and
    ``micro_batch_size`` does not apply."""

    @property
    def micro_rows(self) -> tuple[int, int]:
        """Worst-case rows of a micro-batch: for the activations (rows of ``seq_len`` tokens) and
        for the logits (rows of a one-token prompt and a full response)."""
        if not self.micro_batch_tokens:
            return self.micro_batch_size, self.micro_batch_size
        tokens = max(self.micro_batch_tokens, self.seq_len)  # a longer row runs alone
        return math.ceil(tokens / self.seq_len), math.ceil(tokens / (self.response_len + 1))

    @classmethod
    def from_config(cls, cfg: "Config") -> "LearnerShape":
        return cls(world_size=cfg.learner.world_size, micro_batch_size=cfg.learner.micro_batch_size,
                   micro_batch_tokens=cfg.learner.micro_batch_tokens,
                   seq_len=cfg.model.max_model_len, response_len=cfg.rollout.max_new_tokens,
                   mixed_precision=cfg.learner.num_gpus > 0, critic=cfg.algorithm.uses_critic,
                   reference=cfg.algorithm.uses_reference)


# -- the memory model ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Footprint:
    """Bytes on one GPU, by kind."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits

    def __add__(self, other: "Footprint") -> "Footprint":
        return Footprint(parameters=self.parameters + other.parameters, gradients=self.gradients + other.gradients,
                         optimizer=self.optimizer + other.optimizer, activations=self.activations + other.activations,
                         logits=self.logits + other.logits)


ROWS = tuple(f.name for f in dataclasses.fields(Footprint))


LOGITS_CHUNK_TEMPORARIES = {4: 16, 2: 18}
"""Bytes per vocabulary entry of one loss chunk's temporaries, by compute dtype size: fitted to
the peaks measured in ``tests/integration/test_plan_measured.py`` (fp32 and bf16)."""
HEAD_CHUNK_TEMPORARIES = {4: 12, 2: 14}
"""The same for the chunked head's backward (``learner/head.py``: the recomputed logits, log p,
p, the gradient, and its bf16 cast); its forward needs 12 in both dtypes. Measured with
``LiveBytes`` on ``linear_logprobs``: 11.6-12.0 (fp32) and 13.3-13.8 (bf16)."""


def layer_activation_bytes(arch: Architecture, c: int, seq: int) -> int:
    """Bytes one transformer block keeps for backward, per token (module docstring)."""
    h, q = arch.hidden_size, arch.q_dim
    # transformers repeats grouped k/v heads (a copy) before SDPA; one k/v head repeats as a view.
    kv = q if 1 < arch.num_kv_heads < arch.num_heads else arch.kv_dim
    norms = 2 * (4 * h + 2 * c * h + 4)
    attention = c * (2 * q + 2 * kv) + 4 * arch.num_heads + c * seq
    return norms + attention + 4 * c * arch.intermediate_size


def activation_bytes(arch: Architecture, batch: int, seq: int, c: int, checkpointing: bool) -> int:
    """Bytes saved for backward by one forward of ``batch`` sequences of ``seq`` tokens."""
    per_layer = layer_activation_bytes(arch, c, seq)
    outside = 4 * arch.hidden_size + 2 * c * arch.hidden_size + 4 + 8 + seq
    blocks = arch.num_layers * c * arch.hidden_size + per_layer if checkpointing else arch.num_layers * per_layer
    return batch * seq * (blocks + outside)


def logits_bytes(arch: Architecture, batch: int, seq: int, response: int, c: int, chunked: bool = True) -> int:
    """Peak of the policy's logits working set in a training micro-batch (module docstring)."""
    v, h, bt = arch.vocab_size, arch.hidden_size, batch * response
    chunk = min(bt, LOSS_CHUNK_TOKENS) * v
    if chunked:
        # The response positions' hidden states kept for backward and their gradient; W's
        # gradient summed in fp32 (in bf16: plus one chunk's product and the final cast).
        accumulators = 2 * c * bt * h + (4 if c == 4 else 4 + 2 * c) * v * h
        return accumulators + HEAD_CHUNK_TEMPORARIES[c] * chunk
    # The window (up to L wide when prompts differ in length) and the response columns gathered from it.
    return c * batch * seq * v + c * bt * v + 12 * bt * v + LOGITS_CHUNK_TEMPORARIES[c] * chunk


def value_head_bytes(arch: Architecture, batch: int, seq: int, c: int) -> int:
    """The critic's fp32 copy of its final hidden states, kept for the value head's backward
    (none in fp32, where the head reads them as they are)."""
    return 0 if c == 4 else 4 * batch * seq * arch.hidden_size


def forward_logits_bytes(arch: Architecture, batch: int, seq: int, response: int, c: int,
                         chunked: bool = True) -> int:
    """The same without gradients or entropy (old/ref log-probs). Chunked: one chunk's
    buffers. Otherwise the window's logits and one chunk's fp32 temporaries (its upcast on
    GPU, the scaled copy, logsumexp's work)."""
    v, bt = arch.vocab_size, batch * response
    if chunked:
        return 12 * min(bt, LOSS_CHUNK_TOKENS) * v
    return c * batch * seq * v + c * bt * v + (12 if c < 4 else 8) * min(bt, LOSS_CHUNK_TOKENS) * v


def trained_state(params: int, shards: int, mixed: bool) -> Footprint:
    """Weights, gradients and AdamW moments of a trained model on one rank (fp32 shards)."""
    shard = math.ceil(params / shards)
    return Footprint(parameters=0 if mixed else 4 * shard, gradients=4 * shard,
                     optimizer=8 * shard + (4 * shard if mixed else 0))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPlan:
    """Per-GPU memory of one learner rank.

    ``resident``: what a model holds throughout the step; ``active``: what it adds while it
    computes. A model's column is the sum; the peak is everyone's resident state plus the
    active part of the model computing at the peak.
    """

    resident: dict[str, Footprint]
    active: dict[str, Footprint]
    peak_model: str
    """The model whose training micro-batch makes the peak."""
    peak: Footprint
    """Each row at the peak of the training step."""
    forward_bytes: int
    """Peak of the no-grad forward pass (old/ref log-probs, values), overhead included."""
    overhead_bytes: int
    total_bytes: int
    """max(training step, forward pass) + overhead: what must fit."""
    usable_bytes: int
    """GPU memory less the safety margin."""
    host_bytes: int
    """Host memory per rank for offloaded state."""

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def column(self, name: str) -> Footprint:
        return self.resident[name] + self.active[name]


def plan_memory(arch: Architecture, shape: LearnerShape, options: MemoryOptions) -> MemoryPlan:
    """The per-GPU memory plan of one learner rank (module docstring for the model).

    A training micro-batch has two candidate peaks: the loss (all activations saved and the
    logits working set; with full sharding nothing gathered) and the blocks' backward
    (activations still saved, the root and two blocks gathered, their gradients in flight,
    the logits freed). The larger is the model's active footprint.
    """
    if not shape.mixed_precision:  # a CPU learner ignores both offload settings: its state is on the host already
        options = dataclasses.replace(options, cpu_offload=False, reference_offload=False)
    c = 2 if shape.mixed_precision else 4
    mixed, ckpt = shape.mixed_precision, options.activation_checkpointing
    shards = shape.world_size if options.sharding != "none" else 1
    (b, b_logits), seq, resp = shape.micro_rows, shape.seq_len, shape.response_len
    models = {"policy": (arch.policy_params, arch.policy_root_params)}
    if shape.critic:
        models["critic"] = (arch.critic_params, arch.critic_root_params)
    if shape.reference:
        models["reference"] = (arch.policy_params, arch.policy_root_params)
    keeps_gathered = options.sharding != "full"
    chunked = options.chunked_head
    one_layer = b * seq * layer_activation_bytes(arch, c, seq)

    resident, active, host, forward_resident, forward_active = {}, {}, 0, 0, 0
    for name, (params, root) in models.items():
        trained = name != "reference"
        state = trained_state(params, shards, mixed) if trained else \
            Footprint(parameters=4 * math.ceil(params / shards))
        offloaded = options.cpu_offload or (not trained and options.reference_offload)
        host += state.total if offloaded else 0
        # The reference reshards after its forward under every sharding (no backward follows
        # that would): only the trained models keep their compute copy gathered.
        kept = keeps_gathered and trained
        gathered = Footprint(parameters=c * params if kept else 0)
        resident[name] = gathered + (Footprint() if offloaded else state)
        # The forward pass (old/ref log-probs, values) runs before the update: no gradients yet.
        forward_resident += resident[name].total - (0 if offloaded else state.gradients)
        blocks_gathered = 0 if kept else c * (root + 2 * arch.block_params)
        forward_logits = forward_logits_bytes(arch, b_logits, seq, resp, c, chunked) if name != "critic" else 0
        forward_active = max(forward_active, blocks_gathered + one_layer, forward_logits)
        if not trained:
            active[name] = Footprint()
            continue
        saved = activation_bytes(arch, b, seq, c, ckpt)
        blocks = Footprint(parameters=blocks_gathered,
                           gradients=c * root + 2 * arch.block_params * (c + (4 if mixed else 0)),
                           activations=saved)
        # With checkpointing the loss sees only the block inputs; a block is recomputed later.
        # The root stays gathered from forward to backward (learner/fsdp.py).
        loss = Footprint(parameters=0 if keeps_gathered else c * root, activations=saved - (one_layer if ckpt else 0),
                         logits=(logits_bytes(arch, b_logits, seq, resp, c, chunked) if name == "policy"
                                 else value_head_bytes(arch, b, seq, c) if name == "critic" else 0))
        active[name] = max(loss, blocks, key=lambda fp: fp.total)

    peak_model = max(active, key=lambda n: active[n].total)
    peak = active[peak_model]
    for fp in resident.values():
        peak = peak + fp
    # AdamW's foreach step needs one more fp32 buffer the size of the shard (sqrt of the second moment).
    step = 0 if options.cpu_offload else sum(fp.total for fp in resident.values()) + 4 * max(
        math.ceil(params / shards) for name, (params, _) in models.items() if name != "reference")
    tensors = max(peak.total, forward_resident + forward_active, step)
    overhead = (FIXED_OVERHEAD_BYTES if mixed else 0) + int(FRAGMENTATION * tensors)  # no CUDA context on CPU
    return MemoryPlan(resident=resident, active=active, peak_model=peak_model, peak=peak,
                      forward_bytes=forward_resident + forward_active + overhead, overhead_bytes=overhead,
                      total_bytes=tensors + overhead,
                      usable_bytes=int(options.gpu_memory_gib * GIB * (1 - SAFETY_MARGIN)), host_bytes=host)
