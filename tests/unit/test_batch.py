"""Collation into the sequence and response frames, and row selection."""

import torch

from actors.types import Rollout
from learner.batch import collate, response_positions


def rollout(prompt, response, logprobs):
    return Rollout(prompt_index=0, slot=0, sample_index=0, prompt_text="", answer=None, prompt_token_ids=tuple(prompt),
                   response_token_ids=tuple(response), response_logprobs=tuple(logprobs), response_text="",
                   finish_reason="stop", policy_version=0)


def test_collate_frames_and_positions():
    rs = [rollout([5, 6, 7], [8, 9], [-0.1, -0.2]), rollout([5], [4, 3, 2, 1], [-1.0, -2.0, -3.0, -4.0])]
    b = collate(rs, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 1]]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b.rollout_logprobs[0].tolist() == [-0.1, -0.2, 0.0, 0.0] or torch.allclose(
        b.rollout_logprobs[0], torch.tensor([-0.1, -0.2, 0.0, 0.0]))
    pos = response_positions(b)
    # The logit at position p predicts token p + 1: response token t of row 0 sits at 3 + t.
    assert pos[0, :2].tolist() == [2, 3]
    assert pos[1].tolist() == [0, 1, 2, 3]
    labels = b.input_ids.gather(1, pos + 1)
    assert labels[0, :2].tolist() == [8, 9] and labels[1].tolist() == [4, 3, 2, 1]


def test_select_trims_both_frames():
    rs = [rollout([5, 6, 7], [8, 9], [-0.1, -0.2]), rollout([5], [4, 3, 2, 1], [-1.0, -2.0, -3.0, -4.0])]
    b = collate(rs, pad_token_id=0).select([0])
    assert b.input_ids.shape == (1, 5) and b.response_mask.shape == (1, 2)
