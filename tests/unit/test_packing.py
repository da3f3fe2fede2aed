"""Packed rows (``learner.pack_sequences``): the layout, and attention within each row checked
against a naive masked softmax over the whole packed sequence."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.packing import PACKED_ATTENTION, check_packable, pack_rows, packed_attention


def _padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(1, len(lengths) * width + 1).view(len(lengths), width)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_rows_pack_their_real_tokens_with_positions_restarting_at_each_row():
    ids, mask = _padded([3, 1, 2], width=4)
    rows = pack_rows(ids, mask)
    assert rows.input_ids.tolist() == [[1, 2, 3, 5, 9, 10]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert rows.starts.tolist() == [0, 3, 4, 6] and rows.starts.dtype == torch.int32
    assert rows.max_length == 3
    # Position 2 of row 0, 0 of row 1, 1 of row 2 in the packed row:
    assert rows.flat_index(torch.tensor([[2], [0], [1]])).tolist() == [[2], [3], [5]]
    assert rows.attention_kwargs()["max_length_q"] == 3


def test_left_padded_or_empty_rows_are_refused():
    ids, mask = _padded([3, 2], width=3)
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, mask.flip(1))
    with pytest.raises(ValueError, match="no tokens"):
        pack_rows(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))


def _naive_block_causal(q, k, v, lengths, scale):
    """softmax(q k^T * scale + mask) v over the whole packed row, the mask keeping each query to
    its own row's earlier tokens; key/value heads repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = row.numel()
    allowed = (row[:, None] == row[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(1, 2)  # [1, N, Hq, D]


def test_packed_attention_keeps_each_row_to_itself_with_grouped_queries():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3]
    n = sum(lengths)
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    starts = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    out, weights = packed_attention(nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=starts, max_length_q=5)
    ref = _naive_block_causal(q, k, v, lengths, 0.3)
    assert weights is None and out.shape == (1, n, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    coef = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * coef).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * coef).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sliding_windows_and_attention_dropout_are_refused_by_name():
    q = k = v = torch.zeros(1, 2, 4, 8)
    starts = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="pack_sequences=false"):
        packed_attention(nn.Module(), q, k, v, None, cu_seq_lens_q=starts, sliding_window=2)
    with pytest.raises(ValueError, match="pack_sequences=false"):
        packed_attention(nn.Module(), q, k, v, None, dropout=0.1, cu_seq_lens_q=starts)


def test_a_packed_model_runs_padded_batches_as_sdpa_and_saves_a_config_vllm_can_read(tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation=PACKED_ATTENTION)
    # A config of its own: from_config records the attention choice on the config it is given.
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float64, attn_implementation="sdpa")
    plain.load_state_dict(packed.state_dict())
    ids, mask = _padded([6, 2], width=6)
    ids = ids % 64
    real = mask.bool()
    want = plain(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits[real], want)
    rows = pack_rows(ids, mask)
    got = packed(input_ids=rows.input_ids, position_ids=rows.position_ids, **rows.attention_kwargs()).logits[0]
    torch.testing.assert_close(got, want)
    assert packed.config._attn_implementation == PACKED_ATTENTION
    packed.save_pretrained(tmp_path)
    assert PACKED_ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_a_model_whose_attention_bypasses_the_interface_is_refused_by_name():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)

    class OwnAttention(Qwen2ForCausalLM):  # as a model class that computes attention itself declares
        _supports_attention_backend = False

    check_packable(Qwen2ForCausalLM(config))
    with pytest.raises(ValueError, match="OwnAttention.*pack_sequences=false"):
        check_packable(OwnAttention(config))
