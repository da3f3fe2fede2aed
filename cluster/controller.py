"""The controller: one driver process runs the PPO loop; workers do the computation.

```
  PromptSampler ──prompts──▶ RolloutPool (N × vLLM) ──rollouts──▶ RewardPool (M) ──scores──┐
        ▲                          ▲                                                     │
        │                          │ WeightUpdate vN+1 (object store, pulled by every     ▼
        │                          │ worker, version + checksum checked)        collate → LearnerGroup.forward
        │                          │                                       (old/ref log-probs, values)
        │                   LearnerGroup.export_weights ◀── LearnerGroup.update ◀── advantages (here,
        │                                                   (PPO epochs ×           whole batch visible)
   Tracker ◀── metrics ─────────────────────────────────────  minibatches)
```

Synchronous mode (``trainer.async_staleness=0``): act, then learn, then push, step after step.
Asynchronous mode (``>= 1``): while the learner trains on batch k, the rollout pool already
generates batch k+1 with the weights it holds (one version behind); the push of the new
weights waits for that generation to finish. Samples are then at most one version stale,
and truncated importance sampling corrects for it (on by default in this mode).

Every phase is timed (``timing/*``); every wait on a worker has a timeout (in ``pools``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from actors.types import Prompt
from cluster.autoscale import Autoscaler, AutoscaleRule, wait_share
from cluster.checkpoints import CheckpointManager, DriverState, read_checkpoint, run_signature
from cluster.collect import Batch, Collector, group_ids, rollout_metrics
from cluster.config import Config
from cluster.control import JobStatus
from cluster.data import SamplerState, data_fingerprint
from cluster.learner_group import LearnerGroup
from cluster.pools import alive_nodes, weight_transport
from cluster.tracking import Tracker
from learner.batch import TrainBatch, collate, minibatch_plan
from learner.estimate import estimate_advantages
from learner.kl_control import AdaptiveKLController, FixedKLController
from learner.losses import explained_variance, truncated_importance_weights
from reward.judge import EvalJudge

log = logging.getLogger("rlrelay")

ASYNC_TIS_CAP = 2.0
"""Truncated-importance-sampling cap used in asynchronous mode when ``algorithm.tis_cap`` is unset."""


class TrainingDiverged(RuntimeError):
    """Too many updates in a row were skipped for a non-finite loss or gradient."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """What a finished run reports (also written to ``summary.json``)."""

    steps_completed: int
    """Training steps completed."""
    eval_before: float | None
    """Held-out exact-match accuracy of the starting policy (None without an eval set)."""
    eval_after: float | None
    """Held-out exact-match accuracy of the final policy (None when stopped early)."""
    stopped_early: bool = False
    """Stopped by ``request_stop`` (SIGTERM/SIGINT) after ``steps_completed`` steps, with a
    checkpoint of that step; ``--resume auto`` continues it."""


class Controller:
    """Owns the loop; everything it drives is built at launch and passed in."""

    def __init__(self, cfg: Config, *, collector: Collector, eval_prompts: list[Prompt], learner: LearnerGroup,
                 tracker: Tracker, checkpoints: CheckpointManager, model_path: str, pad_token_id: int,
                 control=None, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.collector = collector
        self.rollout, self.reward = collector.rollout, collector.reward
        self.eval_prompts = eval_prompts
        self.eval_judge = EvalJudge(cfg.eval_judge(), timeout_s=cfg.reward.timeout_s)
        self.learner = learner
        self.tracker = tracker
        self.checkpoints = checkpoints
        self.model_path = model_path
        self.pad_token_id = pad_token_id
        self.control = control  # handle of the job's JobControl actor (rlrelay status / scale)
        self.resume_from = resume_from
        algo = cfg.algorithm
        self.kl_ctl = (AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
                       if algo.kl_target is not None else FixedKLController(algo.kl_coef))
        self.asynchronous = cfg.trainer.async_staleness > 0
        self.tis_cap = algo.tis_cap if algo.tis_cap is not None else (ASYNC_TIS_CAP if self.asynchronous else 0.0)
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")
        self.version = 0  # policy version held by the rollout workers
        self.timings: dict[str, float] = {}
        self.eval_before: float | None = None
        self.consecutive_skips = 0
        self.resume_sampler: SamplerState | None = None  # data position a checkpoint records
        self.resume_norm: dict | None = None  # reward-normaliser state a checkpoint records (its twin)
        r = cfg.rollout
        self.autoscaler = Autoscaler(AutoscaleRule(
            min_workers=r.min_workers, max_workers=r.max_workers, high=r.autoscale_high, low=r.autoscale_low,
            patience=r.autoscale_patience)) if r.autoscale else None
        self.autoscale_target: int | None = None  # decided at the end of a step, applied at the next boundary
        self.stop_requested = False  # set from a signal handler; honoured at the next step boundary

    def request_stop(self) -> None:
        """Finish the step in progress, checkpoint it, and end the run (safe from a signal handler)."""
        self.stop_requested = True

    def run(self) -> RunSummary:
        cfg = self.cfg
        if self.resume_from is not None:
            start = self.restore(self.resume_from)
        else:
            start, self.eval_before = 0, self.evaluate(step=0)
        upcoming: Future | None = None
        try:
            for step in range(start, cfg.trainer.steps):
                self.timings = {}
                started = time.perf_counter()
                # 1-2. act and score: the batch comes from the current policy (synchronous) or
                # was generated during the previous update, one version behind (asynchronous)
                with self.phase("wait_rollout"):
                    batch = upcoming.result() if upcoming else self.collector.collect(step)
                self.timings["rollout_idle"] = time.perf_counter() - batch.finished_at
                self.apply_scale_request()  # the pool is idle here
                upcoming = None
                if self.asynchronous and step + 1 < cfg.trainer.steps:
                    upcoming = self.background.submit(self.collector.collect, step + 1)
                # 3-5. learn from it
                metrics, trained = self.learn(step, batch)
                # 6. push the new weights: every worker holds them before it samples again (in
                # asynchronous mode, once it has finished the batch it is generating)
                if upcoming is not None:
                    with self.phase("wait_rollout"):
                        upcoming.result()  # its error first: pushing into a failed pool would hide it
                if trained:
                    with self.phase("weight_sync"):
                        metrics.update(self.push_weights(version=self.version + 1))
                # What a checkpoint records: the state before any batch in flight (asynchronous
                # mode), which a resume regenerates, so it counts once.
                norm = self.collector.reward_norm
                if upcoming is not None:
                    in_flight = upcoming.result()
                    self.resume_sampler, self.resume_norm = in_flight.sampler_before, in_flight.reward_norm_before
                else:
                    self.resume_sampler = replace(self.collector.sampler.state)
                    self.resume_norm = norm.state_dict() if norm is not None else None
                # 7. record, evaluate, checkpoint
                self.record(step + 1, batch, metrics, started)
                if self.stop_requested and step + 1 < cfg.trainer.steps:
                    # The checkpoint's data position is before any batch in flight, so a resume
                    # regenerates it: nothing is lost or used twice.
                    path = self.save(step + 1)
                    log.warning("stopped on request after step %d; checkpoint %s (`--resume auto` continues)",
                                step + 1, path)
                    return RunSummary(steps_completed=step + 1, eval_before=self.eval_before, eval_after=None,
                                      stopped_early=True)
                if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0 \
                        and step + 1 < cfg.trainer.steps:
                    self.save(step + 1)
        except BaseException:
            if upcoming is not None and not upcoming.done():
                # Failing (a learner rank died, a second Ctrl-C): the batch in flight would be
                # generated to its end, minutes, before the error could reach the user.
                self.collector.abandon()
            raise
        finally:
            self.background.shutdown(wait=True, cancel_futures=True)
        # 8. the end: a last checkpoint, the final policy as a Hugging Face model, evaluation
        self.save(cfg.trainer.steps)
        if cfg.trainer.export_final:
            self.learner.save_pretrained(str(cfg.run.path.resolve() / "final_model"))
        eval_after = self.evaluate(step=cfg.trainer.steps)
        self.eval_judge.close()
        return RunSummary(steps_completed=cfg.trainer.steps, eval_before=self.eval_before, eval_after=eval_after)

    def learn(self, step: int, batch: Batch) -> tuple[dict[str, float], bool]:
        """Old/reference log-probs and values, advantages, PPO update. Returns the step's
        metrics and whether the policy was updated (no weight push otherwise)."""
        cfg, rollouts, metrics = self.cfg, batch.rollouts, dict(batch.metrics)
        if len(rollouts) < cfg.learner.world_size:  # dynamic sampling or failures kept (almost) nothing
            metrics["rollout/skipped_update"] = 1.0
            log.warning("step %d: %d sample(s) left after %d round(s) (%d group(s) without differing rewards, %d "
                        "dropped for reward failures), fewer than the %d learner rank(s); no update this step",
                        step, len(rollouts), int(metrics.get("rollout/generation_rounds", 0)),
                        int(metrics.get("rollout/filtered_groups", 0)), int(metrics.get("reward/dropped_groups", 0)),
                        cfg.learner.world_size)
            return metrics, False
        if metrics.get("reward/failed_in_batch", 0) >= len(rollouts):
            log.warning("step %d: the reward failed for every sample of the batch (reward.on_failure=zero scores "
                        "them 0): this step learns nothing", step)
        tensors = collate(rollouts, self.pad_token_id)
        with self.phase("forward"):
            fwd = self.learner.forward(tensors)
        # Advantages here, where the whole batch is visible.
        mask = tensors.response_mask
        adv = estimate_advantages(cfg.algorithm, scores=batch.scores, group_index=group_ids(rollouts), mask=mask,
                                  old_logprobs=fwd.old_logprobs, ref_logprobs=fwd.ref_logprobs,
                                  values=fwd.values, kl_coef=self.kl_ctl.coef)
        weights = None
        if self.tis_cap > 0:  # importance weights for samples the engine drew off-policy
            weights, tis_metrics = truncated_importance_weights(fwd.old_logprobs, tensors.rollout_logprobs, mask,
                                                                self.tis_cap)
            metrics.update(tis_metrics)
        train = TrainBatch(rollouts=tensors, old_logprobs=fwd.old_logprobs, advantages=adv.advantages,
                           returns=adv.returns, old_values=fwd.values,
                           ref_logprobs=fwd.ref_logprobs if cfg.algorithm.kl_place == "loss" else None,
                           importance_weights=weights)
        # PPO epochs over shuffled minibatches (only the critic during its warm-up).
        train_policy = not (cfg.algorithm.uses_critic and step < cfg.algorithm.critic_warmup_steps)
        with self.phase("update"):
            # An adaptive coefficient steers the KL loss term as it steers the reward penalty.
            plan = minibatch_plan(train.size, cfg.learner.world_size, cfg.algorithm.minibatches,
                                  cfg.algorithm.ppo_epochs, seed=cfg.run.seed * 7919 + step)
            metrics.update(self.learner.update(train, plan, train_policy, kl_coef=self.kl_ctl.coef))
        kl = adv.metrics.get("kl/value", 0.0)
        if not math.isfinite(kl):
            log.warning("step %d: kl/value is %s; the KL coefficient keeps %g", step, kl, self.kl_ctl.coef)
        self.kl_ctl.update(kl, n_steps=train.size)
        metrics.update({**adv.metrics, **rollout_metrics(rollouts, tensors, fwd.old_logprobs, self.version), "kl/coef": self.kl_ctl.coef})
        if fwd.values is not None:
            metrics["value/explained_variance"] = explained_variance(fwd.values, adv.returns, mask)
        return metrics, train_policy

    def record(self, step: int, batch: Batch, metrics: dict[str, float], started: float) -> None:
        """Log the step, evaluate when due, publish status, and stop a diverging run."""
        cfg = self.cfg
        self.timings["step"] = time.perf_counter() - started
        metrics.update({**{f"timing/{k}": v for k, v in self.timings.items()},
                        "cluster/worker_restarts": float(self.rollout.restarts + self.reward.restarts),
                        "cluster/rollout_workers": float(len(self.rollout.actors.members)),
                        "throughput/samples_per_s": len(batch.rollouts) / self.timings["step"]})
        if self.autoscaler is not None:
            share = wait_share({k.removeprefix("timing/"): v for k, v in metrics.items() if k.startswith("timing/")},
                               self.asynchronous)
            self.autoscale_target = self.autoscaler.decide(share, self.rollout.actors.target)
            metrics.update({"cluster/rollout_wait_share": share, "cluster/autoscale_target": float(self.autoscale_target)})
        every = cfg.trainer.eval_every
        if every and self.eval_prompts and step % every == 0 and step < cfg.trainer.steps:
            self.evaluate(step=step, into=metrics)
        self.tracker.log(step, metrics)
        if cfg.trainer.sample_table_every and step % cfg.trainer.sample_table_every == 0:
            self.tracker.log_samples(step, batch.rollouts, batch.scores.tolist())
        self.publish_status(step, metrics)
        self.guard_against_divergence(step, metrics)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    # -- elastic pool and status ----------------------------------------------------------------

    def apply_scale_request(self) -> None:
        """Resize the pool at the step boundary (it is idle here): a pending ``rlrelay scale``
        request, else the autoscaler's decision from the last step."""
        wanted = self.autoscale_target
        self.autoscale_target = None
        if self.control is not None:
            try:
                requested = ray.get(self.control.take_scale_request.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                # The control actor only relays `rlrelay scale`; Ray restarts it. Training goes on.
                log.warning("the job's control actor did not answer (%s); a pending `rlrelay scale` may be lost",
                            type(e).__name__)
                requested = None
            if requested is not None:
                wanted = requested  # an operator's explicit request wins over the rule
        if wanted is not None and wanted != self.rollout.actors.target:
            log.info("scaling the rollout pool from %d to %d workers", self.rollout.actors.target, wanted)
            self.rollout.resize(wanted)

    def publish_status(self, step: int, metrics: dict[str, float]) -> None:
        if self.control is None:
            return
        keys = ("reward/mean", "eval/accuracy", "kl/value", "timing/step", "throughput/samples_per_s",
                "cluster/worker_restarts")
        status = JobStatus(run_name=self.cfg.run.name, step=step, total_steps=self.cfg.trainer.steps,
                           policy_version=self.version, rollout_workers=tuple(self.rollout.infos()),
                           learner_ranks=self.cfg.learner.world_size,
                           desired_rollout_workers=self.rollout.actors.target,
                           worker_resources=dict(self.rollout.bundle),
                           metrics={k: metrics[k] for k in keys if k in metrics})
        self.control.publish.remote(status)  # fire and forget: status must never slow the loop

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Checkpoint learner shards and driver state; atomic (written aside, then renamed)."""
        started = time.perf_counter()
        tmp = self.checkpoints.begin(step)
        try:
            ranks = self.learner.save_checkpoint(str(tmp.resolve() / "learner"))
            state = DriverState(
                step=step, version=self.version, sampler_epoch=self.resume_sampler.epoch,
                sampler_position=self.resume_sampler.position, kl_controller=self.kl_ctl.state_dict(),
                reward_normalizer=self.resume_norm,
                wandb_run_id=self.tracker.run_id, eval_before=self.eval_before,
                consecutive_skips=self.consecutive_skips,
                extra={"signature": run_signature(self.cfg.algorithm.uses_critic, self.model_path),
                       "data": data_fingerprint(self.collector.sampler.prompts)})
            path = self.checkpoints.commit(tmp, step, state, ranks, self.model_path)
        except BaseException:
            self.checkpoints.abort(tmp)
            raise
        log.info("checkpoint step %d written to %s in %.1f s", step, path, time.perf_counter() - started)
        return path

    def restore(self, path: Path) -> int:
        """Continue from a checkpoint: learner state, then the rollout workers get its weights."""
        driver, ranks = read_checkpoint(path)
        lr_change = self.learner.load_checkpoint(str(path.resolve() / "learner"), ranks)
        if lr_change is not None:
            log.warning("%s", lr_change)
        if driver.version > 0:
            self.push_weights(version=driver.version)
        self.collector.sampler.state = SamplerState(epoch=driver.sampler_epoch, position=driver.sampler_position)
        self.resume_sampler = replace(self.collector.sampler.state)
        self.restore_kl(driver.kl_controller, driver.step)
        if self.collector.reward_norm is not None and driver.reward_normalizer is not None:
            self.collector.reward_norm.load_state_dict(driver.reward_normalizer)
            self.resume_norm = self.collector.reward_norm.state_dict()
        self.eval_before = driver.eval_before
        self.consecutive_skips = driver.consecutive_skips
        log.info("resumed from %s at step %d (policy version %d)", path, driver.step, driver.version)
        return driver.step

    def restore_kl(self, saved: dict[str, float | bool], step: int) -> None:
        """The KL coefficient on resume: a fixed one is the config's, an adaptive one continues
        from the checkpoint's adapted value under the configured target and horizon."""
        if self.cfg.algorithm.kl_target is None:  # a setting, not state: a run resumed with KL on trains with it
            if self.kl_ctl.coef != saved["coef"]:
                log.warning("algorithm.kl_coef=%g applies from step %d on; the checkpoint's run used %g",
                            self.kl_ctl.coef, step, saved["coef"])
            return
        self.kl_ctl.load_state_dict(saved)
        if self.kl_ctl.coef != saved["coef"]:
            log.info("algorithm.kl_target: the checkpoint has no adapted KL coefficient (its run's was fixed at %g); "
                     "it adapts from algorithm.kl_coef=%g", saved["coef"], self.kl_ctl.coef)

    def guard_against_divergence(self, step: int, metrics: dict[str, float]) -> None:
        """Count steps whose update was skipped for a non-finite loss/gradient; stop after N."""
        skipped = int(metrics.get("policy/skipped_updates", 0))
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:  # each time, not only at the limit: a run that skips every other step never reaches it
            log.warning("step %d: %d optimizer step(s) skipped, their loss or gradient not finite (%d step(s) in a "
                        "row; the run stops at trainer.max_skipped_updates=%d)", step, skipped,
                        self.consecutive_skips, self.cfg.trainer.max_skipped_updates)
        if self.consecutive_skips >= self.cfg.trainer.max_skipped_updates:
            path = self.save(step)
            raise TrainingDiverged(f"{self.consecutive_skips} steps in a row produced a non-finite loss or "
                                   f"gradient (updates skipped); stopped after writing {path}")

    def push_weights(self, version: int) -> dict[str, float]:
        t = time.perf_counter()
        transport = weight_transport(self.cfg.rollout.weight_transport, alive_nodes(), self.cfg.rollout.autoscale)
        nbytes, update_ref = self.learner.export_weights(version, transport)
        exported = time.perf_counter()
        # Every worker must hold version N+1 before the next generate: samples are then
        # on-policy and each records the version that produced it. A worker that died in the
        # meantime has no report: its replacement loads this update before it serves.
        reports = self.rollout.load_weights(update_ref)
        self.version = version
        return {"timing/weight_export": exported - t,
                "timing/weight_load_max": max((r.load_seconds for r in reports), default=0.0),
                "sync/megabytes": nbytes / 1e6, "sync/version": float(version),
                "sync/workers_loaded": float(len(reports)), "sync/shared_memory": float(transport == "shared_memory")}

    def evaluate(self, step: int, into: dict[str, float] | None = None) -> float | None:
        """Greedy accuracy on the held-out prompts, judged by `cfg.eval_judge()` (None without eval
        prompts); its metrics are logged, or added to ``into`` (a step's metrics) when given."""
        if not self.eval_prompts:
            return None
        greedy = replace(self.collector.sampling, temperature=0.0, samples_per_prompt=1)
        with self.phase("eval"):
            rollouts = self.rollout.generate(self.eval_prompts, greedy, step=step, seed=self.cfg.run.seed)
        verdicts = [self.eval_judge(r.prompt_text, r.response_text, r.answer) for r in rollouts]
        accuracy = sum(v is not None and v > 0 for v in verdicts) / len(rollouts)
        failures = sum(v is None for v in verdicts)
        if failures:  # counted as wrong, and said so: the accuracy is a lower bound
            log.warning("step %d: the eval judge %s failed on %d of %d answers (counted wrong), e.g. %s", step,
                        self.eval_judge.spec, failures, len(rollouts), self.eval_judge.last_error)
        metrics = {"eval/accuracy": accuracy, "eval/judge_failures": float(failures)}
        if into is not None:
            into.update(metrics)
        else:
            self.tracker.log(step, metrics)
        return accuracy
