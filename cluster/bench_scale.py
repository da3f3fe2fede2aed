"""``rlrelay bench scale``: the control plane alone, with stand-in rollout workers.

``StandInRolloutWorker`` has the verbs of ``RolloutWorker`` and no engine: ``generate`` returns
well-formed ``Rollout`` records for every prompt x sample and takes exactly ``--latency``
seconds (it sleeps for whatever building the records left). The real ``RolloutPool`` runs it
(``worker_cls``) at each size of ``--workers``, grown in place with ``resize``. Per size:

- **step**: ``RolloutPool.generate`` of ``--prompts`` x ``--samples``; overhead = wall - latency;
- **breakdown**: the same step done by hand on the pool's actors (build the requests, submit
  them, wait, fetch and deserialise the records, merge); what ``pool.generate`` takes beyond
  this hand-made step is ``ActorSet.run``'s own loop (one ``ray.wait`` per completion, health
  pings, fetching each result);
- **push**: ``RolloutPool.load_weights`` of a small update to every member;
- **memory**: RSS/USS of the stand-in processes, a bare Ray actor's for comparison, and the
  raylet and GCS (the driver's children), whose growth is Ray's bookkeeping per actor.

A micro-benchmark drains n calls in flight on one threaded actor the way ``ActorSet.run``
does (one ``ray.wait`` per completion over the calls still out) and gives the driver's CPU cost
per completion at n. The figures are fitted linearly in the pool size and extrapolated to
``--extrapolate`` workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import statistics
import time

from actors.rollout_worker import EngineSettings, WeightLoadReport, WorkerStatus
from actors.types import GenerateRequest, Rollout
from cluster.bench import BareActor, bench_config, process_memory_mib, significant, spread
from learner.weight_bucket import WeightUpdate, verify

log = logging.getLogger("rlrelay")


class StandInRolloutWorker:
    """Stands in for ``RolloutWorker`` where only the control plane is measured: same verbs,
    no engine. ``stand_in_class`` makes a subclass with the latency and response length set."""

    latency_s: float = 0.5
    """Seconds every ``generate`` call takes, record building included."""
    response_tokens: int = 128
    """Tokens (and log-probs) in every response."""

    def __init__(self, worker_id: int, settings: EngineSettings) -> None:
        self.worker_id = worker_id
        self.settings = settings  # model_path is ignored
        self.policy_version = 0
        self.overruns = 0
        self._tokens = 0
        self._generate_seconds = 0.0

    def generate(self, request: GenerateRequest) -> list[Rollout]:
        started = time.perf_counter()
        n = self.response_tokens
        rollouts = []
        for slot, prompt in enumerate(request.prompts, start=request.first_slot):
            text = prompt.text or ""
            ids = tuple(4 + ord(c) % 40 for c in text)
            for k in range(request.sampling.samples_per_prompt):
                # Distinct values per record: pickle would share identical tuples and
                # understate what real records cost to send.
                base = slot * 7 + k
                tokens = tuple(4 + (base + i) % 40 for i in range(n))
                rollouts.append(Rollout(
                    prompt_index=prompt.index, slot=slot, sample_index=k, prompt_text=text, answer=prompt.answer,
                    prompt_token_ids=ids, response_token_ids=tokens,
                    response_logprobs=tuple(-0.01 * ((base + i) % 97 + 1) for i in range(n)),
                    response_text="".join(chr(97 + t % 26) for t in tokens), finish_reason="length",
                    policy_version=self.policy_version))
        spent = time.perf_counter() - started
        self.overruns += spent > self.latency_s
        time.sleep(max(0.0, self.latency_s - spent))
        self._tokens += n * len(rollouts)
        self._generate_seconds += time.perf_counter() - started
        return rollouts

    def load_weights(self, update: WeightUpdate) -> WeightLoadReport:
        t0 = time.perf_counter()
        verify(update, self.policy_version)
        self.policy_version = update.version
        return WeightLoadReport(version=update.version, verify_seconds=time.perf_counter() - t0, load_seconds=0.0,
                                nbytes=update.nbytes)

    def status(self) -> WorkerStatus:
        return WorkerStatus(worker_id=self.worker_id, pid=os.getpid(), policy_version=self.policy_version,
                            tokens_generated=self._tokens, generate_seconds=self._generate_seconds)

    def ping(self) -> int:
        return self.policy_version


def stand_in_class(latency_s: float, response_tokens: int) -> type:
    """A ``StandInRolloutWorker`` with the given latency and response length (Ray ships the
    subclass by value, so the settings reach every actor)."""
    return type("StandInRolloutWorker", (StandInRolloutWorker,),
                {"latency_s": latency_s, "response_tokens": response_tokens})


# -- the bench -------------------------------------------------------------------------------

def run(args) -> dict:
    import ray

    from actors.types import Prompt, SamplingSettings
    from cluster.launch import init_ray
    from cluster.pools import RolloutPool

    sizes = sorted(set(args.workers))
    cfg = bench_config([f"rollout.num_workers={sizes[0]}", f"rollout.num_cpus={args.num_cpus}",
                        f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
                        f"rollout.max_new_tokens={args.response_tokens}",
                        f"model.max_model_len={args.response_tokens + 64}", f"run.seed={args.seed}"])
    prompts = tuple(Prompt(index=i, text=f"{10 + i % 90}+{10 + i // 90 % 90}=", answer=str(20 + i % 90 + i // 90 % 90))
                    for i in range(args.prompts))
    sampling = SamplingSettings(max_new_tokens=args.response_tokens, samples_per_prompt=args.samples)
    init_ray(cfg)
    pool = None
    try:
        bare = ray.remote(BareActor).options(num_cpus=0).remote()
        bare_memory = process_memory_mib(ray.get(bare.pid.remote(), timeout=120))
        ray.kill(bare)
        ray_base = _ray_processes_mib()
        worker_cls = stand_in_class(args.latency, args.response_tokens)
        bench = _SizeBench(ray, prompts, sampling, args)
        per_size = []
        for n in sizes:
            started = time.perf_counter()
            if pool is None:
                pool = RolloutPool(cfg, "stand-in", worker_cls=worker_cls)
                added = n
            else:
                added = n - len(pool.actors.members)
                pool.resize(n)
            pool.ready()
            start_s = time.perf_counter() - started
            per_size.append({"workers": n, "start_s_per_new_actor": round(start_s / max(1, added), 3),
                             **bench.measure(pool), "ray_processes_mib": _ray_processes_mib()})
            log.info("bench scale: %d workers: step %.3f s, overhead share %.3f, push %.3f s", n,
                     per_size[-1]["step_s"]["median"], per_size[-1]["overhead_share"], per_size[-1]["push_s"]["median"])
        wait_cost = _wait_loop_cost_us(ray)
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()

    return {
        "bench": "scale",
        "settings": {"prompts": args.prompts, "samples": args.samples, "response_tokens": args.response_tokens,
                     "latency_s": args.latency, "steps": args.steps, "num_cpus_per_actor": args.num_cpus,
                     "update_kib": args.update_kib,
                     "stand_in": "StandInRolloutWorker through RolloutPool(worker_cls=...), grown with resize"},
        "bare_actor_memory": bare_memory,
        "ray_processes_mib_before": ray_base,
        "sizes": per_size,
        "wait_loop_us_per_completion": wait_cost,
        "extrapolated": _extrapolate(per_size, wait_cost, args),
    }


class _SizeBench:
    """The measurements taken at one pool size."""

    def __init__(self, ray, prompts, sampling, args) -> None:
        self.ray = ray
        self.prompts = prompts
        self.sampling = sampling
        self.args = args
        self.version = 0
        self.step = 0

    def measure(self, pool) -> dict:
        args, latency = self.args, self.args.latency
        expected = len(self.prompts) * self.sampling.samples_per_prompt
        rollouts = self._pool_step(pool)  # warm-up
        record_bytes = len(pickle.dumps(rollouts, protocol=5))
        steps = []
        for _ in range(args.steps):
            started = time.perf_counter()
            rollouts = self._pool_step(pool)
            steps.append(time.perf_counter() - started)
            if len(rollouts) != expected:
                raise RuntimeError(f"a step returned {len(rollouts)} records, expected {expected}")
        parts = [self._hand_step(pool) for _ in range(args.steps)]
        pushes = [self._push(pool) for _ in range(args.steps)]
        statuses = self.ray.get([h.status.remote() for h in pool.actors.handles()], timeout=120)
        memory = [process_memory_mib(s.pid) for s in statuses]
        overruns = sum(self.ray.get([h.__ray_call__.remote(lambda w: w.overruns) for h in pool.actors.handles()],
                                    timeout=120))
        hand = [p["total_s"] for p in parts]
        step_median = statistics.median(steps)
        return {
            "step_s": spread(steps),
            "overhead_s": spread([s - latency for s in steps]),
            "overhead_share": round((step_median - latency) / step_median, 4),
            "breakdown": {name: spread([p[name] for p in parts])
                          for name in ("build_s", "dispatch_s", "wait_beyond_latency_s", "fetch_s", "merge_s",
                                       "total_s")},
            "actor_set_loop_s": round(step_median - statistics.median(hand), 4),
            "push_s": spread(pushes),
            "records_mib_per_step": significant(record_bytes / 2**20),
            "stand_in_overruns": overruns,
            "actor_rss_mib_median": statistics.median(m["rss_mib"] for m in memory),
            "actor_uss_mib_median": statistics.median(m["uss_mib"] for m in memory),
        }

    def _pool_step(self, pool) -> list:
        self.step += 1
        return pool.generate(self.prompts, self.sampling, step=self.step, seed=self.args.seed)

    def _hand_step(self, pool) -> dict:
        """``RolloutPool.generate`` done by hand, each part timed."""
        from learner.batch import split_evenly

        ray, latency = self.ray, self.args.latency
        self.step += 1
        handles = [m.handle for m in pool.actors.members.values() if m.ready]
        t0 = time.perf_counter()
        chunks = [GenerateRequest(prompts=self.prompts[lo:hi], sampling=self.sampling, step=self.step,
                                  seed=self.args.seed, first_slot=lo)
                  for lo, hi in split_evenly(len(self.prompts), len(handles)) if hi > lo]
        t1 = time.perf_counter()
        refs = [h.generate.remote(c) for h, c in zip(handles, chunks)]
        t2 = time.perf_counter()
        ray.wait(refs, num_returns=len(refs), timeout=600, fetch_local=False)
        t3 = time.perf_counter()
        results = ray.get(refs, timeout=600)
        t4 = time.perf_counter()
        merged = [r for part in results for r in part]
        t5 = time.perf_counter()
        assert len(merged) == len(self.prompts) * self.sampling.samples_per_prompt
        return {"build_s": t1 - t0, "dispatch_s": t2 - t1, "wait_beyond_latency_s": t3 - t2 - latency,
                "fetch_s": t4 - t3, "merge_s": t5 - t4, "total_s": t5 - t0}

    def _push(self, pool) -> float:
        import torch

        from learner.weight_bucket import pack_state_dict

        self.version += 1
        update = pack_state_dict({"w": torch.zeros(self.args.update_kib * 256)}, version=self.version)
        started = time.perf_counter()
        ref = self.ray.put(update)
        reports = pool.load_weights(ref)
        seconds = time.perf_counter() - started
        if len(reports) != len(pool.actors.members):
            raise RuntimeError(f"{len(reports)} of {len(pool.actors.members)} workers took the push")
        return seconds


def _ray_processes_mib() -> dict:
    """RSS of the Ray system processes this driver started (raylet, GCS)."""
    import psutil

    out = {}
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            name = child.name()
            if name in ("raylet", "gcs_server"):
                out[name] = round(child.memory_info().rss / 2**20, 1)
        except psutil.Error:
            pass
    return out


class _Sleeper:
    """Answers many calls at once (a threaded actor): n calls in flight without n processes."""

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _wait_loop_cost_us(ray) -> dict:
    """CPU microseconds of the driver's loop thread per completed call when n calls are in
    flight and are collected the way ``ActorSet.run`` collects them: one
    ``ray.wait(num_returns=1)`` over the calls still out, then a ``ray.get`` of the one returned.
    The calls are sleeps spread over 1 s on one threaded actor, so what is timed is the
    waiting, not the work. The thread's own CPU time, not the process's: Ray's background
    threads tick at a fixed rate whatever the loop does, and would swamp the per-call cost."""
    out = {}
    sleeper = ray.remote(_Sleeper).options(num_cpus=0, max_concurrency=600).remote()
    ray.get(sleeper.sleep.remote(0), timeout=120)
    for n in (32, 128, 512):
        runs = []
        for _ in range(3):
            pending = [sleeper.sleep.remote(0.2 + i / n) for i in range(n)]
            started = time.thread_time()
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=30)
                if not ready:
                    raise RuntimeError("a stand-in sleep did not return within 30 s")
                ray.get(ready[0], timeout=30)
            runs.append((time.thread_time() - started) / n * 1e6)
        out[str(n)] = spread(runs)
    ray.kill(sleeper)
    return out


def _extrapolate(per_size: list[dict], wait_cost: dict, args) -> dict:
    """Least-squares lines through the measured sizes, evaluated at ``args.extrapolate``."""
    import numpy as np

    target = args.extrapolate
    xs = np.array([s["workers"] for s in per_size], dtype=float)

    def at_target(values: list[float]) -> float | None:
        if len(xs) < 2:
            return None
        slope, intercept = np.polyfit(xs, np.array(values, dtype=float), 1)
        return round(float(slope * target + intercept), 4)

    def medians(key: str, sub: str | None = None) -> list[float]:
        return [(s[sub][key] if sub else s[key])["median"] for s in per_size]

    # One completion's cost with n calls in flight, fitted in n, times the N completions of a
    # step that gives every worker one chunk.
    n_refs = np.array([float(k) for k in wait_cost])
    wait_us = np.array([v["median"] for v in wait_cost.values()])
    w_slope, w_intercept = np.polyfit(n_refs, wait_us, 1)
    wait_loop_s = target * (w_intercept + w_slope * target) / 1e6
    step_overhead = at_target(medians("overhead_s"))
    return {
        "workers": target,
        "prompts_per_worker": round(args.prompts / target, 2),
        "overhead_s_linear_fit": step_overhead,
        "overhead_share_at_latency": round(step_overhead / (step_overhead + args.latency), 3)
        if step_overhead is not None and step_overhead > 0 else None,
        "parts_s_linear_fit": {name: at_target(medians(name, "breakdown"))
                               for name in ("build_s", "dispatch_s", "wait_beyond_latency_s", "fetch_s", "merge_s")},
        "actor_set_loop_s_linear_fit": at_target([s["actor_set_loop_s"] for s in per_size]),
        "actor_set_wait_loop_cpu_s": round(float(wait_loop_s), 4),
        "push_s_linear_fit": at_target(medians("push_s")),
        "stand_in_memory_gib": significant(target * statistics.median(s["actor_uss_mib_median"] for s in per_size) / 1024),
        "raylet_mib_linear_fit": at_target([s["ray_processes_mib"].get("raylet", 0.0) for s in per_size]),
        "gcs_mib_linear_fit": at_target([s["ray_processes_mib"].get("gcs_server", 0.0) for s in per_size]),
    }
