"""What a reward model can take: truncation to its context, and a bad text failing only itself."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from cluster.config import ConfigError, load_config
from learner.tokenizer import build_char_tokenizer
from reward.model_scorer import RewardModelScorer
from reward.types import ScoreRequest
from reward.worker import RewardFunctionSpec, RewardModelSpec, RewardWorker
from tiny_models import TINY_ALPHABET

POSITIONS = 16
"""Context of the GPT-2 built here: absolute position embeddings, so a longer text raises."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/unit/conftest.py)


def save_gpt2(path, *, vocab_size: int | None = None) -> str:
    """A tiny one-label GPT-2 of POSITIONS positions with a char tokenizer (no BOS added).

    ``vocab_size`` below the tokenizer's leaves the later characters (the letters) without an
    embedding row, so a text holding one raises IndexError, as a mismatched checkpoint would.
    """
    tokenizer = build_char_tokenizer(TINY_ALPHABET, path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                        n_positions=POSITIONS, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- scorer


def test_a_text_longer_than_the_context_is_scored_on_its_end_by_default(tmp_path):
    scorer = RewardModelScorer(save_gpt2(tmp_path))
    prompt, response = "what is 12+30? ", "it is 42 for sure"  # 32 characters, 32 tokens
    # Only the last POSITIONS tokens fit: the start of the prompt goes, the response's end stays.
    expected = scorer.score(["", "1+1="], [(prompt + response)[-POSITIONS:], "2"])
    assert scorer.score([prompt, "1+1="], [response, "2"]) == pytest.approx(expected, abs=1e-5)


def test_a_tokenizer_limit_below_the_position_table_also_bounds_the_text(tmp_path):
    # RoBERTa-style checkpoints have more position rows than usable positions; the tokenizer's
    # model_max_length says how many are. A rotary Llama would run past it without complaint.
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    tokenizer.model_max_length = 8
    tokenizer.save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    scorer = RewardModelScorer(str(tmp_path))
    prompt, response = "what is 12+30? ", "it is 42"
    expected = scorer.score([""], [(prompt + response)[-8:]])
    assert scorer.score([prompt], [response]) == pytest.approx(expected, abs=1e-5)


def test_a_max_length_beyond_the_models_context_is_refused(tmp_path):
    path = save_gpt2(tmp_path)
    with pytest.raises(ValueError, match=rf"max_length=17 .* context of {POSITIONS} tokens"):
        RewardModelScorer(path, max_length=POSITIONS + 1)
    shorter = RewardModelScorer(path, max_length=4)
    assert shorter.score(["12+30="], ["42"]) == pytest.approx(shorter.score([""], ["0=42"]), abs=1e-5)


# ---------------------------------------------------------------- worker


def requests(*responses: str) -> list[ScoreRequest]:
    return [ScoreRequest(prompt="1+1=", response=r, answer="2") for r in responses]


def test_an_over_long_sample_does_not_fail_its_chunk(tmp_path):
    path = save_gpt2(tmp_path)
    worker = RewardWorker([RewardFunctionSpec(name="exact_match")], RewardModelSpec(path=path), isolation="thread")
    results = worker.score(requests("2", "2" * 40))
    assert [r.error for r in results] == [None, None]
    expected = RewardModelScorer(path).score(["", ""], ["1+1=2", "2" * POSITIONS])
    assert [r.components[1] for r in results] == pytest.approx(expected, abs=1e-5)


def test_a_text_cut_to_the_models_context_is_flagged_and_counted(tmp_path):
    # Cut from the left, an over-long text loses its prompt first: the score of a response as
    # long as the context is the same for every prompt, and nothing said so.
    worker = RewardWorker([RewardFunctionSpec(name="exact_match")], RewardModelSpec(path=save_gpt2(tmp_path)),
                          isolation="thread")
    results = worker.score(requests("2", "2" * 40))
    assert [r.truncated for r in results] == [False, True]


def test_a_sample_the_model_cannot_take_fails_alone_with_its_own_error(tmp_path):
    path = save_gpt2(tmp_path, vocab_size=19)  # digits and "+=-? " have rows, letters do not
    worker = RewardWorker([RewardFunctionSpec(name="exact_match")], RewardModelSpec(path=path, batch_size=4),
                          isolation="thread")
    results = worker.score(requests("2", "two", "3", "2"))
    assert results[1].failed and math.isnan(results[1].reward)
    assert results[1].error.startswith(f"reward model {path!r} failed: IndexError")
    assert [r.error for r in results[::2]] + [results[3].error] == [None, None, None]
    alone = RewardModelScorer(path).score(["1+1="] * 3, ["2", "3", "2"])
    assert [results[i].components[1] for i in (0, 2, 3)] == pytest.approx(alone, abs=1e-5)
    assert worker.stats() == {"scored": 3, "failures": 1, "timeouts": 0}


# ---------------------------------------------------------------- config and pool


def test_reward_model_max_length_is_a_config_key():
    assert load_config(None, ["reward.model={path: /rm}"]).reward.model.max_length is None
    assert load_config(None, ["reward.model={path: /rm, max_length: 512}"]).reward.model.max_length == 512
    with pytest.raises(ConfigError, match=r"reward\.model\.max_length must be >= 1 or null \(got 0\)"):
        load_config(None, ["reward.model={path: /rm, max_length: 0}"])


def test_reward_pool_passes_max_length_to_its_workers(monkeypatch):
    from cluster import pools

    spawned = []

    class Actor:  # stands in for ray.remote(RewardWorker): records what a worker would get
        def options(self, **_):
            return self

        def remote(self, functions, model, **_):
            spawned.append(model)

    class Actors:
        def __init__(self, *_, spawn, **__):
            spawn(0)

    monkeypatch.setattr(pools.ray, "remote", lambda cls: Actor())
    monkeypatch.setattr(pools, "ActorSet", Actors)
    cfg = load_config(None, ["reward.model={path: /rm, max_length: 512, batch_size: 8}"])
    pools.RewardPool(cfg, reward_model_path=None)
    assert spawned == [RewardModelSpec(path="/rm", weight=1.0, batch_size=8, max_length=512)]
