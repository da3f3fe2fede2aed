"""The reward worker: scores responses with rule functions and an optional reward model.

A plain class; ``cluster/`` wraps it with ``ray.remote``. Each sample's reward is
``sum(weight_i * component_i)`` over the configured scorers, in order: the rule functions in
configuration order, then the reward model. A sample whose scorer raised, timed out or gave a
non-finite value comes back with ``error`` set and ``reward = nan``; the batch goes on (a
reward-model forward batch that raises is run again one text at a time, to fail only the bad one).

The rule functions run in a child process (``isolation="process"``, see `reward.isolated`), so
a call that overruns its timeout is killed even when it holds the GIL; or in a thread of this
process (``isolation="thread"``), which saves the pipe round trip but can only abandon an
overrunning call, and cannot time out one that holds the GIL at all.
"""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reward.isolated import FunctionProcess, Outcome, describe_exit, run_call
from reward.rules import resolve_reward_function
from reward.types import ISOLATIONS, ScoreRequest, ScoreResult


def _check_weight(owner: str, weight: float) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"{owner}: weight must be a finite number, got {weight!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardFunctionSpec:
    """One rule/verifier reward function and its weight.

    Example: ``RewardFunctionSpec(name="my_rewards:score", weight=0.5)``
    """

    name: str
    """A built-in name (``exact_match``, ``keyword_contains``, ``numeric_match``) or an import
    path ``module:function`` importable in the reward worker's process."""
    weight: float = 1.0
    """Multiplies the function's value in the sample's reward."""

    def __post_init__(self) -> None:
        _check_weight(f"reward function {self.name!r}", self.weight)


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardModelSpec:
    """A sequence-classification reward model (one label) on local disk.

    Example: ``RewardModelSpec(path="/ckpt/rm", weight=1.0, batch_size=16)``
    """

    path: str
    """Directory holding the model and its tokenizer (``save_pretrained`` layout)."""
    weight: float = 1.0
    """Multiplies the model's logit in the sample's reward."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_length: int | None = None
    """Tokens of ``prompt + response`` the model sees, the last ones (the start of the prompt is
    cut first; the response's end, where the scored token is, stays); ``None``: the model's
    own context (`reward.model_scorer.context_length`). A value beyond that is refused."""

    def __post_init__(self) -> None:
        _check_weight(f"reward model {self.path!r}", self.weight)
        if self.batch_size < 1:
            raise ValueError(f"reward model {self.path!r}: batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"reward model {self.path!r}: max_length must be >= 1 or None, got {self.max_length}")


class _CallThread:
    """One daemon thread that runs the calls submitted to it, in order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a user function
    hung forever would keep the worker process from ever exiting. A daemon thread does not.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="reward-function", daemon=True).start()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            future.set_result(run_call(fn, args))

    def submit(self, fn: Callable, args: tuple) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, fn, args))
        return future

    def retire(self) -> None:
        """Let the thread exit once its current call returns, if it ever does."""
        self._calls.put(None)


