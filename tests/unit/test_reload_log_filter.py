"""The rollout worker hides vLLM's reload warning for rotary embeddings only (no checkpoint
holds their cache); the same warning for any other layer, and other records, pass."""

from __future__ import annotations

import logging

from actors.rollout_worker import RotaryReloadFilter


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, __file__, 1,
                             msg, args, None)


def test_only_the_rotary_reload_warning_is_dropped():
    keep = RotaryReloadFilter().filter
    assert not keep(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not keep(record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    assert keep(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert keep(record("%s: Delayed processing", "RotaryEmbedding"))
    assert keep(record("something else"))
