"""Actor pools: the plain worker classes wrapped with ``ray.remote`` (only here), and the
fan-out/fan-in of each step's work with a timeout on every wait.

- ``RolloutPool``: N vLLM rollout workers; a step's prompts are split across them. Dead or
  hung workers are replaced and their prompts re-dispatched (``cluster/actor_set.py``).
- ``RewardPool``: M reward workers; a step's responses are split across them, same recovery.
- the learner ranks are ``cluster/learner_group.py``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import ray
from ray.autoscaler.sdk import request_resources

from actors.rollout_worker import EngineSettings, RolloutWorker, WeightLoadReport, WorkerStatus
from actors.types import GenerateRequest, Prompt, Rollout, SamplingSettings
from cluster.actor_set import ActorSet
from cluster.config import Config
from cluster.control import WorkerInfo
from learner.batch import split_evenly
from reward.isolated import RESTART_TIMEOUT_S
from reward.types import ScoreRequest, ScoreResult
from reward.worker import RewardFunctionSpec, RewardModelSpec, RewardWorker

log = logging.getLogger(__name__)

def weight_transport(setting: str, nodes: int, autoscale: bool) -> str:
    """The transport of the next weight push for ``rollout.weight_transport=setting`` on a
    cluster of ``nodes`` alive nodes. Shared memory only reaches workers on the learner's
    host; ``auto`` uses it when no worker can be anywhere else, now or before the next push
    (an autoscaler may add a node at any time)."""
    if setting != "auto":
        return setting
    return "shared_memory" if nodes == 1 and not autoscale else "object_store"


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def fits(free: dict[str, float], bundle: dict[str, float]) -> bool:
    """Whether ``free`` resources (``ray.available_resources()``) can hold ``bundle`` now."""
    return all(free.get(name, 0.0) >= amount for name, amount in bundle.items())


class RolloutPool:
    """N rollout workers, each a Ray actor holding one vLLM engine.

    The pool holds a reference to the current weights in the object store: a worker that
    joins (a replacement, or a scale-up) loads them before it gets any prompt. Keeping just
    that one live version also keeps the object-store memory it uses warm (DESIGN)."""

    def __init__(self, cfg: Config, model_path: str, worker_cls: type = RolloutWorker) -> None:
        """``worker_cls``: the rollout worker class; a stand-in with the same verbs (generate,
        load_weights, status, ping) measures the control plane without vLLM (``rlrelay bench scale``)."""
        r = cfg.rollout
        device = "cuda" if r.num_gpus > 0 else "cpu"
        self.settings = EngineSettings(
            model_path=model_path, device=device, dtype="float32" if device == "cpu" else "bfloat16",
            max_model_len=cfg.model.max_model_len, seed=cfg.run.seed, num_threads=r.num_threads,
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization)
        # Two concurrent calls: a health ping is answered while generate runs. The pool
        # itself never sends a worker two pieces of work at once.
        # vLLM's CPU attention sizes its work split by the calling thread's OpenMP default, read
        # from OMP_NUM_THREADS when the process starts (Ray sets it from num_cpus), and runs it
        # with the engine's thread count: when the two differ, any sequence longer than one KV
        # block (128 tokens) aborts the worker ("thread_num == thread_num" check), because Ray
        # runs generate on a thread other than the one that set the engine's count. So the
        # process starts with the engine's count.
        env = {"env_vars": {"OMP_NUM_THREADS": str(r.num_threads)}} if device == "cpu" else None
        actor = ray.remote(worker_cls).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_concurrency=2,
                                               runtime_env=env)
        self.update_ref: ray.ObjectRef | None = None
        self._nodes: dict[int, ray.ObjectRef] = {}
        self._requested = False  # resources asked of an autoscaling cluster, withdrawn at shutdown
        self.bundle = {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}
        """What one worker reserves: a scale-up asks the cluster for this many more."""
        self.actors = ActorSet("rollout worker", spawn=lambda i: actor.remote(i, self.settings),
                               prepare=self._prepare, size=r.num_workers, timeout_s=r.timeout_s,
                               max_restarts=r.max_restarts, health_interval_s=r.health_interval_s,
                               health_timeout_s=r.health_timeout_s, start_timeout_s=r.start_timeout_s,
                               awaiting_resources=lambda: not fits(ray.available_resources(), self.bundle),
                               timeout_key="rollout.timeout_s")

    def _prepare(self, handle) -> ray.ObjectRef:
        if self.update_ref is None:
            return handle.ping.remote()
        return handle.load_weights.remote(self.update_ref)

    def ready(self) -> None:
        """Wait for every engine to start (model load, KV cache): a worker that cannot start
        fails the job here, not on the first step."""
        self.actors.wait_ready()

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingSettings, step: int, seed: int,
                 first_slot: int = 0) -> list[Rollout]:
        """Every prompt sampled ``samples_per_prompt`` times, in prompt order; prompt i takes
        slot ``first_slot + i`` of the step."""
        parts = max(1, sum(m.ready and not m.draining for m in self.actors.members.values()))
        chunks = [GenerateRequest(prompts=tuple(prompts[lo:hi]), sampling=sampling, step=step, seed=seed,
                                  first_slot=first_slot + lo)
                  for lo, hi in split_evenly(len(prompts), parts) if hi > lo]
        results = self.actors.run(chunks, lambda handle, request: handle.generate.remote(request))
        return [r for part in results for r in part]

    def load_weights(self, update_ref: ray.ObjectRef) -> list[WeightLoadReport]:
        """Every worker pulls the update from the object store, verifies it and loads it."""
        self.update_ref = update_ref
        return self.actors.broadcast(lambda handle: handle.load_weights.remote(update_ref))

    def resize(self, size: int) -> None:
        """Grow or shrink the pool. New workers load the current weights before they serve;
        leaving workers finish the prompts they hold, then stop (nothing is lost or redone)."""
        self.actors.resize(size)
        # On an autoscaling cluster (KubeRay, the cluster launcher) this asks for nodes that
        # can hold the whole pool; elsewhere it is recorded and ignored. A worker that cannot
        # be placed yet waits for room instead of being declared dead.
        request_resources(bundles=[self.bundle] * size)
        self._requested = True

    def infos(self) -> list[WorkerInfo]:
        """Every member's state, node, weight version and throughput (for ``rlrelay status``).
        Best effort and bounded: a member that does not answer within a few seconds shows as
        unknown rather than delaying the step."""
        members = list(self.actors.members.values())
        current = {m.id for m in members}
        for gone in [i for i in self._nodes if i not in current]:  # left or replaced: its ref goes too
            del self._nodes[gone]
        for m in members:
            if m.id not in self._nodes:
                self._nodes[m.id] = m.handle.__ray_call__.remote(lambda _: ray.util.get_node_ip_address())
        # One 5 s budget for the whole call, and only for serving members: a joining one
        # answers nothing until its engine has loaded (minutes), so it is not waited for.
        deadline = time.monotonic() + 5
        asked = {m.handle.status.remote(): m.id for m in members if m.ready}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=5) if asked else ([], [])
        statuses = {}
        for ref in answered:
            try:
                statuses[asked[ref]] = ray.get(ref)
            except Exception:  # died since: the pool notices at its next call
                pass
        serving = [self._nodes[m.id] for m in members if m.ready]
        joining = [self._nodes[m.id] for m in members if not m.ready]
        nodes_ready = ray.wait(serving, num_returns=len(serving), timeout=max(0.0, deadline - time.monotonic()))[0] \
            if serving else []
        nodes_ready += ray.wait(joining, num_returns=len(joining), timeout=0)[0] if joining else []
        infos = []
        for m in members:
            st: WorkerStatus | None = statuses.get(m.id)
            node = "?"
            if self._nodes[m.id] in nodes_ready:
                try:
                    node = ray.get(self._nodes[m.id])
                except Exception:
                    pass
            infos.append(WorkerInfo(
                id=m.id, node=node, state="draining" if m.draining else "serving" if m.ready else "joining",
                policy_version=st.policy_version if st else -1,
                tokens_per_s=st.tokens_generated / st.generate_seconds if st and st.generate_seconds else 0.0))
        return infos

    @property
    def restarts(self) -> int:
        return self.actors.restarts

    def shutdown(self) -> None:
        self.actors.shutdown()
        if self._requested:
            # The request outlives the job otherwise: an autoscaler would keep the nodes.
            try:
                request_resources(bundles=[])
            except Exception as e:  # the cluster is going away too: nothing left to release
                log.warning("could not withdraw the rollout pool's resource request: %s", e)


class RewardPool:
    """M reward workers, each scoring with the configured functions and reward model."""

    def __init__(self, cfg: Config, reward_model_path: str | None) -> None:
        rc = cfg.reward
        # Each call may use its whole timeout, and (process isolation) the start of the child
        # that replaces one that timed out; the worker itself never waits longer.
        restart_s = RESTART_TIMEOUT_S if rc.isolation == "process" else 0.0
        self.sample_limit_s = max(1, len(rc.functions)) * (rc.timeout_s + restart_s)
        functions = [RewardFunctionSpec(name=f.name, weight=f.weight) for f in rc.functions]
        model = None
        if rc.model is not None:
            model = RewardModelSpec(path=reward_model_path or rc.model.path, weight=rc.model.weight,
                                    batch_size=rc.model.batch_size, max_length=rc.model.max_length)
        # Torch threads of a reward model and of user functions alike (their child processes
        # inherit it): Ray would set OMP_NUM_THREADS from the CPU share, often 1.
        env = {"env_vars": {"OMP_NUM_THREADS": str(rc.num_threads)}}
        actor = ray.remote(RewardWorker).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_concurrency=2,
                                                 runtime_env=env)
        device = "cuda" if rc.num_gpus > 0 else "cpu"
        self.actors = ActorSet(
            "reward worker", size=rc.num_workers, timeout_s=rc.timeout_s, max_restarts=rc.max_restarts,
            start_timeout_s=rc.start_timeout_s, health_interval_s=rc.health_interval_s,
            health_timeout_s=rc.health_timeout_s, timeout_key="reward.timeout_s",
            spawn=lambda _: actor.remote(functions, model, timeout_s=rc.timeout_s, num_threads=rc.num_threads,
                                         stop_after_failure=rc.on_failure == "error",
                                         device=device, isolation=rc.isolation),
            prepare=lambda handle: handle.ping.remote())

    def ready(self) -> None:
        self.actors.wait_ready()

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        parts = max(1, sum(m.ready for m in self.actors.members.values()))
        chunks = [list(requests[lo:hi]) for lo, hi in split_evenly(len(requests), parts) if hi > lo]
        longest = max(len(c) for c in chunks) * self.sample_limit_s + 60
        results = self.actors.run(chunks, lambda handle, chunk: handle.score.remote(chunk), timeout_s=longest)
        return [s for part in results for s in part]

    @property
    def restarts(self) -> int:
        return self.actors.restarts

    def shutdown(self) -> None:
        self.actors.shutdown()