class RewardWorker:
    """Scores batches of responses; what a reward actor runs.

    Example::

        worker = RewardWorker([RewardFunctionSpec(name="exact_match")], timeout_s=2.0)
        worker.score([ScoreRequest(prompt="12+30=", response="42", answer="42")])
        # -> [ScoreResult(reward=1.0, components=(1.0,), error=None)]
    """

    def __init__(
        self,
        functions: Sequence[RewardFunctionSpec],
        model: RewardModelSpec | None = None,
        *,
        timeout_s: float = 30.0,
        num_threads: int | None = None,
        device: str = "cpu",
        isolation: str = "process",
        stop_after_failure: bool = False,
    ) -> None:
        for spec in functions:
            if not isinstance(spec, RewardFunctionSpec):
                raise TypeError(f"reward functions must be RewardFunctionSpec, got {spec!r}")
        if model is not None and not isinstance(model, RewardModelSpec):
            raise TypeError(f"reward model must be a RewardModelSpec or None, got {model!r}")
        if not functions and model is None:
            raise ValueError("a reward worker needs at least one reward function or a reward model")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"reward timeout_s must be a positive number of seconds, got {timeout_s}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"reward isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"reward worker num_threads must be >= 1, got {num_threads}")

        # Resolve now (here or in the child) so a misspelled function fails at launch, not on
        # the first batch.
        self._specs = list(functions)
        self._stop_after_failure = stop_after_failure
        """``reward.on_failure=error``: a failed sample ends the run, so the rest of its call is
        not scored (each could take the whole timeout: hours over a batch before the error)."""
        self._process: FunctionProcess | None = None
        self._thread_functions: list[Callable] = []
        self._caller: _CallThread | None = None
        if functions and isolation == "process":
            self._process = FunctionProcess([spec.name for spec in functions])
        elif functions:
            self._thread_functions = [resolve_reward_function(spec.name) for spec in functions]
            self._caller = _CallThread()
        # A call in flight belongs to one score() at a time (the actor also answers pings).
        self._call_lock = threading.Lock()
        self._model_spec = model
        self._model = None
        if model is not None:
            # Imported here: transformers and torch cost a rule-only worker ~4 s of start-up
            # (measured) and ~130 MiB.
            import torch

            from reward.model_scorer import RewardModelScorer

            if num_threads is not None:
                # Ray sets OMP_NUM_THREADS from the actor's CPU share (often 1); say it explicitly.
                torch.set_num_threads(num_threads)

            self._model = RewardModelScorer(model.path, device=device, batch_size=model.batch_size,
                                            max_length=model.max_length)
        self._timeout_s = timeout_s
        self._scored = 0
        self._failures = 0
        self._timeouts = 0

    def ping(self) -> bool:
        """Health probe: answers as soon as the worker is not busy."""
        return True

    def stats(self) -> dict[str, int]:
        """Counts since start: ``scored`` samples with a reward, ``failures`` samples with an
        error (``scored + failures`` = samples seen), ``timeouts`` function calls timed out."""
        return {"scored": self._scored, "failures": self._failures, "timeouts": self._timeouts}

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One result per request, in order."""
        requests = list(requests)
        for request in requests:
            if not isinstance(request, ScoreRequest):
                raise TypeError(f"RewardWorker.score takes ScoreRequest records, got {request!r}")
        model_scores = self._score_with_model(requests)

        results = []
        for i, request in enumerate(requests):
            if self._stop_after_failure and any(r.failed for r in results):
                results.append(ScoreResult(reward=math.nan, components=(),
                                           error="not scored: an earlier sample of its batch failed"))
                continue
            components: list[float] = []
            error: str | None = None
            truncated = False
            for index, spec in enumerate(self._specs):
                if error is not None:  # the sample has failed; spare the remaining calls
                    components.append(math.nan)
                    continue
                value, error = self._call(index, request)
                components.append(value)
            if self._model is not None:
                value, model_error, truncated = model_scores[i]
                components.append(value)
                if error is None:
                    error = model_error or (None if math.isfinite(value) else f"reward model returned {value}")

            if error is None:
                weights = [spec.weight for spec in self._specs]
                if self._model_spec is not None:
                    weights.append(self._model_spec.weight)
                reward = sum(w * c for w, c in zip(weights, components))
                if not math.isfinite(reward):  # finite components, e.g. 1e308 x weight 2
                    error = f"the weighted sum of the components {components} overflowed to {reward}"
            if error is None:
                self._scored += 1
            else:
                reward = math.nan
                self._failures += 1
            results.append(ScoreResult(reward=reward, components=tuple(components), error=error, truncated=truncated))
        return results

    def _score_with_model(self, requests: Sequence[ScoreRequest]) -> list[tuple[float, str | None, bool]]:
        """The reward model's ``(value, None, truncated)`` per request, or ``(nan, why, False)``
        where it failed (``truncated``: its text filled the model's ``max_length``).

        In forward batches of ``batch_size``; a batch that raises is run again one text at a
        time, so a text the model cannot take (a token its checkpoint lacks, memory run out on
        one long text) fails only its own sample, with its own error.
        """
        if self._model is None:
            return []
        size = self._model.batch_size
        scores: list[tuple[float, str | None, bool]] = []
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            outcome = self._forward(batch)
            if len(batch) > 1 and outcome[0][1] is not None:
                outcome = [self._forward([request])[0] for request in batch]
            scores.extend(outcome)
        return scores

    def _forward(self, requests: Sequence[ScoreRequest]) -> list[tuple[float, str | None, bool]]:
        """One forward batch: each request's ``(value, None, truncated)``, or ``(nan, why, False)``
        for all if it raised."""
        try:
            values = self._model.score_and_fill([r.prompt for r in requests], [r.response for r in requests],
                                                [r.messages for r in requests])
        except Exception as err:  # noqa: BLE001 - one bad batch must not take the actor down
            error = f"reward model {self._model.path!r} failed: {type(err).__name__}: {err}"
            return [(math.nan, error, False)] * len(requests)
        return [(value, None, filled) for value, filled in values]

    def _call(self, index: int, request: ScoreRequest) -> tuple[float, str | None]:
        """Run one rule function with the timeout; return (value, None) or (nan, why not)."""
        name = self._specs[index].name
        args = (request.prompt, request.response, request.answer)
        with self._call_lock:
            if self._process is not None:
                outcome = self._process.call(index, args, self._timeout_s)
            else:
                outcome = self._call_in_thread(self._thread_functions[index], args)
        kind = outcome[0]
        if kind == "timed_out":
            self._timeouts += 1
            return math.nan, f"reward function {name!r} timed out after {self._timeout_s:g} s"
        if kind == "crashed":
            return math.nan, f"reward function {name!r} ended its process (it {describe_exit(outcome[1])})"
        if kind == "not_started":
            return math.nan, f"reward function {name!r} could not run: {outcome[1]}"
        if kind == "raised":
            return math.nan, f"reward function {name!r} raised {outcome[1]}: {outcome[2]}"
        if kind == "not_a_number":
            return math.nan, f"reward function {name!r} returned {outcome[1]}, not a number"
        value = outcome[1]
        if not math.isfinite(value):
            return math.nan, f"reward function {name!r} returned {value}"
        return value, None

    def _call_in_thread(self, fn: Callable, args: tuple) -> Outcome:
        future = self._caller.submit(fn, args)
        try:
            return future.result(timeout=self._timeout_s)
        except concurrent.futures.TimeoutError:
            # Python cannot kill a thread stuck in user code. Abandon it (it exits if the call
            # ever returns) and start a fresh one, so later calls are not queued behind it.
            # Each such hang costs one idle thread; the `timeouts` count shows how many.
            self._caller.retire()
            self._caller = _CallThread()
            return ("timed_out",)

    def close(self) -> None:
        """Stop the reward-function process, if any (it also dies with this process)."""
        with self._call_lock:
            if self._process is not None:
                self._process.close()
