"""From scores to advantages, as the configured estimator prescribes.

This is the one place that reads ``AlgorithmConfig`` to choose among the pure estimators in
``learner/advantages.py``; it runs on the driver, where the whole batch is visible (group
baselines and batch whitening need every sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.advantages import (gae, group_mean_baseline, grpo_advantages, masked_mean, masked_whiten,
                                reinforce_pp_advantages, rloo_advantages, token_level_rewards)
from learner.config import AlgorithmConfig
from learner.losses import kl_penalty


@dataclass(frozen=True, slots=True, kw_only=True)
class Advantages:
    """Per-token training targets.

    Example: ``Advantages(advantages=a, returns=None, metrics={"kl/value": 0.01})``
    """

    advantages: torch.Tensor
    """Per-token advantages, 0 on padding.  # [B, T]"""
    returns: torch.Tensor | None
    """Value targets (gae only).  # [B, T]"""
    metrics: dict[str, float]
    """``kl/value`` (mean per-sequence KL to the reference) and advantage statistics."""


def estimate_advantages(algo: AlgorithmConfig, *, scores: torch.Tensor, group_index: torch.Tensor,
                        mask: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                        values: torch.Tensor | None, kl_coef: float) -> Advantages:
    """scores ``[B]``, group_index ``[B]``, mask/old_logprobs/ref_logprobs/values ``[B, T]``."""
    metrics: dict[str, float] = {}
    kl_tokens = None  # per-token KL penalty in the reward, already times the coefficient
    if ref_logprobs is not None:
        k1 = kl_penalty(old_logprobs, ref_logprobs, "k1") * mask  # [B, T]
        metrics["kl/value"] = float(k1.sum(1).mean())
        if algo.kl_place == "reward" and kl_coef > 0:
            kl_tokens = kl_coef * k1
    estimator = algo.advantage_estimator
    returns = None
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage_estimator=gae needs critic values")
        adv, returns = gae(token_level_rewards(scores, mask, kl_tokens), values, mask, algo.gamma, algo.lam)
    elif estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        if estimator == "reinforce_pp_baseline":
            scores = group_mean_baseline(scores, group_index)
        adv = reinforce_pp_advantages(token_level_rewards(scores, mask, kl_tokens), mask, algo.gamma)
    else:
        # Group estimators see one number per sequence, so a KL penalty in the reward enters
        # as its sum over the sequence.
        if kl_tokens is not None:
            scores = scores - kl_tokens.sum(1)
        if estimator == "rloo":
            adv = rloo_advantages(scores, group_index, mask)
        else:
            adv = grpo_advantages(scores, group_index, mask, scale_by_std=estimator == "grpo")
    if algo.whiten_advantages and estimator not in ("reinforce_pp", "reinforce_pp_baseline"):
        # Group advantages are centred per group already; a token mean is not 0 once right and
        # wrong answers differ in length, and subtracting it would give every token of a group
        # with no signal (exactly 0) a common sign. So they are only rescaled.
        adv = masked_whiten(adv, mask, shift_mean=estimator == "gae")
    metrics["advantages/mean"] = float(masked_mean(adv, mask))
    metrics["advantages/abs_mean"] = float(masked_mean(adv.abs(), mask))
    if returns is not None:
        metrics["value/returns_mean"] = float(masked_mean(returns, mask))
    return Advantages(advantages=adv, returns=returns, metrics=metrics)
