"""Built-in reward functions and the resolution of reward function specs."""

from __future__ import annotations

import textwrap
import unicodedata
import uuid

import pytest

from reward.rules import (
    BUILTINS,
    exact_match,
    keyword_contains,
    numeric_match,
    resolve_reward_function,
)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match("12+30=", " 42\n", "42") == 1.0
    assert exact_match("12+30=", "42", " 42 ") == 1.0
    assert exact_match("12+30=", "4 2", "42") == 0.0
    assert exact_match("12+30=", "42.", "42") == 0.0
    assert exact_match("12+30=", "", "42") == 0.0


def test_keyword_contains_is_case_insensitive_and_signed():
    assert keyword_contains("", "The capital is PARIS.", "paris") == 1.0
    assert keyword_contains("", "The capital is Lyon.", "Paris") == -1.0


@pytest.mark.parametrize(
    ("response", "keyword", "expected"),
    [
        (unicodedata.normalize("NFD", "Un café noir"), "café", 1.0),  # é as e + combining accent
        ("Un café noir", unicodedata.normalize("NFD", "CAFÉ"), 1.0),
        ("The capital is \uff30\uff21\uff32\uff29\uff33.", "paris", 1.0),  # fullwidth PARIS
        ("The ﬁnal answer", "final", 1.0),  # the "fi" ligature U+FB01
        ("Ünïcödé", "unicode", -1.0),  # accents are part of the text, not dropped
        # A substring test, as documented: no word boundaries, which Chinese or Japanese text
        # (no spaces between words) would never have.
        ("Romeo and Juliet", "Rome", 1.0),
        ("首都是北京。", "北京", 1.0),
    ],
)
def test_keyword_contains_compares_unicode_normalized_text(response, keyword, expected):
    assert keyword_contains("", response, keyword) == expected


@pytest.mark.parametrize("fn", [exact_match, keyword_contains, numeric_match])
def test_builtins_refuse_a_missing_answer(fn):
    with pytest.raises(ValueError, match=fn.__name__):
        fn("prompt", "response", None)


@pytest.mark.parametrize("keyword", ["", "  ", "\t\n"])
def test_keyword_contains_refuses_an_empty_or_blank_keyword(keyword):
    # A keyword of two spaces matched any response with two spaces in it.
    with pytest.raises(ValueError, match="empty or all-whitespace keyword"):
        keyword_contains("", "anything  at all", keyword)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("5 + 37 = 42", "42", 1.0),
        ("So she has 42.", "42", 1.0),  # sentence-final period is not a decimal point
        ("#### 42.0", "42", 1.0),  # numerically equal
        ("The total is 1,000 dollars", "1000", 1.0),
        ("It costs 1000", "1,000", 1.0),
        ("x = -3", "-3", 1.0),
        ("5-8 gives 3", "3", 1.0),  # "8 gives 3" ends in 3
        ("42 apples, not 43", "42", 0.0),  # only the final number counts
        ("I don't know", "42", 0.0),
        ("0.5", "0.25", 0.0),
        # A dataset's JSON number keeps its text: an exponent in the answer still compares.
        ("It is 1000.", "1e3", 1.0),
        ("a quarter: 0.25", "2.5E-1", 1.0),
    ],
)
def test_numeric_match_compares_the_final_number(response, answer, expected):
    assert numeric_match("", response, answer) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("Total: 1,2345", "1234", 0.0),  # not "1,234" with its 5 dropped: a group has 3 digits
        ("She pays $1,234.50 in total.", "1234.5", 1.0),
        ("The temperature drops to \u22125 degrees.", "-5", 1.0),  # U+2212 MINUS SIGN
        ("x = -5", "\u22125", 1.0),
        ("The answer is .5", "0.5", 1.0),
        ("It is -.5", "-0.5", 1.0),
        ("version 1.2.3", "0.3", 0.0),  # ".3" glued to a digit is no number of its own
        # 2**64 + 1 and 2**64 are the same float; integers compare exactly.
        ("The answer is 18446744073709551617", "18446744073709551616", 0.0),
        ("The answer is 18446744073709551617", "18446744073709551617", 1.0),
        ("So 0.1 + 0.2 = 0.3", "0.3", 1.0),
    ],
)
def test_numeric_match_reads_numbers_as_written(response, answer, expected):
    assert numeric_match("", response, answer) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        # GSM8K's "#### x": the number right after the last "####", whatever follows.
        ("#### 72\n\nNote: I used 2 steps", "72", 1.0),
        ("6 * 12 = 72\n#### $1,000 in all, after 3 weeks", "1000", 1.0),
        ("#### Step 2\nSo the total is 42.", "42", 1.0),  # a Markdown heading is no marker
        # The last \boxed{...}: it must hold one number, which is the answer.
        ("So \\boxed{42}. Check: 6 * 7 = 42, and 40 + 2", "42", 1.0),
        ("\\boxed{41}, no: \\boxed{x = -5} (3 tries)", "-5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "2", 0.0),  # not the last number in the box
        ("\\boxed{2^{10}}", "10", 0.0),
        ("\\boxed{yes} after 3 steps", "3", 0.0),  # an explicit answer with no number
        # Of both markers, the one written last is the final answer.
        ("\\boxed{41}, no wait:\n#### 42", "42", 1.0),
        ("#### 41, no wait: \\boxed{42} (step 7)", "42", 1.0),
    ],
)
def test_numeric_match_prefers_an_explicit_final_answer_to_the_last_number(response, answer, expected):
    assert numeric_match("", response, answer) == expected


