"""FSDP2 plumbing of a learner rank: sharding, optimizer-state creation, and splitting a
rank's rows into a fixed number of micro-batches so every rank makes the same collective calls."""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from learner.batch import TrainBatch


def init_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create AdamW's state (moments, step) so a checkpoint has tensors to load into.

    A zero-learning-rate step on zero gradients creates the state without moving any
    weight (AdamW's decay is also scaled by the learning rate); the loaded checkpoint then
    overwrites all of it, step counts included.
    """
    if opt.state:
        return
    rates = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, rates):
        g["lr"] = lr


def shard_model(model: nn.Module, mesh, mp: MixedPrecisionPolicy | None) -> nn.Module:
    """FSDP2: shard every transformer block, then the root (embeddings, head, norms)."""
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    block_names = set(_find_block_names(model))
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _find_block_names(model: nn.Module) -> list[str]:
    # Hugging Face models name their repeated block classes in `_no_split_modules`; the critic
    # wraps a trunk that does.
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module._no_split_modules:
            return list(module._no_split_modules)
    return []


def micro_batches(batch, num_micro: int):
    """Split rows into exactly ``num_micro`` chunks; yields ``(chunk, real_rows)``.

    A rank with fewer rows than chunks pads with a copy of its first row, weighted zero by
    the caller, because every rank must run the same number of forward/backward passes.
    """
    n = batch.size
    bounds = [round(i * n / num_micro) for i in range(num_micro + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            yield batch.select(torch.arange(lo, hi)), hi - lo
        else:
            yield batch.select(torch.tensor([0])), 0


def to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    moved = {f.name: getattr(batch, f.name).to(device) for f in fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    if isinstance(batch, TrainBatch):
        moved["rollouts"] = to_device(batch.rollouts, device)
    return replace(batch, **moved)


def cat_rows(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate micro-batch outputs of different widths back into one [B, width] tensor."""
    rows = sum(p.shape[0] for p in parts)
    out = torch.zeros(rows, width, dtype=torch.float32)
    r = 0
    for p in parts:
        out[r:r + p.shape[0], :p.shape[1]] = p.float().cpu()
        r += p.shape[0]
    return out
