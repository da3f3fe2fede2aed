"""Policy, value and KL losses, and the log-prob / entropy helpers they are computed from.

Pure functions on right-padded ``[B, T]`` response tensors (``mask`` marks real tokens).

Micro-batch invariance: a minibatch is split into micro-batches and across data-parallel
ranks, and the summed gradient must equal the one of the whole minibatch. So every loss
takes the *global* denominators (``num_tokens``, ``num_seqs`` of the whole minibatch) and
returns its micro-batch's share: sum of its terms divided by the global denominator.
Summing (all-reducing) the shares gives the minibatch loss exactly, whatever the split.
Without them the local denominators are used, so the functions also work on their own.

Metrics are Python floats over this micro-batch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.advantages import masked_mean
from learner.config import LOSS_AGG_MODES

# exp() of a log-ratio beyond this is far outside any clip range; clamping keeps one
# diverged token from turning the loss into inf and every gradient into NaN.
_MAX_LOG_RATIO = 20.0

# Rows of [N, V] logits processed at once by the entropy / log-prob helpers, so the
# float32 softmax temporaries stay a few hundred MB even for 150k-token vocabularies.
_CHUNK_TOKENS = 1024


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses ``[B, T]`` to this micro-batch's share of the minibatch loss.

    - ``token_mean``: ``sum(loss * mask) / num_tokens``; every token weighs the same.
    - ``seq_mean_token_sum``: ``sum_rows(sum_t(loss * mask)) / num_seqs`` (Dr. GRPO: no
      length normalisation, so long wrong answers are not favoured).
    - ``seq_mean_token_mean``: ``sum_rows(sum_t(loss * mask) / len_row) / num_seqs``;
      every sequence weighs the same (original GRPO).

    ``num_tokens`` / ``num_seqs``: totals over the whole minibatch (all micro-batches and
    ranks); ``None`` means this micro-batch's own.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg mode {mode!r}; allowed: {', '.join(LOSS_AGG_MODES)}")
    mask = mask.bool()
    # where, not multiply: a NaN or inf on padding must not poison the sum.
    per_token = torch.where(mask, loss_mat, 0)
    if mode == "token_mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
        return per_token.sum() / denom
    row_sum = per_token.sum(dim=1)  # [B]
    if mode == "seq_mean_token_mean":
        row_sum = row_sum / mask.sum(dim=1).clamp_min(1)
    denom = max(mask.shape[0], 1) if num_seqs is None else num_seqs
    return row_sum.sum() / denom


def _real(x: Tensor, mask: Tensor) -> Tensor:
    """The real-token entries of ``x`` as a detached float 1-D tensor, for metrics."""
    return x.detach()[mask].float()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    importance_weights: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017) with DAPO's clip-higher and dual clip.

    logprobs (requires grad), old_logprobs, advantages, mask, importance_weights: ``[B, T]``.
    ``ratio = exp(logprobs - old_logprobs)``;
    ``pg_losses = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``.
    Separate bounds are DAPO's clip-higher (Yu et al. 2025): a larger ``clip_high`` lets
    unlikely tokens with positive advantage grow, which fights entropy collapse.
    ``dual_clip`` (Ye et al. 2020, arXiv:1912.09729), ``> 1``: for ``A < 0`` the loss is
    also capped at ``-A * dual_clip``, so one token whose ratio exploded cannot dominate.
    ``importance_weights`` (e.g. truncated IS for rollout/trainer mismatch) multiply each
    token's loss and are never differentiated. The log-ratio is clamped to +-20 (a ratio
    of e^20 is clipped anyway; it keeps one diverged token from making the loss inf).

    Metrics: ``pg_loss`` (this micro-batch aggregated on its own), ``clipfrac`` (fraction
    of tokens where the clipped branch is active), ``approx_kl`` (k3 estimate of
    KL(old || new): ``mean((ratio - 1) - log ratio)``, non-negative and unbiased),
    ``ratio_mean/max/min``, and ``dual_clipfrac`` when dual clip is on.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.bool()
    # Masked before exp so garbage on padding cannot overflow into NaN gradients.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses = torch.maximum(unclipped, clipped)
    metrics: dict[str, float] = {}
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (cap < pg_losses)
        pg_losses = torch.where(capped, cap, pg_losses)
        metrics["dual_clipfrac"] = float(_real(capped, mask).mean())
    if importance_weights is not None:
        pg_losses = pg_losses * importance_weights.detach()
    loss = aggregate(pg_losses, mask, loss_agg, num_tokens, num_seqs)

    with torch.no_grad():
        metrics["pg_loss"] = float(aggregate(pg_losses, mask, loss_agg))
        metrics["clipfrac"] = float(_real(clipped > unclipped, mask).mean())
        metrics["approx_kl"] = float(_real((ratio - 1.0) - log_ratio, mask).mean())
        real_ratio = _real(ratio, mask)
        metrics["ratio_mean"] = float(real_ratio.mean())
        metrics["ratio_max"] = float(real_ratio.max())
        metrics["ratio_min"] = float(real_ratio.min())
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg: str = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2)``.

    values (requires grad), old_values, returns, mask: ``[B, T]``. ``clip_range=None`` gives
    the plain squared error. Metrics: ``vf_loss`` (this micro-batch on its own),
    ``vf_clipfrac`` (fraction of tokens where the clipped term is the larger).
    """
    mask = mask.bool()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        vf_losses = 0.5 * unclipped
        clip_active = torch.zeros_like(mask)  # nothing is ever clipped
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (values_clipped - returns) ** 2
        vf_losses = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate(vf_losses, mask, loss_agg, num_tokens, num_seqs)
    with torch.no_grad():
        metrics = {
            "vf_loss": float(aggregate(vf_losses, mask, loss_agg)),
            "vf_clipfrac": float(_real(clip_active, mask).mean()),
        }
    return loss, metrics


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 -> float32 (softmax in half precision is too coarse); float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(x: Tensor) -> Tensor:
    return x.to(softmax_dtype(x.dtype))


