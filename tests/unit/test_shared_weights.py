"""The same-host shared-memory weight transport: exact round trip across processes, and
refusal of a stale version, a slot rewritten before or during a load, a wrong file, or a
learner this process cannot reach."""

import dataclasses
import multiprocessing
import pickle

import pytest
import torch

from learner.shared_weights import SharedWeightReader, SharedWeightWriter
from learner.weight_bucket import WeightSyncError


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(33, 17, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),  # 6 bytes: offsets stay aligned after it
        "c.flag": torch.tensor([True, False, True]),
        "d.weight": torch.randn(4, 4, generator=g).half(),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.transposed": torch.randn(5, 3, generator=g).t(),  # not contiguous: copied in logical order
    }


def assert_same(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]) -> None:
    assert [name for name, _ in got] == list(want)
    for name, tensor in got:
        assert tensor.dtype == want[name].dtype and tensor.shape == want[name].shape, name
        assert torch.equal(tensor, want[name]), name


def test_round_trip_in_process_is_exact():
    writer = SharedWeightWriter()
    try:
        original = state()
        sent = writer.write(original, version=1)
        # The descriptor is all that crosses Ray: small, and a frozen dataclass.
        assert len(pickle.dumps(sent)) < 4096
        assert sent.nbytes == sum(t.numel() * t.element_size() for t in original.values())
        assert all(slot.offset % 64 == 0 for slot in sent.slots)
        assert_same(SharedWeightReader().open(sent, current_version=0), original)
    finally:
        writer.close()


def _read_in_child(sent, queue) -> None:
    try:
        got = SharedWeightReader().open(sent, current_version=0)
        # Plain pickle bytes: a queue would share the tensors back through torch's fd passing.
        queue.put(pickle.dumps([(name, t.clone()) for name, t in got]))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


def test_another_process_reads_the_learners_slot():
    writer = SharedWeightWriter()
    try:
        original = state(seed=3)
        sent = writer.write(original, version=5)
        ctx = multiprocessing.get_context("spawn")  # a fresh process, as a Ray worker is
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(sent, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(timeout=60)
        assert isinstance(got, bytes), got
        assert_same(pickle.loads(got), original)
    finally:
        writer.close()


def test_stale_versions_and_rewritten_slots_are_refused():
    writer = SharedWeightWriter(num_slots=2)
    reader = SharedWeightReader()
    try:
        v1 = writer.write(state(1), version=1)
        with pytest.raises(WeightSyncError, match="stale weight update: version 1 does not follow loaded version 1"):
            reader.open(v1, current_version=1)
        v2 = writer.write(state(2), version=2)
        assert v1.fd != v2.fd  # version 1 stays readable while version 2 is written
        assert_same(reader.open(v1, current_version=0), state(1))
        with pytest.raises(WeightSyncError, match="version 1 does not follow loaded version 2"):
            reader.open(v1, current_version=2)  # older than what the worker holds: a rollback
        writer.write(state(3), version=3)  # back into version 1's slot
        with pytest.raises(WeightSyncError, match="slot is holding v3"):
            reader.open(v1, current_version=0)
        # A slot rewritten while a worker loads from it is caught by the check after the load.
        reader.open(v2, current_version=1)
        writer.write(state(4), version=4)
        with pytest.raises(WeightSyncError, match="holding v4"):
            reader.check(v2)
    finally:
        writer.close()


def test_a_slot_left_half_written_is_refused():
    writer = SharedWeightWriter()
    try:
        sent = writer.write(state(), version=1)
        # As if the learner had marked slot 1 for version 3 and died before finishing the copy.
        _, mm, _ = writer._files[1]
        mm[24:32] = (0).to_bytes(8, "little")
        with pytest.raises(WeightSyncError, match="slot is being rewritten"):
            SharedWeightReader().open(sent, current_version=0)
    finally:
        writer.close()


def test_wrong_token_or_unreachable_learner_is_named():
    writer = SharedWeightWriter()
    try:
        sent = writer.write(state(), version=1)
        with pytest.raises(WeightSyncError, match="is not the learner's shared weights"):
            SharedWeightReader().open(dataclasses.replace(sent, token="00" * 16), current_version=0)
        with pytest.raises(WeightSyncError, match="cannot open .*rollout.weight_transport=object_store"):
            SharedWeightReader().open(dataclasses.replace(sent, pid=2**22 + 7), current_version=0)
    finally:
        writer.close()


def test_version_zero_and_unsupported_dtypes_are_errors():
    writer = SharedWeightWriter()
    try:
        with pytest.raises(ValueError, match="version >= 1"):
            writer.write(state(), version=0)
        with pytest.raises(TypeError, match="unsupported dtype"):
            writer.write({"x": torch.zeros(2, dtype=torch.complex64)}, version=1)
    finally:
        writer.close()


def test_a_new_layout_reallocates_and_a_new_writer_replaces_the_old_mappings():
    writer = SharedWeightWriter()
    reader = SharedWeightReader()
    try:
        first = writer.write(state(), version=1)
        reader.open(first, current_version=0)
        smaller = {"only.weight": torch.arange(10, dtype=torch.float32)}
        for version in (2, 3):  # both slots, whose descriptors may reuse the old files' numbers
            sent = writer.write(smaller, version=version)
            assert sent.token != first.token
            assert_same(reader.open(sent, current_version=version - 1), smaller)
    finally:
        writer.close()
    restarted = SharedWeightWriter()  # a learner restarted from a checkpoint
    try:
        assert_same(reader.open(restarted.write(state(7), version=3), current_version=2), state(7))
        assert all(key[2] == restarted.token.hex() for key in reader._maps)
    finally:
        restarted.close()
