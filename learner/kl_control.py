"""KL-coefficient controllers and the running reward normaliser.

Small stateful classes whose whole state is a few floats: ``state_dict()`` returns a plain
dict that round-trips through JSON, so a resumed run continues with the same adapted
coefficient and reward statistics. Settings (a fixed coefficient, the adaptive one's target
and horizon) come from the config at construction and are not state: a resume whose config
changed them goes on with the new ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FixedKLController:
    """A constant KL coefficient.

    Example: ``FixedKLController(coef=0.05).coef == 0.05``
    """

    def __init__(self, coef: float) -> None:
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; kept so the trainer calls every controller the same way."""

    def state_dict(self) -> dict[str, float | bool]:
        return {"coef": self.coef, "adaptive": False}

    def load_state_dict(self, state: dict[str, float | bool]) -> None:
        """The inverse of ``state_dict``. A resume does not call it: a fixed coefficient is a
        setting, so the resumed job's configured one applies (``Controller.restore_kl``)."""
        self.coef = float(state["coef"])


MIN_FACTOR, MAX_FACTOR = 0.5, 2.0
"""Bounds of the adaptive controller's factor per update (it stays positive)."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593, section 2.2).

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``coef *= 1 + error * n_steps / horizon``. The clip bounds the change to 20% per
    ``horizon`` samples, so one noisy KL measurement cannot swing the coefficient. A horizon
    shorter than a fifth of a batch would make the factor negative (the coefficient changes
    sign and the penalty silently turns off or into a bonus): the factor is kept within
    [1/2, 2] per update, which the usual horizons (thousands of samples) never reach.

    Example: ``AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)``
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: KL to the reference measured on the last batch;
        ``n_steps``: samples (sequences) in that batch. A non-finite KL (NaN log-probs) leaves
        the coefficient as it is: folded in, it would stay NaN for the rest of the run."""
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= min(max(1.0 + error * n_steps / self.horizon, MIN_FACTOR), MAX_FACTOR)

    def state_dict(self) -> dict[str, float | bool]:
        return {"coef": self.coef, "adaptive": True}

    def load_state_dict(self, state: dict[str, float | bool]) -> None:
        """Continue from the adapted coefficient; the configured target and horizon steer it from
        there. A fixed controller's checkpoint holds nothing adapted: the configured start stays.
        Checkpoints written before ``adaptive`` was kept: a coefficient of 0 cannot be an adapted
        one (this one starts above 0 and stays there), and restoring it would pin it at 0."""
        if state.get("adaptive", state["coef"] > 0):
            self.coef = float(state["coef"])


class RunningMeanStd:
    """Running mean and (population) variance of a stream of rewards.

    Each batch's moments are merged into the running ones with the parallel update of
    Chan et al. (1979), exact for any batch sizes; state is kept in Python floats (double
    precision) so long runs do not drift.

    Example: ``rms.update(scores); scores = rms.normalize(scores, clip=5.0)``
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0  # so normalize() before any update leaves scale unchanged
        self.count = 0

    def update(self, x: Tensor) -> None:
        """Fold a batch ``x`` ``[N]`` into the statistics; an empty batch changes nothing."""
        x = x.detach().reshape(-1).double()
        n = x.numel()
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            # One inf would make the mean inf and the variance NaN for the rest of the run, and
            # the checkpoint would carry them; failed rewards never reach here, so this is a bug.
            raise ValueError(f"reward normalisation got {int((~torch.isfinite(x)).sum())} non-finite reward(s)")
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        # Sum of squared deviations (M2) of the union = both parts' M2 + the spread of means.
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: Tensor, clip: float | None = None, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / sqrt(var + eps)``, optionally clamped to ``[-clip, clip]``; same shape."""
        out = (x - self.mean) / (self.var + eps) ** 0.5
        return out if clip is None else out.clamp(-clip, clip)

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
