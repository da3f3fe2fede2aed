"""Chaos: rollout and reward workers killed (Ray kill, SIGKILL) or frozen (SIGSTOP) in the
middle of their work. Every prompt is generated and every response scored exactly once, the
samples are the ones an undisturbed pool produces, and replacements serve the current
weights. A reward function stuck in C code fails its sample, not the worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from transformers import AutoModelForCausalLM

from actors.types import Prompt, SamplingSettings
from cluster.config import load_config
from cluster.pools import RewardPool, RolloutPool
from learner.weight_bucket import pack_state_dict
from reward.types import ScoreRequest

pytestmark = pytest.mark.integration

SAMPLING = SamplingSettings(temperature=1.0, max_new_tokens=24, samples_per_prompt=8)
PROMPTS = [Prompt(index=i, text=f"{10 + i}+{i * 3 % 90 + 10}=", answer=str(i)) for i in range(48)]


def config(*overrides):
    # A 15 s probe timeout: a live worker generating while two replacement engines start on a
    # loaded 2-core machine can be slow to answer, and an extra restart would break the counts.
    return load_config(None, ["rollout.num_cpus=0.5", "rollout.num_threads=1", "rollout.kv_cache_gib=0.1",
                              "model.max_model_len=64", "rollout.max_new_tokens=24", "rollout.health_interval_s=1",
                              "rollout.health_timeout_s=15", *overrides])


def busy_member(pool: RolloutPool, exclude=(), timeout: float = 60):
    """A member that is in the middle of a generate call."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for member in list(pool.actors.members.values()):
            if member.busy_since is not None and member.id not in exclude:
                return member
        time.sleep(0.01)
    raise AssertionError("no worker became busy")


def pid_of(handle) -> int:
    return ray.get(handle.status.remote(), timeout=60).pid


def samples(rollouts):
    return {(r.slot, r.sample_index): r.response_token_ids for r in rollouts}


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_dir):
    pool = RolloutPool(config("rollout.num_workers=2"), str(tiny_model_dir))
    pool.ready()
    # Version 1 weights, so a replacement that skipped the sync would be caught.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    pool.load_weights(ray.put(pack_state_dict(model.state_dict(), version=1)))
    yield pool
    pool.shutdown()


def generate_with(pool, chaos) -> list:
    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    out = pool.generate(PROMPTS, SAMPLING, step=3, seed=11)
    thread.join(timeout=120)
    return out


def test_killed_rollout_workers_lose_nothing(pool):
    reference = pool.generate(PROMPTS, SAMPLING, step=3, seed=11)
    assert len(reference) == len(PROMPTS) * SAMPLING.samples_per_prompt
    before = pool.restarts

    def chaos():
        first = busy_member(pool)
        ray.kill(first.handle)  # Ray kill
        second = busy_member(pool, exclude={first.id})
        os.kill(pid_of(second.handle), signal.SIGKILL)  # the process dies under Ray

    out = generate_with(pool, chaos)
    assert pool.restarts - before == 2
    keys = [(r.slot, r.sample_index) for r in out]
    assert len(keys) == len(set(keys)) == len(reference)  # exactly once
    assert samples(out) == samples(reference)  # the same samples an undisturbed pool draws
    assert {r.policy_version for r in out} == {1}  # replacements loaded the current weights
    assert len(pool.actors.members) == 2


def test_frozen_rollout_worker_is_detected_by_health_probe(pool):
    reference = pool.generate(PROMPTS, SAMPLING, step=4, seed=11)
    before = pool.restarts
    frozen = []

    def chaos():
        member = busy_member(pool)
        pid = pid_of(member.handle)
        os.kill(pid, signal.SIGSTOP)  # alive but answering nothing
        frozen.append(pid)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        out = pool.generate(PROMPTS, SAMPLING, step=4, seed=11)
    finally:
        thread.join(timeout=120)
        for pid in frozen:  # let Ray's kill take effect
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen and pool.restarts - before >= 1
    assert samples(out) == samples(reference)


def test_killed_reward_worker_loses_nothing(ray_local):
    cfg = config("reward.num_workers=2", "reward.functions=[rewards_for_tests:slow_length]")
    rewards = RewardPool(cfg, None)
    try:
        rewards.ready()
        requests = [ScoreRequest(prompt="p", response="x" * i, answer=None) for i in range(200)]

        def chaos():
            deadline = time.time() + 60
            while time.time() < deadline:
                busy = [m for m in rewards.actors.members.values() if m.busy_since is not None]
                if busy:
                    ray.kill(busy[0].handle)
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        results = rewards.score(requests)
        thread.join(timeout=60)
        assert rewards.restarts == 1
        assert [r.reward for r in results] == [float(i) for i in range(200)]
    finally:
        rewards.shutdown()


def reward_processes() -> list[int]:
    """Pids of live reward-function child processes on this machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(") ")[-1][0]
        except (OSError, IndexError):
            continue
        if any(b"from reward.isolated import _serve" in part for part in cmdline) and state != "Z":
            pids.append(int(proc.name))
    return pids


def test_reward_call_holding_the_gil_fails_its_sample_not_the_worker(ray_local):
    # on_failure=zero: the worker scores the rest of the batch after the failed call (with the
    # default, error, it would spare them: the run stops anyway).
    cfg = config("reward.num_workers=1", "reward.timeout_s=3", "reward.on_failure=zero",
                 "reward.functions=[rewards_for_tests:backtracking_length]")
    rewards = RewardPool(cfg, None)
    try:
        rewards.ready()
        requests = [ScoreRequest(prompt="p", response="x" * i, answer=None) for i in range(10)]
        results = rewards.score(requests)
        # The call was killed at its timeout, the sample named; the worker kept answering its
        # health pings meanwhile, so it was not replaced as hung.
        assert results[7].error == "reward function 'rewards_for_tests:backtracking_length' timed out after 3 s"
        assert [r.reward for i, r in enumerate(results) if i != 7] == [float(i) for i in range(10) if i != 7]
        assert rewards.restarts == 0
        assert reward_processes()
    finally:
        rewards.shutdown()
    # The reward worker's function process ends with it.
    deadline = time.time() + 30
    while reward_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert reward_processes() == []
