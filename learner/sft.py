"""Supervised warm-start: next-token training on (prompt, answer) pairs, single process.

Each example is ``prompt tokens + answer tokens + eos``; the loss covers the answer and the
eos only (prompt positions carry the label -100), so the model learns to answer and to
stop, not to predict prompts. Batches are right-padded with the pad id. AdamW with a linear
warmup and cosine decay to zero. Plain torch + transformers: no Ray, no process group, and no
change to torch's global thread or RNG settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of positions without loss (prompt and padding)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize and right-pad all pairs at once.

    Returns ``(input_ids, attention_mask, labels)``, each ``[N, T]`` with T the longest
    ``prompt + answer + eos``; labels are -100 on prompt and padding positions.
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad token and an eos token")
    # One batched call per side: encoding thousands of pairs one by one takes seconds.
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    rows = [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [N, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [N, T]
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = input_ids[i, prompt_len : len(ids)]
    return input_ids, attention_mask, labels


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup_steps`, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def supervised_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 20,
    log_every: int = 0,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train `model` in place on `pairs` for `steps` AdamW steps of `batch_size` examples.

    Batches are drawn by walking through seeded random permutations of the pairs (every pair
    once per epoch). Logs every `log_every` steps through `log_fn` when both are set.

    Returns ``loss`` (mean over the last ``min(steps, 20)`` steps, per answer token),
    ``first_loss`` (the first step's loss), ``steps`` and ``seconds`` (wall time).
    """
    if steps < 1 or batch_size < 1 or not pairs:
        raise ValueError("need steps >= 1, batch_size >= 1 and at least one pair")
    input_ids, attention_mask, labels = encode_pairs(tokenizer, pairs)  # [N, T] each
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=min(warmup_steps, steps), total_steps=steps),
    )

    was_training = model.training
    model.train()
    order = torch.empty(0, dtype=torch.long)
    recent: list[float] = []
    first_loss = math.nan
    started = time.perf_counter()
    for step in range(steps):
        if order.numel() < batch_size:  # next epoch; a short remainder is dropped
            order = torch.randperm(len(pairs), generator=generator)
        index, order = order[:batch_size], order[batch_size:]
        # Trim to the longest sequence in this batch: less padding, less compute.
        width = int(attention_mask[index].sum(dim=1).max())
        out = model(
            input_ids=input_ids[index, :width],
            attention_mask=attention_mask[index, :width],
            labels=labels[index, :width],
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()

        loss = float(out.loss.detach())
        if step == 0:
            first_loss = loss
        recent = (recent + [loss])[-20:]
        done = step + 1
        if log_fn is not None and log_every > 0 and (done % log_every == 0 or done == steps):
            log_fn(
                f"sft step {done}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} {time.perf_counter() - started:.1f}s"
            )
    model.train(was_training)
    return {
        "loss": sum(recent) / len(recent),
        "first_loss": first_loss,
        "steps": float(steps),
        "seconds": time.perf_counter() - started,
    }
