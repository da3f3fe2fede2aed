"""Building the learner's models and running them over a ``RolloutBatch``.

The policy is a Hugging Face causal LM, so its state dict already has the checkpoint names
vLLM loads. The critic is the same transformer trunk with a scalar value head.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from learner.batch import RolloutBatch, response_positions
from learner.head import linear_logprobs
from learner.losses import logprobs_and_entropy
from learner.packing import PACKED_ATTENTION, check_packable, pack_rows

log = logging.getLogger("rlrelay")


class Critic(nn.Module):
    """Transformer trunk + linear value head: one value per token."""

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.value_head = nn.Linear(hidden_size, 1)
        # A zero head starts every value at 0, so early value errors are the returns
        # themselves rather than noise from a random projection.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **inputs: torch.Tensor) -> torch.Tensor:
        """``inputs``: the trunk's other keyword inputs (``position_ids`` and the packed rows'
        bounds under ``learner.pack_sequences``)."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **inputs).last_hidden_state
        # The head runs in float32: in bf16 every value is rounded to 2^-9 of its size, noise of
        # that order in each advantage r + gamma V' - V. One dot product per token, so cheap; the
        # weights are read directly, which FSDP allows because the head belongs to the root
        # module, gathered for the whole forward (learner/fsdp.py).
        head, dtype = self.value_head, torch.promote_types(hidden.dtype, torch.float32)
        values = nn.functional.linear(hidden.to(dtype), head.weight.to(dtype), head.bias.to(dtype))
        # A fresh tensor, not a view of the head's output: FSDP2 hooks the module's output for
        # backward and warns that a view could lose that hook to an in-place op.
        return values.squeeze(-1).clone()  # [B, L], float32 (or float64)


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model path {path!r} has no config.json: not a Hugging Face model directory")


def load_policy(path: str, dtype: torch.dtype, packed: bool = False) -> nn.Module:
    """``packed``: attention that can run packed rows (``learner.pack_sequences``)."""
    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=without_dropout(AutoConfig.from_pretrained(path)),
                                                 dtype=dtype, attn_implementation=_attention(packed))
    if packed:
        check_packable(model)
    return model


def load_critic(path: str, dtype: torch.dtype, packed: bool = False) -> Critic:
    """The policy checkpoint's trunk under a fresh value head.

    The checkpoint is a causal LM, so its ``lm_head`` has no place in the trunk; transformers
    logs that as an "UNEXPECTED" load report, alarming and expected, in every GAE job. The
    report is silenced for this one load and its contents checked here instead: a trunk
    weight the checkpoint lacks (the critic would start from random weights there) is an error
    naming it, and unexpected keys other than the head are logged."""
    check_model_dir(path)
    config = without_dropout(AutoConfig.from_pretrained(path))
    with _quiet_load_report():
        trunk, info = AutoModel.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                attn_implementation=_attention(packed))
    if packed:
        check_packable(trunk)
    if info["missing_keys"]:
        raise ValueError(f"model path {path!r}: the critic's trunk lacks weights the checkpoint should hold, "
                         f"e.g. {sorted(info['missing_keys'])[:3]}")
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head."))
    if unexpected:
        log.warning("critic from %s: checkpoint weights not used by the trunk: %s", path, unexpected[:5])
    return Critic(trunk, config.hidden_size).to(dtype)


