"""``pools.wait``: a dead worker is named even when a live peer's error arrives first (a rank
whose collective lost its peer fails with a connection error before Ray reports the death),
and a plain task error is still raised as itself."""

from __future__ import annotations

import threading
import time

import pytest
from ray.exceptions import RayTaskError

from cluster.actor_set import WorkerFailure
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
