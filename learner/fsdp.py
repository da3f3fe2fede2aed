"""FSDP2 plumbing of a learner rank: sharding, optimizer-state creation, and splitting a
rank's rows into a fixed number of micro-batches so every rank makes the same collective calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from learner.batch import TrainBatch
from learner.weight_bucket import drop_aliases


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingPlan:
    """How one model is wrapped with FSDP2 (built by the learner rank from ``learner.*``).

    Example: ``ShardingPlan(mesh=mesh, reshard_after_forward=True, mp=None, offload=False)``
    """

    mesh: DeviceMesh
    """1-D ``(world,)`` mesh to shard over, or 2-D ``(world, 1)`` to replicate (HSDP with
    shard groups of one: ``learner.sharding=none``)."""
    reshard_after_forward: bool
    """False keeps each block gathered between forward and backward (``grad_op``)."""
    mp: MixedPrecisionPolicy | None
    """bf16 compute with fp32 gradient reduction on GPU; None (fp32) on CPU."""
    offload: bool
    """Parameters (and their gradients and optimizer state) live in CPU memory."""
    compile_blocks: bool = False
    """``torch.compile`` every transformer block in place (names, and so checkpoints, unchanged)."""


def shard_model(model: nn.Module, plan: ShardingPlan, checkpoint_activations: bool = False) -> nn.Module:
    """FSDP2: wrap every transformer block, then the root (embeddings, head, norms)."""
    if checkpoint_activations:
        _checkpoint_blocks(model)
    kwargs = {"mesh": plan.mesh, "reshard_after_forward": plan.reshard_after_forward}
    if plan.mp is not None:
        kwargs["mp_policy"] = plan.mp
    if plan.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    block_names = set(_find_block_names(model))
    for module in model.modules():
        if type(module).__name__ in block_names:
            if plan.compile_blocks:
                # In place, before sharding: FSDP2's gather/reshard hooks then stay outside
                # the compiled graph (dynamo skips them) and parameter names do not change.
                module.compile()
            fully_shard(module, **kwargs)
    # The root's parameters (embeddings, final norm, head) stay gathered from forward through
    # backward: the chunked head (learner/head.py) uses the head's weight after the root's
    # forward, and the root's backward would gather them again at once anyway. A pass without
    # backward releases them with `release_root`.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def shard_from_rank0(skeleton: nn.Module, load: Callable[[], nn.Module], plan: ShardingPlan, device: torch.device,
                     checkpoint_activations: bool = False) -> nn.Module:
    """Shard ``skeleton`` (the model on the meta device) and fill it with the weights that rank
    0 alone reads with ``load`` (collective).

    Every rank reading the checkpoint itself would hold, per node, one whole fp32 copy in host
    memory per rank at once (8 x 32 GB for an 8B model on a node of 8 GPUs), and without CPU
    offload move it whole onto each GPU before sharding: past ~16B that alone fills an 80 GB
    GPU. Here each rank allocates only its own shards; rank 0 broadcasts the checkpoint one
    tensor at a time and every rank keeps its slice of it.
    """
    shard_model(skeleton, plan, checkpoint_activations)
    # Offloaded shards live in host memory (to_empty pins them: FSDP2 re-pads each shard there).
    skeleton.to_empty(device=torch.device("cpu") if plan.offload else device)
    full = load() if dist.get_rank() == 0 else None
    # Non-persistent buffers (rotary frequencies) are in no state dict: rank 0 sends its own.
    # `_non_persistent_buffers_set` is nn.Module's own record of them; persistent buffers come
    # with the weights below, on the parameters' device, which set_model_state_dict requires.
    for prefix, module in skeleton.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                continue
            value = torch.empty_like(buf, device=device)
            if full is not None:
                theirs = full.get_buffer(f"{prefix}.{name}" if prefix else name)
                if theirs.shape != buf.shape:
                    raise ValueError(f"buffer {prefix}.{name}: the checkpoint's model has shape {tuple(theirs.shape)}, "
                                     f"its config builds {tuple(buf.shape)}")
                value.copy_(theirs)
            dist.broadcast(value, src=0)
            setattr(module, name, value)
    # Offloaded, the tensors cross over gloo (the shards' device decides the backend): slower
    # than NCCL, once per model at start-up.
    set_model_state_dict(skeleton, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Every buffer is computed with, so it belongs on the compute device even when offloaded.
    for module in skeleton.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.device != device:
                setattr(module, name, buf.to(device))
    return skeleton


def release_root(model: nn.Module) -> None:
    """Free the root's gathered parameters after a no-grad pass (no backward will)."""
    if isinstance(model, FSDPModule):
        model.reshard()


