"""The collector's check that a generate call returned every sample it asked for, once."""

from __future__ import annotations

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
])
def test_a_lost_extra_or_doubled_sample_stops_the_step(got, message):
    with pytest.raises(RuntimeError, match=message):
        check_complete(got, range(3, 5), per=2, step=7)
