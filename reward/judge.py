"""The eval judge: whether a held-out greedy answer counts as right.

It runs on the driver. A built-in judge is ours and runs in-process; a user's
``module:function`` runs in a child process under ``reward.timeout_s`` per call, as reward
functions do on the reward workers, so one that hangs or crashes cannot hang or end the
driver: its sample counts as wrong and as a judge failure.
"""

from __future__ import annotations

import math

from reward.isolated import FunctionProcess
from reward.rules import BUILTINS, resolve_reward_function


class EvalJudge:
    """Example: ``EvalJudge("exact_match", timeout_s=30.0)("12+30=", "42", "42") == 1.0``"""

    def __init__(self, spec: str, timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self._builtin = resolve_reward_function(spec) if spec in BUILTINS else None
        self._process = FunctionProcess([spec]) if self._builtin is None else None
        self.last_error: str | None = None
        """Why the latest failed call failed."""

    def __call__(self, prompt: str, response: str, answer: str | None) -> float | None:
        """The judge's number, or None when it could not judge (raised, timed out, crashed,
        returned something other than a finite number; ``last_error`` says which)."""
        if self._builtin is not None:
            try:  # answers were checked before the run; this is the response's side
                value = float(self._builtin(prompt, response, answer))
            except (ValueError, TypeError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                return None
        else:
            outcome = self._process.call(0, (prompt, response, answer), self.timeout_s)
            if outcome[0] != "value":
                self.last_error = " ".join(str(part) for part in outcome)
                return None
            value = outcome[1]
        if not math.isfinite(value):  # as for a reward: NaN is no verdict, and inf no right answer
            self.last_error = f"returned {value}"
            return None
        return value

    def close(self) -> None:
        if self._process is not None:
            self._process.close()
