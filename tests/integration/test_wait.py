"""``learner_group.wait``: a dead worker is named even when a live peer's error arrives first (a rank
whose collective lost its peer fails with a connection error before Ray reports the death),
and a plain task error names the worker that raised it. A worker whose constructor raises is named
with the constructor's error, by ``wait`` and by ``ActorSet``, at once and without restarts. A
worker's own exception stays its own failure even when its class is one Ray uses for deaths
(test_memory_kill.py has a real death of that kind)."""

from __future__ import annotations

import threading
import time

import pytest
from ray.exceptions import OutOfMemoryError

from cluster.actor_set import ActorSet, WorkerFailure
from cluster.learner_group import wait

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


def test_a_task_error_with_no_death_names_the_worker_that_raised_it(ray_local):
    failing, fine = peers(ray_local, 2)
    with pytest.raises(WorkerFailure, match="^rank 0 failed: .*Connection closed by peer"):
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


class RaisesADeathsClass:
    """Its own code raises an exception of a class Ray also uses for dead workers (as a worker
    that itself called a dead actor would): the worker is not dead, its call failed."""

    def ready(self) -> bool:
        return True

    def work(self, x: int) -> int:
        raise OutOfMemoryError("a Ray call of this worker's own failed")


def test_a_workers_own_exception_of_a_death_class_fails_the_run_at_once(ray_local):
    actors = ActorSet("worker", lambda mid: ray_local.remote(RaisesADeathsClass).options(num_cpus=0.25).remote(),
                      lambda h: h.ready.remote(), 1, timeout_s=60, max_restarts=2)
    try:
        actors.wait_ready(timeout_s=120)
        with pytest.raises(WorkerFailure, match=r"worker 0 failed: .*a Ray call of this worker's own failed"):
            actors.run([1], lambda h, x: h.work.remote(x))
        assert actors.restarts == 0  # not retried as a death
    finally:
        actors.shutdown()
    handle = ray_local.remote(RaisesADeathsClass).options(num_cpus=0.25).remote()
    with pytest.raises(WorkerFailure, match="^rank 0 failed: .*a Ray call of this worker's own failed"):
        wait([handle.work.remote(1)], 120, ["rank 0"])
