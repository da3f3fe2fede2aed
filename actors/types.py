"""Records the rollout side produces and consumes; they cross process boundaries.

Everything here is a frozen, slotted, keyword-only dataclass of plain Python values, so it
pickles cheaply through Ray and cannot be mutated by the receiver. This module imports
nothing heavy: the driver, the learner and the reward workers import it without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One turn of a chat prompt.

    Example: ``ChatMessage(role="user", content="What is 12+30?")``
    """

    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str
    """The text of the turn."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    """One prompt of the dataset, as the controller hands it to a rollout worker.

    Exactly one of ``text`` and ``messages`` is set. Chat messages are rendered with the
    tokenizer's chat template on the worker (an error if the tokenizer has none).

    Example: ``Prompt(index=7, text="12+30=", answer="42", line=9)``
    """

    index: int
    """Position of the prompt in the training (or eval) set; with the step it makes the
    sampling seed of every sample, so a re-dispatched prompt samples the same completion."""
    line: int | None = None
    """1-based line of the dataset file it was read from (blank lines make it differ from
    ``index``); ``None`` for a prompt built in code."""
    text: str | None = None
    """Plain-text prompt, fed to the model as is."""
    messages: tuple[ChatMessage, ...] | None = None
    """Chat prompt, rendered with the chat template (generation prompt added)."""
    answer: str | None = None
    """Reference answer (or keyword) for rule and verifier rewards; ``None`` if the dataset has none."""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"{self.label}: set exactly one of text and messages")

    @property
    def label(self) -> str:
        """How errors name it: ``prompt 3 (line 5)``; the index alone is not findable in a file
        with blank lines."""
        return f"prompt {self.index}" if self.line is None else f"prompt {self.index} (line {self.line})"


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingSettings:
    """How a rollout worker samples. Log-probs are those of the distribution sampled from
    (``log_softmax(logits / temperature)``), which is what the PPO ratio needs.

    Example: ``SamplingSettings(temperature=1.0, max_new_tokens=16, samples_per_prompt=8)``
    """

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (evaluation)."""
    top_p: float = 1.0
    """Nucleus sampling mass; anything below 1 makes the log-probs those of a truncated
    distribution the learner does not model, so training keeps 1."""
    top_k: int = -1
    """Top-k cut-off; -1 turns it off (training keeps it off for the same reason as top_p)."""
    max_new_tokens: int = 64
    """Upper bound on response length; a response that hits it finishes with ``length``."""
    samples_per_prompt: int = 1
    """Independent samples drawn per prompt (the group size of group-baseline estimators)."""
    stop: tuple[str, ...] = ()
    """Extra stop strings besides the tokenizer's end-of-sequence token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateRequest:
    """One call to a rollout worker: a slice of the step's prompts.

    Example: ``GenerateRequest(prompts=(p0, p1), sampling=s, step=3, seed=1234)``
    """

    prompts: tuple[Prompt, ...]
    """The prompts of this slice; every one is sampled ``sampling.samples_per_prompt`` times."""
    sampling: SamplingSettings
    """Sampling settings shared by the slice."""
    step: int
    """Training step the samples are for; part of every request's seed."""
    seed: int
    """Run seed; part of every request's seed."""
    first_slot: int = 0
    """Slot of ``prompts[0]`` in the step's batch (the others follow on)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    """One sampled response with everything the reward and learner need.

    Example: ``Rollout(prompt_index=7, slot=3, sample_index=0, prompt_text="12+30=", answer="42",
    prompt_token_ids=(1, 5, 6), response_token_ids=(8, 6, 2), response_logprobs=(-0.1, -0.3, -0.01),
    response_text="42", finish_reason="stop", policy_version=3)``
    """

    prompt_index: int
    """``Prompt.index`` of the prompt this answers."""
    slot: int
    """Position of its prompt in the step's batch. (step, slot, sample_index) names a sample
    uniquely even when a prompt comes twice in one batch (across an epoch boundary); it seeds
    the sample and groups the samples of one prompt."""
    sample_index: int
    """Which of the slot's ``samples_per_prompt`` samples this is (0-based)."""
    prompt_text: str
    """The prompt as fed to the model: a chat rendered by the chat template, special tokens and
    role markers included; a plain prompt as written (the BOS the tokenizer adds is not in it)."""
    answer: str | None
    """The prompt's reference answer, carried along for the reward."""
    prompt_token_ids: tuple[int, ...]
    """Token ids of the prompt.  # [P]"""
    response_token_ids: tuple[int, ...]
    """Token ids of the response, including the end-of-sequence token when one was sampled.  # [R]"""
    response_logprobs: tuple[float, ...]
    """vLLM's log-prob of each response token under the sampling distribution.  # [R]"""
    response_text: str
    """Detokenised response (special tokens skipped)."""
    finish_reason: str
    """``stop`` (end-of-sequence or stop string) or ``length`` (hit max_new_tokens)."""
    policy_version: int
    """Version of the policy weights that generated this sample (0 = the starting weights)."""
