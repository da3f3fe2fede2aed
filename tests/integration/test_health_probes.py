"""Health pings are sent to every due member at once and judged without blocking: members
that stop answering (a node of hung workers) are found by one round of pings, not one health
timeout after another, and the healthy members keep getting work while the pings are out."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.actor_set import ActorSet

pytestmark = pytest.mark.integration

HEALTH_TIMEOUT_S = 4.0


class Worker:
    """Healthy: a chunk takes 0.1 s. Hung: its chunk and its pings never return (alive to Ray,
    answering nothing, like a process stuck in a driver call)."""

    def __init__(self, hung: bool) -> None:
        self.hung = hung

    def ready(self) -> bool:
        return True

    def ping(self) -> bool:
        if self.hung:
            threading.Event().wait()
        return True

    def work(self, x: int) -> tuple[int, float]:
        if self.hung:
            threading.Event().wait()
        time.sleep(0.1)
        return x, time.time()


def test_hung_members_are_found_by_one_round_of_pings_while_the_pool_serves(ray_local):
    remote = ray_local.remote(Worker).options(num_cpus=0, max_concurrency=2)  # pings beside work
    spawned_at: dict[int, float] = {}

    def spawn(mid: int):
        spawned_at[mid] = time.time()
        return remote.remote(hung=mid < 3)  # members 0-2 hang, member 3 and every replacement work

    actors = ActorSet("worker", spawn, prepare=lambda h: h.ready.remote(), size=4, timeout_s=600,
                      health_timeout_s=HEALTH_TIMEOUT_S, health_interval_s=0.5, max_restarts=3)
    try:
        actors.wait_ready(timeout_s=120)
        out = actors.run(list(range(150)), lambda h, x: h.work.remote(x))
    finally:
        actors.shutdown()
    assert [x for x, _ in out] == list(range(150))  # the hung members' chunks were re-run
    assert actors.restarts == 3
    replaced = sorted(t for mid, t in spawned_at.items() if mid >= 4)  # when each hung member was given up
    assert len(replaced) == 3
    # One round of pings found all three: pings waited on one by one would have spaced the
    # replacements a whole health timeout apart (8 s from first to last).
    assert replaced[-1] - replaced[0] < HEALTH_TIMEOUT_S
    # Meanwhile the healthy member went on working: over the ~4.5 s before the hung members were
    # given up it finishes ~40 chunks of 0.1 s; a loop blocked on a ping collects one per timeout.
    finished_before = sum(done < replaced[0] for _, done in out)
    assert finished_before >= 15, finished_before