def _entropy_rows(logits: Tensor) -> Tensor:
    """``[N, V]`` -> ``[N]``: ``logsumexp(l) - sum(softmax(l) * l)`` on max-shifted logits.

    Entropy is shift-invariant; without the shift both terms are as large as the logits
    and their difference cancels catastrophically (logits ~1e4 lose every digit in fp32).
    """
    logits = _upcast(logits)
    logits = logits - logits.max(dim=-1, keepdim=True).values.detach()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)``: ``[B, T, V]`` -> ``[B, T]`` (at least float32).

    Computed in chunks of tokens, each upcast to float32 on its own, so the peak extra
    memory is a few chunk-sized temporaries instead of several full ``[B, T, V]`` copies.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [B*T, V]
    out = torch.cat([_entropy_rows(chunk) for chunk in flat.split(_CHUNK_TOKENS)])
    return out.reshape(logits.shape[:-1])


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``labels``: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]``.

    The temperature must be the one the rollout sampled with, or the PPO ratio compares two
    different distributions. Computed as ``logit[label] - logsumexp(logits)`` per chunk in
    at least float32, never materialising the full log-softmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # [B*T, V]
    flat_labels = labels.reshape(-1, 1)  # [B*T, 1]
    parts = []
    for chunk, chunk_labels in zip(
        flat_logits.split(_CHUNK_TOKENS), flat_labels.split(_CHUNK_TOKENS), strict=True
    ):
        chunk = _upcast(chunk) / temperature
        picked = chunk.gather(1, chunk_labels).squeeze(1)
        parts.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts).reshape(labels.shape)


def logprobs_and_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                         with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """``logprobs_from_logits`` and the entropy of ``softmax(logits / temperature)`` in one pass.

    ``[B, T, V]`` (any float dtype), ``[B, T]`` -> ``[B, T]``, ``[B, T]`` or None. Each chunk
    of tokens is upcast and scaled once and shared by both: on a 150k vocabulary the full
    float32 copies that separate calls would need cost more time than the model's matmuls.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [B*T, V]
    flat_labels = labels.reshape(-1, 1)  # [B*T, 1]
    logprobs, entropies = [], []
    for chunk, chunk_labels in zip(flat_logits.split(_CHUNK_TOKENS), flat_labels.split(_CHUNK_TOKENS), strict=True):
        scaled = _upcast(chunk) / temperature
        logprobs.append(scaled.gather(1, chunk_labels).squeeze(1) - torch.logsumexp(scaled, dim=-1))
        if with_entropy:
            entropies.append(_entropy_rows(scaled))
    entropy = torch.cat(entropies).reshape(labels.shape) if with_entropy else None
    return torch.cat(logprobs).reshape(labels.shape), entropy


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi, ``[B, T]`` -> ``[B, T]``.

    Schulman, "Approximating KL divergence" (2020), with ``r = ref / pi``:
    ``k1 = -log r`` (unbiased, high variance, can be negative); ``k2 = 0.5 * (log r)^2``
    (biased, low variance); ``k3 = (r - 1) - log r`` (unbiased, low variance, always >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # log r; clamp before exp
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: k1, k2, k3")


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over real tokens: 1 is a perfect critic, 0 no better than
    a constant, negative worse than one.

    When the returns are constant (``Var(R) == 0``) there is nothing to explain and the
    ratio is undefined; it returns 0.0 so a dashboard never shows NaN.
    """
    mask = mask.bool()
    values, returns = values.detach().double(), returns.detach().double()
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    if var_returns.item() == 0.0:
        return 0.0
    return float(1.0 - var_residual / var_returns)


@torch.no_grad()
def truncated_importance_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling for the rollout/trainer mismatch (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training").

    old_logprobs (trainer, pre-update), rollout_logprobs (inference engine), mask: ``[B, T]``.
    ``w = min(exp(old - rollout), cap)``, detached, 0 on padding; pass it to ``policy_loss``
    as ``importance_weights``. The cap bounds the variance the correction adds.
    Metrics: ``tis/weight_mean``, ``tis/weight_max``, ``tis/clipped_frac`` (tokens at the
    cap). The gap itself is logged by the controller, split by policy version.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    mask = mask.bool()
    diff = torch.where(mask, old_logprobs - rollout_logprobs, 0)
    raw = torch.exp(diff)
    weights = torch.where(mask, raw.clamp(max=cap), 0)
    metrics = {
        "tis/weight_mean": float(_real(weights, mask).mean()),
        "tis/weight_max": float(_real(weights, mask).max()),
        "tis/clipped_frac": float(_real(raw > cap, mask).mean()),
    }
    return weights, metrics