def _checkpoint_blocks(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing around every transformer block (Hugging Face's
    own switch on the model, or on the critic's trunk)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise ValueError(f"{type(model).__name__} does not support activation checkpointing")


def applied_options(model: nn.Module) -> dict[str, object]:
    """What sharding and the speed and memory options did to ``model``, read from its modules
    rather than from the config: how a block's parameters lie on each mesh dimension (``S(0)``
    sharded along dim 0, ``R`` replicated), whether its blocks are checkpointed, how many are
    compiled. Whether blocks reshard after forward (full vs grad_op) has no public reader."""
    names = set(_find_block_names(model))
    # fully_shard gives each module a subclass (FSDPQwen2DecoderLayer): its base names the block.
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    first = next(blocks[0].parameters()) if blocks else None
    return {
        "blocks": len(blocks),
        "placements": [str(p) for p in first.placements] if isinstance(first, DTensor) else [],
        "activation_checkpointing": any(m.is_gradient_checkpointing for m in model.modules()
                                        if isinstance(m, PreTrainedModel)),
        # nn.Module.compile() keeps the module and sets its compiled forward here.
        "compiled_blocks": sum(getattr(m, "_compiled_call_impl", None) is not None for m in blocks),
    }


def _find_block_names(model: nn.Module) -> list[str]:
    # Hugging Face models name their repeated block classes in `_no_split_modules`; the critic
    # wraps a trunk that does.
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module._no_split_modules:
            return list(module._no_split_modules)
    return []


def gather_full_state(model: nn.Module, rank: int, world_size: int, device: torch.device,
                      dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """``model``'s full weights in ``dtype`` as contiguous CPU tensors under their checkpoint
    names (collective); rank 0 gets them, the other ranks None. A tied head is left out
    (``drop_aliases``)."""
    weights = drop_aliases(model.state_dict(keep_vars=True))
    if world_size == 1 and device.type == "cpu":
        # One CPU rank holds every parameter whole: its local tensors are the full weights,
        # and gathering them would be a full copy for nothing (half a copy bound, measured).
        # The module's own state_dict has the same names (FSDP2 keeps them; checked for
        # tied and untied models) at a fifth of get_model_state_dict's cost (2.5 against
        # 12 ms for 75 tensors, measured: a quarter of the copy bound).
        return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().to(dtype).contiguous()
                for k, v in weights.items()}
    # Tensor by tensor, each cast to the sent dtype before its all-gather: half the bytes of
    # gathering the fp32 masters (as get_model_state_dict does) over NVLink/the network and
    # across PCIe to the host, and no cast of the whole model on rank 0's CPU afterwards
    # (single-threaded seconds at 7B). Rank 0 keeps each full tensor, the others drop it.
    state = {} if rank == 0 else None
    for name, value in weights.items():
        if isinstance(value, DTensor):  # a shard (or a replica) of the weight
            # On the compute device even when offloaded: the gather then runs over NCCL.
            local = value.to_local().to(device=device, dtype=dtype)
            value = DTensor.from_local(local, value.device_mesh, value.placements, shape=value.shape,
                                       stride=value.stride()).full_tensor()
        if state is not None:
            state[name] = value.detach().to(device="cpu", dtype=dtype).contiguous()
    return state


def micro_batches(batch, sizes: list[int]):
    """Consecutive chunks of ``sizes`` rows (``learner.batch.micro_batch_sizes``); yields
    ``(chunk, real_rows)``.

    A size of 0 (this rank has fewer rows than micro-batches) yields a copy of the first row,
    weighted zero by the caller, because every rank must run the same number of
    forward/backward passes.
    """
    if sum(sizes) != batch.size:
        raise ValueError(f"micro-batch sizes {sizes} do not cover the {batch.size} rows")
    lo = 0
    for size in sizes:
        if size:
            yield batch.select(torch.arange(lo, lo + size)), size
            lo += size
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