@pytest.mark.parametrize("answer", ["forty-two", "nan", "inf", ""])
def test_numeric_match_refuses_a_non_numeric_answer(answer):
    with pytest.raises(ValueError, match=f"needs a numeric answer, got '{answer}'"):
        numeric_match("", "42", answer)


def test_numeric_match_scores_a_degenerate_digit_run_as_wrong_instead_of_raising():
    # Past Python's 4300-digit limit int() raises, which failed the sample (and with
    # reward.on_failure=error the run); a loop of 9s is simply no answer.
    assert numeric_match("", "The answer is " + "9" * 5000, "42") == 0.0
    assert numeric_match("", "9" * 5000 + " so the answer is 42", "42") == 1.0


def test_builtin_names_resolve_to_the_builtins():
    for name, fn in BUILTINS.items():
        assert resolve_reward_function(name) is fn
    assert set(BUILTINS) >= {"exact_match", "keyword_contains", "numeric_match"}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user package on sys.path: ``<name>.rules`` with reward functions and a few non-functions."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"  # unique, so no stale sys.modules entry is reused
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(
        textwrap.dedent(
            """
            LIMIT = 3

            def length_penalty(prompt, response, answer):
                return -len(response) / 10

            def two_args(prompt, response):
                return 0.0

            class Graders:
                @staticmethod
                def starts_with_answer(prompt, response, answer):
                    return float(response.startswith(answer))
            """
        )
    )
    (package / "broken.py").write_text("raise RuntimeError('config server unreachable')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_import_path_resolves_a_user_function(user_package):
    fn = resolve_reward_function(f"{user_package}.rules:length_penalty")
    assert fn("p", "abcde", None) == -0.5
    nested = resolve_reward_function(f"{user_package}.rules:Graders.starts_with_answer")
    assert nested("p", "42 is it", "42") == 1.0


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("exact_mach", "built-ins are exact_match, keyword_contains, numeric_match"),
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("{pkg}.broken:score", "RuntimeError: config server unreachable"),
        ("{pkg}.rules:missing", "has no attribute 'missing'"),
        ("{pkg}.rules:LIMIT", "is not callable"),
        ("{pkg}.rules:two_args", r"must accept \(prompt, response, answer\)"),
        ("{pkg}.rules:", "must look like 'module:function'"),
        (":score", "must look like 'module:function'"),
    ],
)
def test_bad_specs_fail_with_a_message_naming_the_spec(user_package, spec, why):
    spec = spec.format(pkg=user_package)
    with pytest.raises(ValueError) as info:
        resolve_reward_function(spec)
    assert repr(spec) in str(info.value)
    assert info.match(why)


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_empty_spec_is_refused(spec):
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_reward_function(spec)
