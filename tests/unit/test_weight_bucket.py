"""Building weight updates (shared views and flat buckets), and the receiver's checks."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from learner.weight_bucket import (WeightSyncError, checksum, iter_tensors, pack_state_dict,
                                  share_state_dict, verify)


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
    # An older update, as a delayed push arriving after a newer one: loading it would roll back.
    with pytest.raises(WeightSyncError, match="version 2 does not follow loaded version 3"):
        verify(update, current_version=3)
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


def test_a_shared_update_is_views_of_the_tensors_and_round_trips_exactly():
    original = state()
    update = share_state_dict(original, version=4)
    assert len(update.buckets) == len(original)
    for bucket, t in zip(update.buckets, original.values()):
        assert bucket.buffer.ctypes.data == t.data_ptr()  # no copy on the sending side
        assert bucket.checksum == checksum(bucket.buffer.copy())
    got = dict(iter_tensors(update))
    assert list(got) == list(original)
    for name, t in original.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    # The same weights packed flat carry the same tensors; checksums are per buffer, so they differ.
    assert {k: v.tolist() for k, v in iter_tensors(pack_state_dict(original, 4))} == \
        {k: v.tolist() for k, v in got.items()}
    verify(update, current_version=3)


def test_a_shared_update_travels_through_pickle_out_of_band_and_is_checked():
    update = share_state_dict(state(), version=1)
    buffers = []
    data = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    # Every tensor's bytes leave as an out-of-band buffer (what Ray writes into shared memory).
    assert len(buffers) == len(update.buckets) and len(data) < 4096
    received = pickle.loads(data, buffers=buffers)
    verify(received, current_version=0)
    raw = bytearray(buffers[0].raw())
    raw[0] ^= 0x01
    torn = pickle.loads(data, buffers=[raw, *buffers[1:]])
    with pytest.raises(WeightSyncError, match="bucket 0 checksum"):
        verify(torn, current_version=0)


def test_only_contiguous_cpu_tensors_of_known_dtypes_are_shared():
    with pytest.raises(ValueError, match="a.weight.*contiguous"):
        share_state_dict({"a.weight": torch.zeros(4, 3).t()}, version=1)
    with pytest.raises(TypeError, match="b.*complex"):
        share_state_dict({"b": torch.zeros(2, dtype=torch.complex64)}, version=1)


def test_checksum_sees_a_zeroed_tail_and_a_changed_length():
    buf = np.arange(37, dtype=np.uint8)  # 4 words and 5 tail bytes
    assert checksum(buf) != checksum(buf[:-1])
    cut = buf.copy()
    cut[-3:] = 0
    assert checksum(cut) != checksum(buf)
    assert checksum(np.zeros(0, np.uint8)) == 0


def test_checksum_is_the_unsigned_word_sum_modulo_2_64_whatever_the_threads():
    # Words near 2**64 overflow the signed sum many times over; the reference is Python ints.
    rng = np.random.default_rng(0)
    words = rng.integers(2**63, 2**64, size=100_003, dtype=np.uint64, endpoint=False)
    buf = np.concatenate([words.view(np.uint8), np.array([7, 1, 2], np.uint8)])  # 3 tail bytes
    want = (sum(int(w) for w in words) + int.from_bytes(bytes([7, 1, 2]), "little") + buf.nbytes) % 2**64
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert checksum(buf) == want
    finally:
        torch.set_num_threads(threads)
    read_only = buf.copy()
    read_only.setflags(write=False)  # as out of Ray's object store
    assert checksum(read_only) == want


def test_a_tied_head_is_sent_once_under_the_checkpoints_name(tiny_tied_model_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from learner.weight_bucket import drop_aliases

    tied = AutoModelForCausalLM.from_pretrained(str(tiny_tied_model_dir)).state_dict(keep_vars=True)
    assert tied["lm_head.weight"] is tied["model.embed_tokens.weight"]
    kept = drop_aliases(tied)
    assert set(tied) - set(kept) == {"lm_head.weight"}
    untied = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict(keep_vars=True)
    assert drop_aliases(untied).keys() == untied.keys()
    # Only the same tensor is an alias: equal values elsewhere, a view, a slice are not.
    x = torch.arange(6.0)
    assert drop_aliases({"a": x, "b": x.clone(), "c": x[:3], "d": x.view(2, 3), "e": x}).keys() == {"a", "b", "c", "d"}
