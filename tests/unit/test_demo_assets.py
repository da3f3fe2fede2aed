"""The demo's starting point: char tokenizer, arithmetic task, noisy warm-start corpus,
supervised warm-start, and the cached asset build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cluster import demo
from cluster.demo import (
    DemoSettings,
    noisy_corpus,
    prepare_demo_assets,
    read_problems,
    settings_hash,
    split_problems,
    with_systematic_error,
)
from learner.sft import encode_pairs, supervised_warm_start
from learner.tokenizer import build_char_tokenizer

# A model small enough that a whole asset build takes a few seconds.
TINY = DemoSettings(
    num_eval=20,
    warm_start_steps=4,
    warm_start_batch_size=16,
    hidden_size=64,
    num_layers=1,
    num_heads=1,
    intermediate_size=64,
)


def is_correct(prompt: str, answer: str) -> bool:
    a, b = prompt.removesuffix("=").split("+")
    return int(a) + int(b) == int(answer)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_one_token_per_char_and_round_trips_exactly():
    tok = build_char_tokenizer("0123456789+= ")
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    ids = tok.encode("12+30=")
    assert tok.convert_ids_to_tokens(ids) == list("12+30=")  # no bos added, one id per char
    for text in ["12+30=42", "99+99=198", " 1 + 2 = 3 ", "0"]:
        assert tok.decode(tok.encode(text)) == text  # no spaces inserted between chars
    with_eos = tok.encode("12+30=42") + [tok.eos_token_id]
    assert tok.decode(with_eos, skip_special_tokens=True) == "12+30=42"
    one, two = tok.convert_tokens_to_ids(["1", "2"])
    assert tok.encode("1x2") == [one, tok.unk_token_id, two]


def test_tokenizer_saved_to_disk_reloads_with_autotokenizer(tmp_path):
    built = build_char_tokenizer(demo.ALPHABET, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("57+68=") == built.encode("57+68=")
    assert loaded("57+68=")["input_ids"] == built.encode("57+68=")  # the call vLLM makes
    specials = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert loaded.decode(loaded.encode("57+68=125")) == "57+68=125"
    assert len(loaded) == 4 + len(demo.ALPHABET)


# ---------------------------------------------------------------- task and corpus


def test_split_is_disjoint_even_up_to_operand_order_and_answers_are_correct():
    train, held_out = split_problems(seed=3, num_eval=200)
    assert len(held_out) == 200
    assert all(is_correct(p, a) for p, a in train + held_out)
    train_prompts = {p for p, _ in train}
    assert not train_prompts & {p for p, _ in held_out}
    swapped = {"+".join(reversed(p.removesuffix("=").split("+"))) + "=" for p, _ in held_out}
    assert not train_prompts & swapped
    assert len(train_prompts) == len(train)  # no duplicates
    # 90 * 90 ordered problems; each held-out pair removes its swapped twin (if a != b)
    twins = sum(1 for p in swapped if p not in {q for q, _ in held_out})
    assert len(train) + len(held_out) + twins == 90 * 90
    assert split_problems(seed=3, num_eval=200) == (train, held_out)
    assert split_problems(seed=4, num_eval=200)[1] != held_out


def test_systematic_error_changes_only_the_last_digit_without_carry():
    assert with_systematic_error("42") == "43"
    assert with_systematic_error("49") == "40"
    assert with_systematic_error("109") == "100"
    assert with_systematic_error("198") == "199"


def test_noisy_corpus_has_the_configured_share_of_systematic_errors():
    train, _ = split_problems(seed=0, num_eval=200)
    corpus = noisy_corpus(train, noise_fraction=0.6, seed=0)
    assert [p for p, _ in corpus] == [p for p, _ in train]
    noisy = [(a, b) for (_, a), (_, b) in zip(train, corpus) if a != b]
    assert len(noisy) == round(0.6 * len(train))
    assert all(wrong == with_systematic_error(right) for right, wrong in noisy)
    assert noisy_corpus(train, noise_fraction=0.0, seed=0) == train


# ---------------------------------------------------------------- supervised warm-start


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_encode_pairs_masks_prompt_and_padding():
    tok = build_char_tokenizer(demo.ALPHABET)
    input_ids, attention_mask, labels = encode_pairs(tok, [("12+30=", "42"), ("99+99=", "198")])
    assert input_ids.shape == (2, 10)  # longest: 6 prompt + 3 answer + eos
    first = tok.encode("12+30=42") + [tok.eos_token_id]
    assert input_ids[0].tolist() == first + [tok.pad_token_id]
    assert attention_mask[0].tolist() == [1] * 9 + [0]
    assert labels[0].tolist() == [-100] * 6 + first[6:] + [-100]
    assert labels[1].tolist()[6:] == tok.encode("198") + [tok.eos_token_id]


def test_supervised_warm_start_lowers_the_loss():
    tok = build_char_tokenizer(demo.ALPHABET)
    model = tiny_llama(len(tok)).eval()
    pairs = split_problems(seed=0, num_eval=1)[0][:32]
    logs: list[str] = []
    metrics = supervised_warm_start(
        model, tok, pairs, steps=40, batch_size=16, lr=1e-2, seed=0, warmup_steps=5,
        log_every=10, log_fn=logs.append,
    )
    assert metrics["loss"] < 0.6 * metrics["first_loss"]
    assert len(logs) == 4
    assert not model.training  # the caller's mode is restored


# ---------------------------------------------------------------- cached assets


def file_state(root: Path) -> dict[str, tuple[int, int]]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


def test_prepare_demo_assets_builds_once_then_returns_the_cache(tmp_path):
    logs: list[str] = []
    assets = prepare_demo_assets(TINY, tmp_path, log=logs.append)
    assert assets.model_dir.parent == tmp_path / f"demo-{settings_hash(TINY)}"
    assert any("warm-start" in line for line in logs)

    config = json.loads((assets.model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == 2 and config["hidden_size"] == 64
    assert (assets.model_dir / "model.safetensors").exists()
    assert (assets.model_dir / "generation_config.json").exists()
    reloaded = AutoTokenizer.from_pretrained(assets.model_dir)
    assert reloaded.encode("12+30=") == build_char_tokenizer(demo.ALPHABET).encode("12+30=")
    LlamaForCausalLM.from_pretrained(assets.model_dir)  # loads without missing weights

    train, held_out = read_problems(assets.train_path), read_problems(assets.eval_path)
    assert (train, held_out) == split_problems(TINY.seed, TINY.num_eval)
    assert all(is_correct(p, a) for p, a in train + held_out)  # the RL data is not noisy

    before = file_state(tmp_path)
    logs.clear()
    again = prepare_demo_assets(TINY, tmp_path, log=logs.append)
    assert again == assets
    assert not any("warm-start" in line for line in logs)  # no retraining
    assert file_state(tmp_path) == before


def test_leftover_of_a_killed_build_is_not_taken_for_a_cache(tmp_path):
    name = f"demo-{settings_hash(TINY)}"
    leftover = tmp_path / f".{name}.tmp-killed"
    (leftover / "model").mkdir(parents=True)
    (leftover / "train.jsonl").write_text('{"prompt": "10+10=", "answer": "21"}\n')

    logs: list[str] = []
    assets = prepare_demo_assets(TINY, tmp_path, log=logs.append)
    assert assets.model_dir.parent == tmp_path / name
    assert any("warm-start" in line for line in logs)
    assert (assets.model_dir / "model.safetensors").exists()
    assert len(read_problems(assets.train_path)) > 1


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("learner.sft.supervised_warm_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo_assets(TINY, tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_every_setting_changes_the_cache_key_and_bad_values_name_the_key():
    base = settings_hash(TINY)
    changed = {"seed": 1, "num_eval": 21, "noise_fraction": 0.5, "warm_start_steps": 5,
               "warm_start_batch_size": 8, "warm_start_lr": 2e-3, "hidden_size": 128,
               "num_layers": 2, "num_heads": 2, "intermediate_size": 32}
    assert set(changed) == {f.name for f in dataclasses.fields(DemoSettings)}
    for name, value in changed.items():
        assert value != getattr(TINY, name), name
        assert settings_hash(dataclasses.replace(TINY, **{name: value})) != base, name
    with pytest.raises(ValueError, match="demo.noise_fraction"):
        DemoSettings(noise_fraction=1.5)
    with pytest.raises(ValueError, match="demo.num_heads"):
        DemoSettings(hidden_size=64, num_heads=4)  # head size 16: vLLM's CPU attention rejects it
