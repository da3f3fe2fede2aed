"""Same-host weight transport: the learner writes an update once into shared memory and the
rollout workers on its host read it in place.

Through Ray's object store a push costs the learner a ``ray.put``, which copies the update
into the store and measured 2.0x the memory-copy bound on its own (75 buffers, 411 MB), on
top of the checksum pass. Here rank 0 keeps two files of anonymous shared memory
(``memfd``) and copies version v into slot v % 2; only a small ``SharedWeights`` descriptor
crosses Ray. A worker on the same host opens the file through ``/proc/<learner pid>/fd/<fd>``,
maps it read-only once (kept mapped between pushes) and loads views of it into its engine.

Integrity is a version header, not a checksum. The header holds a token drawn by the writer
(so a reused pid or fd is never mistaken for the learner's file) and the slot's version, set
to 0 before the slot is written and to v after: a reader checks the version before it
loads and again after, so a slot rewritten under it (the one way shared memory on one host
tears an update) is refused instead of served. A checksum would guard the same thing at a
full extra pass on each side (fused into the copy: +0.3x the bound on the learner; 0.05 s
on every worker, measured), and the object store, which crosses the network, keeps it.

Why memfd and not a file in /dev/shm: it has no name, so nothing is left behind when the
learner is killed, and it is not bound by the size of the /dev/shm mount (64 MB by default
in a container). Two slots keep version v readable while v+1 is written.

Only torch and numpy are imported here, as in ``weight_bucket``.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from learner.weight_bucket import DTYPES, TensorSlot, WeightSyncError, check_version

_MAGIC = b"RLRWGT01"
_HEADER = struct.Struct("<8s16sq")  # magic, writer token, version (0 while being written)
_DATA_START = 4096
"""Tensors start one page in, so every tensor offset can be 64-byte aligned from a page."""
_ALIGN = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedWeights:
    """A weight update left in the learner's shared memory; what crosses Ray instead of the bytes.

    Example: ``SharedWeights(version=3, host="node-1", pid=4242, fd=17, token="9f...", size=411045888,
    slots=(...))``
    """

    version: int
    """Policy version the slot holds."""
    host: str
    """Host name of the learner (for the error a worker on another host gets)."""
    pid: int
    """Learner rank 0's process id: the file is opened as ``/proc/<pid>/fd/<fd>``."""
    fd: int
    """The slot's file descriptor in the learner's process."""
    token: str
    """Hex token the file's header must carry."""
    size: int
    """Bytes of the file."""
    slots: tuple[TensorSlot, ...]
    """Every tensor, ``offset`` counted from the start of the file."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


class SharedWeightWriter:
    """Learner rank 0's side: two shared-memory slots, written in turn."""

    def __init__(self, num_slots: int = 2) -> None:
        self.num_slots = num_slots
        self.token = secrets.token_bytes(16)
        self._layout: tuple | None = None
        self._files: list[tuple[int, mmap.mmap, torch.Tensor]] = []
        self._slots: tuple[TensorSlot, ...] = ()
        self._size = 0

    def write(self, state: Mapping[str, torch.Tensor], version: int) -> SharedWeights:
        """Copy ``state`` into slot ``version % num_slots`` (torch's copy on this process's threads)."""
        if version < 1:
            raise ValueError(f"shared weights need a version >= 1 (got {version}): 0 marks a slot being written")
        layout = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in state.items())
        if layout != self._layout:
            self._allocate(layout)
        fd, mm, data = self._files[version % self.num_slots]
        _HEADER.pack_into(mm, 0, _MAGIC, self.token, 0)
        for slot in self._slots:
            data[slot.offset:slot.offset + slot.nbytes].copy_(state[slot.name].detach().reshape(-1).view(torch.uint8))
        _HEADER.pack_into(mm, 0, _MAGIC, self.token, version)
        return SharedWeights(version=version, host=socket.gethostname(), pid=os.getpid(), fd=fd,
                             token=self.token.hex(), size=self._size, slots=self._slots)

    def close(self) -> None:
        for fd, mm, _ in self._files:
            try:
                mm.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with it
                pass
            os.close(fd)
        self._files = []
        self._layout = None

    def _allocate(self, layout: tuple) -> None:
        self.close()
        # New files may get the old descriptor numbers: a new token keeps readers from taking
        # them for the mappings they hold.
        self.token = secrets.token_bytes(16)
        slots = []
        offset = _DATA_START
        for name, shape, dtype in layout:
            if dtype not in DTYPES:
                raise TypeError(f"cannot send {name}: unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            slots.append(TensorSlot(name=name, shape=shape, dtype=dtype, offset=offset, nbytes=nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._size = offset
        for i in range(self.num_slots):
            fd = os.memfd_create(f"rlrelay-weights-{i}", os.MFD_CLOEXEC)
            try:
                # Reserve the memory now: a lazily grown file that runs out of memory would
                # kill the learner with SIGBUS in the middle of a copy.
                os.posix_fallocate(fd, 0, self._size)
            except OSError as e:
                os.close(fd)
                raise WeightSyncError(f"cannot reserve {self._size / 2**20:.0f} MiB of shared memory for weight "
                                      f"sync ({e}); use rollout.weight_transport=object_store") from e
            # Map with the page tables filled now rather than one fault per page on the first
            # write into each slot.
            mm = mmap.mmap(fd, self._size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            data = torch.frombuffer(mm, dtype=torch.uint8)
            self._files.append((fd, mm, data))
        self._slots = tuple(slots)
        self._layout = layout


class SharedWeightReader:
    """A rollout worker's side: maps the learner's slots (once each) and checks their headers."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int, str], mmap.mmap] = {}

    def open(self, update: SharedWeights, current_version: int) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views into the learner's slot, read-only; raises ``WeightSyncError``
        if the update is not newer than ``current_version``, this process cannot reach the
        file, or the slot no longer holds ``update.version``. Call ``check`` after loading."""
        check_version(update.version, current_version)
        mm = self._map(update)
        self.check(update)
        tensors = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only views: the engine only copies from them
            for slot in update.slots:
                view = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=slot.nbytes, offset=slot.offset))
                tensors.append((slot.name, view.view(DTYPES[slot.dtype]).reshape(slot.shape)))
        return tensors

    def check(self, update: SharedWeights) -> None:
        """Raise unless the slot still holds ``update.version`` from the same writer."""
        magic, token, version = _HEADER.unpack_from(self._map(update), 0)
        if magic != _MAGIC or token.hex() != update.token:
            raise WeightSyncError(f"weight update v{update.version}: /proc/{update.pid}/fd/{update.fd} is not the "
                                  f"learner's shared weights (another process of that pid on this host?)")
        if version != update.version:
            state = "being rewritten" if version == 0 else f"holding v{version}"
            raise WeightSyncError(f"weight update v{update.version}: its shared-memory slot is {state}")

    def _map(self, update: SharedWeights) -> mmap.mmap:
        key = (update.pid, update.fd, update.token)
        mm = self._maps.get(key)
        if mm is not None:
            return mm
        # A new writer (the learner restarted) replaces every mapping of the old one.
        self._maps = {k: m for k, m in self._maps.items() if k[2] == update.token}
        path = f"/proc/{update.pid}/fd/{update.fd}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise WeightSyncError(
                f"weight update v{update.version} is in shared memory of the learner (pid {update.pid} on "
                f"{update.host}), which this worker on {socket.gethostname()} cannot open ({e}); workers on "
                f"another host need rollout.weight_transport=object_store") from e
        try:
            if os.fstat(fd).st_size < update.size:
                raise WeightSyncError(f"weight update v{update.version}: {path} is smaller than the update")
            # Populate the page tables now, once: later pushes reuse the same mapping.
            mm = mmap.mmap(fd, update.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps[key] = mm
        return mm