def policy_skeleton(path: str, dtype: torch.dtype, packed: bool = False) -> nn.Module:
    """The policy's modules from its ``config.json`` on the meta device: shapes and names,
    no memory and no weights (``learner.fsdp.shard_from_rank0`` fills in the weights).
    Dropout is off (``without_dropout``)."""
    check_model_dir(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(without_dropout(AutoConfig.from_pretrained(path)), dtype=dtype,
                                                attn_implementation=_attention(packed))


def critic_skeleton(path: str, dtype: torch.dtype, packed: bool = False) -> Critic:
    """The critic's modules on the meta device, as ``policy_skeleton``."""
    check_model_dir(path)
    config = without_dropout(AutoConfig.from_pretrained(path))
    with torch.device("meta"):
        trunk = AutoModel.from_config(config, dtype=dtype, attn_implementation=_attention(packed))
        return Critic(trunk, config.hidden_size).to(dtype)


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with every dropout probability set to 0 (``attention_dropout``, ``resid_pdrop``,
    ``hidden_dropout_prob``, ...; nested configs too).

    vLLM samples without dropout and the learner's old log-probs are taken without it, so a
    dropout left on in training makes the PPO ratio noise at identical weights (0.88 to 1.09
    measured on a tiny Llama with attention_dropout=0.1) for clipping and the truncated importance
    weights to act on. Turning the models to eval mode would do it too, but would also turn
    off Hugging Face's activation checkpointing, which runs only in training mode."""
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            without_dropout(value)
        elif isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    return config


def _attention(packed: bool) -> str | None:
    return PACKED_ATTENTION if packed else None  # None: transformers' default (SDPA)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")  # where transformers logs the report
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def sequence_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool = False, *,
                      chunked_head: bool = True, compiled_head: bool = False, check_head: bool = False,
                      packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under ``model`` (and per-token entropy), both 0 on padding.  # [B, T]

    Uses ``log_softmax(logits / temperature)``, the distribution vLLM sampled from
    (``logprobs_mode="processed_logprobs"``), so ratios against rollout log-probs are exact.

    ``chunked_head`` (``learner.chunked_head``): the model runs up to its final hidden states
    and ``learner.head`` turns the real response tokens' states into log-probs a chunk of tokens
    at a time, never holding ``[B, T, V]`` logits (``compiled_head``: through ``torch.compile``).
    Otherwise the model's own ``lm_head`` computes the logits and the log-softmax runs on them.
    ``check_head``: first verify that the model's logits are ``lm_head(hidden)``
    (``check_linear_head``; the learner does it on its first pass). ``packed``
    (``learner.pack_sequences``): the rows run as one sequence of their real tokens.
    """
    pos = response_positions(batch)  # [B, T]
    seq_len = batch.input_ids.shape[1]
    labels = batch.input_ids.gather(1, (pos + 1).clamp(max=seq_len - 1))  # [B, T]
    real = batch.response_mask.bool()  # [B, T]
    inputs, flat = _model_inputs(batch, pos, packed)
    if chunked_head:
        hidden, last_logits = final_hidden_states(model, **inputs)  # [B, L, H], or [1, N, H] packed
        if check_head:
            check_linear_head(model, hidden, last_logits)
        picked = hidden.reshape(-1, hidden.shape[-1])[flat[real]]  # [M, H], M real response tokens
        head = model.get_output_embeddings()
        if isinstance(head.weight, DTensor):
            raise RuntimeError("the policy's lm_head is still sharded after its forward: the FSDP2 root must keep "
                               "its parameters gathered after forward (learner/fsdp.py shard_model)")
        logprobs, entropy = linear_logprobs(picked, head.weight, labels[real], temperature, bias=head.bias,
                                            with_entropy=with_entropy, compiled=compiled_head)  # [M]
        return _to_response_frame(logprobs, real), _to_response_frame(entropy, real)
    # No KV cache: training never decodes, and building one costs time (and makes compiled
    # blocks recompile per layer).
    if packed:  # the lm_head runs on the real response tokens' positions alone
        logits = model(**inputs, use_cache=False, logits_to_keep=flat[real]).logits[0]  # [M, V]
        logprobs, entropy = logprobs_and_entropy(logits, labels[real], temperature, with_entropy)
        return _to_response_frame(logprobs, real), _to_response_frame(entropy, real)
    # Only positions that predict a response token need logits: the window from the shortest
    # prompt's last token on. Asking the model for that window alone skips the lm_head on the
    # rest of the prompts and never materialises [B, L, V] logits.
    first = int(batch.prompt_lengths.min()) - 1
    logits = model(**inputs, use_cache=False, logits_to_keep=seq_len - first).logits  # [B, W, V], W = L - first
    if int(batch.prompt_lengths.max()) - 1 == first:  # equal prompts: the window is the response
        picked = logits[:, :pos.shape[1]]
    else:
        picked = logits.gather(1, (pos - first)[:, :, None].expand(-1, -1, logits.shape[-1]))  # [B, T, V]
    logprobs, entropy = logprobs_and_entropy(picked, labels, temperature, with_entropy)
    return logprobs * batch.response_mask, None if entropy is None else entropy * batch.response_mask


def _model_inputs(batch: RolloutBatch, pos: torch.Tensor, packed: bool) -> tuple[dict, torch.Tensor]:
    """The model's keyword inputs for ``batch``, and where each response position ``pos``
    ``[B, T]`` lands in its flattened output: ``[B * L]`` padded, ``[N]`` packed.  # [B, T]"""
    if not packed:
        rows, width = batch.input_ids.shape
        offsets = torch.arange(rows, device=pos.device)[:, None] * width
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask), offsets + pos
    packed_rows = pack_rows(batch.input_ids, batch.attention_mask)
    # Padding columns of short responses point past their row; clamped, they are masked out.
    flat = packed_rows.flat_index(pos).clamp(max=packed_rows.input_ids.shape[1] - 1)
    inputs = dict(input_ids=packed_rows.input_ids, position_ids=packed_rows.position_ids,
                  **packed_rows.attention_kwargs())
    return inputs, flat


