"""One learner rank: FSDP2-sharded policy, critic and reference, and the PPO update.

A plain class; ``cluster/`` runs ``world_size`` of them as Ray actors and drives them in
lock-step. Every collective (FSDP2's all-gathers and reduce-scatters, the state-dict gather)
needs all ranks to make the same calls in the same order, so each verb is called on every
rank with that rank's shard, and micro-batch counts are fixed by the driver, not by the
shard size.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer

from learner.batch import ForwardResult, Minibatch, RolloutBatch, TrainBatch, UpdateResult, merge_extreme
from learner.checkpoint import RankState, decode_rng, encode_rng, load_trained, save_trained
from learner.config import AlgorithmConfig, LearnerConfig
from learner.fsdp import (ShardingPlan, applied_options, cat_rows, gather_full_state, micro_batches, release_root,
                          shard_from_rank0, to_device)
from learner.losses import aggregate, kl_penalty, policy_loss, value_loss
from learner.models import (critic_skeleton, load_critic, load_policy, policy_skeleton, sequence_logprobs,
                            sequence_values)
from learner.schedule import LRSchedule, run_schedules, settings_changed
from learner.shared_weights import SharedWeights, SharedWeightWriter
from learner.weight_bucket import WeightUpdate, share_state_dict


class LearnerRank:
    """One rank of the learner group."""

    def __init__(self, rank: int, world_size: int, model_path: str, learner: LearnerConfig,
                 algorithm: AlgorithmConfig, temperature: float, total_updates: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.cfg = learner
        self.algo = algorithm
        self.temperature = temperature
        self.schedules = run_schedules(learner, algorithm, total_updates)
        self.device = torch.device("cuda" if learner.num_gpus > 0 else "cpu")
        torch.set_num_threads(learner.num_threads)
        self._head_checked = False
        """Whether the policy's head was checked to be ``lm_head(hidden)`` (``learner.chunked_head``)."""
        self._shared: SharedWeightWriter | None = None
        """Rank 0's shared-memory slots for same-host weight pushes, made on first use."""

    # -- set-up ------------------------------------------------------------------------------

    def free_port(self) -> int:
        """A free TCP port on this rank's host, for the process-group rendezvous (rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load and shard the models, build the optimisers."""
        gpu = self.device.type == "cuda"
        if gpu:
            torch.cuda.set_device(0)  # Ray exposes exactly the rank's own GPU
        # On GPU, NCCL for CUDA tensors and gloo for CPU ones: with CPU offload the gradient
        # shards, and so the clipping norm's all-reduce, live on the host, which NCCL refuses.
        # device_id makes NCCL connect here, so a broken network fails setup (the pool's ready
        # wait names the rank) rather than the first step after learner.timeout_s.
        dist.init_process_group("cuda:nccl,cpu:gloo" if gpu else "gloo",
                                init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=self.cfg.timeout_s),
                                device_id=torch.device("cuda", 0) if gpu else None)
        torch.manual_seed(self.cfg.seed)
        cfg = self.cfg
        if cfg.sharding == "none":  # replicate: HSDP whose shard groups have one rank
            mesh = init_device_mesh(self.device.type, (self.world_size, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
        # fp32 master weights everywhere; on GPU compute runs in bf16 and gradients reduce in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu else None
        # CPU offload only means something when compute is on a GPU.
        if (cfg.cpu_offload or cfg.reference_offload) and not gpu and self.rank == 0:
            logging.getLogger("rlrelay").info("learner.cpu_offload/reference_offload: no effect when training on CPU")
        trained = ShardingPlan(mesh=mesh, reshard_after_forward=cfg.sharding == "full", mp=mp,
                               offload=cfg.cpu_offload and gpu, compile_blocks=cfg.compile)
        ckpt = cfg.activation_checkpointing
        packed = cfg.pack_sequences
        path = self.model_path

        def build(skeleton, load, plan: ShardingPlan, checkpoint: bool = ckpt) -> nn.Module:
            return shard_from_rank0(skeleton(path, torch.float32, packed), lambda: load(path, torch.float32, packed),
                                    plan, self.device, checkpoint)

        self.policy = build(policy_skeleton, load_policy, trained)
        self.policy_opt, self.policy_sched = self._optimizer(self.policy, cfg.lr, self.schedules["policy"])
        self.critic = self.critic_opt = self.critic_sched = None
        if self.algo.uses_critic:
            self.critic = build(critic_skeleton, load_critic, trained)
            self.critic_opt, self.critic_sched = self._optimizer(self.critic, cfg.critic_lr, self.schedules["critic"])
        self.reference = None
        if self.algo.uses_reference:
            # Resharded after its forward whatever the trained models do: no backward follows
            # that would free a gathered copy, which under grad_op/none stayed for the whole job.
            frozen = replace(trained, offload=(cfg.reference_offload or cfg.cpu_offload) and gpu,
                             reshard_after_forward=True)
            self.reference = build(policy_skeleton, load_policy, frozen, checkpoint=False)
            self.reference.requires_grad_(False).eval()
        dist.barrier()  # every rank is set up and the group carries a collective end to end

    def sees(self, path: str, token: str) -> bool:
        """Whether the file ``path`` holds ``token`` as this rank sees it: the driver's probe of a
        directory it and the ranks must share (checkpoint shards, the final model)."""
        try:
            return Path(path).read_text(encoding="utf-8") == token
        except OSError:
            return False

    def applied_options(self) -> dict[str, object]:
        """What the options did to the policy, read from its modules (``fsdp.applied_options``)."""
        return applied_options(self.policy)

    def _optimizer(self, model: nn.Module, lr: float, schedule: LRSchedule):
        # The fused kernel updates every parameter in a few launches; the default per-tensor
        # path over FSDP2's DTensors took 55 ms a step for 0.5B on an H100 (measured).
        fused = self.device.type == "cuda" and not self.cfg.cpu_offload
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay,
                                betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)

    # -- verbs -------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: RolloutBatch, micro_sizes: list[int]) -> ForwardResult:
        """Old log-probs, reference log-probs and values for this rank's shard."""
        self.policy.eval()
        old, ref, val = [], [], []
        for micro, real in micro_batches(batch, micro_sizes):
            micro = to_device(micro, self.device)
            old.append(self._logprobs(self.policy, micro)[0][:real])
            if self.reference is not None:
                ref.append(self._logprobs(self.reference, micro)[0][:real])
            if self.critic is not None:
                val.append(sequence_values(self.critic, micro, self.cfg.pack_sequences)[:real])
        for model in (self.policy, self.reference, self.critic):
            if model is not None:
                release_root(model)
        t = batch.response_mask.shape[1]
        return ForwardResult(old_logprobs=cat_rows(old, t), ref_logprobs=cat_rows(ref, t) if ref else None,
                             values=cat_rows(val, t) if val else None)

    def update(self, minibatches: list[Minibatch], train_policy: bool = True) -> UpdateResult:
        """One optimizer step per minibatch for the policy (and the critic, if any)."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        extremes: dict[str, float] = {}

        def record(metrics: dict[str, float], weight: float) -> None:
            for k, v in metrics.items():
                if k.endswith(("_max", "_min")):
                    extremes[k] = merge_extreme(k, extremes.get(k), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * weight
                    weights[k] = weights.get(k, 0.0) + weight

        skipped = 0
        self.policy.train()
        for mb in minibatches:
            if train_policy:
                self.policy_opt.zero_grad(set_to_none=True)
            if self.critic is not None:
                self.critic.train()
                self.critic_opt.zero_grad(set_to_none=True)
            for i, (micro, real) in enumerate(micro_batches(mb.batch, mb.micro_sizes)):
                self._sync_gradients(last=i == len(mb.micro_sizes) - 1)
                if real:  # compute spent on padding: a padded micro-batch is as wide as its longest row
                    seen = micro.rollouts.attention_mask[:real]
                    padding = 0.0 if self.cfg.pack_sequences else 1.0 - float(seen.sum()) / seen.numel()
                    record({"learner/padding_fraction": padding}, float(seen.numel()))
                micro = to_device(micro, self.device)
                # A padding micro-batch (this rank ran out of rows) still runs forward and
                # backward so the collectives line up, but contributes nothing.
                scale = float(self.world_size) if real else 0.0
                tokens = float(micro.rollouts.response_mask[:real].sum())
                if train_policy:
                    loss, metrics = self._policy_loss(micro, mb)
                    (loss * scale).backward()
                    if real:
                        record(metrics, tokens)
                if self.critic is not None:
                    loss, metrics = self._value_loss(micro, mb)
                    (loss * scale).backward()
                    if real:
                        record(metrics, tokens)
            if train_policy:
                lr = self.policy_sched.get_last_lr()[0]  # the rate this step uses
                norm = self._step(self.policy, self.policy_opt, self.policy_sched)
                skipped += not math.isfinite(norm)
                if math.isfinite(norm):
                    record({"policy/grad_norm": norm, "policy/lr": lr}, 1.0)
            if self.critic is not None:
                norm = self._step(self.critic, self.critic_opt, self.critic_sched)
                skipped += not math.isfinite(norm)
                if math.isfinite(norm):
                    record({"value/grad_norm": norm}, 1.0)
        return UpdateResult(metric_sums=sums, metric_weights=weights, skipped_updates=skipped,
                            metric_extremes=extremes)

    def export_weights(self, version: int, transport: str = "object_store"
                       ) -> tuple[int, WeightUpdate | SharedWeights | None]:
        """Gather the full policy weights (collective); rank 0 returns them as ``version``, after
        their size in bytes (0 on the other ranks, which only take part in the gather): two
        values, so a caller can wait on the small one without fetching the weights.

        ``transport="object_store"``: the update itself, for Ray to copy into its object store;
        ``"shared_memory"``: the weights written into this process's shared memory and a small
        descriptor of them, for rollout workers on this host (``learner/shared_weights.py``)."""
        state = self.full_policy_state()
        update = None
        if state is not None:
            # Object store: the update wraps the tensors without a copy; Ray copies them into its
            # store once, when this call returns (this actor runs one call at a time, so no
            # update can change them before that).
            update = (self.write_shared(state, version) if transport == "shared_memory"
                      else share_state_dict(state, version=version))
        return (update.nbytes if update is not None else 0), update

    def write_shared(self, state: dict[str, torch.Tensor], version: int) -> SharedWeights:
        """Write full weights into this rank's shared-memory slots (made on first use)."""
        if self._shared is None:
            self._shared = SharedWeightWriter()
        return self._shared.write(state, version=version)

    def full_policy_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights as contiguous CPU tensors under their checkpoint names
        (collective); rank 0 gets them, the other ranks None. Sent in bf16 from a GPU; a tied
        head is left out (``drop_aliases``)."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return gather_full_state(self.policy, self.rank, self.world_size, self.device, dtype)

    def save_checkpoint(self, path: str) -> RankState:
        """Write this rank's shards of every model and optimizer into the DCP directory
        ``path`` (collective); returns the plain state that goes to JSON."""
        groups, schedulers, unstepped = save_trained(path, list(self._trained()))
        cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return RankState(param_groups=groups, schedulers=schedulers, rng=encode_rng(torch.get_rng_state()),
                         cuda_rng=None if cuda is None else encode_rng(cuda), schedule=self.schedules["policy"],
                         unstepped=unstepped)

    def load_checkpoint(self, path: str, state: RankState) -> str | None:
        """Load what ``save_checkpoint`` wrote (any rank count that FSDP2 can reshard to).

        The checkpoint supplies the state: weights, optimizer moments, step counts. The config
        supplies the settings: peak learning rates, weight decay and the schedule, its length
        from the current ``trainer.steps``; the next update's rate is that schedule's at the
        checkpoint's step. With the checkpoint's own settings this is the rate it holds, bit for
        bit; when the rate moves by more than 1 %, returns the warning that says from what to what
        and why (every rank computes the same one; the driver logs it, where the user reads).
        """
        rates, changes = {}, []
        for name, *_ in self._trained():
            peak = self._peak_lr(name)
            rates[name] = peak, peak * self.schedules[name].factor(state.schedulers[name]["last_epoch"])
            was = state.param_groups[name][0]["lr"]  # the rate the checkpoint's next update would have used
            if abs(rates[name][1] - was) > 0.01 * abs(was):
                changes.append(f"{was:.3g} to {rates[name][1]:.3g} ({name})")
        load_trained(path, list(self._trained()), state, rates, self.cfg.weight_decay)
        warning = None
        if changes:
            warning = (f"resume at optimizer step {state.schedulers['policy']['last_epoch']}: the next update's "
                       f"learning rate goes from {', '.join(changes)}, as the config asks "
                       f"({'; '.join(self._lr_settings_changed(state))}); the optimizer moments and step count "
                       f"are the checkpoint's")
        torch.set_rng_state(decode_rng(state.rng))
        if state.cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(decode_rng(state.cuda_rng))
        return warning

    def _peak_lr(self, name: str) -> float:
        return self.cfg.lr if name == "policy" else self.cfg.critic_lr

    def _lr_settings_changed(self, state: RankState) -> list[str]:
        saved = {name: groups[0]["initial_lr"] for name, groups in state.param_groups.items()}
        peaks = {name: self._peak_lr(name) for name, *_ in self._trained()}
        return settings_changed(saved, peaks, state.schedule, self.schedules["policy"],
                                state.schedulers["policy"]["last_epoch"])

    def save_pretrained(self, out_dir: str) -> None:
        """Gather the full policy (collective) and write it as a Hugging Face model (rank 0)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.policy, options=options)
        if self.rank == 0:
            model = load_policy(self.model_path, torch.float32)
            model.load_state_dict(state)
            model.save_pretrained(out_dir)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)

    def _trained(self):
        yield "policy", self.policy, self.policy_opt, self.policy_sched
        if self.critic is not None:
            yield "critic", self.critic, self.critic_opt, self.critic_sched

    def shutdown(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- internals ---------------------------------------------------------------------------

    def _policy_loss(self, micro: TrainBatch, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        algo = self.algo
        mask = micro.rollouts.response_mask
        logprobs, entropy = self._logprobs(self.policy, micro.rollouts, with_entropy=True)
        denominators = dict(num_tokens=mb.num_tokens, num_seqs=mb.num_seqs)
        loss, metrics = policy_loss(
            logprobs, micro.old_logprobs, micro.advantages, mask,
            clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
            loss_agg=algo.loss_agg, importance_weights=micro.importance_weights, **denominators)
        metrics = {f"policy/{k}": v for k, v in metrics.items()}
        entropy_term = aggregate(entropy, mask, algo.loss_agg, **denominators)
        metrics["policy/entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy_term
        if micro.ref_logprobs is not None and algo.kl_place == "loss":
            kl = kl_penalty(logprobs, micro.ref_logprobs, algo.kl_estimator)
            coef = algo.kl_coef if mb.kl_coef is None else mb.kl_coef
            loss = loss + coef * aggregate(kl, mask, algo.loss_agg, **denominators)
            metrics["kl/loss_term"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, metrics

    def _logprobs(self, model: nn.Module, batch: RolloutBatch, with_entropy: bool = False):
        # The chunked head's assumption is checked once, on the first pass, from logits the
        # model computes anyway (a separate probe would cost compiled blocks a compilation).
        check = self.cfg.chunked_head and not self._head_checked
        self._head_checked = True
        return sequence_logprobs(model, batch, self.temperature, with_entropy, chunked_head=self.cfg.chunked_head,
                                 compiled_head=self.cfg.compile, check_head=check, packed=self.cfg.pack_sequences)

    def _value_loss(self, micro: TrainBatch, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        values = sequence_values(self.critic, micro.rollouts, self.cfg.pack_sequences)
        loss, metrics = value_loss(values, micro.old_values, micro.returns, micro.rollouts.response_mask,
                                   clip_range=self.algo.value_clip, loss_agg=self.algo.loss_agg,
                                   num_tokens=mb.num_tokens, num_seqs=mb.num_seqs)
        return loss, {f"value/{k}": v for k, v in metrics.items()}

    def _sync_gradients(self, last: bool) -> None:
        """Whether the coming backward reduces gradients across ranks.

        Under ``learner.sharding=none`` every rank holds whole gradients anyway, so they add up
        locally over a step's micro-batches and are all-reduced once, in the last one's backward
        (DDP's ``no_sync``): one all-reduce of the gradients per optimizer step instead of one
        per micro-batch, and no more memory: the local sum takes the place of the reduced gradients a
        rank would keep between micro-batches. ``full`` and ``grad_op`` reduce-scatter in every
        backward, which is what keeps only a shard of the gradients on each rank.
        """
        if self.cfg.sharding != "none" or (self.cfg.cpu_offload and self.device.type == "cuda"):
            # Offloaded, the local sum would stay on the GPU in fp32 for the whole step (FSDP2
            # accumulates unsynced gradients on the compute device), 4 bytes a parameter that
            # offloading exists to keep off it.
            return
        for model in (self.policy, self.critic):
            if model is not None:
                model.set_requires_gradient_sync(last)

    def _step(self, model: nn.Module, opt, sched) -> float:
        """Clip and apply the accumulated gradient; returns its norm before clipping.

        A non-finite norm (NaN/inf loss or gradient) skips the step on every rank alike (the
        norm is all-reduced), leaving weights, optimizer and schedule untouched; the driver
        counts skips and stops a run that keeps producing them.
        """
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
        if math.isfinite(norm):
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        return norm
