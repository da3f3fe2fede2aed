"""Advantage estimators and reward shaping: pure functions on right-padded response tensors.

Every estimator returns token-level advantages ``[B, T]`` that are zero on padding, so the
policy loss is the same whatever produced them. ``mask`` is ``[B, T]`` (bool or float) with
1 on real response tokens; rows are right-padded and every row has at least one real token.
Group estimators take one scalar ``scores[i]`` per sequence and ``group_index[i]``, the id of
the prompt it was sampled from (ids need not be contiguous or sorted; groups may differ in
size, size 1 included).

Advantages are targets, never differentiated: the estimators run under ``no_grad`` so a
value head that requires grad cannot leak gradient into the policy loss through them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is set; padding never enters (even NaN).

    x, mask: same shape (e.g. ``[B, T]``). ``dim=None`` gives a scalar; ``dim=1`` gives ``[B]``.
    An empty selection gives 0 rather than NaN.
    """
    mask = mask.bool()
    masked = torch.where(mask, x, 0)
    if dim is None:
        return masked.sum() / mask.sum().clamp_min(1)
    return masked.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and std of its masked entries; padding stays 0.

    x, mask: ``[B, T]`` -> ``[B, T]``. The variance is the population one (divide by N), so a
    single real token whitens to 0 instead of NaN. ``shift_mean=False`` only rescales
    (``x / std``), keeping the sign of every entry.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) if shift_mean else x
    return torch.where(mask, whitened * torch.rsqrt(var + eps), 0)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    token_rewards, values, mask: ``[B, T]``. Returns ``(advantages, returns)``, both ``[B, T]``
    and zero on padding; ``returns = advantages + values`` is the value-head target.
    The episode ends at each row's last real token, so the value after it is 0.
    """
    mask = mask.bool()
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    # With reward and value zeroed on the (right) padding, the scan over the padding yields
    # exactly 0, so each row's last real token sees next value 0 and no carried advantage:
    # its episode ends there, and whatever the model wrote on padding never leaks in.
    rewards = torch.where(mask, token_rewards, 0).to(dtype)
    values = torch.where(mask, values, 0).to(dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    carry = torch.zeros_like(values[:, 0])  # [B] advantage of the next position
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        carry = delta + gamma * lam * carry
        advantages[:, t] = carry
        next_value = values[:, t]
    return advantages, advantages + values


@torch.no_grad()
def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` within each row; 0 on padding.

    token_rewards, mask: ``[B, T]`` -> ``[B, T]``.
    """
    # Zero reward on the (right) padding keeps the running return 0 until each row's end.
    rewards = torch.where(mask.bool(), token_rewards, 0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def _float(scores: Tensor) -> Tensor:
    return scores if scores.is_floating_point() else scores.to(torch.get_default_dtype())


def _groups(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group statistics, looked up by ``inverse`` (``[B]``, compact ids 0..G-1).

    Returns ``(inverse [B], count [G], mean [G], uniform [G])``; a group is uniform when all
    its scores are equal, which includes every size-1 group.
    """
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    zeros = scores.new_zeros(num_groups)
    count = zeros.index_add(0, inverse, torch.ones_like(scores))
    mean = zeros.index_add(0, inverse, scores) / count
    lo = zeros.scatter_reduce(0, inverse, scores, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, inverse, scores, "amax", include_self=False)
    return inverse, count, mean, lo == hi


def _per_token(per_seq: Tensor, mask: Tensor) -> Tensor:
    """Broadcast ``[B]`` over the real tokens of ``[B, T]``."""
    return torch.where(mask.bool(), per_seq[:, None], 0)


@torch.no_grad()
def grpo_advantages(
    scores: Tensor, group_index: Tensor, mask: Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, GRPO, arXiv:2402.03300).

    scores ``[B]``, group_index ``[B]``, mask ``[B, T]`` -> ``[B, T]``.
    ``(score - group mean) / (group std + eps)`` on every real token. The std is the
    unbiased one (divide by n - 1), as in the reference GRPO implementations, so curves
    can be compared with theirs. ``scale_by_std=False`` is Dr. GRPO (Liu et al. 2025,
    arXiv:2503.20783), which drops the std because it up-weights near-uniform groups.
    Groups whose scores are all equal (size-1 groups included) get exactly 0: they carry
    no learning signal, and rounding in the mean must not be blown up by ``1 / eps``.
    """
    scores = _float(scores)
    inverse, count, mean, uniform = _groups(scores, group_index)
    adv = scores - mean[inverse]
    if scale_by_std:
        sq_dev = scores.new_zeros(count.shape).index_add(0, inverse, adv**2)
        std = torch.sqrt(sq_dev / (count - 1).clamp_min(1))
        adv = adv / (std[inverse] + eps)
    adv = torch.where(uniform[inverse], 0, adv)
    return _per_token(adv, mask)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_index: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740).

    scores ``[B]``, group_index ``[B]``, mask ``[B, T]`` -> ``[B, T]``.
    Each score minus the mean of the *other* samples of its group; size-1 groups have no
    other sample and get 0, as do groups whose scores are all equal.
    """
    scores = _float(scores)
    inverse, count, mean, uniform = _groups(scores, group_index)
    n = count[inverse]
    others_mean = (mean[inverse] * n - scores) / (n - 1).clamp_min(1)
    adv = torch.where(uniform[inverse], 0, scores - others_mean)
    return _per_token(adv, mask)


@torch.no_grad()
def group_mean_baseline(scores: Tensor, group_index: Tensor) -> Tensor:
    """``[B]`` score minus its group's mean (0 for uniform and size-1 groups).

    The REINFORCE++-baseline variant subtracts this before building token rewards.
    """
    scores = _float(scores)
    inverse, _, mean, uniform = _groups(scores, group_index)
    return torch.where(uniform[inverse], 0, scores - mean[inverse])


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): reward-to-go, whitened over the batch.

    token_rewards, mask: ``[B, T]`` -> ``[B, T]``. Whitening uses every real token of the
    whole batch (global normalisation), which is what replaces the critic.
    """
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask, eps=eps)


