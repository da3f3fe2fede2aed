"""Asynchronous mode's failures reach the user at once. A background collection that failed is
raised before the weight push (the push into the failed pool used to fail first, naming a
worker and a prefix-cache error instead); an error on the driver's side (a learner rank died, a
second Ctrl-C) ends the batch in flight instead of waiting minutes for it to be generated.
Ray and the pools are stand-ins here: this tests the bookkeeping, not Ray."""

from __future__ import annotations

import threading
import time
import types

import pytest

import cluster.actor_set as actor_set
import cluster.controller as controller_module
from cluster.config import load_config
from cluster.controller import Controller


def test_an_abandoned_set_stops_its_run_within_a_wait(monkeypatch):
    pool: list[actor_set.ActorSet] = []
    waits = []

    def wait(refs, num_returns=1, timeout=None, **_):
        refs = list(refs)
        if any(ref == "generate" for ref in refs):  # the chunk in flight never finishes
            waits.append(timeout)
            if len(waits) == 3:
                pool[0].abandon()  # as the driver's thread does when it fails
            assert len(waits) < 50, "the run went on after abandon()"
            return [], refs
        return refs[:num_returns], refs[num_returns:]  # start-up: every member is ready

    monkeypatch.setattr(actor_set, "ray", types.SimpleNamespace(
        wait=wait, get=lambda ref, timeout=None: None, kill=lambda handle, no_restart=True: None))
    worker = types.SimpleNamespace(ping=types.SimpleNamespace(remote=lambda: "ping"))
    pool.append(actor_set.ActorSet("rollout worker", spawn=lambda i: worker, prepare=lambda h: "prepared", size=1,
                                   timeout_s=3600))
    pool[0].wait_ready()
    with pytest.raises(actor_set.Abandoned, match="rollout workers' work was abandoned"):
        pool[0].run(["chunk"], lambda handle, chunk: "generate")
    assert len(waits) == 3 and all(t is not None and t <= 1.0 for t in waits)
    with pytest.raises(actor_set.Abandoned):  # and any later call
        pool[0].broadcast(lambda handle: "generate")


def test_work_that_overruns_its_timeout_on_two_workers_in_turn_fails_naming_the_key(monkeypatch):
    # A share of the work that needs longer than rollout.timeout_s (long reasoning outputs)
    # went from worker to worker, each killed and replaced, until max_restarts ran out.
    def wait(refs, num_returns=1, timeout=None, **_):
        refs = list(refs)
        if "generate" in refs:  # never finishes; time passes
            time.sleep(0.02)
            return [], refs
        return refs[:num_returns], refs[num_returns:]

    monkeypatch.setattr(actor_set, "ray", types.SimpleNamespace(
        wait=wait, get=lambda ref, timeout=None: None, kill=lambda handle, no_restart=True: None))
    spawned = []
    worker = types.SimpleNamespace(ping=types.SimpleNamespace(remote=lambda: "ping"))
    pool = actor_set.ActorSet("rollout worker", spawn=lambda i: spawned.append(i) or worker,
                              prepare=lambda h: "prepared", size=1, timeout_s=0.01, max_restarts=8,
                              timeout_key="rollout.timeout_s")
    pool.wait_ready()
    with pytest.raises(actor_set.WorkerFailure, match=r"the same share of the work \(rollout worker call 1 of 1\) "
                                                      r"overran its 0 s timeout on 2 rollout workers in turn: it "
                                                      r"needs longer \(rollout.timeout_s sets it\)"):
        pool.run(["chunk"], lambda handle, chunk: "generate")
    assert spawned == [0, 1] and pool.restarts == 1  # one replacement tried, not all eight


class Collector:
    """Step 0's batch at once; step 1's (in the background) from ``second``."""

    def __init__(self, second) -> None:
        self.second = second
        self.abandoned = threading.Event()
        self.rollout = self.reward = types.SimpleNamespace(restarts=0, actors=types.SimpleNamespace(members={}))
        self.reward_norm = None

    def collect(self, step: int):
        if step == 0:
            return types.SimpleNamespace(finished_at=time.perf_counter())
        return self.second(self)

    def abandon(self) -> None:
        self.abandoned.set()


def controller(monkeypatch, collector: Collector) -> Controller:
    monkeypatch.setattr(controller_module, "alive_nodes", lambda: 1)
    cfg = load_config(None, ["trainer.async_staleness=1", "trainer.steps=3"])
    ctl = Controller(cfg, collector=collector, eval_prompts=[], learner=None, tracker=None, checkpoints=None,
                     model_path="unused", pad_token_id=0)
    ctl.pushes = []
    ctl.push_weights = lambda version: ctl.pushes.append(version) or {}
    return ctl


def test_a_failed_background_collection_is_raised_before_the_weight_push(monkeypatch):
    def fails(collector):
        raise RuntimeError("rollout worker 1 failed: the engine raised")

    ctl = controller(monkeypatch, Collector(fails))
    ctl.learn = lambda step, batch: ({}, True)
    with pytest.raises(RuntimeError, match="rollout worker 1 failed: the engine raised"):
        ctl.run()
    assert ctl.pushes == []


def test_an_error_while_learning_abandons_the_batch_in_flight(monkeypatch):
    def generates_until_abandoned(collector):
        # A whole batch of long generations; only abandon() ends it early.
        if not collector.abandoned.wait(timeout=120):
            raise AssertionError("the driver waited for the batch in flight")
        raise actor_set.Abandoned("abandoned")

    collector = Collector(generates_until_abandoned)
    ctl = controller(monkeypatch, collector)

    def rank_dies(step, batch):
        raise actor_set.WorkerFailure("learner rank 1 died")

    ctl.learn = rank_dies
    with pytest.raises(actor_set.WorkerFailure, match="learner rank 1 died"):
        ctl.run()
    assert collector.abandoned.is_set() and ctl.pushes == []
