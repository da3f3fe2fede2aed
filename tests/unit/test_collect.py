"""The collector's check that a generate call returned every sample it asked for, once."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest

from actors.types import Rollout
from cluster.collect import check_complete


def rollout(slot: int, sample: int) -> Rollout:
    return Rollout(prompt_index=slot, slot=slot, sample_index=sample, prompt_text="p", answer=None,
                   prompt_token_ids=(1,), response_token_ids=(2,), response_logprobs=(-0.5,),
                   response_text="r", finish_reason="stop", policy_version=0)


def test_a_complete_call_passes_in_any_order():
    got = [rollout(slot, i) for slot in (5, 4, 3) for i in (1, 0)]
    check_complete(got, range(3, 6), per=2, step=1)


@pytest.mark.parametrize("got, message", [
    ([rollout(3, 0), rollout(3, 1), rollout(4, 0)],
     r"step 7: generation returned 3 samples for 4 asked: 1 missing, 0 not asked for, 0 twice "
     r"\(e.g. \(slot, sample\) \[\(4, 1\)\]\)"),
    ([rollout(3, 0), rollout(3, 1), rollout(4, 0), rollout(4, 1), rollout(5, 0)], "0 missing, 1 not asked for, 0 twice"),
    ([rollout(3, 0), rollout(3, 1), rollout(4, 0), rollout(4, 0)], "1 missing, 0 not asked for, 1 twice"),
    # Complete but for the duplicate: only the doubling check can refuse it.
    ([rollout(3, 0), rollout(3, 1), rollout(4, 0), rollout(4, 1), rollout(4, 1)],
     r"5 samples for 4 asked: 0 missing, 0 not asked for, 1 twice \(e.g. \(slot, sample\) \[\(4, 1\)\]\)"),
])
def test_a_lost_extra_or_doubled_sample_stops_the_step(got, message):
    with pytest.raises(RuntimeError, match=message):
        check_complete(got, range(3, 5), per=2, step=7)


# -- Collector.collect with stand-in pools: which samples and scores make the batch ----------

from actors.types import Prompt  # noqa: E402
from cluster.collect import Collector  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.data import PromptSampler  # noqa: E402
from reward.types import ScoreResult  # noqa: E402


class StandInRollout:
    """Sample k of every prompt answers ``answers[k]``; every sample of a prompt whose index is
    in ``failing`` answers "boom"."""

    def __init__(self, answers: list[str], failing: set[int]) -> None:
        self.answers, self.failing = answers, failing

    def generate(self, prompts, sampling, step, seed, first_slot=0):
        return [Rollout(prompt_index=p.index, slot=first_slot + i, sample_index=k, prompt_text=p.text or "chat", answer=p.answer,
                        prompt_token_ids=(1,), response_token_ids=(2,), response_logprobs=(-0.5,),
                        response_text="boom" if p.index in self.failing else self.answers[k], finish_reason="stop",
                        policy_version=0)
                for i, p in enumerate(prompts) for k in range(sampling.samples_per_prompt)]


class StandInReward:
    """+1 right, -1 wrong; a response "boom" fails (as a timed-out call does)."""

    def score(self, requests):
        return [ScoreResult(reward=float("nan"), components=(), error="timed out") if r.response == "boom"
                else ScoreResult(reward=1.0 if r.response == r.answer else -1.0, components=()) for r in requests]


def collector(answers: list[str], *overrides: str, prompts: int = 40, failing: frozenset = frozenset()) -> Collector:
    cfg = load_config(None, ["rollout.prompts_per_step=4", f"rollout.samples_per_prompt={len(answers)}", *overrides])
    dataset = [Prompt(index=i, text=f"{i}+0=", answer="ok") for i in range(prompts)]
    return Collector(cfg, PromptSampler(dataset, seed=0), StandInRollout(answers, set(failing)), StandInReward())


def test_a_failed_sample_scored_zero_would_outrank_the_wrong_answers_of_its_group():
    """What reward.on_failure=zero does (documented, not neutral): kept for comparison with drop."""
    batch = collector(["no", "no", "no", "boom"], "reward.on_failure=zero").collect(step=1)
    assert batch.scores.tolist() == [-1.0, -1.0, -1.0, 0.0] * 4
    assert batch.metrics["reward/failures"] == batch.metrics["reward/failed_in_batch"] == 4


def test_why_samples_could_not_be_scored_is_logged_not_only_counted(caplog):
    # The metric counted failures; their reasons (a verifier down, a timeout) were thrown away.
    with caplog.at_level(logging.WARNING, logger="rlrelay"):
        collector(["no", "no", "no", "boom"], "reward.on_failure=drop").collect(step=7)
    assert "step 7: 4 of 16 samples could not be scored (reward.on_failure=drop): 4 x timed out" in caplog.text


def test_drop_leaves_out_the_group_of_a_failed_sample_and_counts_it():
    batch = collector(["no", "no", "no", "boom"], "reward.on_failure=drop").collect(step=1)
    assert batch.rollouts == [] and len(batch.scores) == 0
    assert batch.metrics["reward/failures"] == 4 and batch.metrics["reward/dropped_groups"] == 4
    assert batch.metrics["reward/failed_in_batch"] == 0
    assert all(math.isfinite(v) for v in batch.metrics.values())  # an empty batch logs numbers, not NaN


def test_drop_under_dynamic_sampling_refills_and_keeps_failures_out_of_the_normaliser():
    """Every group has a right answer and a failure: dropped, refilled, dropped again, up to
    the round limit. The normaliser counts nothing (nothing was kept), and a batch smaller than
    the learner group would not count either."""
    c = collector(["ok", "no", "boom"], "reward.on_failure=drop", "algorithm.dynamic_sampling=true",
                  "algorithm.dynamic_sampling_max_rounds=2", "algorithm.normalize_rewards=true")
    batch = c.collect(step=1)
    assert batch.rollouts == [] and batch.metrics["rollout/generation_rounds"] == 3
    assert batch.metrics["reward/dropped_groups"] == 12 and batch.metrics["rollout/filtered_groups"] == 0
    assert c.reward_norm.state_dict()["count"] == 0


def test_the_normaliser_counts_only_a_batch_the_learner_trains_on():
    c = collector(["ok", "no"], "algorithm.normalize_rewards=true", "learner.world_size=2")
    c.collect(step=1)
    assert c.reward_norm.state_dict()["count"] == 8  # 4 prompts x 2 samples
    # Three of the four prompts fail and are dropped: 2 samples left for 4 ranks, a step the
    # learner skips, so its scores must not count.
    small = collector(["ok", "no"], "algorithm.normalize_rewards=true", "learner.world_size=4",
                      "reward.on_failure=drop", prompts=4, failing=frozenset({1, 2, 3}))
    batch = small.collect(step=1)
    assert len(batch.rollouts) == 2 and batch.metrics["reward/dropped_groups"] == 3
    assert small.reward_norm.state_dict()["count"] == 0


def test_texts_the_reward_model_saw_only_the_end_of_are_counted():
    class Truncating(StandInReward):
        def score(self, requests):
            return [dataclasses.replace(r, truncated=True) if q.response == "long" else r
                    for q, r in zip(requests, super().score(requests))]

    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2"])
    dataset = [Prompt(index=i, text=f"{i}+0=", answer="ok") for i in range(8)]
    batch = Collector(cfg, PromptSampler(dataset, seed=0), StandInRollout(["ok", "long"], set()), Truncating()).collect(step=1)
    assert batch.metrics["reward/model_truncated"] == 4


def test_a_chat_prompts_turns_reach_the_reward_workers():
    from actors.types import ChatMessage

    seen = []

    class Recording(StandInReward):
        def score(self, requests):
            seen.extend(requests)
            return super().score(requests)

    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2"])
    turns = {i: (ChatMessage(role="user", content=f"{i}+0"),) for i in range(2)}
    dataset = [Prompt(index=0, messages=turns[0], answer="ok"), Prompt(index=1, text="1+0=", answer="ok")]
    Collector(cfg, PromptSampler(dataset, seed=0), StandInRollout(["ok", "no"], set()), Recording()).collect(step=1)
    assert len(seen) == 4
    assert all(r.messages == (turns[0] if r.prompt == "chat" else None) for r in seen)
    assert sum(r.messages is not None for r in seen) == 2


# -- rollout_metrics: the samples' versions and the engine/learner log-prob gap ---------------

from cluster.collect import rollout_metrics  # noqa: E402
from learner.batch import collate  # noqa: E402


def test_rollout_metrics_keep_mismatch_of_current_samples_apart_from_drift_of_stale_ones():
    import torch

    engine = [(-0.5, -1.0), (-2.0,), (-0.25, -0.75, -1.5)]  # response log-probs as the engine drew them
    versions, reasons = [3, 3, 2], ["stop", "length", "length"]
    rollouts = [Rollout(prompt_index=i, slot=i, sample_index=0, prompt_text="p", answer=None, prompt_token_ids=(1, 2),
                        response_token_ids=tuple(range(3, 3 + len(lp))), response_logprobs=lp, response_text="r",
                        finish_reason=reasons[i], policy_version=versions[i])
               for i, lp in enumerate(engine)]
    learner = [(-0.5, -1.5), (-1.0,), (-0.25, -0.5, -2.0)]
    old = torch.zeros(3, 3)
    for i, lp in enumerate(learner):
        old[i, :len(lp)] = torch.tensor(lp)
    got = rollout_metrics(rollouts, collate(rollouts, pad_token_id=0), old, version=3)
    gaps = [[abs(a - b) for a, b in zip(e, l)] for e, l in zip(engine, learner)]
    current = [g for g, v in zip(gaps, versions) if v == 3]
    assert got["rollout/logprob_mismatch"] == pytest.approx(sum(map(sum, current)) / sum(map(len, current)))
    assert got["rollout/logprob_drift"] == pytest.approx(sum(gaps[2]) / 3)
    assert got["rollout/response_length"] == pytest.approx(2.0)
    assert got["rollout/truncated_frac"] == pytest.approx(2 / 3)
    assert (got["rollout/policy_version"], got["rollout/policy_version_max"], got["rollout/samples"]) == (2, 3, 3)
    assert got["rollout/staleness_max"] == 1 and got["rollout/staleness_mean"] == pytest.approx(1 / 3)
    # All on the learner's version: no drift is logged, only mismatch.
    on_policy = rollout_metrics(rollouts[:2], collate(rollouts[:2], pad_token_id=0), old[:2, :2], version=3)
    assert "rollout/logprob_drift" not in on_policy and on_policy["rollout/staleness_max"] == 0
