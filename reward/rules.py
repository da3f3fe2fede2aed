"""Rule/verifier reward functions and the resolution of a spec string to a function.

Every reward function has the signature ``fn(prompt: str, response: str, answer: str | None)
-> float``. A spec is either a built-in name (``exact_match``, ``keyword_contains``,
``numeric_match``) or an import path ``module:function`` (``my_rewards:score``,
``pkg.sub:fn``) that is imported inside the reward worker's process.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable

RewardFunction = Callable[[str, str, str | None], float]


def _require_answer(name: str, answer: str | None) -> str:
    if answer is None:
        raise ValueError(f"reward function {name!r} needs a reference answer, but the sample has none")
    return answer


def exact_match(prompt: str, response: str, answer: str | None) -> float:
    """1.0 if the response equals the answer (both stripped of surrounding whitespace), else 0.0."""
    return 1.0 if response.strip() == _require_answer("exact_match", answer).strip() else 0.0


def keyword_contains(prompt: str, response: str, answer: str | None) -> float:
    """+1.0 if the response contains the keyword ``answer`` (case-insensitive), else -1.0."""
    keyword = _require_answer("keyword_contains", answer)
    if not keyword:
        # Every string contains "", so an empty keyword would silently reward everything.
        raise ValueError("reward function 'keyword_contains' got an empty keyword as the answer")
    return 1.0 if keyword.casefold() in response.casefold() else -1.0


# A number not glued to a preceding digit: "5-3" ends in 3 (not -3), "x = -3" in -3.
# Thousands separators ("1,000") are allowed so GSM8K-style answers parse.
_NUMBER = re.compile(r"(?<!\d)-?\d+(?:,\d{3})*(?:\.\d+)?")


def _parse_number(text: str) -> float:
    return float(text.replace(",", ""))


def numeric_match(prompt: str, response: str, answer: str | None) -> float:
    """1.0 if the last number in the response equals the answer numerically, else 0.0.

    Meant for math tasks (GSM8K) where the response reasons first and ends with the result:
    ``numeric_match("", "5 + 37 = 42.", "42") == 1.0``; ``"1,000"`` equals ``"1000"``.
    A response without any number scores 0.0.
    """
    ref = _require_answer("numeric_match", answer).strip()
    target = _reference_number(ref)
    if target is None:
        raise ValueError(f"reward function 'numeric_match' needs a numeric answer, got {answer!r}")
    numbers = _NUMBER.findall(response)
    if not numbers:
        return 0.0
    return 1.0 if _parse_number(numbers[-1]) == target else 0.0


def _reference_number(ref: str) -> float | None:
    """The answer as a number: as responses write numbers, or in any notation a dataset keeps
    (``1e3``, written as a JSON number)."""
    if _NUMBER.fullmatch(ref) is not None:
        return _parse_number(ref)
    try:
        value = float(ref)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


BUILTINS: dict[str, RewardFunction] = {
    "exact_match": exact_match,
    "keyword_contains": keyword_contains,
    "numeric_match": numeric_match,
}
"""Built-in reward functions by the name a config uses for them."""


def resolve_reward_function(spec: str) -> RewardFunction:
    """Return the reward function a spec names: a built-in name or ``module:function``.

    Raises ValueError naming the spec when it is unknown, its module cannot be imported, the
    attribute is missing, or the object is not callable with ``(prompt, response, answer)``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward function spec must be a non-empty string, got {spec!r}")
    if ":" not in spec:
        if spec not in BUILTINS:
            raise ValueError(
                f"unknown reward function {spec!r}: built-ins are {', '.join(sorted(BUILTINS))}; "
                "a user function is given as 'module:function'"
            )
        return BUILTINS[spec]

    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward function spec {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user module can fail at import in any way; report it as such
        raise ValueError(
            f"reward function {spec!r}: cannot import module {module_name!r}: "
            f"{type(err).__name__}: {err}"
        ) from err

    obj: object = module
    for part in attr_path.split("."):  # "mod:Class.method" reaches nested attributes
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is not callable (it is a {type(obj).__name__})")

    # Check the arity now, at construction, rather than on the first sample in the middle of a run.
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # some C callables have no introspectable signature; trust them
    try:
        signature.bind("prompt", "response", "answer")
    except TypeError as err:
        raise ValueError(
            f"reward function {spec!r} must accept (prompt, response, answer), "
            f"but its signature is {signature}: {err}"
        ) from err
    return obj
