"""A worker killed by Ray's memory monitor, for real: its calls fail with ``OutOfMemoryError``,
which is not a ``RayActorError``. ``wait`` names the worker, and ``ActorSet`` replaces it and
re-runs its work (both raised the error raw before). The instance runs with a memory threshold
5 GiB above what the machine uses, which one worker growing 1.3 GiB a second crosses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cluster.actor_set import ActorSet, WorkerFailure
from cluster.learner_group import wait

pytestmark = pytest.mark.integration


class Hog:
    """``work`` grows its process by 64 MiB every 50 ms until the memory monitor kills it."""

    def ready(self) -> bool:
        return True

    def work(self, x: int) -> int:
        held = []
        for _ in range(256):  # 16 GiB at most: far past the threshold
            held.append(bytearray(64 * 2**20))
            time.sleep(0.05)
        return -len(held)  # not reached while the monitor is on


class Doubler:
    def ready(self) -> bool:
        return True

    def work(self, x: int) -> int:
        return 2 * x


@pytest.fixture(scope="module")
def ray_low_threshold():
    import ray
    from ray._private.utils import get_system_memory, get_used_memory  # what the monitor measures

    # 5 GiB above what the machine uses now: other processes' swings stay below it (the suite
    # runs one test at a time), the hog crosses it within seconds.
    threshold = min(0.95, (get_used_memory() + 5 * 2**30) / get_system_memory())
    env = {"RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the raylet this ray.init starts
    try:
        # Workers import this module (its classes) as ray_local's do (conftest.py).
        path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="rlrelay-tests-oom",
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_worker_killed_for_memory_is_named_by_wait(ray_low_threshold):
    handle = ray_low_threshold.remote(Hog).options(num_cpus=0.5).remote()
    with pytest.raises(WorkerFailure, match=r"(?s)^rank 0 died: .*low on memory"):
        wait([handle.work.remote(1)], 300, ["rank 0"])


def test_a_worker_killed_for_memory_is_replaced_and_its_work_rerun(ray_low_threshold):
    def spawn(mid: int):  # the first member is killed for memory, its replacement works
        return ray_low_threshold.remote(Hog if mid == 0 else Doubler).options(num_cpus=0.5).remote()

    actors = ActorSet("worker", spawn, lambda h: h.ready.remote(), 1, timeout_s=300, max_restarts=2)
    try:
        actors.wait_ready(timeout_s=120)
        assert actors.run([1, 2, 3], lambda h, x: h.work.remote(x)) == [2, 4, 6]
        assert actors.restarts >= 1  # the hog was killed and replaced
    finally:
        actors.shutdown()
