"""Response log-probs (and entropy) straight from the final hidden states, a chunk of tokens at
a time: ``log_softmax((h W^T + b) / T)[label]`` without ever holding ``[N, V]`` logits.

Computing the logits with the model's ``lm_head`` and the log-softmax on them keeps, for
backward, the ``[B, T, V]`` logits in the compute dtype and several float32 copies of them;
on a 150k vocabulary that is most of a step's memory at any useful micro-batch (12 + 2 bytes
per token per vocabulary entry: ~20 GB for 8 x 1024 response tokens), and passes over it take
a large share of the step's time. Here the forward keeps only the hidden states it was given
and two numbers per token (log-sum-exp, entropy); the backward recomputes each chunk's logits
(one more ``h W^T`` matmul, a sixth of the head's FLOPs for a 0.5B model) and turns them
straight into the gradients of ``h``, ``W`` and ``b``. Peak extra memory: a few ``[chunk, V]``
float32 buffers and a float32 ``[V, H]`` accumulator for ``W``'s gradient.

Gradients, with ``z = logits / T``, ``log p = z - logsumexp(z)`` and entropy ``H = -sum p log p``:
``d log p_y / dz = onehot(y) - p`` and ``dH / dz = -p (log p + H)``; both are divided by ``T``
on the way back to the logits.

``compiled=True`` runs each chunk's math through ``torch.compile`` (the matmul, the upcast and
the softmax's elementwise passes fused into few kernels); it is meant for the GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.losses import softmax_dtype

CHUNK_TOKENS = 1024
"""Tokens per chunk: a chunk's float32 buffers are ~0.6 GB each on a 150k vocabulary."""


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, *,
                    bias: Tensor | None = None, with_entropy: bool = False,
                    chunk_tokens: int = CHUNK_TOKENS, compiled: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden ``[..., H]`` (compute dtype), weight ``[V, H]``, bias ``[V]`` or None, labels ``[...]``
    -> log-probs ``[...]`` and entropy ``[...]`` (float32, or float64 for float64 inputs) or None. Differentiable in
    ``hidden``, ``weight`` and ``bias``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    logprobs, entropy = _LinearLogprobs.apply(flat_hidden, weight, bias, flat_labels, float(temperature),
                                              with_entropy, chunk_tokens, compiled)
    return logprobs.view(labels.shape), entropy.view(labels.shape) if with_entropy else None


def _scaled_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``[n, H] -> [n, V]`` ``logits / T`` in float32 (float64 stays); the logits in the compute
    dtype, as the model's own ``lm_head`` would give them, then upcast (a softmax in bf16 is too
    coarse)."""
    logits = F.linear(h, weight, bias)
    scaled = logits.to(softmax_dtype(logits.dtype))
    # In place when the upcast made a copy, or when the logits are already float32 and this
    # function's own temporary.
    return scaled.div_(temperature)


def _chunk_forward(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                   with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk: log-probs of the labels, log-sum-exp, entropy (``[n]`` each, float32)."""
    z = _scaled_logits(h, weight, bias, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(1, labels[:, None]).squeeze(1) - lse
    if not with_entropy:
        return logprobs, lse, None
    log_p = z.sub_(lse[:, None])
    # -sum(p log p): every term is small, so no cancellation (unlike lse - sum(p z)).
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return logprobs, lse, entropy


def _chunk_grad_logits(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                       lse: Tensor, entropy: Tensor | None, grad_logprobs: Tensor,
                       grad_entropy: Tensor | None) -> Tensor:
    """One chunk's gradient with respect to its logits ``[n, V]``, in the compute dtype."""
    log_p = _scaled_logits(h, weight, bias, temperature).sub_(lse[:, None])
    p = log_p.exp()
    grad = p * -grad_logprobs[:, None]
    grad.scatter_add_(1, labels[:, None], grad_logprobs[:, None])
    if grad_entropy is not None:
        # dH/dz = -p (log p + H), accumulated in log_p's buffer.
        grad.sub_(log_p.add_(entropy[:, None]).mul_(p).mul_(grad_entropy[:, None]))
    return grad.div_(temperature).to(h.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                with_entropy: bool, chunk_tokens: int, compiled: bool):
        forward_fn = _compiled(_chunk_forward) if compiled else _chunk_forward
        logprobs, lse, entropy = [], [], []
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            lp, chunk_lse, ent = forward_fn(hidden[rows], weight, bias, labels[rows], temperature, with_entropy)
            logprobs.append(lp)
            lse.append(chunk_lse)
            if with_entropy:
                entropy.append(ent)
        dtype = softmax_dtype(hidden.dtype)
        empty = hidden.new_empty(0, dtype=dtype)
        logprobs = torch.cat(logprobs) if logprobs else empty
        lse = torch.cat(lse) if lse else empty
        entropy = torch.cat(entropy) if entropy else hidden.new_zeros(hidden.shape[0] if with_entropy else 0,
                                                                     dtype=dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.options = (temperature, with_entropy, chunk_tokens, compiled)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, with_entropy, chunk_tokens, compiled = ctx.options
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if not with_entropy:
            grad_entropy = None
        grad_fn = _compiled(_chunk_grad_logits) if compiled else _chunk_grad_logits
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulators: summing a bf16 [V, H] gradient over chunks in bf16 would round.
        acc = softmax_dtype(weight.dtype)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows]
            g = grad_fn(h, weight, bias, labels[rows], temperature, lse[rows],
                        entropy[rows] if grad_entropy is not None else None, grad_logprobs[rows],
                        grad_entropy[rows] if grad_entropy is not None else None)  # [n, V]
            if need_h:
                torch.mm(g, weight, out=grad_h[rows])
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w.add_(g.t() @ h)
            if need_b:
                grad_b.add_(g.sum(dim=0, dtype=acc))
            del g  # before the next chunk's buffers are made
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None, None)
