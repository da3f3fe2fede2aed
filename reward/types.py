"""Records that cross into and out of reward workers."""

from __future__ import annotations

from dataclasses import dataclass

from actors.types import ChatMessage

ISOLATIONS = ("process", "thread")
"""Where rule functions run: a child process of the worker (default) or a thread of it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreRequest:
    """One response to score.

    Example: ``ScoreRequest(prompt="12+30=", response="42", answer="42")``
    """

    prompt: str
    """The prompt as the policy saw it (chat template applied)."""
    response: str
    """The policy's response text."""
    answer: str | None
    """Reference answer or keyword from the dataset; ``None`` when the dataset has none."""
    messages: tuple[ChatMessage, ...] | None = None
    """The dataset's chat turns of a chat prompt (None for a plain one): a reward model with a
    chat template of its own scores them and the response in its own format."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    """The reward of one response and what it was made of.

    Example: ``ScoreResult(reward=1.0, components=(1.0,), error=None)``
    """

    reward: float
    """Weighted sum of the components; NaN when ``error`` is set."""
    components: tuple[float, ...]
    """Each configured scorer's raw value, in configuration order (NaN for one that failed)."""
    error: str | None = None
    """Why the sample could not be scored (a scorer raised, timed out, or returned a
    non-finite value); ``None`` on success. The controller decides what a failure costs."""
    truncated: bool = False
    """The reward model scored only the end of the text: it filled ``reward.model.max_length``
    (counted in ``reward/model_truncated``)."""

    @property
    def failed(self) -> bool:
        return self.error is not None
