"""A weight push whose only rollout worker died while the learner trained: the pool starts a
replacement (which loads the update before it serves) and the push reports what it did, where
it used to fail on ``max()`` of no reports. Ray is replaced by stand-ins here: this tests the
pool's and the controller's bookkeeping, not Ray."""

from __future__ import annotations

import types

from ray.exceptions import RayActorError

import cluster.actor_set as actor_set
import cluster.controller as controller_module
from cluster.config import load_config
from cluster.controller import Controller


class Ref:
    def __init__(self, value=None, error: Exception | None = None) -> None:
        self.value, self.error = value, error


def get(ref: Ref, timeout=None):
    if ref.error is not None:
        raise ref.error
    return ref.value


class Worker:
    def __init__(self) -> None:
        self.dead = False
        self.loaded: list[str] = []

    def call(self, name: str, *args) -> Ref:
        if self.dead:
            return Ref(error=RayActorError())
        if name == "load_weights":
            self.loaded.append(args[0])
            return Ref(types.SimpleNamespace(load_seconds=0.5, nbytes=1))
        return Ref(0)


FAKE_RAY = types.SimpleNamespace(
    wait=lambda refs, num_returns=1, timeout=None, **_: (list(refs)[:num_returns], list(refs)[num_returns:]),
    get=get, kill=lambda handle, no_restart=True: None, ObjectRef=Ref)


def test_the_only_worker_dying_before_a_push_leaves_a_replacement_and_no_report(monkeypatch):
    monkeypatch.setattr(actor_set, "ray", FAKE_RAY)
    workers: list[Worker] = []

    def spawn(i: int) -> Worker:
        workers.append(Worker())
        return workers[-1]

    # As RolloutPool's: a worker that joins loads the update the pool holds, if any.
    current: list[str] = []
    pool = actor_set.ActorSet("rollout worker", spawn=spawn, size=1, timeout_s=60,
                              prepare=lambda w: w.call("load_weights", *current) if current else w.call("ping"))
    pool.wait_ready()
    workers[0].dead = True  # dies while the learner trains
    current.append("v1")  # the pool records the update before broadcasting it
    reports = pool.broadcast(lambda w: w.call("load_weights", "v1"))
    assert reports == [] and pool.restarts == 1 and len(workers) == 2
    assert workers[1].loaded == ["v1"]  # once, by its preparation, before it serves


def test_a_push_that_no_worker_reported_on_still_gives_its_figures(monkeypatch):
    monkeypatch.setattr(controller_module, "alive_nodes", lambda: 1)
    cfg = load_config(None, [])
    collector = types.SimpleNamespace(rollout=types.SimpleNamespace(load_weights=lambda ref: []), reward=None)
    learner = types.SimpleNamespace(
        export_weights=lambda version, transport: (4_000_000, "ref"))
    ctl = Controller(cfg, collector=collector, eval_prompts=[], learner=learner, tracker=None, checkpoints=None,
                     model_path="unused", pad_token_id=0)
    metrics = ctl.push_weights(3)
    assert ctl.version == 3
    assert metrics["sync/megabytes"] == 4.0 and metrics["sync/workers_loaded"] == 0.0
    assert metrics["timing/weight_load_max"] == 0.0


def test_a_worker_compares_update_names_with_the_checkpoint_then_with_the_first_update(
        tiny_model_dir, tiny_tied_model_dir, caplog):
    """vLLM only logs a weight it does not know, and a layer left out keeps its old weights:
    the first update is compared with the checkpoint (a warning), later ones with the first
    (an error, before loading). No engine is needed for the check itself."""
    import pytest
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from actors.rollout_worker import EngineSettings, RolloutWorker, checkpoint_weight_names
    from learner.weight_bucket import WeightSyncError, drop_aliases

    for model_dir in (tiny_model_dir, tiny_tied_model_dir):
        sent = drop_aliases(AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict(keep_vars=True))
        names = checkpoint_weight_names(str(model_dir))
        assert names == set(load_file(str(model_dir / "model.safetensors"))) == set(sent)  # what the learner sends

    worker = RolloutWorker.__new__(RolloutWorker)  # the check alone: no engine
    worker.worker_id, worker.settings, worker._update_names = 0, EngineSettings(model_path=str(tiny_model_dir)), None
    full = sorted(checkpoint_weight_names(str(tiny_model_dir)))
    with caplog.at_level("WARNING", logger="rlrelay"):
        worker._check_names(full, version=1)
        worker._check_names(full, version=2)
    assert not caplog.records
    with pytest.raises(WeightSyncError, match=r"v3 does not carry .*missing \['lm_head.weight'\]"):
        worker._check_names([n for n in full if n != "lm_head.weight"], version=3)

    renamed = RolloutWorker.__new__(RolloutWorker)
    renamed.worker_id, renamed.settings, renamed._update_names = 1, worker.settings, None
    with caplog.at_level("WARNING", logger="rlrelay"):
        renamed._check_names([f"_orig_mod.{n}" for n in full], version=1)
    assert "not sent" in caplog.text and "_orig_mod." in caplog.text
