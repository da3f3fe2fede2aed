"""The learner group: W learner ranks (``ray.remote`` of the plain ``LearnerRank``) forming one
FSDP2 process group in a placement group, driven in lock-step with a timeout on every wait.

A failed rank stops the run with an error naming it; resuming from the last checkpoint is the
recovery (a collective group cannot lose a member mid-step).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actor_set import DEATHS, WorkerFailure, init_error
from cluster.config import Config, ConfigError
from learner.batch import (ForwardResult, Minibatch, RolloutBatch, TrainBatch, UpdateResult, arrange_by_length,
                           merge_extreme, micro_batch_sizes)
from learner.checkpoint import CheckpointError, RankState, missing_shards
from learner.worker import LearnerRank

log = logging.getLogger(__name__)

LIMIT = "learner.timeout_s"
"""The config key of the learner's per-call timeout, named when it runs out."""
SHARED = "must be storage that the driver and every learner node share (NFS, a mounted bucket)"
DEATH_GRACE_S = 10.0
"""How long a failed call waits for its peers' results before it is reported as it is."""


def wait(refs: list, timeout_s: float, what: Sequence[str], limit: str | None = None) -> list:
    """``ray.get`` of every ref with one deadline, turning Ray's errors into one that names the
    worker. Results are checked as they arrive, so a dead worker is named at once, not after
    its peers time out waiting for it in a collective."""
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            slow = [what[refs.index(r)] for r in pending]
            raise WorkerFailure(f"no answer within {timeout_s:.0f} s from {', '.join(slow)}" + (
                f" ({limit}): hung, or slower than that; a longer step needs a larger {limit}" if limit else ""))
        try:
            _get_naming_death(ready[0], refs, what)
        except RayTaskError as e:
            # A dead rank often shows first as a collective error in a live peer ("connection
            # closed by peer"); name the dead worker if one of the others turns out to be one.
            grace = min(DEATH_GRACE_S, max(0.0, deadline - time.monotonic()))
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=grace)
            for ref in done:
                with contextlib.suppress(RayTaskError):
                    _get_naming_death(ref, refs, what)
            # None died: the worker's own exception, named by the worker (Ray's names the method only).
            raise WorkerFailure(f"{what[refs.index(ready[0])]} failed: {e.cause!r}") from e
    return ray.get(list(refs))


def _get_naming_death(ref, refs: list, what: Sequence[str]):
    try:
        return ray.get(ref)
    except RayTaskError:  # the worker's own exception, whatever its cause's class (actor_set.DEATHS)
        raise
    except DEATHS as e:
        if isinstance(e, RayActorError) and e.actor_init_failed:
            raise WorkerFailure(f"{what[refs.index(ref)]} could not start: {init_error(e)}") from e
        raise WorkerFailure(f"{what[refs.index(ref)]} died: {e}") from e


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnerPlacement:
    """Where the learner ranks run: one bundle each in a placement group.

    Example: ``LearnerPlacement(group=pg, rank_bundles=[2, 0, 1, 3], nodes=["n1", "n1", "n2", "n2"])``
    """

    group: PlacementGroup
    rank_bundles: list[int]
    """Bundle of each rank: ranks on the same node are consecutive (rank 0's node first)."""
    nodes: list[str]
    """Node id of each rank."""


