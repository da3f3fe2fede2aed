"""Collation of rollouts into padded tensors, the batch records the learner works on, and what
the driver and the learner ranks hand each other (``Minibatch``, ``ForwardResult``, ``UpdateResult``).

Two frames are used:
- the *sequence* frame ``[B, L]``: prompt + response token ids, right-padded, what the model
  reads;
- the *response* frame ``[B, T]``: one column per response token, left-aligned and
  right-padded, where all RL math happens (log-probs, values, advantages, losses).
``response_positions`` maps the second into the first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from actors.types import Rollout


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutBatch:
    """Rollouts as tensors, ready for the learner's forward passes.

    Example: ``collate(rollouts, pad_token_id=0)`` builds one; ``batch.select(idx)`` slices rows.
    """

    input_ids: torch.Tensor
    """Prompt then response token ids, right-padded with the pad id.  # [B, L] int64"""
    attention_mask: torch.Tensor
    """1 on real tokens.  # [B, L] int64"""
    prompt_lengths: torch.Tensor
    """Number of prompt tokens per row.  # [B] int64"""
    response_mask: torch.Tensor
    """1.0 on real response tokens.  # [B, T] float32"""
    rollout_logprobs: torch.Tensor
    """The rollout engine's log-prob of each response token (0 on padding).  # [B, T] float32"""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int]) -> "RolloutBatch":
        """The given rows, with both frames trimmed to the longest remaining row."""
        return _select(self, rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainBatch:
    """A rollout batch with everything the PPO update needs, in the response frame.

    Example: ``TrainBatch(rollouts=b, old_logprobs=..., advantages=..., returns=None, old_values=None, ref_logprobs=None)``
    """

    rollouts: RolloutBatch
    """The sequences."""
    old_logprobs: torch.Tensor
    """Learner log-probs under the policy that sampled (before this update).  # [B, T]"""
    advantages: torch.Tensor
    """Per-token advantages (0 on padding).  # [B, T]"""
    returns: torch.Tensor | None
    """Value targets when a critic is trained, else None.  # [B, T]"""
    old_values: torch.Tensor | None
    """Critic values before the update (for value clipping), else None.  # [B, T]"""
    ref_logprobs: torch.Tensor | None
    """Reference-model log-probs when KL is a loss term, else None.  # [B, T]"""
    importance_weights: torch.Tensor | None
    """Truncated importance weights for the train/inference mismatch, else None.  # [B, T]"""

    @property
    def size(self) -> int:
        return self.rollouts.size

    def select(self, rows: torch.Tensor | Sequence[int]) -> "TrainBatch":
        rows = torch.as_tensor(rows, dtype=torch.long)
        rollouts = self.rollouts.select(rows)
        t = rollouts.response_mask.shape[1]
        cut = {f.name: getattr(self, f.name)[rows, :t] for f in fields(self)
               if f.name != "rollouts" and getattr(self, f.name) is not None}
        return replace(self, rollouts=rollouts, **cut)


def collate(rollouts: Sequence[Rollout], pad_token_id: int) -> RolloutBatch:
    """Pad a list of rollouts into a ``RolloutBatch`` (row order = list order)."""
    if not rollouts:
        raise ValueError("cannot collate an empty list of rollouts")
    seq_len = max(len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts)
    resp_len = max(1, max(len(r.response_token_ids) for r in rollouts))
    b = len(rollouts)
    input_ids = torch.full((b, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, seq_len), dtype=torch.long)
    response_mask = torch.zeros((b, resp_len), dtype=torch.float32)
    rollout_logprobs = torch.zeros((b, resp_len), dtype=torch.float32)
    prompt_lengths = torch.empty(b, dtype=torch.long)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_token_ids), len(r.response_token_ids)
        input_ids[i, :p + n] = torch.tensor(r.prompt_token_ids + r.response_token_ids)
        attention_mask[i, :p + n] = 1
        prompt_lengths[i] = p
        response_mask[i, :n] = 1.0
        rollout_logprobs[i, :n] = torch.tensor(r.response_logprobs, dtype=torch.float32)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths,
                        response_mask=response_mask, rollout_logprobs=rollout_logprobs)


def response_positions(batch: RolloutBatch) -> torch.Tensor:
    """Index of the logit that predicts each response token: ``prompt_len - 1 + t``.  # [B, T]

    Padding columns point at a valid position (clamped) and are masked out downstream.
    """
    t = torch.arange(batch.response_mask.shape[1], device=batch.prompt_lengths.device)
    pos = batch.prompt_lengths[:, None] - 1 + t[None, :]
    return pos.clamp(max=batch.input_ids.shape[1] - 2)


def _select(batch: RolloutBatch, rows) -> RolloutBatch:
    rows = torch.as_tensor(rows, dtype=torch.long)
    attention = batch.attention_mask[rows]
    response = batch.response_mask[rows]
    seq_len = int(attention.sum(1).max())
    resp_len = max(1, int(response.sum(1).max()))
    return RolloutBatch(
        input_ids=batch.input_ids[rows, :seq_len], attention_mask=attention[:, :seq_len],
        prompt_lengths=batch.prompt_lengths[rows], response_mask=response[:, :resp_len],
        rollout_logprobs=batch.rollout_logprobs[rows, :resp_len])


