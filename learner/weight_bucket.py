"""Flat, versioned, checksummed weight buckets: the unit of learner → rollout weight sync.

The learner packs its full state dict into a few large byte buffers instead of sending a
dict of tensors: measured through Ray's object store (DESIGN), one flat numpy buffer moves
10-60x faster than 200 separate tensors and is read zero-copy on the receiving side. The
receiver checks the version and a CRC32 of every buffer before it loads anything, so a
torn or stale update is refused whole instead of leaving the engine half-updated.

Only torch and numpy are imported here, so rollout workers can unpack without the learner.
"""

from __future__ import annotations

import warnings
import zlib
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

    Example: ``WeightBucket(slots=(...), buffer=np.zeros(1024, np.uint8), crc32=0)``
    """

    slots: tuple[TensorSlot, ...]
    """The tensors in the buffer, in order."""
    buffer: np.ndarray
    """Raw bytes of all tensors back to back.  # [nbytes] uint8"""
    crc32: int
    """CRC32 of ``buffer``; the receiver recomputes it before loading."""


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


def pack_state_dict(state: Mapping[str, torch.Tensor], version: int,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightUpdate:
    """Pack a full (unsharded) state dict into checksummed buckets of at most ``bucket_bytes``."""
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
    return WeightUpdate(version=version, buckets=tuple(_pack_group(g) for g in groups if g))


def _pack_group(group: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    slots = []
    offset = 0
    for name, tensor in group:
        n = tensor.numel() * tensor.element_size()
        slots.append(TensorSlot(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype),
                                offset=offset, nbytes=n))
        offset += -(-n // _ALIGN) * _ALIGN
    buffer = np.zeros(offset, dtype=np.uint8)
    flat = torch.from_numpy(buffer)
    for slot, (_, tensor) in zip(slots, group):
        src = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        flat[slot.offset:slot.offset + slot.nbytes].copy_(src)
    return WeightBucket(slots=tuple(slots), buffer=buffer, crc32=zlib.crc32(memoryview(buffer)))


def verify(update: WeightUpdate, current_version: int) -> None:
    """Raise ``WeightSyncError`` unless the update is newer than ``current_version`` and intact."""
    if update.version <= current_version:
        raise WeightSyncError(
            f"stale weight update: version {update.version} does not follow loaded version {current_version}")
    for i, bucket in enumerate(update.buckets):
        crc = zlib.crc32(memoryview(bucket.buffer))
        if crc != bucket.crc32:
            raise WeightSyncError(
                f"weight update v{update.version}: bucket {i} checksum {crc:#010x} != sent {bucket.crc32:#010x}")


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
