"""The FSDP2 learner group as real Ray actors over gloo: the update must not depend on how a
minibatch is split into micro-batches or across ranks (TRL-style invariance tests)."""

from __future__ import annotations

import pytest
import torch

from actors.types import Rollout
from cluster.config import Config
from cluster.learner_group import LearnerGroup
from learner.batch import TrainBatch, collate
from learner.weight_bucket import iter_tensors

pytestmark = pytest.mark.integration


def make_batch(rows: int = 8, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(rows):
        p, r = 3 + i % 3, 2 + (i * 5) % 6  # ragged prompts and responses
        rollouts.append(Rollout(
            prompt_index=i // 2, slot=i // 2, sample_index=i % 2, prompt_text="", answer=None,
            prompt_token_ids=tuple(torch.randint(4, 40, (p,), generator=g).tolist()),
            response_token_ids=tuple(torch.randint(4, 40, (r,), generator=g).tolist()),
            response_logprobs=tuple([-1.0] * r), response_text="", finish_reason="stop", policy_version=0))
    batch = collate(rollouts, pad_token_id=0)
    mask = batch.response_mask
    # Old log-probs slightly off the current policy so ratios differ from 1 and clipping acts.
    old = (torch.randn(mask.shape, generator=g) * 0.3 - 3.5) * mask
    adv = torch.randn(mask.shape, generator=g) * mask
    return TrainBatch(rollouts=batch, old_logprobs=old, advantages=adv, returns=None, old_values=None,
                      ref_logprobs=None, importance_weights=None)


_RESULTS: dict[tuple, tuple[dict, float, dict]] = {}
"""_train_twice by its arguments: the 2-rank, micro-batch-3 reference is the baseline of
several tests, and each run starts a learner group (~10 s); a run is deterministic."""


def _run(ray, model_dir, *, world_size: int, micro_batch_size: int, loss_agg: str = "token_mean",
         **learner) -> tuple[dict, float, dict]:
    key = (str(model_dir), world_size, micro_batch_size, loss_agg, tuple(sorted(learner.items())))
    if key not in _RESULTS:
        _RESULTS[key] = _train_twice(ray, model_dir, world_size=world_size, micro_batch_size=micro_batch_size,
                                     loss_agg=loss_agg, **learner)
    return _RESULTS[key]


def updated_weights(ray, model_dir, **kw) -> tuple[dict, float]:
    """Weights after two optimizer steps, and the mean gradient norm before clipping (the
    result is shared between callers with the same arguments: do not modify it)."""
    return _run(ray, model_dir, **kw)[:2]


def applied(ray, model_dir, **kw) -> dict:
    """What the options did to rank 0's policy in that run (``LearnerGroup.applied``): an
    option the learner ignored would give the same update, and pass an equivalence test."""
    return _run(ray, model_dir, **kw)[2]


def _train_twice(ray, model_dir, *, world_size: int, micro_batch_size: int, loss_agg: str,
                 **learner) -> tuple[dict, float, dict]:
    cfg = Config()
    for key, value in learner.items():
        setattr(cfg.learner, key, value)
    cfg.learner.world_size = world_size
    cfg.learner.micro_batch_size = micro_batch_size
    cfg.learner.num_cpus = 0.5
    cfg.learner.num_threads = 1
    cfg.learner.lr = 1e-2
    cfg.learner.lr_schedule = "constant"
    cfg.learner.max_grad_norm = 1e6  # clipping would hide a wrongly scaled gradient
    cfg.algorithm.loss_agg = loss_agg
    group = LearnerGroup(cfg, str(model_dir), total_updates=2)
    try:
        group.ready()
        batch = make_batch()
        # Two optimizer steps over the same 8 rows in two different orders.
        plan = [torch.tensor([3, 0, 5, 6, 1, 7, 2, 4]), torch.arange(8)]
        metrics = group.update(batch, plan, train_policy=True)
        assert metrics["policy/clipfrac"] > 0  # clipping is exercised
        weights = {k: v.clone() for k, v in iter_tensors(ray.get(group.export_weights(version=1)[1], timeout=300))}
        return weights, metrics["policy/grad_norm"], group.applied
    finally:
        group.shutdown()


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_micro_batching_and_world_size_give_the_same_update(ray_local, tiny_model_dir, loss_agg):
    reference, ref_norm = updated_weights(ray_local, tiny_model_dir, world_size=1, micro_batch_size=8, loss_agg=loss_agg)
    variants = {
        "micro 1 x accumulation 8": dict(world_size=1, micro_batch_size=1),
        "2 ranks, micro 4": dict(world_size=2, micro_batch_size=4),
        "2 ranks, micro 3 (uneven, padded micro-batches)": dict(world_size=2, micro_batch_size=3),
        # Rows of 5-12 tokens: passes of 1 to 4 rows, split to match across ranks.
        "2 ranks, micro-batches by a 24-token budget": dict(world_size=2, micro_batch_size=3, micro_batch_tokens=24),
        "2 ranks, packed rows of up to 24 real tokens": dict(world_size=2, micro_batch_size=3, micro_batch_tokens=24,
                                                             pack_sequences=True),
    }
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    delta_ref = torch.cat([(reference[k] - initial[k]).flatten() for k in reference])
    assert delta_ref.abs().max() > 1e-3  # the update really changed the weights
    for name, kw in variants.items():
        got, norm = updated_weights(ray_local, tiny_model_dir, loss_agg=loss_agg, **kw)
        # Adam is nearly invariant to the scale of the gradient, so the gradient itself is
        # compared too: a missing world-size factor halves it.
        assert abs(norm - ref_norm) / ref_norm < 1e-4, f"{name}: gradient norm {norm} != {ref_norm}"
        delta = torch.cat([(got[k] - initial[k]).flatten() for k in reference])
        # Relative to the size of the update: summation order changes the gradients at
        # float32 rounding level, and Adam's normalisation amplifies that only for
        # near-zero gradients. A wrongly scaled loss (a missing world-size factor, local
        # instead of global denominators) is off by tens of percent.
        rel = float((delta - delta_ref).norm() / delta_ref.norm())
        assert rel < 1e-3, f"{name}: update differs by {rel:.2e} (relative)"


@pytest.mark.parametrize("option", [
    {"sharding": "grad_op"},                # ZeRO-2-like: blocks stay gathered forward to backward
    {"sharding": "none"},                   # replicated (HSDP with shard groups of one)
    {"activation_checkpointing": True},     # blocks recomputed in backward
    {"chunked_head": False},                # the model's own lm_head and [B, T, V] logits
])
def test_memory_options_give_the_same_update(ray_local, tiny_model_dir, option):
    reference, ref_norm = updated_weights(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3)
    got, norm = updated_weights(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3, **option)
    assert abs(norm - ref_norm) / ref_norm < 1e-4, f"{option}: gradient norm {norm} != {ref_norm}"
    worst = max(float((got[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, f"{option}: weights differ by {worst:.2e}"
    base, now = (applied(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3, **kw) for kw in ({}, option))
    assert base["placements"] == ["S(0)"] and not base["activation_checkpointing"] and base["blocks"] > 0
    if option.get("sharding") == "none":
        assert now["placements"] == ["R", "S(0)"]  # shard groups of one rank
    if option.get("activation_checkpointing"):
        assert now["activation_checkpointing"]


def test_chunked_head_gives_the_logits_paths_update_with_a_tied_head(ray_local, tiny_tied_model_dir):
    """Tied embeddings over two ranks: the head's weight is the embedding's, gathered by the
    FSDP2 root; its gradient from the chunked head and from the embedding must both arrive."""
    reference, ref_norm = updated_weights(ray_local, tiny_tied_model_dir, world_size=2, micro_batch_size=3,
                                          chunked_head=False)
    got, norm = updated_weights(ray_local, tiny_tied_model_dir, world_size=2, micro_batch_size=3)
    assert abs(norm - ref_norm) / ref_norm < 1e-4, f"gradient norm {norm} != {ref_norm}"
    worst = max(float((got[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, f"weights differ by {worst:.2e}"


@pytest.mark.parametrize("option", [
    {"compile": True},          # compiled blocks
    {"pack_sequences": True},   # padding-free: rows packed into one, attention per row
])
def test_compiled_blocks_and_packed_rows_give_the_same_update(ray_local, tiny_model_dir, option):
    """Inductor fuses and reorders float sums, and packed rows run matmuls of other shapes, so
    the weights agree to rounding, not bit for bit: compared, like micro-batching above,
    relative to the size of the update."""
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    reference, ref_norm = updated_weights(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3)
    got, norm = updated_weights(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3, **option)
    assert abs(norm - ref_norm) / ref_norm < 1e-4, f"{option}: gradient norm {norm} != {ref_norm}"
    delta_ref = torch.cat([(reference[k] - initial[k]).flatten() for k in reference])
    delta = torch.cat([(got[k] - initial[k]).flatten() for k in reference])
    rel = float((delta - delta_ref).norm() / delta_ref.norm())
    assert rel < 1e-3, f"{option}: update differs by {rel:.2e} (relative)"
    blocks = applied(ray_local, tiny_model_dir, world_size=2, micro_batch_size=3, **option)
    assert blocks["compiled_blocks"] == (blocks["blocks"] if option.get("compile") else 0)


def test_ranks_hold_the_checkpoint_that_rank_0_alone_read(ray_local, tiny_tied_model_dir, tmp_path):
    """Two ranks build their models on the meta device and rank 0 broadcasts the checkpoint
    (learner/fsdp.py shard_from_rank0). Weights, and the rotary frequencies that no state dict
    carries, must arrive whole: a rank with uninitialised buffers computes other log-probs."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModel, AutoModelForCausalLM

    from learner.checkpoint import JsonMetadataReader
    from learner.models import sequence_logprobs
    from learner.weight_bucket import drop_aliases

    cfg = Config()
    cfg.learner.world_size, cfg.learner.micro_batch_size, cfg.learner.num_cpus = 2, 2, 0.5
    cfg.learner.num_threads = 1
    cfg.algorithm.advantage_estimator, cfg.algorithm.kl_coef = "gae", 0.1  # a critic and a reference too
    group = LearnerGroup(cfg, str(tiny_tied_model_dir), total_updates=1)
    try:
        group.ready()
        batch = make_batch().rollouts
        got = group.forward(batch)
        exported = dict(iter_tensors(ray_local.get(group.export_weights(version=0)[1], timeout=300)))
        group.save_checkpoint(str(tmp_path))  # the critic's shards, read back whole below
    finally:
        group.shutdown()
    # The critic's values start at 0 whatever its trunk holds (a zero head): its trunk is
    # compared with the checkpoint's through what the ranks saved.
    trunk = AutoModel.from_pretrained(str(tiny_tied_model_dir)).state_dict()
    saved = {f"critic/trunk.{k}": torch.empty_like(v) for k, v in trunk.items()}
    dcp.load(saved, storage_reader=JsonMetadataReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(saved[f"critic/trunk.{k}"], v) for k, v in trunk.items())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_tied_model_dir))
    # Every weight once: the tied head's second name (lm_head.weight) is not sent.
    expected = drop_aliases(model.state_dict(keep_vars=True))
    assert exported.keys() == expected.keys() and "lm_head.weight" not in exported
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    with torch.no_grad():
        want, _ = sequence_logprobs(model, batch, cfg.rollout.temperature)
    # Each rank computed its own share of the rows (by length).
    assert torch.allclose(got.old_logprobs, want, atol=1e-5), float((got.old_logprobs - want).abs().max())
    assert torch.allclose(got.ref_logprobs, want, atol=1e-5)
    assert got.values is not None and torch.equal(got.values, torch.zeros_like(got.values))  # the zero value head


def test_a_non_finite_loss_skips_the_update_on_every_rank_and_is_counted(ray_local, tiny_model_dir):
    cfg = Config()
    cfg.learner.world_size, cfg.learner.micro_batch_size, cfg.learner.num_cpus = 2, 2, 0.5
    cfg.learner.num_threads, cfg.learner.lr = 1, 1e-2
    group = LearnerGroup(cfg, str(tiny_model_dir), total_updates=2)
    try:
        group.ready()
        before = dict(iter_tensors(ray_local.get(group.export_weights(version=0)[1], timeout=300)))
        batch = make_batch()
        poisoned = batch.advantages.clone()
        poisoned[5, 0] = float("nan")  # one token of one row on rank 1: the all-reduced norm is NaN everywhere
        bad = TrainBatch(rollouts=batch.rollouts, old_logprobs=batch.old_logprobs, advantages=poisoned,
                         returns=None, old_values=None, ref_logprobs=None, importance_weights=None)
        metrics = group.update(bad, [torch.arange(8)], train_policy=True)
        assert metrics["policy/skipped_updates"] == 1.0 and "policy/grad_norm" not in metrics
        after = dict(iter_tensors(ray_local.get(group.export_weights(version=1)[1], timeout=300)))
        assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched
        # The next finite batch trains normally.
        metrics = group.update(batch, [torch.arange(8)], train_policy=True)
        assert metrics["policy/skipped_updates"] == 0.0 and metrics["policy/grad_norm"] > 0
    finally:
        group.shutdown()


def test_a_dead_learner_rank_stops_the_driver_naming_it(ray_local, tiny_model_dir):
    from cluster.actor_set import WorkerFailure

    cfg = Config()
    cfg.learner.world_size, cfg.learner.micro_batch_size, cfg.learner.num_cpus = 2, 2, 0.5
    cfg.learner.num_threads, cfg.learner.timeout_s = 1, 60
    group = LearnerGroup(cfg, str(tiny_model_dir), total_updates=2)
    try:
        group.ready()
        ray_local.kill(group.ranks[1], no_restart=True)
        with pytest.raises(WorkerFailure, match="learner rank 1"):
            group.update(make_batch(), [torch.arange(8)], train_policy=True)
    finally:
        group.shutdown()
