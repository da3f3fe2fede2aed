"""Flat, versioned, checksummed weight buckets: the unit of learner → rollout weight sync.

The learner packs its full state dict into a few large byte buffers instead of sending a
dict of tensors: measured through Ray's object store (DESIGN), one flat numpy buffer moves
10-60x faster than 200 separate tensors and is read zero-copy on the receiving side. The
receiver checks the version and a checksum of every buffer before it loads anything, so a
torn or stale update is refused whole instead of leaving the engine half-updated.

The checksum is a 64-bit wrapping sum of the buffer's 8-byte words plus its length: one
memory-bound pass (~12 GB/s here, against ~3.4 GB/s for CRC32, which made the checksum a third
of a push). It catches a torn, truncated, zeroed or mixed-up buffer, what a transport or a
restarted worker can do; it is no defence against deliberate tampering, which the object
store's trust boundary (the Ray cluster) has to provide.

Only torch and numpy are imported here, so rollout workers can unpack without the learner.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BUCKET_BYTES = 512 * 2**20
"""Upper bound on one buffer. A single tensor larger than this gets a bucket of its own."""

_ALIGN = 16
"""Byte alignment of every tensor in a buffer, so a dtype view of the bytes is always legal."""

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


class WeightSyncError(RuntimeError):
    """A weight update failed its version or checksum check; nothing was loaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSlot:
    """Where one named tensor lives inside a bucket's buffer.

    Example: ``TensorSlot(name="lm_head.weight", shape=(64, 256), dtype="torch.float32", offset=0, nbytes=65536)``
    """

    name: str
    """Parameter name in Hugging Face checkpoint format (what vLLM's loader expects)."""
    shape: tuple[int, ...]
    """Tensor shape."""
    dtype: str
    """``str(torch.dtype)``, e.g. ``"torch.bfloat16"``."""
    offset: int
    """Byte offset of the tensor's data in the buffer."""
    nbytes: int
    """Byte length of the tensor's data."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightBucket:
    """A group of tensors packed into one contiguous byte buffer.

    Example: ``WeightBucket(slots=(...), buffer=np.zeros(1024, np.uint8), checksum=1024)``
    """

    slots: tuple[TensorSlot, ...]
    """The tensors in the buffer, in order."""
    buffer: np.ndarray
    """Raw bytes of all tensors back to back.  # [nbytes] uint8"""
    checksum: int
    """``checksum(buffer)``; the receiver recomputes it before loading."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightUpdate:
    """One versioned push of the full policy weights.

    Example: ``WeightUpdate(version=3, buckets=(bucket,))``
    """

    version: int
    """Policy version these weights are (number of optimizer steps taken); strictly increasing."""
    buckets: tuple[WeightBucket, ...]
    """The packed weights; together they hold every parameter of the policy."""

    @property
    def nbytes(self) -> int:
        return sum(b.buffer.nbytes for b in self.buckets)


def pack_state_dict(state: Mapping[str, torch.Tensor], version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    reuse: list[np.ndarray] | None = None) -> WeightUpdate:
    """Pack a full (unsharded) state dict into checksummed buckets of at most ``bucket_bytes``.

    ``reuse``: buffers of an earlier pack whose update has been handed off (``ray.put`` or an
    actor method's return copy it into the object store); a bucket of the same size is
    written into one of them. Writing into fresh memory costs a page fault per 4 KiB, which
    made packing into new buffers 4-5x slower than the copy itself (measured)."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in state.items():
        if str(tensor.dtype) not in _DTYPES:
            raise TypeError(f"cannot pack {name}: unsupported dtype {tensor.dtype}")
        n = tensor.numel() * tensor.element_size()
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += n
    spare = list(reuse or ())
    return WeightUpdate(version=version, buckets=tuple(_pack_group(g, spare) for g in groups if g))


def _pack_group(group: list[tuple[str, torch.Tensor]], spare: list[np.ndarray]) -> WeightBucket:
    slots = []
    offset = 0
    for name, tensor in group:
        n = tensor.numel() * tensor.element_size()
        slots.append(TensorSlot(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype),
                                offset=offset, nbytes=n))
        offset += -(-n // _ALIGN) * _ALIGN
    same = [b for b in spare if b.nbytes == offset and b.flags.writeable]
    if same:
        buffer = same[0]
        spare.remove(buffer)
        buffer[slots[-1].offset + slots[-1].nbytes:] = 0  # alignment padding: deterministic checksum
        for a, b in zip(slots, slots[1:]):
            buffer[a.offset + a.nbytes:b.offset] = 0
    else:
        buffer = np.zeros(offset, dtype=np.uint8)
    flat = torch.from_numpy(buffer)
    for slot, (_, tensor) in zip(slots, group):
        src = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        flat[slot.offset:slot.offset + slot.nbytes].copy_(src)
    return WeightBucket(slots=tuple(slots), buffer=buffer, checksum=checksum(buffer))


def checksum(buffer: np.ndarray) -> int:
    """64-bit wrapping sum of the buffer's little-endian 8-byte words, its tail and its length."""
    whole = buffer.nbytes // 8 * 8
    words = buffer[:whole].view(np.dtype("<u8"))
    total = int(words.sum(dtype=np.uint64)) if whole else 0  # numpy integer sums wrap modulo 2**64
    tail = int.from_bytes(buffer[whole:].tobytes(), "little")
    return (total + tail + buffer.nbytes) % 2**64


def verify(update: WeightUpdate, current_version: int) -> None:
    """Raise ``WeightSyncError`` unless the update is newer than ``current_version`` and intact."""
    if update.version <= current_version:
        raise WeightSyncError(
            f"stale weight update: version {update.version} does not follow loaded version {current_version}")
    for i, bucket in enumerate(update.buckets):
        got = checksum(bucket.buffer)
        if got != bucket.checksum:
            raise WeightSyncError(
                f"weight update v{update.version}: bucket {i} checksum {got:#018x} != sent {bucket.checksum:#018x}")


def iter_tensors(update: WeightUpdate) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` views into the buckets without copying.

    The buffers coming out of Ray's object store are read-only; the views are only read
    (the engine copies them into its own parameters), so torch's warning about
    non-writable arrays is silenced here rather than paying for a copy.
    """
    for bucket in update.buckets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(bucket.buffer)
        for slot in bucket.slots:
            dtype = _DTYPES[slot.dtype]
            yield slot.name, flat[slot.offset:slot.offset + slot.nbytes].view(dtype).reshape(slot.shape)
