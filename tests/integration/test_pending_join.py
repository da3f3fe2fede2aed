"""A scale-up the cluster has no room for waits for resources instead of being declared dead
(and replaced, and counted) once the start timeout passes; the pool serves meanwhile. A pool
with no member able to work fails after the start timeout instead of waiting for ever."""

from __future__ import annotations

import time

import pytest

from cluster.actor_set import ActorSet
from cluster.pools import fits

pytestmark = pytest.mark.integration


class Echo:
    def ping(self) -> bool:
        return True

    def work(self, x: int) -> int:
        time.sleep(0.2)
        return 2 * x


def pool(ray, awaiting_resources) -> ActorSet:
    small, huge = ray.remote(Echo).options(num_cpus=0.25), ray.remote(Echo).options(num_cpus=64)
    # Member 0 fits the 4-CPU test instance; every later member asks for 64 CPUs.
    actors = ActorSet("echo", spawn=lambda i: (small if i == 0 else huge).remote(),
                      prepare=lambda h: h.ping.remote(), size=1, timeout_s=30,
                      awaiting_resources=awaiting_resources,
                      max_restarts=1000)  # a slow machine replaces the joiner many times a run
    actors.wait_ready()
    actors.start_timeout_s = 1.0  # short, for the joiner only
    actors.resize(2)
    return actors


def test_unplaceable_joiner_waits_for_resources_and_the_pool_serves(ray_local):
    bundle = {"CPU": 64}
    assert not fits(ray_local.available_resources(), bundle) and fits({"CPU": 64.0}, bundle)
    actors = pool(ray_local, awaiting_resources=lambda: not fits(ray_local.available_resources(), bundle))
    out = actors.run(list(range(12)), lambda h, x: h.work.remote(x))  # ~2.4 s: past the start timeout
    assert out == [2 * x for x in range(12)]
    assert actors.restarts == 0 and len(actors.members) == 2  # still joining, not replaced
    assert sum(m.ready for m in actors.members.values()) == 1
    actors.resize(1)
    assert len(actors.members) == 1


def test_a_joiner_that_never_starts_with_room_to_spare_is_replaced(ray_local):
    actors = pool(ray_local, awaiting_resources=lambda: False)
    actors.run(list(range(12)), lambda h, x: h.work.remote(x))
    assert actors.restarts >= 1  # declared dead after the start timeout, a replacement started
    actors.resize(1)


def test_a_pool_left_with_only_unplaceable_replacements_fails_after_the_start_timeout(ray_local):
    from cluster.actor_set import WorkerFailure

    bundle = {"CPU": 64}
    small, huge = ray_local.remote(Echo).options(num_cpus=0.25), ray_local.remote(Echo).options(num_cpus=64)
    actors = ActorSet("echo", spawn=lambda i: (small if i == 0 else huge).remote(),
                      prepare=lambda h: h.ping.remote(), size=1, timeout_s=30,
                      awaiting_resources=lambda: not fits(ray_local.available_resources(), bundle))
    actors.wait_ready()
    actors.start_timeout_s = 2.0
    (only,) = actors.members.values()
    ray_local.kill(only.handle, no_restart=True)  # its replacement asks for 64 CPUs: never placed
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"no echo could take work for 2 s: 1 waiting to start"):
        actors.run(list(range(4)), lambda h, x: h.work.remote(x))
    assert actors.restarts == 1 and time.monotonic() - started < 60


class Slot:
    """A joiner that starts slowly and cannot read version 1 (its slot was rewritten, as the
    learner's shared memory is two pushes later)."""

    def __init__(self, delay_s: float) -> None:
        time.sleep(delay_s)

    def load(self, version: int) -> int:
        if version == 1:
            raise ValueError("weight update v1: its shared-memory slot is holding v3")
        return version

    def ping(self) -> bool:
        return True


