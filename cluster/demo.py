"""The demo job's task and starting point, built locally and cached.

Nothing can be downloaded here, so the demo makes everything it needs:

- **task**: two-digit addition, prompt ``"12+30="``, answer ``"42"`` (short prompts and
  answers of at most 3 characters keep generation cheap). Held-out problems are disjoint
  from training problems even up to operand order: if ``12+30=`` is held out, ``30+12=`` is
  used nowhere.
- **tokenizer**: one token per character (`learner.tokenizer`).
- **policy**: a small Llama trained from scratch by a supervised warm-start on *noisy*
  demonstrations: a share of the answers carry a systematic error (last digit + 1, like noisy
  web data). Measured (DESIGN, "What makes the demo learn"): RL cannot teach a missing skill
  in minutes, but it quickly selects a behaviour the warm-start already has. So the
  warm-start leaves the right answer *present* (high pass@8 at temperature 1) but *not
  dominant* (low greedy accuracy), and the RL stage's exact-match reward has something to
  select.

`prepare_demo_assets` builds all of it into ``cache_root/demo-<hash>`` (the hash covers
every `DemoSettings` field and `FORMAT_VERSION`) and returns the cached copy on later calls.

torch and transformers are imported inside the functions that train or evaluate, so that
importing this module (for `DemoSettings`, from the config and the CLI) stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

# Bump when the layout or content of the cached assets changes for the same settings.
FORMAT_VERSION = 1
ALPHABET = "0123456789+="
MAX_POSITIONS = 64  # prompt (6) + answer (<= 3) + eos: far below this
# Head sizes the vLLM CPU attention backend accepts (vLLM 0.32); 16 is rejected.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

Problem = tuple[str, str]  # (prompt "12+30=", answer "42")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSettings:
    """How the demo's task and warm-started policy are built (the job config's ``demo:``).

    The warm-start defaults were tuned by measurement (200 held-out problems, greedy
    exact-match accuracy and pass@8 at temperature 1; a shared 2-core machine, fp32):

    - these defaults (600 steps x 128 = 77k examples, ~10 epochs, lr 1e-3): held-out greedy
      0.22, pass@8 0.915 (vLLM on the same model: 0.22 / 0.90); seeds 1-5: greedy 0.17-0.29,
      pass@8 0.925-0.97. Greedy errors are the learned habit (seed 0: 146 of the 156 wrong
      greedy answers are exactly the +1 error). Rebuilt on 2026-11-24 with the same settings
      and seed (torch 2.13): greedy 0.21, pass@8 0.92, 147 of the 158 wrong greedy answers the
      +1 error. Time: 0.12 s a step with 2 threads while the
      machine was quiet (first 120 steps; ~70 s for all 600), ~120 s in all with 1 thread
      beside another 1-thread run, and 5-10x longer while other jobs oversubscribed the cores
      (a 2-thread run took 836 s).
    - 480 steps: pass@8 0.885-0.955 over seeds 0-3 (less margin). Batch 64 at lr 1.5e-3 for
      800 steps matched on 3 seeds of 4 but stalled on one (pass@8 0.5); peak lr 3e-3
      stalled at loss ~0.65 (pass@8 0.5-0.6) with batch 128 and 256.

    Example::

        assets = prepare_demo_assets(DemoSettings(seed=1), Path(".cache/demo"))
    """

    seed: int = 0
    """Seeds the train/eval split, which answers are noisy, the model's init and batch order."""
    num_eval: int = 200
    """Held-out problems, disjoint from the training problems (also up to operand order)."""
    noise_fraction: float = 0.6
    """Share of warm-start answers whose last digit is wrong by +1 (mod 10, no carry)."""
    warm_start_steps: int = 600
    """AdamW steps of the supervised warm-start."""
    warm_start_batch_size: int = 128
    """Examples per warm-start step."""
    warm_start_lr: float = 1e-3
    """Peak warm-start learning rate (linear warmup, then cosine decay to zero)."""
    hidden_size: int = 256
    """Model width; hidden_size / num_heads must be a head size vLLM's CPU attention accepts."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (as many key/value heads: no grouped-query attention)."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP; with the defaults the model has ~1.3M parameters."""

    def __post_init__(self) -> None:
        checks = {
            "num_eval": self.num_eval >= 1,
            "noise_fraction": 0.0 <= self.noise_fraction <= 1.0,
            "warm_start_steps": self.warm_start_steps >= 1,
            "warm_start_batch_size": self.warm_start_batch_size >= 1,
            "warm_start_lr": self.warm_start_lr > 0,
            "hidden_size": self.hidden_size >= 1,
            "num_layers": self.num_layers >= 1,
            "num_heads": self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
            "intermediate_size": self.intermediate_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"demo.{name}: bad value {getattr(self, name)!r}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"demo.num_heads: head size hidden_size/num_heads = {head_dim}; "
                f"vLLM's CPU attention accepts {VLLM_CPU_HEAD_DIMS}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoAssets:
    """Where the built demo lives; everything under one cache directory."""

    model_dir: Path
    """HF model directory: config.json, model.safetensors, tokenizer files and
    generation_config.json (vLLM and transformers load it as is)."""
    train_path: Path
    """JSONL of training problems, one ``{"prompt": "12+30=", "answer": "42"}`` a line, with the
    CORRECT answers (the RL reward checks against them; only the warm-start saw noisy ones)."""
    eval_path: Path
    """JSONL of held-out problems with correct answers, same format."""


# ---------------------------------------------------------------- task


def split_problems(seed: int, num_eval: int) -> tuple[list[Problem], list[Problem]]:
    """All ``a+b=`` with a, b in 10..99, split into (train, eval), shuffled, from `seed`.

    Eval takes `num_eval` unordered operand pairs, in one random order each; the other order
    of an eval pair is dropped, so no training prompt is an eval prompt with operands swapped.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]  # unordered, a <= b
    if num_eval > len(pairs):
        raise ValueError(f"demo.num_eval: at most {len(pairs)} held-out problems, got {num_eval}")
    rng = random.Random(f"demo-split-{seed}")
    rng.shuffle(pairs)

    def problem(a: int, b: int) -> Problem:
        return f"{a}+{b}=", str(a + b)

    eval_set = [problem(*((a, b) if rng.random() < 0.5 else (b, a))) for a, b in pairs[:num_eval]]
    train = [problem(a, b) for a, b in pairs[num_eval:]]
    train += [problem(b, a) for a, b in pairs[num_eval:] if a != b]
    rng.shuffle(train)
    return train, eval_set


def with_systematic_error(answer: str) -> str:
    """The noisy demonstrations' habit: last digit + 1, mod 10, without carry.

    ``"42" -> "43"``, ``"49" -> "40"`` (not "50"): the wrong answer always has the correct
    length and prefix and differs only in its last character, so exactly one decision per
    answer separates right from wrong, which is what RL then has to select.
    """
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def noisy_corpus(train: Sequence[Problem], noise_fraction: float, seed: int) -> list[Problem]:
    """`train` with exactly ``round(noise_fraction * len(train))`` answers (chosen from
    `seed`) replaced by `with_systematic_error`; same order as `train`."""
    rng = random.Random(f"demo-noise-{seed}")
    noisy = set(rng.sample(range(len(train)), round(noise_fraction * len(train))))
    return [(p, with_systematic_error(a) if i in noisy else a) for i, (p, a) in enumerate(train)]


def read_problems(path: Path) -> list[Problem]:
    """Read a problems JSONL written by `prepare_demo_assets`."""
    with open(path, encoding="utf-8") as f:
        return [(row["prompt"], row["answer"]) for row in map(json.loads, f)]


def _write_problems(path: Path, problems: Sequence[Problem]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prompt, answer in problems:
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


# ---------------------------------------------------------------- policy


def build_policy(settings: DemoSettings, vocab_size: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama (init seeded from `settings.seed`; the global RNG
    state is left as it was)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tokenizer import SPECIAL_TOKENS

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        # Untied: vLLM's CPU reload leaves a tied lm_head at stale weights (DESIGN).
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return LlamaForCausalLM(config).float()


def answer_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 4,
) -> float:
    """Share of `problems` for which at least one of `samples` completions is exactly the answer.

    ``samples=1, temperature=0`` is greedy exact-match accuracy; ``samples=8, temperature=1``
    is pass@8. A completion counts only if it ends with eos within `max_new_tokens`. Full
    forward passes without a KV cache: the sequences are a few tokens long.
    """
    import torch

    by_length: dict[int, list[int]] = {}
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p, _ in problems]
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    solved = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for indices in by_length.values():  # equal-length prompts batch without padding
            prompts = torch.tensor([encoded[i] for i in indices])  # [B, P]
            prompts = prompts.repeat_interleave(samples, dim=0)  # [B*S, P]
            ids = prompts
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids).logits[:, -1, :].float()  # [B*S, V]
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)  # [B*S, P+t]
            completions = ids[:, prompts.shape[1] :].tolist()
            for j, i in enumerate(indices):
                answer = problems[i][1]
                for row in completions[j * samples : (j + 1) * samples]:
                    if tokenizer.eos_token_id in row:
                        text = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)])
                        if text == answer:
                            solved += 1
                            break
    model.train(was_training)
    return solved / len(problems)


# ---------------------------------------------------------------- cache


def settings_hash(settings: DemoSettings) -> str:
    """Hash of every `DemoSettings` field and `FORMAT_VERSION`: the cache key."""
    payload = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _assets_in(root: Path) -> DemoAssets:
    return DemoAssets(
        model_dir=root / "model", train_path=root / "train.jsonl", eval_path=root / "eval.jsonl"
    )


def prepare_demo_assets(
    settings: DemoSettings, cache_root: Path, log: Callable[[str], None] = print
) -> DemoAssets:
    """Return the demo's assets for `settings`, building them on the first call.

    The build goes into a temporary sibling directory that is renamed to
    ``cache_root/demo-<hash>`` only once complete, so a killed build never leaves a
    directory that a later call takes for a cache (its ``.demo-<hash>.tmp-*`` leftover is
    ignored). If another process finished the same build first, its copy wins.
    """
    cache_root = Path(cache_root)
    final = cache_root / f"demo-{settings_hash(settings)}"
    if final.is_dir():
        assets = _assets_in(final)
        needed = (assets.model_dir / "model.safetensors", assets.train_path, assets.eval_path)
        missing = [p for p in needed if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"demo cache {final} is damaged (missing {missing[0]}); delete it to rebuild"
            )
        log(f"demo assets: cached at {final}")
        return assets

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_root))
    try:
        _build(settings, _assets_in(tmp), log)
        try:
            os.rename(tmp, final)  # atomic: the cache appears complete or not at all
        except OSError:
            if not final.is_dir():
                raise
            log(f"demo assets: another process built {final} first; using it")
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"demo assets: built at {final}")
    return _assets_in(final)


def _build(settings: DemoSettings, assets: DemoAssets, log: Callable[[str], None]) -> None:
    from transformers import GenerationConfig

    from learner.sft import supervised_warm_start
    from learner.tokenizer import build_char_tokenizer

    started = time.perf_counter()
    train, eval_set = split_problems(settings.seed, settings.num_eval)
    corpus = noisy_corpus(train, settings.noise_fraction, settings.seed)
    _write_problems(assets.train_path, train)
    _write_problems(assets.eval_path, eval_set)

    tokenizer = build_char_tokenizer(ALPHABET, assets.model_dir)
    model = build_policy(settings, vocab_size=len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"demo warm-start: {n_params / 1e6:.2f}M-parameter Llama, {len(corpus)} problems, "
        f"{settings.noise_fraction:.0%} with the last-digit error, {settings.warm_start_steps} steps"
    )
    sft = supervised_warm_start(
        model,
        tokenizer,
        corpus,
        steps=settings.warm_start_steps,
        batch_size=settings.warm_start_batch_size,
        lr=settings.warm_start_lr,
        seed=settings.seed,
        log_every=max(1, settings.warm_start_steps // 10),
        log_fn=log,
    )
    greedy = answer_accuracy(model, tokenizer, eval_set)
    pass8 = answer_accuracy(
        model, tokenizer, eval_set, samples=8, temperature=1.0, seed=settings.seed
    )
    log(
        f"demo warm-start: {sft['seconds']:.0f}s, loss {sft['loss']:.3f}; held-out greedy accuracy "
        f"{greedy:.3f}, pass@8 (T=1) {pass8:.3f}: right answer present, not dominant"
    )

    model.save_pretrained(assets.model_dir)
    # Only the special token ids: sampling defaults belong to the job config, not to vLLM's
    # reading of generation_config.json.
    GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    ).save_pretrained(assets.model_dir)
    report = {
        "settings": dataclasses.asdict(settings),
        "format_version": FORMAT_VERSION,
        "parameters": n_params,
        "warm_start": sft,
        "eval_greedy_accuracy": greedy,
        "eval_pass_at_8": pass8,
        "build_seconds": time.perf_counter() - started,
    }
    (assets.train_path.parent / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
