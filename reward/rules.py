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
import unicodedata
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

RewardFunction = Callable[[str, str, str | None], float]


def _require_answer(name: str, answer: str | None) -> str:
    if answer is None:
        raise ValueError(f"reward function {name!r} needs a reference answer, but the sample has none")
    return answer


def exact_match(prompt: str, response: str, answer: str | None) -> float:
    """1.0 if the response equals the answer (both stripped of surrounding whitespace), else 0.0."""
    return 1.0 if response.strip() == _require_answer("exact_match", answer).strip() else 0.0


def keyword_contains(prompt: str, response: str, answer: str | None) -> float:
    """+1.0 if the response contains the keyword ``answer``, else -1.0.

    A substring test ("Rome" is found in "Romeo"), as word boundaries would never match in
    text written without spaces (Chinese, Japanese, Thai); for whole words use a function of
    your own. Case-insensitive and Unicode-normalised (NFKC) on both sides, so an accent typed
    as a combining mark matches the precomposed one and fullwidth ``ＰＡＲＩＳ`` matches ``paris``.
    """
    keyword = _require_answer("keyword_contains", answer)
    if not keyword.strip():
        # Every string contains "", so an empty keyword would silently reward everything; a
        # keyword of spaces alone, nearly everything.
        raise ValueError(f"reward function 'keyword_contains' got an empty or all-whitespace keyword "
                         f"{keyword!r} as the answer")
    return 1.0 if _caseless(keyword) in _caseless(response) else -1.0


def _caseless(text: str) -> str:
    # NFKC again after casefold, which can leave text unnormalised ("ǰ" folds to j + U+030C).
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


# A number not glued to a preceding digit: "5-3" ends in 3 (not -3), "x = -3" in -3, "1.2.3" in
# 3 (not .3). Thousands separators ("1,000") are allowed so GSM8K-style answers parse; a group
# has exactly three digits, so "1,2345" is 1 and 2345, not 1,234 with the 5 lost.
_NUMBER = re.compile(r"(?<!\d)-?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")
_GSM8K_ANSWER = re.compile(r"####[ \t]*\$?[ \t]*(" + _NUMBER.pattern + ")")
"""GSM8K's final-answer line, ``#### 72``; a Markdown heading (``#### Step 2``) is none."""
_BOXED = "\\boxed{"


def _parse_number(text: str) -> Fraction:
    # Exact: as floats, 2**64 + 1 would equal 2**64.
    return Fraction(text.replace(",", ""))


def _normalize_signs(text: str) -> str:
    return text.replace("\u2212", "-")  # U+2212 MINUS SIGN, as typeset math and some models write it


def numeric_match(prompt: str, response: str, answer: str | None) -> float:
    """1.0 if the response's final answer equals the answer numerically, else 0.0.

    Meant for math tasks (GSM8K) where the response reasons first and ends with the result:
    ``numeric_match("", "5 + 37 = 42.", "42") == 1.0``; ``"1,000"`` equals ``"1000"``, ``".5"``
    equals ``"0.5"``, ``"\u22125"`` (U+2212) equals ``"-5"``; the comparison is exact (no
    float rounding). The final answer is, by precedence:

    1. the explicit final-answer marker written last, whatever follows it: ``\\boxed{...}``,
       which must hold exactly one number (``\\boxed{x = 42}``; ``\\boxed{\\frac{1}{2}}``
       holds two and scores 0.0), or GSM8K's ``#### 42`` (a number right after ``####``);
    2. otherwise the last number in the response.

    A response without any number (or whose marker holds none) scores 0.0.
    """
    ref = _require_answer("numeric_match", answer).strip()
    target = _reference_number(ref)
    if target is None:
        raise ValueError(f"reward function 'numeric_match' needs a numeric answer, got {answer!r}")
    final = _final_answer(_normalize_signs(response))
    if final is None:
        return 0.0
    try:
        value = _parse_number(final)
    except ValueError:  # past Python's 4300-digit limit (a degenerate "999..." loop): no reference's
        return 0.0
    return 1.0 if value == target else 0.0


def _final_answer(response: str) -> str | None:
    """The text of the response's final number, by `numeric_match`'s precedence; None if none."""
    boxed_at = response.rfind(_BOXED)
    gsm8k_answers = list(_GSM8K_ANSWER.finditer(response))
    gsm8k = gsm8k_answers[-1] if gsm8k_answers else None
    if boxed_at >= 0 and (gsm8k is None or boxed_at > gsm8k.start()):
        numbers = _NUMBER.findall(_braced(response, boxed_at + len(_BOXED)))
        return numbers[0] if len(numbers) == 1 else None
    if gsm8k is not None:
        return gsm8k.group(1)
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _braced(text: str, start: int) -> str:
    """The text from ``start`` up to the brace closing the one just before it (nested braces
    count); the rest of the text if it never closes (a response cut off in the box)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def _reference_number(ref: str) -> Fraction | None:
    """The answer as a number: as responses write numbers, or in any notation a dataset keeps
    (``1e3``, written as a JSON number)."""
    ref = _normalize_signs(ref)
    if _NUMBER.fullmatch(ref) is not None:
        return _parse_number(ref)
    try:
        value = float(ref)
    except ValueError:
        return None
    # float() is the gate (it refuses "1/2", and "nan", "inf" and overflow come out non-finite);
    # the value itself is read exactly.
    return Fraction(Decimal(ref)) if math.isfinite(value) else None


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
