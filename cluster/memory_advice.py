"""What to change when a plan does not fit (``rlrelay plan``'s advice): the ladder of memory
options, cheapest first, and the largest micro-batch or smallest learner that fits.

Each answer is a search over ``cluster.memory_model.plan_memory``; torch is not imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from cluster.architecture import Architecture
from cluster.memory_model import LearnerShape, MemoryOptions, MemoryPlan, plan_memory


@dataclass(frozen=True, slots=True, kw_only=True)
class Remedy:
    """One rung of the ladder of memory options, cheapest first."""

    change: dict
    """MemoryOptions fields this rung sets (on top of the rungs before it)."""
    setting: str
    """How to ask for it."""
    cost: str
    """What it costs."""


LADDER = (
    Remedy(change={"activation_checkpointing": True}, setting="learner.activation_checkpointing=true",
           cost="recomputes each block's forward in backward: about +30 % learner compute"),
    Remedy(change={"reference_offload": True}, setting="learner.reference_offload=true",
           cost="copies the reference to the GPU and back for its forward pass each step"),
    Remedy(change={"sharding": "full"}, setting="learner.sharding=full",
           cost="all-gathers each block's weights again in backward: more communication"),
    Remedy(change={"cpu_offload": True}, setting="learner.cpu_offload=true",
           cost="optimizer step on the CPU, weights and gradients over PCIe: several times slower steps"),
)


def advise(arch: Architecture, shape: LearnerShape, options: MemoryOptions) -> list[tuple[Remedy, MemoryPlan]]:
    """Rungs to turn on, in order, each with the plan it gives, up to the first that fits.

    Rungs already on, reference offload without a reference, and offloading on a CPU learner
    (where everything is in host memory already) are skipped. Empty when the job fits as it is."""
    steps = []
    if plan_memory(arch, shape, options).fits:
        return steps
    for remedy in LADDER:
        turned_on = dataclasses.replace(options, **remedy.change)
        if turned_on == options or ("reference_offload" in remedy.change and not shape.reference):
            continue
        if not shape.mixed_precision and ({"reference_offload", "cpu_offload"} & remedy.change.keys()):
            continue
        options = turned_on
        result = plan_memory(arch, shape, options)
        steps.append((remedy, result))
        if result.fits:
            break
    return steps


def largest_micro_batch(arch: Architecture, shape: LearnerShape, options: MemoryOptions) -> int:
    """The largest micro-batch (<= the job's) that fits with these options; 0 if none does.
    Rows, or with a token budget the largest budget in whole ``seq_len`` rows."""
    if shape.micro_batch_tokens:
        def fits(rows: int) -> bool:
            return plan_memory(arch, dataclasses.replace(shape, micro_batch_tokens=rows * shape.seq_len), options).fits
        return _largest(fits, math.ceil(shape.micro_batch_tokens / shape.seq_len)) * shape.seq_len
    return _largest(lambda mb: plan_memory(arch, dataclasses.replace(shape, micro_batch_size=mb), options).fits,
                    shape.micro_batch_size)


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), 0 if none, for fits true up to some n and false
    above it (memory grows with the micro-batch). Bisection: counting down from a micro-batch
    of 10^8 rows took minutes."""
    low = 0  # fits(low) holds, or low is 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def smallest_world_size(arch: Architecture, shape: LearnerShape, options: MemoryOptions, limit: int = 1024) -> int:
    """The fewest learner ranks (>= the job's) that fit with these options; 0 if none up to ``limit``."""
    for world in range(shape.world_size, limit + 1):
        if plan_memory(arch, dataclasses.replace(shape, world_size=world), options).fits:
            return world
    return 0


