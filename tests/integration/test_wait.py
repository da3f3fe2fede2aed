"""``pools.wait``: a dead worker is named even when a live peer's error arrives first (a rank
whose collective lost its peer fails with a connection error before Ray reports the death),
and a plain task error is still raised as itself. A worker whose constructor raises is named
with the constructor's error, by ``wait`` and by ``ActorSet``, at once and without restarts. A
worker killed by Ray's memory monitor (``OutOfMemoryError``, not a ``RayActorError``) is a
death too: named by ``wait``, replaced by ``ActorSet``."""

from __future__ import annotations

import threading
import time

import pytest
from ray.exceptions import OutOfMemoryError, RayTaskError

from cluster.actor_set import ActorSet, WorkerFailure
from cluster.pools import wait

pytestmark = pytest.mark.integration


class Peer:
    def ready(self) -> bool:
        return True

    def lose_peer(self) -> None:
        raise ConnectionError("Connection closed by peer")

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def peers(ray, n: int) -> list:
    handles = [ray.remote(Peer).options(num_cpus=0.25).remote() for _ in range(n)]
    ray.get([h.ready.remote() for h in handles], timeout=120)
    return handles


def test_the_dead_peer_is_named_when_the_live_one_fails_first(ray_local):
    live, doomed = peers(ray_local, 2)
    refs = [live.lose_peer.remote(), doomed.sleep.remote(60)]
    # The live peer's error is back long before the kill: the death arrives during the grace.
    killer = threading.Timer(1.0, ray_local.kill, args=(doomed,), kwargs={"no_restart": True})
    killer.start()
    try:
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match="rank 1 died"):
            wait(refs, 120, ["rank 0", "rank 1"])
        assert time.monotonic() - started < 60  # not after the sleeping call
    finally:
        killer.cancel()


def test_a_task_error_with_no_death_is_raised_as_itself(ray_local):
    failing, fine = peers(ray_local, 2)
    with pytest.raises(RayTaskError, match="Connection closed by peer"):
        wait([failing.lose_peer.remote(), fine.sleep.remote(0.1)], 120, ["rank 0", "rank 1"])


class BadStart:
    def __init__(self) -> None:
        raise ValueError("unknown reward function 'exact_mach'")

    def ready(self) -> bool:
        return True


def test_a_constructor_error_is_named_by_wait(ray_local):
    handle = ray_local.remote(BadStart).options(num_cpus=0.25).remote()
    with pytest.raises(WorkerFailure, match=r"^rank 0 could not start: ValueError: unknown reward function 'exact_mach'$"):
        wait([handle.ready.remote()], 120, ["rank 0"])


def test_a_constructor_error_stops_an_actor_set_without_restarts(ray_local):
    actors = ActorSet("reward worker", lambda mid: ray_local.remote(BadStart).options(num_cpus=0.25).remote(),
                      lambda handle: handle.ready.remote(), 2, timeout_s=60, max_restarts=8)
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"could not start: ValueError: unknown reward function 'exact_mach'$"):
        actors.wait_ready(timeout_s=120)
    assert actors.restarts == 0  # a replacement would raise the same
    assert time.monotonic() - started < 60


class MemoryMonitorVictim:
    """Its call fails as the calls of a worker that Ray's memory monitor killed do: with
    OutOfMemoryError, which is not a RayActorError."""

    def ready(self) -> bool:
        return True

    def work(self, x: int) -> int:
        raise OutOfMemoryError("Task was killed due to the node running low on memory.")


class Doubler:
    def ready(self) -> bool:
        return True

    def work(self, x: int) -> int:
        return 2 * x


def test_a_worker_killed_for_memory_is_named_by_wait(ray_local):
    handle = ray_local.remote(MemoryMonitorVictim).options(num_cpus=0.25).remote()
    with pytest.raises(WorkerFailure, match=r"(?s)^rank 0 died: .*running low on memory"):
        wait([handle.work.remote(1)], 120, ["rank 0"])


def test_a_worker_killed_for_memory_is_replaced_and_its_work_rerun(ray_local):
    def spawn(mid: int):  # the first member is killed for memory, its replacement works
        return ray_local.remote(MemoryMonitorVictim if mid == 0 else Doubler).options(num_cpus=0.25).remote()

    actors = ActorSet("worker", spawn, lambda h: h.ready.remote(), 1, timeout_s=60, max_restarts=2)
    try:
        actors.wait_ready(timeout_s=120)
        assert actors.run([1, 2, 3], lambda h, x: h.work.remote(x)) == [2, 4, 6]
        assert actors.restarts == 1
    finally:
        actors.shutdown()
