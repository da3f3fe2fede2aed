"""The controller: one driver process runs the PPO loop; workers do the computation.

```
  PromptSampler ──prompts──▶ RolloutPool (N × vLLM) ──rollouts──▶ RewardPool (M) ──scores──┐
        ▲                          ▲                                                     │
        │                          │ WeightUpdate vN+1 (object store, pulled by every     ▼
        │                          │ worker, version + CRC checked)        collate → LearnerGroup.forward
        │                          │                                       (old/ref log-probs, values)
        │                   LearnerGroup.export_weights ◀── LearnerGroup.update ◀── advantages (here,
        │                                                   (PPO epochs ×           whole batch visible)
   Tracker ◀── metrics ─────────────────────────────────────  minibatches)
```

Every phase is timed (``timing/*``); every wait on a worker has a timeout (in ``pools``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import torch

from actors.types import Prompt, Rollout, SamplingSettings
from cluster.checkpoints import CheckpointManager, DriverState, read_checkpoint
from cluster.config import Config
from cluster.control import JobStatus
from cluster.data import PromptSampler, SamplerState
from cluster.pools import LearnerGroup, RewardPool, RolloutPool
from cluster.tracking import Tracker
from learner.advantages import filter_uniform_groups, masked_mean, overlong_penalty
from learner.batch import TrainBatch, collate
from learner.estimate import estimate_advantages
from learner.kl_control import AdaptiveKLController, FixedKLController, RunningMeanStd
from learner.losses import explained_variance, truncated_importance_weights
from reward.rules import exact_match
from reward.types import ScoreRequest

log = logging.getLogger("rlrelay")


def group_ids(rollouts: list[Rollout]) -> torch.Tensor:
    """Which prompt group each sample belongs to: its slot in the step's batch.  # [B]"""
    return torch.tensor([r.slot for r in rollouts])


class RewardFailure(RuntimeError):
    """A sample could not be scored and ``reward.on_failure`` is ``error``."""


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
    """Held-out exact-match accuracy of the final policy."""