def test_a_joiner_is_judged_on_the_current_state_not_one_since_replaced(ray_local):
    from cluster.actor_set import WorkerFailure

    current = [0]
    actor = ray_local.remote(Slot).options(num_cpus=0.25)
    actors = ActorSet("slot", spawn=lambda i: actor.remote(0.0 if i == 0 else 2.0),
                      prepare=lambda h: h.load.remote(current[0]), size=1, timeout_s=30)
    actors.wait_ready()
    try:
        current[0] = 1
        actors.resize(2)  # the joiner is sent version 1, which it will fail to read...
        current[0] = 3
        assert actors.broadcast(lambda h: h.load.remote(3)) == [3]  # ...while version 3 goes out
        actors.wait_ready()  # its failure on version 1 is not held against it: it loads 3
        assert sum(m.ready for m in actors.members.values()) == 2 and actors.restarts == 0
        assert actors.broadcast(lambda h: h.load.remote(3)) == [3, 3]

        current[0] = 1  # a joiner that fails on the state it was sent, still current, fails the job
        actors.resize(3)
        with pytest.raises(WorkerFailure, match="could not start: .*slot is holding v3"):
            actors.wait_ready()
    finally:
        actors.shutdown()


class Picky:
    """Starts on the first node; a later one lacks what it needs (a model path, a device)."""

    def __init__(self, member: int) -> None:
        if member > 0:
            raise FileNotFoundError(f"/models/policy: not on this node (member {member})")

    def ping(self) -> bool:
        return True

    def work(self, x: int) -> int:
        return 2 * x


def work_for(actors: ActorSet, seconds: float) -> None:
    """Hand the pool work for ``seconds``, or until it raises."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        actors.run(list(range(4)), lambda h, x: h.work.remote(x))


def test_a_worker_added_after_start_that_cannot_start_is_dropped_and_the_pool_serves(ray_local, caplog):
    # At start-up such a worker fails the job at once (test_wait); added later by a scale-up
    # or as a replacement it killed a run that had been training for hours.
    import logging

    from cluster.actor_set import WorkerFailure

    actor = ray_local.remote(Picky).options(num_cpus=0.25)
    actors = ActorSet("picky", spawn=lambda i: actor.remote(i), prepare=lambda h: h.ping.remote(), size=1,
                      timeout_s=30, max_restarts=2)
    actors.wait_ready()
    try:
        actors.resize(3)
        with caplog.at_level(logging.WARNING, logger="cluster.actor_set"):
            deadline = time.monotonic() + 60
            while actors._joining and time.monotonic() < deadline:
                assert actors.run(list(range(4)), lambda h, x: h.work.remote(x)) == [0, 2, 4, 6]
        assert not actors._joining and list(actors.members) == [0]
        assert actors.target == 1 and actors.restarts == 2
        assert "picky 1 could not start (FileNotFoundError: /models/policy: not on this node" in caplog.text
        actors.resize(2)  # a third failure passes max_restarts: the job gives up, naming why
        with pytest.raises(WorkerFailure, match=r"picky 3 could not start: .*not on this node.*limit 2\): giving up"):
            work_for(actors, seconds=60)
    finally:
        actors.shutdown()


def test_a_replacement_that_cannot_start_in_an_emptied_pool_stops_the_job_with_its_reason(ray_local):
    from cluster.actor_set import WorkerFailure

    actor = ray_local.remote(Picky).options(num_cpus=0.25)
    actors = ActorSet("picky", spawn=lambda i: actor.remote(i), prepare=lambda h: h.ping.remote(), size=1,
                      timeout_s=30, max_restarts=5)
    actors.wait_ready()
    try:
        ray_local.kill(actors.members[0].handle, no_restart=True)  # its replacement, picky 1, cannot start
        with pytest.raises(WorkerFailure, match=r"picky 1 could not start: .*not on this node.*no other picky is left"):
            work_for(actors, seconds=60)
    finally:
        actors.shutdown()