def _to_response_frame(values: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor | None:
    """Per-token values of the real response tokens ``[M]`` back into the response frame, 0 on
    padding.  # [B, T]"""
    if values is None:
        return None
    out = values.new_zeros(real.shape)
    out[real] = values
    return out


def final_hidden_states(model: nn.Module, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal LM's last hidden states (after its final norm) ``[B, L, H]``, and its own
    logits of the last position ``[B, 1, V]``, for the model's keyword ``inputs``.

    The whole model runs, not its decoder alone, so FSDP2's hooks on the root gather the
    embeddings and head and schedule their gradients' reduction; a forward hook on the decoder
    hands its output over, and the lm_head is asked for one position's logits only.
    """
    captured: list[torch.Tensor] = []
    handle = model.get_decoder().register_forward_hook(
        lambda _module, _args, output: captured.append(output.last_hidden_state))
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(model).__name__}: its decoder ran {len(captured)} times in one forward")
    return captured[0], logits


@torch.no_grad()
def check_linear_head(model: nn.Module, hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
    """``learner.chunked_head`` computes logits as ``lm_head(final hidden states)``. A model whose
    head does more (logit soft-capping, scaling) would silently train on other log-probs than
    vLLM's, so the model's own last-position logits (``final_hidden_states`` returns them) are
    compared with that product."""
    head = model.get_output_embeddings()
    mine = torch.nn.functional.linear(hidden[:, -1:], head.weight, head.bias)
    if not torch.allclose(mine.float(), last_logits.float(), rtol=1e-2, atol=1e-2):
        gap = float((mine.float() - last_logits.float()).abs().max())
        raise ValueError(f"{type(model).__name__}: its logits are not lm_head(final hidden states) (max gap {gap:.3g}), "
                         "so learner.chunked_head would compute other log-probs than the model; "
                         "set learner.chunked_head=false")


def sequence_values(critic: nn.Module, batch: RolloutBatch, packed: bool = False) -> torch.Tensor:
    """Critic value at each response token's position (the state before emitting it), 0 on
    padding; ``packed`` as in ``sequence_logprobs``.  # [B, T]"""
    pos = response_positions(batch)
    inputs, flat = _model_inputs(batch, pos, packed)
    values = critic(**inputs)  # [B, L], or [1, N] packed
    return values.reshape(-1)[flat].float() * batch.response_mask
