"""Packing weights into flat checksummed buckets, and the receiver's checks."""

import dataclasses

import numpy as np
import pytest
import torch

from learner.weight_bucket import WeightSyncError, checksum, iter_tensors, pack_state_dict, verify


def state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.flag": torch.tensor([True, False, True]),
        "d.weight": torch.randn(4, 4, generator=g).half(),
        "e.scalar": torch.tensor(2.5),
    }


def test_round_trip_is_exact_for_mixed_dtypes_and_bucket_sizes():
    original = state()
    for bucket_bytes in (1, 64, 1 << 20):
        update = pack_state_dict(original, version=3, bucket_bytes=bucket_bytes)
        assert update.version == 3
        got = dict(iter_tensors(update))
        assert list(got) == list(original)
        for name, t in original.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape
            assert torch.equal(got[name], t), name
    assert len(pack_state_dict(original, 0, bucket_bytes=1).buckets) == len(original)
    assert len(pack_state_dict(original, 0, bucket_bytes=1 << 20).buckets) == 1


def test_verify_refuses_stale_versions_and_corruption():
    update = pack_state_dict(state(), version=2)
    verify(update, current_version=1)
    with pytest.raises(WeightSyncError, match="stale"):
        verify(update, current_version=2)
    corrupted = update.buckets[0].buffer.copy()
    corrupted[5] ^= 0xFF
    bad = dataclasses.replace(update, buckets=(dataclasses.replace(update.buckets[0], buffer=corrupted),))
    with pytest.raises(WeightSyncError, match="checksum"):
        verify(bad, current_version=1)


def test_read_only_buffers_unpack_without_copy():
    # Buffers out of Ray's object store are read-only numpy arrays.
    update = pack_state_dict(state(), version=1)
    for b in update.buckets:
        b.buffer.setflags(write=False)
    name, tensor = next(iter_tensors(update))
    assert tensor.data_ptr() == update.buckets[0].buffer.ctypes.data
    assert np.shares_memory(update.buckets[0].buffer, tensor.numpy())


def test_packing_into_reused_buffers_equals_a_fresh_pack_and_writes_in_place():
    first = pack_state_dict(state(), version=1, bucket_bytes=64)
    buffers = [b.buffer for b in first.buckets]
    for b in buffers:
        b[:] = 0xAB  # garbage, padding included: a reused buffer must come out identical anyway
    again = pack_state_dict(state(), version=2, bucket_bytes=64, reuse=buffers)
    fresh = pack_state_dict(state(), version=2, bucket_bytes=64)
    assert [b.buffer.ctypes.data for b in again.buckets] == [b.ctypes.data for b in buffers]
    for a, f in zip(again.buckets, fresh.buckets):
        assert np.array_equal(a.buffer, f.buffer) and a.checksum == f.checksum
    verify(again, current_version=1)


def test_checksum_sees_a_zeroed_tail_and_a_changed_length():
    buf = np.arange(37, dtype=np.uint8)  # 4 words and 5 tail bytes
    assert checksum(buf) != checksum(buf[:-1])
    cut = buf.copy()
    cut[-3:] = 0
    assert checksum(cut) != checksum(buf)
    assert checksum(np.zeros(0, np.uint8)) == 0