@torch.no_grad()
def token_level_rewards(scores: Tensor, mask: Tensor, kl_penalty: Tensor | None = None) -> Tensor:
    """Place each sequence's score on its last real token; subtract a per-token KL penalty.

    scores ``[B]``, mask ``[B, T]``, kl_penalty ``[B, T]`` (already times the coefficient)
    -> ``[B, T]``, zero on padding.
    """
    mask = mask.bool()
    scores = _float(scores)
    positions = torch.arange(mask.shape[1], device=mask.device)
    # Largest index of a real token; argmax returns the first maximum, so a row whose only
    # real token is at 0 still gets 0.
    last = torch.where(mask, positions, 0).argmax(dim=1)  # [B]
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(1, last[:, None], scores[:, None])
    if kl_penalty is not None:
        rewards = rewards - kl_penalty
    return torch.where(mask, rewards, 0)


@torch.no_grad()
def filter_uniform_groups(scores: Tensor, group_index: Tensor) -> Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476): which samples to keep.

    scores ``[B]``, group_index ``[B]`` -> bool ``[B]``, False for every member of a group
    whose scores are all equal (size-1 groups included): their advantages are all 0, so
    they would only dilute the batch.
    """
    inverse, _, _, uniform = _groups(_float(scores), group_index)
    return ~uniform[inverse]


def overlong_penalty(
    response_lengths: Tensor, max_new_tokens: int, buffer_tokens: int, penalty: float = 1.0
) -> Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476), ``[B]`` -> ``[B]``.

    0 up to ``max_new_tokens - buffer_tokens`` tokens, then linear down to ``-penalty`` at
    ``max_new_tokens``, and ``-penalty`` beyond. Added to the score of each sequence.
    """
    if not 0 < buffer_tokens <= max_new_tokens:
        raise ValueError(
            f"buffer_tokens must be in (0, max_new_tokens={max_new_tokens}], got {buffer_tokens}"
        )
    soft_limit = max_new_tokens - buffer_tokens
    excess = (response_lengths.to(torch.get_default_dtype()) - soft_limit) / buffer_tokens
    return 0.0 - penalty * excess.clamp(0.0, 1.0)  # 0.0 - ... avoids printing -0.