class Controller:
    """Owns the loop; everything it drives is built at launch and passed in."""

    def __init__(self, cfg: Config, *, sampler: PromptSampler, eval_prompts: list[Prompt],
                 rollout: RolloutPool, reward: RewardPool, learner: LearnerGroup, tracker: Tracker,
                 checkpoints: CheckpointManager, model_path: str, pad_token_id: int,
                 control=None, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.control = control  # handle of the job's JobControl actor (rlrelay status / scale)
        self.checkpoints = checkpoints
        self.model_path = model_path
        self.resume_from = resume_from
        self.sampler = sampler
        self.eval_prompts = eval_prompts
        self.rollout = rollout
        self.reward = reward
        self.learner = learner
        self.tracker = tracker
        self.pad_token_id = pad_token_id
        algo = cfg.algorithm
        self.kl_ctl = (AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
                       if algo.kl_target is not None else FixedKLController(algo.kl_coef))
        r = cfg.rollout
        self.sampling = SamplingSettings(temperature=r.temperature, max_new_tokens=r.max_new_tokens,
                                         samples_per_prompt=r.samples_per_prompt, stop=tuple(r.stop))
        self.reward_norm = RunningMeanStd() if algo.normalize_rewards else None
        self.version = 0  # policy version held by the rollout workers
        self.timings: dict[str, float] = {}
        self.eval_before: float | None = None
        self.consecutive_skips = 0

    def run(self) -> RunSummary:
        cfg = self.cfg
        if self.resume_from is not None:
            start = self.restore(self.resume_from)
        else:
            start, self.eval_before = 0, self.evaluate(step=0)
        for step in range(start, cfg.trainer.steps):
            self.timings = {}
            started = time.perf_counter()
            self.apply_scale_request()
            # 1-2. act and score: sample responses from the current policy, reward them
            rollouts, scores, metrics = self.collect(step)
            if len(rollouts) < cfg.learner.world_size:  # dynamic sampling kept (almost) nothing
                self.tracker.log(step + 1, {**metrics, "rollout/skipped_update": 1.0})
                continue
            # 3. old log-probs, reference log-probs and values under the weights that sampled
            batch = collate(rollouts, self.pad_token_id)
            with self.phase("forward"):
                fwd = self.learner.forward(batch)
            # 4. advantages, where the whole batch is visible
            mask = batch.response_mask
            adv = estimate_advantages(cfg.algorithm, scores=scores, group_index=group_ids(rollouts), mask=mask,
                                      old_logprobs=fwd.old_logprobs, ref_logprobs=fwd.ref_logprobs,
                                      values=fwd.values, kl_coef=self.kl_ctl.coef)
            weights = None
            if cfg.algorithm.tis_cap is not None:
                weights, tis_metrics = truncated_importance_weights(
                    fwd.old_logprobs, batch.rollout_logprobs, mask, cfg.algorithm.tis_cap)
                metrics.update(tis_metrics)
            train = TrainBatch(rollouts=batch, old_logprobs=fwd.old_logprobs, advantages=adv.advantages,
                               returns=adv.returns, old_values=fwd.values,
                               ref_logprobs=fwd.ref_logprobs if cfg.algorithm.kl_place == "loss" else None,
                               importance_weights=weights)
            # 5. PPO epochs over shuffled minibatches (only the critic during its warm-up)
            train_policy = not (cfg.algorithm.uses_critic and step < cfg.algorithm.critic_warmup_steps)
            with self.phase("update"):
                metrics.update(self.learner.update(train, self.minibatch_plan(train.size, step), train_policy))
            # 6. push the new weights to every rollout worker before it samples again
            if train_policy:
                with self.phase("weight_sync"):
                    metrics.update(self.push_weights(version=self.version + 1))
            self.kl_ctl.update(adv.metrics.get("kl/value", 0.0), n_steps=train.size)
            self.timings["step"] = time.perf_counter() - started
            metrics.update({**adv.metrics, **self.rollout_metrics(rollouts, batch, fwd), "kl/coef": self.kl_ctl.coef,
                            **{f"timing/{k}": v for k, v in self.timings.items()},
                            "cluster/worker_restarts": float(self.rollout.restarts + self.reward.restarts),
                            "cluster/rollout_workers": float(len(self.rollout.actors.members)),
                            "throughput/samples_per_s": len(rollouts) / self.timings["step"]})
            if fwd.values is not None:
                metrics["value/explained_variance"] = explained_variance(fwd.values, adv.returns, mask)
            every = cfg.trainer.eval_every
            if every and self.eval_prompts and (step + 1) % every == 0 and step + 1 < cfg.trainer.steps:
                metrics["eval/accuracy"] = self.evaluate(step=step + 1, log=False)
            self.tracker.log(step + 1, metrics)
            if cfg.trainer.sample_table_every and (step + 1) % cfg.trainer.sample_table_every == 0:
                self.tracker.log_samples(step + 1, rollouts, scores.tolist())
            self.publish_status(step + 1, metrics)
            self.guard_against_divergence(step + 1, metrics)
            if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0 and step + 1 < cfg.trainer.steps:
                self.save(step + 1)
        # 7. the end: a last checkpoint, the final policy as a Hugging Face model, evaluation
        self.save(cfg.trainer.steps)
        if cfg.trainer.export_final:
            self.learner.save_pretrained(str(cfg.run.path.resolve() / "final_model"))
        eval_after = self.evaluate(step=cfg.trainer.steps)
        return RunSummary(steps_completed=cfg.trainer.steps, eval_before=self.eval_before, eval_after=eval_after)

    # -- elastic pool and status ----------------------------------------------------------------

    def apply_scale_request(self) -> None:
        """Take a pending ``rlrelay scale`` request at the step boundary."""
        if self.control is None:
            return
        wanted = ray.get(self.control.take_scale_request.remote(), timeout=30)
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
                step=step, version=self.version, sampler_epoch=self.sampler.state.epoch,
                sampler_position=self.sampler.state.position, kl_controller=self.kl_ctl.state_dict(),
                reward_normalizer=self.reward_norm.state_dict() if self.reward_norm else None,
                wandb_run_id=self.tracker.run_id, eval_before=self.eval_before,
                consecutive_skips=self.consecutive_skips)
            path = self.checkpoints.commit(tmp, step, state, ranks, self.model_path)
        except BaseException:
            self.checkpoints.abort(tmp)
            raise
        log.info("checkpoint step %d written to %s in %.1f s", step, path, time.perf_counter() - started)
        return path

    def restore(self, path: Path) -> int:
        """Continue from a checkpoint: learner state, then the rollout workers get its weights."""
        driver, ranks = read_checkpoint(path)
        self.learner.load_checkpoint(str(path.resolve() / "learner"), ranks)
        if driver.version > 0:
            self.push_weights(version=driver.version)
        self.sampler.state = SamplerState(epoch=driver.sampler_epoch, position=driver.sampler_position)
        self.kl_ctl.load_state_dict(driver.kl_controller)
        if self.reward_norm is not None and driver.reward_normalizer is not None:
            self.reward_norm.load_state_dict(driver.reward_normalizer)
        self.eval_before = driver.eval_before
        self.consecutive_skips = driver.consecutive_skips
        log.info("resumed from %s at step %d (policy version %d)", path, driver.step, driver.version)
        return driver.step

    def guard_against_divergence(self, step: int, metrics: dict[str, float]) -> None:
        """Count steps whose update was skipped for a non-finite loss/gradient; stop after N."""
        self.consecutive_skips = self.consecutive_skips + 1 if metrics.get("policy/skipped_updates") else 0
        if self.consecutive_skips >= self.cfg.trainer.max_skipped_updates:
            path = self.save(step)
            raise TrainingDiverged(f"{self.consecutive_skips} steps in a row produced a non-finite loss or "
                                   f"gradient (updates skipped); stopped after writing {path}")

    # -- the phases ------------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def collect(self, step: int) -> tuple[list[Rollout], torch.Tensor, dict[str, float]]:
        """Generate and score a step's batch; with dynamic sampling, keep only prompt groups
        whose rewards differ and refill with new prompts, for a bounded number of rounds."""
        algo, want = self.cfg.algorithm, self.cfg.rollout.prompts_per_step
        rollouts: list[Rollout] = []
        scores: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []
        filtered, rounds, issued, failures = 0, 0, 0, 0
        while True:
            with self.phase("generate"):
                prompts = self.sampler.next_batch(want - len(rollouts) // self.sampling.samples_per_prompt)
                # Refills take fresh slots, so every sample of the step keeps its own seed.
                new = self.rollout.generate(prompts, self.sampling, step=step, seed=self.cfg.run.seed,
                                            first_slot=issued)
                issued += len(prompts)
            with self.phase("score"):
                new_scores, failed = self.score(new)
                failures += failed
            raw.append(new_scores)
            new_scores = self.shape(new_scores, new)
            if algo.dynamic_sampling:
                keep = filter_uniform_groups(new_scores, group_ids(new))
                filtered += int((~keep).sum()) // self.sampling.samples_per_prompt
                new = [r for r, k in zip(new, keep.tolist()) if k]
                new_scores = new_scores[keep]
            rollouts += new
            scores.append(new_scores)
            rounds += 1
            if not algo.dynamic_sampling or len(rollouts) >= want * self.sampling.samples_per_prompt \
                    or rounds > algo.dynamic_sampling_max_rounds:
                break
        # Exactly once: every (slot, sample) of the step appears once, whatever workers died.
        keys = [(r.slot, r.sample_index) for r in rollouts]
        if len(set(keys)) != len(keys):
            raise RuntimeError(f"step {step}: duplicate samples in the batch ({len(keys) - len(set(keys))})")
        all_raw = torch.cat(raw)
        metrics = {"reward/mean": float(all_raw.mean()), "reward/std": float(all_raw.std(unbiased=False)),
                   "reward/failures": float(failures), "rollout/filtered_groups": float(filtered),
                   "rollout/generation_rounds": float(rounds)}
        scores_t = torch.cat(scores)
        if self.reward_norm is not None and len(scores_t):
            self.reward_norm.update(scores_t)
            scores_t = self.reward_norm.normalize(scores_t)
        return rollouts, scores_t, metrics

    def score(self, rollouts: list[Rollout]) -> tuple[torch.Tensor, int]:
        """Rewards of the rollouts and how many failed (failures score 0 or stop the run)."""
        requests = [ScoreRequest(prompt=r.prompt_text, response=r.response_text, answer=r.answer)
                    for r in rollouts]
        results = self.reward.score(requests)
        failed = [(r, s) for r, s in zip(rollouts, results) if s.failed]
        if failed and self.cfg.reward.on_failure == "error":
            r, s = failed[0]
            raise RewardFailure(f"{len(failed)} sample(s) could not be scored; first: prompt {r.prompt_index} "
                                f"sample {r.sample_index}: {s.error} (set reward.on_failure=zero to count "
                                f"and score them 0 instead)")
        return torch.tensor([0.0 if s.failed else s.reward for s in results]), len(failed)

    def shape(self, scores: torch.Tensor, rollouts: list[Rollout]) -> torch.Tensor:
        """DAPO's soft overlong penalty, when configured."""
        algo = self.cfg.algorithm
        if not algo.overlong_buffer:
            return scores
        lengths = torch.tensor([len(r.response_token_ids) for r in rollouts])
        return scores + overlong_penalty(lengths, self.sampling.max_new_tokens, algo.overlong_buffer,
                                         algo.overlong_penalty)

    def minibatch_plan(self, size: int, step: int) -> list[torch.Tensor]:
        """Row indices of every optimizer step: epochs × shuffled minibatches, seeded by the step.

        A batch shrunk by dynamic sampling gets fewer minibatches, so every learner rank
        still has at least one row of each."""
        g = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + step)
        parts = max(1, min(self.cfg.algorithm.minibatches, size // self.cfg.learner.world_size))
        plan = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            plan.extend(torch.randperm(size, generator=g).tensor_split(parts))
        return plan

    def push_weights(self, version: int) -> dict[str, float]:
        t = time.perf_counter()
        update_ref = self.learner.export_weights(version)
        exported = time.perf_counter()
        # Every worker must hold version N+1 before the next generate: samples are then
        # on-policy and each records the version that produced it.
        reports = self.rollout.load_weights(update_ref)
        self.version = version
        return {"timing/weight_export": exported - t, "timing/weight_load_max": max(r.load_seconds for r in reports),
                "sync/megabytes": reports[0].nbytes / 1e6, "sync/version": float(version)}

    def rollout_metrics(self, rollouts: list[Rollout], batch, fwd) -> dict[str, float]:
        mask = batch.response_mask
        lengths = mask.sum(1)
        return {
            # Old log-probs are the learner's for the same weights that sampled: any gap is
            # train/inference mismatch (DESIGN: ~1e-6 in fp32 when the traps are handled).
            "rollout/logprob_mismatch": float(masked_mean((fwd.old_logprobs - batch.rollout_logprobs).abs(), mask)),
            "rollout/response_length": float(lengths.mean()),
            "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "rollout/policy_version": float(min(r.policy_version for r in rollouts)),
            "rollout/policy_version_max": float(max(r.policy_version for r in rollouts)),
            "rollout/samples": float(len(rollouts)),
        }

    def evaluate(self, step: int, log: bool = True) -> float | None:
        """Greedy exact-match accuracy on the held-out prompts (None without eval prompts)."""
        if not self.eval_prompts:
            return None
        greedy = replace(self.sampling, temperature=0.0, samples_per_prompt=1)
        with self.phase("eval"):
            rollouts = self.rollout.generate(self.eval_prompts, greedy, step=step, seed=self.cfg.run.seed)
        accuracy = sum(exact_match(r.prompt_text, r.response_text, r.answer) for r in rollouts) / len(rollouts)
        if log:
            self.tracker.log(step, {"eval/accuracy": accuracy})
        return accuracy