def arrange_by_length(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Row indices for each of ``ranks`` learner ranks, longest rows first within each rank.

    Rows are dealt in order of decreasing length, in a snake (0, 1, .., R-1, R-1, .., 0, 0, ..)
    so ranks get near-equal token totals and none waits for a long shard at the collectives;
    row counts differ by at most one, as with a contiguous split. A rank cuts its rows into
    micro-batches in order, and each micro-batch is padded to its own longest row, so rows of
    similar length side by side compute less padding. The update does not depend on the
    arrangement: every loss uses the minibatch's global denominators.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    shards: list[list[int]] = [[] for _ in range(ranks)]
    for k, row in enumerate(order):
        turn, slot = divmod(k, ranks)
        shards[slot if turn % 2 == 0 else ranks - 1 - slot].append(row)
    return shards


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(lo, hi)`` ranges covering ``range(n)``, sizes differing by at most 1."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def micro_batch_sizes(lengths: Sequence[int], shards: list[list[int]], rows_per_micro: int,
                      token_budget: int = 0, packed: bool = False) -> list[list[int]]:
    """Rows in each micro-batch of each rank's shard (rows in ``arrange_by_length`` order), the
    same number of micro-batches on every rank, since each is a collective forward/backward.

    ``token_budget == 0``: at most ``rows_per_micro`` rows per micro-batch, rows spread evenly.
    ``token_budget > 0``: consecutive rows fill a micro-batch while rows x its longest row stay
    within the budget (a row longer than the budget runs alone), so short rows run many to a
    micro-batch and long ones few; ``packed`` (``learner.pack_sequences``, no padding): while the
    rows' lengths sum to within the budget. A rank that needs fewer micro-batches than another splits its
    largest ones; one with fewer rows than micro-batches gets empty ones (size 0).
    """
    if token_budget <= 0:
        num_micro = max(1, math.ceil(max(len(s) for s in shards) / rows_per_micro))
        return [[hi - lo for lo, hi in split_evenly(len(s), num_micro)] for s in shards]
    per_rank = []
    for shard in shards:
        sizes, i = [], 0
        while i < len(shard):
            if packed:
                take, total = 1, lengths[shard[i]]
                while i + take < len(shard) and total + lengths[shard[i + take]] <= token_budget:
                    total += lengths[shard[i + take]]
                    take += 1
            else:  # longest first, so the micro-batch's first row sets its width
                take = min(len(shard) - i, max(1, token_budget // max(1, lengths[shard[i]])))
            sizes.append(take)
            i += take
        per_rank.append(sizes)
    num_micro = max(1, max(len(s) for s in per_rank))
    for sizes in per_rank:
        while len(sizes) < num_micro:
            big = max(range(len(sizes)), key=lambda k: sizes[k], default=None)
            if big is None or sizes[big] < 2:
                sizes.append(0)
                continue
            half = sizes[big] // 2
            sizes[big:big + 1] = [sizes[big] - half, half]
    return per_rank


def minibatch_plan(size: int, world_size: int, minibatches: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Row indices of every optimizer step of a batch of ``size`` rows: ``epochs`` passes, each
    a fresh shuffle split into ``minibatches`` parts. A batch shrunk by dynamic sampling gets
    fewer parts, so every one of the ``world_size`` learner ranks has at least one row of each."""
    g = torch.Generator().manual_seed(seed)
    parts = max(1, min(minibatches, size // world_size))
    plan = []
    for _ in range(epochs):
        plan.extend(torch.randperm(size, generator=g).tensor_split(parts))
    return plan


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardResult:
    """What the learner computes before the update, for one rank's shard (response frame).

    Example: ``ForwardResult(old_logprobs=lp, ref_logprobs=None, values=None, entropy=ent)``
    """

    old_logprobs: torch.Tensor
    """Policy log-probs of the sampled tokens.  # [B, T]"""
    ref_logprobs: torch.Tensor | None
    """Reference-model log-probs, when a reference exists.  # [B, T]"""
    values: torch.Tensor | None
    """Critic values, when a critic exists.  # [B, T]"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Minibatch:
    """One rank's share of one optimizer step.

    Example: ``Minibatch(batch=shard, micro_sizes=[3, 3], num_tokens=180.0, num_seqs=64)``
    """

    batch: TrainBatch
    """This rank's rows of the minibatch, in micro-batch order."""
    micro_sizes: list[int]
    """Rows of each micro-batch (``learner.batch.micro_batch_sizes``); as many micro-batches on
    every rank, a size of 0 is a zero-weighted pass that keeps the collectives in step."""
    num_tokens: float
    """Real response tokens in the WHOLE minibatch over all ranks (loss denominator)."""
    num_seqs: int
    """Sequences in the WHOLE minibatch over all ranks (loss denominator)."""
    kl_coef: float | None = None
    """This step's KL coefficient for ``algorithm.kl_place=loss`` (the adaptive controller's
    current value); None uses the fixed ``algorithm.kl_coef``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateResult:
    """Sums for the step's training metrics from one rank; the driver merges ranks.

    Example: ``UpdateResult(metric_sums={"policy/clipfrac": 3.2}, metric_weights={"policy/clipfrac": 64.0}, skipped_updates=0)``
    """

    metric_sums: dict[str, float]
    """Token-weighted sums of per-micro-batch metrics."""
    metric_weights: dict[str, float]
    """The weights (token counts) behind each sum."""
    skipped_updates: int
    """Optimizer steps skipped because the loss or gradient was not finite, the policy's and the
    critic's together (logged as ``policy/skipped_updates``)."""
    metric_extremes: dict[str, float] = field(default_factory=dict)
    """Metrics named ``*_max`` / ``*_min`` (the PPO ratio's extremes): the largest / smallest over
    micro-batches, merged across ranks the same way. A token-weighted mean of per-micro-batch
    maxima would hide the one spike these exist to show."""


def merge_extreme(name: str, seen: float | None, value: float) -> float:
    """The larger of two values of a ``*_max`` metric, the smaller of a ``*_min`` one."""
    if seen is None:
        return value
    return max(seen, value) if name.endswith("_max") else min(seen, value)
