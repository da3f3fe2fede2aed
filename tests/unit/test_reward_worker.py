"""RewardWorker, RewardModelScorer and train_reward_model on tiny models built here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from reward.model_scorer import RewardModelScorer
from reward.train import train_reward_model
from reward.types import ScoreRequest
from reward.worker import ISOLATIONS, RewardFunctionSpec, RewardModelSpec, RewardWorker

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=:.,?"


def make_tokenizer(*, pad: bool = True, eos: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A char-level tokenizer (BPE with no merges splits text into characters)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({c: i + len(vocab) for i, c in enumerate(CHARS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    special = {"unk_token": "<unk>"}
    if pad:
        special["pad_token"] = "<pad>"
    if eos:
        special["eos_token"] = "</s>"
    # padding_side as a constructor argument, so that save_pretrained keeps it.
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **special)


def make_model(tokenizer, *, vocab_size: int | None = None, seed: int = 0, arch: str = "llama"):
    """A tiny seq-cls model with one label: Llama (rotary positions) or GPT-2 (absolute)."""
    torch.manual_seed(seed)
    vocab_size = vocab_size or len(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                            num_labels=1, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos)
        return GPT2ForSequenceClassification(config).eval()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=pad,
    )
    return LlamaForSequenceClassification(config).eval()


def save_reward_model(path, *, pad=True, eos=True, padding_side="right", vocab_size=None, arch="llama") -> str:
    tokenizer = make_tokenizer(pad=pad, eos=eos, padding_side=padding_side)
    tokenizer.save_pretrained(path)
    make_model(tokenizer, vocab_size=vocab_size, arch=arch).save_pretrained(path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/unit/conftest.py)


PROMPTS = ["12+30=", "what is 7+8? ", "a", "hello there, how are you?"]
RESPONSES = ["42", "15", "the answer is fifteen", ""]


def requests_for(*responses: str, answer: str | None = "42") -> list[ScoreRequest]:
    return [ScoreRequest(prompt="q: ", response=r, answer=answer) for r in responses]


# ---------------------------------------------------------------- reward model scorer


@pytest.mark.parametrize(
    ("arch", "pad", "padding_side"),
    [("llama", True, "right"), ("llama", False, "right"), ("gpt2", True, "left"), ("gpt2", False, "left")],
    ids=["llama", "llama-eos-as-pad", "gpt2-left-pad", "gpt2-left-eos-as-pad"],
)
def test_batched_scores_equal_one_at_a_time_scores(tmp_path, arch, pad, padding_side):
    # Texts of different lengths share a batch: each must be scored at its own last token and
    # positions, exactly as if it were alone. Without a pad token the scorer pads with eos.
    # GPT-2's absolute positions make a left-padding tokenizer shift the scores if obeyed.
    path = save_reward_model(tmp_path, pad=pad, padding_side=padding_side, arch=arch)
    scorer = RewardModelScorer(path, batch_size=4)
    batched = scorer.score(PROMPTS, RESPONSES)
    alone = [scorer.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == len(batched)  # distinct texts, distinct scores
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    if not pad:
        assert scorer.tokenizer.pad_token == "</s>"
    if padding_side == "left":
        assert AutoTokenizer.from_pretrained(path).padding_side == "left"  # the case is really exercised


def test_scores_match_a_plain_forward_of_the_concatenated_text(tmp_path):
    path = save_reward_model(tmp_path)
    scorer = RewardModelScorer(path, batch_size=3)  # 4 texts -> a full batch and a partial one
    tokenizer, model = scorer.tokenizer, scorer.model
    expected = [
        model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in zip(PROMPTS, RESPONSES)
    ]
    assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_max_length_keeps_the_end_of_the_text(tmp_path):
    path = save_reward_model(tmp_path)
    truncated = RewardModelScorer(path, max_length=5)
    full = RewardModelScorer(path)
    # The last 5 characters are what a 5-token window sees, whatever came before them.
    expected = full.score([""], ["is 42"])
    assert truncated.score(["a long prompt here "], ["is 42"]) == pytest.approx(expected, abs=1e-5)


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    path = save_reward_model(tmp_path, pad=False, eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        RewardModelScorer(path)


def test_missing_model_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_rm")
    with pytest.raises(FileNotFoundError, match="no_such_rm"):
        RewardModelScorer(missing)
    with pytest.raises(FileNotFoundError, match="no_such_rm"):
        RewardWorker([], RewardModelSpec(path=missing))


def test_scorer_refuses_a_model_with_several_labels(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=3"):
        RewardModelScorer(str(tmp_path))


# ---------------------------------------------------------------- reward worker


def test_worker_weights_rules_and_reward_model_in_config_order(tmp_path, user_rewards):
    path = save_reward_model(tmp_path)
    worker = RewardWorker(
        [
            RewardFunctionSpec(name="exact_match", weight=2.0),
            RewardFunctionSpec(name=f"{user_rewards}:length", weight=-0.5),
        ],
        RewardModelSpec(path=path, weight=0.25, batch_size=2),
    )
    requests = [
        ScoreRequest(prompt="12+30=", response="42", answer="42"),
        ScoreRequest(prompt="12+30=", response=" 41 ", answer="42"),
        ScoreRequest(prompt="7+8=", response="15", answer="15"),
    ]
    rm = RewardModelScorer(path).score([r.prompt for r in requests], [r.response for r in requests])
    results = worker.score(requests)

    assert [r.components[:2] for r in results] == [(1.0, 2.0), (0.0, 4.0), (1.0, 2.0)]
    assert [r.components[2] for r in results] == pytest.approx(rm, abs=1e-5)
    for result in results:
        exact, length, model = result.components
        assert result.error is None and not result.failed
        assert result.reward == pytest.approx(2.0 * exact - 0.5 * length + 0.25 * model)
    assert worker.stats() == {"scored": 3, "failures": 0, "timeouts": 0}
    assert worker.ping() is True


def test_bad_function_spec_fails_at_construction(user_rewards):
    with pytest.raises(ValueError, match="'exactmatch'"):
        RewardWorker([RewardFunctionSpec(name="exact_match"), RewardFunctionSpec(name="exactmatch")])
    with pytest.raises(ValueError, match=f"'{user_rewards}:nope'"):
        RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:nope")])


def test_worker_needs_a_scorer_and_sane_settings():
    with pytest.raises(ValueError, match="at least one"):
        RewardWorker([])
    with pytest.raises(ValueError, match="timeout_s"):
        RewardWorker([RewardFunctionSpec(name="exact_match")], timeout_s=0)
    with pytest.raises(ValueError, match="'exact_match': weight"):
        RewardFunctionSpec(name="exact_match", weight=math.nan)
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelSpec(path="/rm", batch_size=0)


def test_num_threads_sets_torch_threads_for_a_reward_model(tmp_path):
    # Ray gives an actor OMP_NUM_THREADS from its CPU share; the config must be able to say more.
    RewardWorker([], RewardModelSpec(path=save_reward_model(tmp_path)), num_threads=2)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="num_threads"):
        RewardWorker([RewardFunctionSpec(name="exact_match")], num_threads=0)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_isolation_decides_which_process_runs_the_functions(user_rewards, isolation):
    # The tests parametrised over ISOLATIONS compare results, which either path gives alike.
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:pid")], isolation=isolation)
    (result,) = worker.score(requests_for("any"))
    assert (result.reward == os.getpid()) == (isolation == "thread"), (isolation, result)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_raising_and_nonfinite_functions_fail_only_their_sample(user_rewards, isolation):
    worker = RewardWorker(
        [RewardFunctionSpec(name=f"{user_rewards}:boom"), RewardFunctionSpec(name=f"{user_rewards}:nonfinite")],
        isolation=isolation,
    )
    results = worker.score(requests_for("ok", "bad", "nan", "inf", "fine"))

    assert [r.reward for r in results[::4]] == [3.0, 3.0]
    boom = f"reward function '{user_rewards}:boom'"
    assert results[1].error == f"{boom} raised KeyError: 'no grader for this response'"
    assert results[2].error == f"reward function '{user_rewards}:nonfinite' returned nan"
    assert results[3].error == f"reward function '{user_rewards}:nonfinite' returned inf"
    for failed in results[1:4]:
        assert failed.failed and math.isnan(failed.reward)
        assert len(failed.components) == 2 and math.isnan(failed.components[-1])
    assert worker.stats() == {"scored": 2, "failures": 3, "timeouts": 0}


def test_a_weighted_sum_that_overflows_fails_its_sample(user_rewards):
    # Finite components whose weighted sum is inf were a success: NaN advantages for the group,
    # a skipped update, and reward normalisation poisoned for the rest of the run.
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:nonfinite", weight=1e308)])
    (result,) = worker.score(requests_for("fine"))
    assert result.failed and math.isnan(result.reward) and "overflowed to inf" in result.error
    assert worker.stats()["failures"] == 1


def test_a_worker_that_stops_after_a_failure_spares_the_rest_of_its_batch(user_rewards):
    # reward.on_failure=error ends the run at the first failure; scoring on meant one timeout
    # per remaining sample first (hours over a batch of slow failures).
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:boom")], isolation="thread",
                          stop_after_failure=True)
    results = worker.score(requests_for("ok", "bad", "fine", "bad"))
    assert not results[0].failed and "raised KeyError" in results[1].error
    assert [r.error for r in results[2:]] == ["not scored: an earlier sample of its batch failed"] * 2
    assert worker.stats()["failures"] == 1  # the spared ones were never called


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_non_number_return_value_fails_the_sample(user_rewards, isolation):
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:text")], isolation=isolation)
    (result,) = worker.score(requests_for("42"))
    assert math.isnan(result.reward)
    assert result.error == f"reward function '{user_rewards}:text' returned str, not a number"


def test_builtin_refusing_a_missing_answer_fails_the_sample_not_the_batch():
    worker = RewardWorker([RewardFunctionSpec(name="exact_match")])
    results = worker.score(requests_for("42", answer=None) + requests_for("42"))
    assert "needs a reference answer" in results[0].error
    assert results[1].reward == 1.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_hung_function_times_out_and_later_samples_still_score(user_rewards, isolation):
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:slow")], timeout_s=2.0, isolation=isolation)
    # The hung call never returns: had the samples after it waited behind it (a worker joining
    # the stuck thread or process), this test would hang until pytest's own timeout fails it.
    results = worker.score(requests_for("a", "hang", "b", "c"))
    assert [r.reward for r in results[0:1] + results[2:]] == [1.0, 1.0, 1.0]
    assert math.isnan(results[1].reward)
    assert results[1].error == f"reward function '{user_rewards}:slow' timed out after 2 s"
    assert worker.stats() == {"scored": 3, "failures": 1, "timeouts": 1}
    # The next batch is not held up by the still-stuck call either.
    assert [r.reward for r in worker.score(requests_for("d"))] == [1.0]


def test_a_reward_model_failure_fails_each_sample_it_fails_on(tmp_path):
    # A model whose embedding table is smaller than its tokenizer: characters beyond it raise
    # IndexError in the forward pass, as a mismatched checkpoint would. Every text here has
    # such a character, so each fails on its own retry (test_reward_model_limits.py has one
    # bad sample among good ones).
    path = save_reward_model(tmp_path, vocab_size=10)
    worker = RewardWorker([RewardFunctionSpec(name="exact_match")], RewardModelSpec(path=path))
    results = worker.score(requests_for("42", "zzz"))
    for result in results:
        assert math.isnan(result.reward)
        assert result.error.startswith(f"reward model {path!r} failed: IndexError")
    # The rule function still ran, so its component tells the caller what it saw.
    assert [r.components[0] for r in results] == [1.0, 0.0]
    assert worker.stats()["failures"] == 2


# ---------------------------------------------------------------- training


def test_train_reward_model_separates_good_from_bad_and_the_scorer_agrees(tmp_path):
    tokenizer = make_tokenizer(pad=False)  # also exercises the eos-as-pad fallback in training
    model = make_model(tokenizer, seed=1)
    subjects = ["the cake", "this answer", "my day", "the plan", "his code", "a reply", "that", "it is"]
    texts = [f"{s} was {w}" for s in subjects for w in ("good", "bad")]
    labels = [1.0 if t.endswith("good") else 0.0 for t in texts]

    metrics = train_reward_model(model, tokenizer, texts, labels, steps=40, batch_size=8, lr=3e-3, seed=0)
    assert metrics["accuracy"] == 1.0
    assert metrics["loss"] < 0.3

    # What the demo does next: save, load in the scorer, and rank unseen texts.
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    good, bad = RewardModelScorer(str(tmp_path)).score(["the food was "] * 2, ["good", "bad"])
    assert good > 0 > bad


def test_train_reward_model_refuses_labels_outside_zero_one():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_reward_model(
            make_model(tokenizer), tokenizer, ["a", "b"], [1.0, -1.0], steps=1, batch_size=2, lr=1e-3, seed=0
        )


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_rule_only_worker_does_not_import_torch(isolation):
    # torch costs a reward worker ~0.7 s of start-up and ~130 MiB; only a reward model needs it.
    code = ("import sys; from reward.worker import RewardFunctionSpec, RewardWorker; "
            "from reward.types import ScoreRequest; "
            f"w = RewardWorker([RewardFunctionSpec(name='exact_match')], num_threads=1, isolation={isolation!r}); "
            "(r,) = w.score([ScoreRequest(prompt='1+1=', response='2', answer='2')]); "
            "assert r.reward == 1.0, r; w.close(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_a_bos_written_by_a_chat_template_is_not_doubled_by_the_tokenizer():
    # Chat prompts reach the reward model as the template rendered them, special tokens and
    # all; a template that writes the BOS itself met a tokenizer that adds another.
    from tokenizers import processors

    from reward.model_scorer import encode, without_doubled_bos

    adds_bos = make_tokenizer()
    adds_bos.add_special_tokens({"bos_token": "<s>"})
    adds_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    once = encode(adds_bos, ["<s>user: hi", "user: hi"], None).input_ids
    assert once[0].tolist() == once[1].tolist() and once[0].tolist().count(1) == 1
    no_bos = make_tokenizer()  # adds nothing: a BOS the text holds is the only one, kept
    assert without_doubled_bos(no_bos, ["<s>user: hi"]) == ["<s>user: hi"]
