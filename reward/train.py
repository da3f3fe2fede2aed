"""A small trainer for a reward model: teaches a sequence-classification model (one logit) to
tell good responses from bad ones, e.g. correct answers from wrong ones.

Loss: binary cross-entropy on the single logit (labels are 1.0 for good, 0.0 for bad, or a
probability in between). Then the logit the scorer returns is the log-odds that a response is
good, so rewards are centred on 0 and comparable across runs, which an MSE regression onto
0/1 would not give (it pulls every logit into [0, 1] and flattens the differences PPO sees).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from reward.model_scorer import encode, ensure_pad_token


def train_reward_model(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[float],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, float]:
    """Train ``model`` (seq-cls, one label) in place with AdamW; return metrics on ``texts``.

    Each step draws ``batch_size`` distinct texts with a generator seeded by ``seed``. The
    tokenizer and model get a pad token if they lack one (see ``ensure_pad_token``), so a model
    saved afterwards scores the way it was trained. Returns ``{"loss", "accuracy"}`` over the
    whole training set after the last step; accuracy counts ``logit > 0`` as predicting good.
    The model is left in eval mode.
    """
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"need as many labels as texts (and at least one), got {len(texts)} and {len(labels)}")
    if any(not 0.0 <= y <= 1.0 for y in labels):
        raise ValueError("reward model labels must lie in [0, 1] (1 = good, 0 = bad)")
    if steps < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model needs num_labels=1, got {model.config.num_labels}")

    ensure_pad_token(tokenizer, model)
    device = next(model.parameters()).device
    targets = torch.tensor(labels, dtype=torch.float32, device=device)  # [N]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(texts), generator=generator)[:batch_size]  # [B]
        batch = encode(tokenizer, [texts[i] for i in idx], None).to(device)
        logits = model(**batch).logits[:, 0].float()  # [B]
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [
                model(**encode(tokenizer, texts[i : i + batch_size], None).to(device)).logits[:, 0].float()
                for i in range(0, len(texts), batch_size)
            ]
        )  # [N]
    return {
        "loss": F.binary_cross_entropy_with_logits(logits, targets).item(),
        "accuracy": ((logits > 0) == (targets >= 0.5)).float().mean().item(),
    }
