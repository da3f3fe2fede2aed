"""The acting half of a step: draw prompts, generate, score, shape — one ``Batch``.

Runs on the driver's main thread in synchronous mode, and on a background thread in
asynchronous mode (while the learner trains on the previous batch); it touches only the
sampler, the rollout and reward pools and its own state, never the learner.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from actors.types import Rollout, SamplingSettings
from cluster.config import Config
from cluster.data import PromptSampler, SamplerState
from cluster.pools import RewardPool, RolloutPool
from learner.advantages import filter_uniform_groups, masked_mean, overlong_penalty
from learner.batch import RolloutBatch
from learner.kl_control import RunningMeanStd
from reward.types import ScoreRequest

log = logging.getLogger("rlrelay")


class RewardFailure(RuntimeError):
    """A sample could not be scored and ``reward.on_failure`` is ``error``."""


def group_ids(rollouts: list[Rollout]) -> torch.Tensor:
    """Which prompt group each sample belongs to: its slot in the step's batch.  # [B]"""
    return torch.tensor([r.slot for r in rollouts])


def rollout_metrics(rollouts: list[Rollout], batch: RolloutBatch, old_logprobs: torch.Tensor,
                    version: int) -> dict[str, float]:
    """What the step's samples were: lengths, truncation, the policy versions that drew them
    (the learner holds ``version``), and how far the engine's log-probs are from the learner's."""
    mask = batch.response_mask
    gap = (old_logprobs - batch.rollout_logprobs).abs()
    # For samples of the learner's current version the old log-probs come from the weights
    # that sampled: any gap is train/inference mismatch (DESIGN: ~1e-6 in fp32 when the
    # traps are handled). For older samples (asynchronous mode) the gap is mostly how far
    # the policy has moved since, so it is logged apart and cannot hide a mismatch.
    current = torch.tensor([r.policy_version == version for r in rollouts])
    split = {}
    if current.any():
        split["rollout/logprob_mismatch"] = float(masked_mean(gap[current], mask[current]))
    if not current.all():
        split["rollout/logprob_drift"] = float(masked_mean(gap[~current], mask[~current]))
    versions = [r.policy_version for r in rollouts]
    return {
        **split,
        "rollout/response_length": float(mask.sum(1).float().mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/policy_version": float(min(versions)),
        "rollout/policy_version_max": float(max(versions)),
        "rollout/samples": float(len(rollouts)),
        # Versions between the samples and the learner that trains on them (0 when on-policy).
        "rollout/staleness_max": float(version - min(versions)),
        "rollout/staleness_mean": version - sum(versions) / len(versions),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """One step's scored samples.

    Example: ``Batch(step=3, rollouts=[...], scores=torch.zeros(512), metrics={...}, sampler_before=s,
    reward_norm_before=None, finished_at=t)``
    """

    step: int
    """Training step the batch is for (0-based)."""
    rollouts: list[Rollout]
    """The samples kept for training, grouped by slot."""
    scores: torch.Tensor
    """Shaped (and, if configured, normalised) reward of each kept sample.  # [B]"""
    metrics: dict[str, float]
    """``reward/*``, ``rollout/filtered_groups``, ``timing/generate``, ``timing/score``, ..."""
    sampler_before: SamplerState
    """Data position before this batch's prompts were drawn: where a resume re-draws them."""
    reward_norm_before: dict | None
    """The reward normaliser's state before this batch updated it (None without
    ``algorithm.normalize_rewards``): what a checkpoint taken while the batch is in flight keeps,
    so the regenerated batch is not counted twice."""
    finished_at: float
    """``time.perf_counter()`` when generation and scoring ended (for rollout idle time)."""


def check_complete(rollouts: list[Rollout], slots: range, per: int, step: int) -> None:
    """Every (slot, sample) a generate call was asked for came back, once: a pool that lost or
    doubled work while replacing workers must stop the run, not train on a skewed batch."""
    keys = [(r.slot, r.sample_index) for r in rollouts]
    want = {(slot, i) for slot in slots for i in range(per)}
    missing, extra = want - set(keys), set(keys) - want
    doubled = len(keys) - len(set(keys))
    if missing or extra or doubled:
        example = sorted(missing or extra or {k for k, n in Counter(keys).items() if n > 1})[:3]
        raise RuntimeError(f"step {step}: generation returned {len(keys)} samples for {len(want)} asked: "
                           f"{len(missing)} missing, {len(extra)} not asked for, {doubled} twice"
                           + (f" (e.g. (slot, sample) {example})" if example else ""))


class Collector:
    """Turns the next prompts of the dataset into a scored ``Batch``."""

    def __init__(self, cfg: Config, sampler: PromptSampler, rollout: RolloutPool, reward: RewardPool) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.rollout = rollout
        self.reward = reward
        r = cfg.rollout
        self.sampling = SamplingSettings(temperature=r.temperature, max_new_tokens=r.max_new_tokens,
                                         samples_per_prompt=r.samples_per_prompt, stop=tuple(r.stop))
        self.reward_norm = RunningMeanStd() if cfg.algorithm.normalize_rewards else None
        self.messages = {p.index: p.messages for p in sampler.prompts if p.messages is not None}
        """Chat turns by prompt index, for a reward model that renders them with its own template."""

    def abandon(self) -> None:
        """End a ``collect`` in progress on another thread within a second or so (it raises
        ``actor_set.Abandoned``), and any later one: the driver is failing on another error."""
        for pool in (self.rollout, self.reward):
            pool.actors.abandon()

    def collect(self, step: int) -> Batch:
        """Generate and score a step's batch; with dynamic sampling, keep only prompt groups
        whose rewards differ and refill with new prompts, for a bounded number of rounds."""
        algo, want, per = self.cfg.algorithm, self.cfg.rollout.prompts_per_step, self.sampling.samples_per_prompt
        sampler_before = replace(self.sampler.state)
        norm_before = self.reward_norm.state_dict() if self.reward_norm is not None else None
        timings: dict[str, float] = {}
        rollouts: list[Rollout] = []
        scores: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []
        penalties: list[torch.Tensor] = []  # what reward shaping added to each generated sample
        filtered, rounds, issued, failures, dropped, failed_kept, truncated = 0, 0, 0, 0, 0, 0, 0
        while True:
            with _timed(timings, "generate"):
                prompts = self.sampler.next_batch(want - len(rollouts) // per)
                # Refills take fresh slots, so every sample of the step keeps its own seed.
                new = self.rollout.generate(prompts, self.sampling, step=step, seed=self.cfg.run.seed,
                                            first_slot=issued)
                # Exactly once, whatever workers died; rounds take disjoint slots, so across
                # the step too.
                check_complete(new, range(issued, issued + len(prompts)), per, step)
                issued += len(prompts)
            with _timed(timings, "score"):
                new_scores, failed, cut = self.score(new, step)
                failures += int(failed.sum())
                truncated += cut
            if self.cfg.reward.on_failure == "drop" and failed.any():
                # A failed sample has no score, and any number put in its place is a reward
                # (0 beats a wrong answer's -1): its whole group goes, as a filtered one does.
                groups = group_ids(new)
                keep = ~torch.isin(groups, groups[failed])
                dropped += len(set(groups[failed].tolist()))
                new, new_scores, failed = [r for r, k in zip(new, keep.tolist()) if k], new_scores[keep], failed[keep]
            raw.append(new_scores)
            shaped = self.shape(new_scores, new)
            penalties.append(shaped - new_scores)
            new_scores = shaped
            if algo.dynamic_sampling and new:
                keep = filter_uniform_groups(new_scores, group_ids(new))
                filtered += int((~keep).sum()) // per
                new = [r for r, k in zip(new, keep.tolist()) if k]
                new_scores, failed = new_scores[keep], failed[keep]
            failed_kept += int(failed.sum())
            rollouts += new
            scores.append(new_scores)
            rounds += 1
            if not algo.dynamic_sampling or len(rollouts) >= want * per or rounds > algo.dynamic_sampling_max_rounds:
                break
        all_raw = torch.cat(raw)
        scores_t = torch.cat(scores)
        # Only a batch the learner will train on counts in the running statistics: one smaller
        # than the learner group is skipped (Controller.learn).
        if self.reward_norm is not None and len(scores_t) >= self.cfg.learner.world_size:
            self.reward_norm.update(scores_t)
            scores_t = self.reward_norm.normalize(scores_t)
        metrics = {"reward/mean": float(all_raw.mean()) if len(all_raw) else 0.0,
                   "reward/std": float(all_raw.std(unbiased=False)) if len(all_raw) else 0.0,
                   "reward/failures": float(failures),
                   # Failed samples left in the batch (reward.on_failure=zero), scored 0.
                   "reward/failed_in_batch": float(failed_kept),
                   "reward/dropped_groups": float(dropped),
                   # Texts the reward model saw only the end of (they filled reward.model.max_length).
                   "reward/model_truncated": float(truncated),
                   # DAPO's overlong penalty, averaged over every generated sample (0 when off).
                   "reward/overlong_penalty_mean": float(torch.cat(penalties).mean()) if len(all_raw) else 0.0,
                   "rollout/filtered_groups": float(filtered),
                   "rollout/generation_rounds": float(rounds),
                   # Identifies the prompts a step trained on: equal between runs that see the same data.
                   "data/prompt_index_sum": float(sum(r.prompt_index for r in rollouts if r.sample_index == 0)),
                   **{f"timing/{k}": v for k, v in timings.items()}}
        return Batch(step=step, rollouts=rollouts, scores=scores_t, metrics=metrics, sampler_before=sampler_before,
                     reward_norm_before=norm_before, finished_at=time.perf_counter())

    def score(self, rollouts: list[Rollout], step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rewards of the rollouts, which failed (bool ``[B]``), and how many texts the reward
        model saw only the end of: with ``reward.on_failure``
        ``error`` a failure stops the run, else it scores 0 here (``drop`` then drops its group)
        and is logged with its reasons (the metric only counts them)."""
        requests = [ScoreRequest(prompt=r.prompt_text, response=r.response_text, answer=r.answer,
                                 messages=self.messages.get(r.prompt_index)) for r in rollouts]
        results = self.reward.score(requests)
        failed = [(r, s) for r, s in zip(rollouts, results) if s.failed]
        if failed and self.cfg.reward.on_failure == "error":
            # Workers stop scoring a batch at its first failure: name a real one.
            r, s = next(((r, s) for r, s in failed if not s.error.startswith("not scored")), failed[0])
            raise RewardFailure(f"a sample could not be scored: prompt {r.prompt_index} sample {r.sample_index}: "
                                f"{s.error} (set reward.on_failure=drop to count such samples and leave their "
                                f"prompt's group out of the batch instead)")
        if failed:
            reasons = Counter(s.error for _, s in failed)
            common = reasons.most_common(3)
            log.warning("step %d: %d of %d samples could not be scored (reward.on_failure=%s): %s", step,
                        len(failed), len(rollouts), self.cfg.reward.on_failure,
                        "; ".join(f"{n} x {why}" for why, n in common)
                        + (f"; and {len(reasons) - 3} other reason(s)" if len(reasons) > 3 else ""))
        return (torch.tensor([0.0 if s.failed else s.reward for s in results]),
                torch.tensor([s.failed for s in results], dtype=torch.bool), sum(s.truncated for s in results))

    def shape(self, scores: torch.Tensor, rollouts: list[Rollout]) -> torch.Tensor:
        """DAPO's soft overlong penalty, when configured."""
        algo = self.cfg.algorithm
        if not algo.overlong_buffer:
            return scores
        lengths = torch.tensor([len(r.response_token_ids) for r in rollouts])
        return scores + overlong_penalty(lengths, self.sampling.max_new_tokens, algo.overlong_buffer,
                                         algo.overlong_penalty)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
