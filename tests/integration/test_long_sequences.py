"""Rollout workers generating past one KV block (128 tokens on CPU) from Ray's worker
threads, with an engine thread count that differs from what Ray gives the process by default
(rollout.num_threads=2 on a 0.5-CPU actor): vLLM's CPU attention used to abort there."""

from __future__ import annotations

import pytest

from actors.types import Prompt, SamplingSettings
from cluster.bench import ModelShape, bench_config, build_model
from cluster.pools import RolloutPool

pytestmark = pytest.mark.integration


def test_pool_generates_past_one_kv_block_with_two_thread_engines(ray_local, tmp_path):
    build_model(tmp_path, ModelShape(hidden=128, layers=2, intermediate=256), seed=0)  # never emits EOS
    cfg = bench_config(["rollout.num_workers=1", "rollout.num_threads=2", "rollout.num_cpus=0.5",
                        "rollout.kv_cache_gib=0.25", "model.max_model_len=400", "rollout.max_new_tokens=300"])
    pool = RolloutPool(cfg, str(tmp_path))
    try:
        pool.ready()
        prompts = [Prompt(index=i, text="12+34=" * 3) for i in range(4)]
        sampling = SamplingSettings(temperature=1.0, max_new_tokens=300, samples_per_prompt=2)
        rollouts = pool.generate(prompts, sampling, step=0, seed=0)
        assert len(rollouts) == 8
        assert {len(r.response_token_ids) for r in rollouts} == {300}  # 300 + ~19 prompt tokens: 3 KV blocks
    finally:
        pool.shutdown()