def learner_placement(world_size: int, num_cpus: float, num_gpus: float, timeout_s: float) -> LearnerPlacement:
    """Reserve one ``{CPU, GPU}`` bundle per rank, packed onto as few nodes as possible (PACK:
    fill a node's GPUs, then spill to the next), so that ranks of a node share its fast links
    and collectives cross the network only between nodes. Raises if the cluster cannot hold
    it within ``timeout_s`` (an autoscaling cluster adds nodes meanwhile)."""
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    group = placement_group([bundle] * world_size, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise WorkerFailure(f"the learner's {world_size} bundle(s) of {bundle} could not be placed within "
                            f"{timeout_s:.0f} s: the cluster lacks free resources (ray status shows them)") from None
    node_of = placement_group_table(group)["bundles_to_node_id"]
    order = ranks_by_node([node_of[b] for b in range(world_size)])
    return LearnerPlacement(group=group, rank_bundles=order, nodes=[node_of[b] for b in order])


def ranks_by_node(node_of: Sequence[str]) -> list[int]:
    """Bundle indices in rank order: bundles of a node consecutive, bundle 0's node first (its
    address is the rendezvous), so rank order follows the hardware (NCCL rings, local ranks).
    Ray's PACK placement usually lists bundles grouped already; this makes it so whatever the
    listing."""
    return sorted(range(len(node_of)), key=lambda b: (node_of[b] != node_of[0], node_of[b], b))


class LearnerGroup:
    """W learner ranks in one torch.distributed group; every verb runs on all ranks."""

    def __init__(self, cfg: Config, model_path: str, total_updates: int) -> None:
        lc = cfg.learner
        self.cfg = cfg
        self.timeout_s = lc.timeout_s
        self.placement = learner_placement(lc.world_size, lc.num_cpus, lc.num_gpus, timeout_s=lc.timeout_s)
        actor = ray.remote(LearnerRank)
        self.ranks = [actor.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        placement_group=self.placement.group, placement_group_bundle_index=bundle))
                      .remote(rank, lc.world_size, model_path, lc, cfg.algorithm, cfg.rollout.temperature, total_updates)
                      for rank, bundle in enumerate(self.placement.rank_bundles)]
        self.applied: dict | None = None
        """What the options did to rank 0's policy (``LearnerRank.applied_options``), once ready."""

    def ready(self) -> None:
        """Form the process group (rank 0's node is the rendezvous) and load the models."""
        names = self._names()
        address = wait([self.ranks[0].__ray_call__.remote(lambda _: ray.util.get_node_ip_address())],
                       120, names[:1])[0]
        port = wait([self.ranks[0].free_port.remote()], 120, names[:1])[0]
        wait([r.setup.remote(address, port) for r in self.ranks], self.timeout_s, names, LIMIT)
        # Read back from the modules, so the log shows what the options did, not what was asked.
        a = self.applied = wait([self.ranks[0].applied_options.remote()], 120, names[:1])[0]
        log.info("learner policy as built: %d blocks, parameters %s (S(0) sharded, R replicated per mesh "
                 "dimension), activation checkpointing %s, %d compiled blocks", a["blocks"],
                 "/".join(a["placements"]) or "not sharded", "on" if a["activation_checkpointing"] else "off",
                 a["compiled_blocks"])

    def check_shared(self, directory: Path, key: str, ranks: int | None = None) -> None:
        """Refuse ``directory`` (config key ``key``) unless the first ``ranks`` ranks (all by
        default) see a file the driver writes there. Each rank writes its checkpoint shards, rank
        0 the final model, where it sees the path; on a disk of its own node they would be lost to
        the driver, found only when a resume reads the checkpoint."""
        token = uuid.uuid4().hex
        probe = directory.resolve() / f".rlrelay-shared-{token}"
        probe.write_text(token, encoding="utf-8")
        try:
            asked = self.ranks[:ranks]
            seen = wait([r.sees.remote(str(probe), token) for r in asked], 120, self._names()[:len(asked)])
        finally:
            probe.unlink(missing_ok=True)
        blind = [name for name, ok in zip(self._names(), seen) if not ok]
        if blind:
            raise ConfigError(f"{key}: {', '.join(blind)} cannot read what the driver writes in {directory.resolve()} "
                              f"(another node's disk): the learner writes there and the driver reads it back, so "
                              f"it {SHARED}")

    def _names(self) -> list[str]:
        return [f"learner rank {i}" for i in range(len(self.ranks))]

    def _shards(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Each rank's rows, by length (``arrange_by_length``: less padding, balanced ranks),
        and the rows of each of its micro-batches."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        shards = arrange_by_length(lengths, len(self.ranks))
        learner = self.cfg.learner
        sizes = micro_batch_sizes(lengths, shards, learner.micro_batch_size, learner.micro_batch_tokens,
                                  learner.pack_sequences)
        return [torch.tensor(rows, dtype=torch.long) for rows in shards], sizes

    def forward(self, batch: RolloutBatch) -> ForwardResult:
        shards, sizes = self._shards(batch)
        parts = wait([rank.forward.remote(batch.select(rows), micro)
                      for rank, rows, micro in zip(self.ranks, shards, sizes)], self.timeout_s, self._names(), LIMIT)
        width = batch.response_mask.shape[1]

        def merge(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            if tensors[0] is None:
                return None
            out = torch.zeros(batch.size, width)
            for rows, t in zip(shards, tensors):
                out[rows, :t.shape[1]] = t
            return out

        return ForwardResult(old_logprobs=merge("old_logprobs"), ref_logprobs=merge("ref_logprobs"),
                             values=merge("values"))

    def update(self, batch: TrainBatch, minibatch_rows: list[torch.Tensor], train_policy: bool,
               kl_coef: float | None = None) -> dict[str, float]:
        """One optimizer step per minibatch (rows given by the driver); merged metrics.
        ``kl_coef``: the step's coefficient of a KL loss term (None: the configured one)."""
        per_rank: list[list[Minibatch]] = [[] for _ in self.ranks]
        for rows in minibatch_rows:
            mb = batch.select(rows)
            shards, sizes = self._shards(mb.rollouts)
            tokens = float(mb.rollouts.response_mask.sum())
            for r, shard in enumerate(shards):
                per_rank[r].append(Minibatch(batch=mb.select(shard), micro_sizes=sizes[r],
                                             num_tokens=tokens, num_seqs=len(rows), kl_coef=kl_coef))
        results: list[UpdateResult] = wait(
            [rank.update.remote(mbs, train_policy) for rank, mbs in zip(self.ranks, per_rank)],
            self.timeout_s, self._names(), LIMIT)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        extremes: dict[str, float] = {}
        for res in results:
            for k, v in res.metric_sums.items():
                sums[k] = sums.get(k, 0.0) + v
                weights[k] = weights.get(k, 0.0) + res.metric_weights[k]
            for k, v in res.metric_extremes.items():
                extremes[k] = merge_extreme(k, extremes.get(k), v)
        merged = {k: sums[k] / weights[k] for k in sums if weights[k] > 0} | extremes
        # Every rank sees the same all-reduced gradient norm, so all skip the same steps.
        merged["policy/skipped_updates"] = float(results[0].skipped_updates)
        return merged

    def export_weights(self, version: int, transport: str = "object_store") -> tuple[int, ray.ObjectRef]:
        """The (collective) gather on every rank; returns the update's size in bytes and the update
        (or, with ``transport="shared_memory"``, where it lies in rank 0's shared memory), unfetched."""
        calls = [rank.export_weights.options(num_returns=2).remote(version, transport) for rank in self.ranks]
        # Every rank's small first value, rank 0's included, so that a failed export (rank 0 out of
        # memory holding the full weights, say) names its learner rank here, within the learner's
        # timeout, instead of surfacing in the first rollout worker to read the update.
        sizes = wait([size for size, _ in calls], self.timeout_s, self._names(), LIMIT)
        return sizes[0], calls[0][1]

    def save_checkpoint(self, path: str) -> list[RankState]:
        """Every rank writes its shards into the DCP directory ``path``, checked to be where the
        driver reads them (``check_shared`` refuses an unshared directory at start)."""
        states = wait([r.save_checkpoint.remote(path) for r in self.ranks], self.timeout_s, self._names(), LIMIT)
        if missing := missing_shards(path):
            raise CheckpointError(f"{path}: the learner ranks wrote {', '.join(missing[:3])} where the driver cannot "
                                  f"read it: trainer.checkpoint_dir {SHARED}")
        return states

    def load_checkpoint(self, path: str, states: list[RankState]) -> str | None:
        """Every rank loads its shards; returns rank 0's warning about changed learning-rate
        settings, if any. A checkpoint from a different world size reshards; plain state is
        rank-agnostic apart from the RNG, which is reused cyclically."""
        return wait([r.load_checkpoint.remote(path, states[i % len(states)]) for i, r in enumerate(self.ranks)],
                    self.timeout_s, self._names(), LIMIT)[0]

    def save_pretrained(self, out_dir: str) -> None:
        wait([r.save_pretrained.remote(out_dir) for r in self.ranks], self.timeout_s, self._names(), LIMIT)

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement.group)
