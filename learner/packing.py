"""Padding-free forward passes (``learner.pack_sequences``): a micro-batch's rows run as one
sequence of their real tokens, ``[1, N]`` with ``N`` the sum of row lengths, and attention is
kept inside each row.

A padded micro-batch ``[B, L]`` computes every block on ``B x L`` positions, of which RL rows
of ragged lengths leave a share padding even when sorted by length (14 % on GSM8K-like
lengths, ``tests/unit/test_batch.py``). Packed, the linear layers see the ``N`` real tokens
only, and attention runs per row:

- on a GPU in bf16/fp16, one ``torch.nn.attention.varlen.varlen_attn`` call (FlashAttention's
  variable-length kernel) over the packed rows, given their cumulative lengths;
- elsewhere (CPU, float32), ``scaled_dot_product_attention`` once per row with a causal mask,
  the same kernel the padded path runs, without the padded rows' masked work.

Each row restarts its positions at 0 (``position_ids``), so rotary embeddings see what they see
in a padded row, and the results at real positions are the padded path's (the equivalence
tests compare them). The function is registered with transformers' ``AttentionInterface``
under ``PACKED_ATTENTION`` and chosen at model load; called without packing arguments it is
transformers' own SDPA attention, and its mask function is SDPA's for padded calls.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn  # FlashAttention's variable-length kernel (CUDA)
except ImportError:  # torch < 2.9: per-row SDPA everywhere
    varlen_attn = None
_VARLEN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn else frozenset()

PACKED_ATTENTION = "rlrelay_packed"
"""The ``attn_implementation`` name the learner's models load with under ``learner.pack_sequences``."""


@dataclass(frozen=True, slots=True)
class PackedRows:
    """A padded ``[B, L]`` batch's real tokens as one row. Example: ``pack_rows(ids, mask)``."""

    input_ids: Tensor
    """Every row's real tokens, one row after another.  # [1, N]"""
    position_ids: Tensor
    """Position of each token within its own row (0 at each row's start).  # [1, N]"""
    starts: Tensor
    """Cumulative row lengths: row ``i`` is ``[starts[i], starts[i + 1])``.  # [B + 1] int32"""
    max_length: int
    """The longest row."""

    def attention_kwargs(self) -> dict:
        """What the model's forward passes down to ``packed_attention`` (transformers'
        variable-length keyword names; keys and queries share the bounds)."""
        return dict(cu_seq_lens_q=self.starts, max_length_q=self.max_length)

    def flat_index(self, positions: Tensor) -> Tensor:
        """Packed index of each ``positions[i, t]`` of row ``i``.  # [B, T] -> [B, T]"""
        return self.starts[:-1, None].to(positions.dtype) + positions


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> PackedRows:
    """Pack right-padded rows (``attention_mask`` 1 on a prefix of each row)."""
    lengths = attention_mask.sum(dim=1)  # [B]
    if int(lengths.min()) < 1:
        raise ValueError("cannot pack a row with no tokens")
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    real = attention_mask.bool()
    if not bool((real == (columns < lengths[:, None])).all()):
        raise ValueError("pack_rows needs right-padded rows: each row's real tokens first")
    starts = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
    starts[1:] = torch.cumsum(lengths, dim=0)
    return PackedRows(input_ids=input_ids[real][None], position_ids=columns[real][None], starts=starts,
                      max_length=int(lengths.max()))


def packed_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: Tensor | None = None, max_length_q: int | None = None,
                     sliding_window: int | None = None, **kwargs) -> tuple[Tensor, None]:
    """Causal attention within each packed row. query ``[1, Hq, N, D]``, key/value
    ``[1, Hkv, N, D]`` -> ``[1, N, Hq, D]``. Without ``cu_seq_lens_q`` (a padded call), SDPA."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    if sliding_window is not None or dropout:
        raise ValueError("learner.pack_sequences supports neither sliding-window attention nor attention dropout "
                         f"(sliding_window={sliding_window}, dropout={dropout}); set learner.pack_sequences=false")
    gqa = query.shape[1] != key.shape[1]
    flash = varlen_attn is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
    default_scale = scaling is None or math.isclose(scaling, query.shape[-1] ** -0.5)
    if flash and (default_scale or "scale" in _VARLEN_PARAMETERS):
        out = _varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling, gqa)  # [N, Hq, D]
    else:
        out = _per_row(query, key, value, cu_seq_lens_q, scaling, gqa)
    return out[None], None


def _varlen(query: Tensor, key: Tensor, value: Tensor, starts: Tensor, max_length: int,
            scaling: float | None, gqa: bool) -> Tensor:
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    # torch 2.10's signature takes is_causal; later ones a window, (-1, 0) being causal.
    kwargs = dict(window_size=(-1, 0)) if "window_size" in _VARLEN_PARAMETERS else dict(is_causal=True)
    if scaling is not None and "scale" in _VARLEN_PARAMETERS:
        kwargs["scale"] = scaling
    if gqa and "enable_gqa" in _VARLEN_PARAMETERS:
        kwargs["enable_gqa"] = True
    elif gqa:  # each key/value head serves a group of query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, starts, starts, max_length, max_length, **kwargs)


@torch.compiler.disable  # row boundaries are data: a compiled block calls this loop eagerly
def _per_row(query: Tensor, key: Tensor, value: Tensor, starts: Tensor, scaling: float | None,
             gqa: bool) -> Tensor:
    bounds = starts.tolist()
    rows = [F.scaled_dot_product_attention(query[:, :, lo:hi], key[:, :, lo:hi], value[:, :, lo:hi],
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.cat(rows, dim=2)[0].transpose(0, 1)  # [N, Hq, D]


def check_packable(model: torch.nn.Module) -> None:
    """Packed rows are kept apart only if every attention layer calls transformers' attention
    interface with the keyword arguments the model was given; a model class that does not
    (``_supports_attention_backend`` false) would silently attend across rows."""
    if not model.is_backend_compatible():
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' attention "
                         "interface, so its rows cannot be packed: set learner.pack_sequences=false")


def packed_mask(*, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """A packed call passes no mask (``packed_attention`` keeps rows apart by their bounds);
    a padded call gets SDPA's."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
