"""``rlrelay plan``: does a job's learner fit its GPUs, and if not, which option to turn on.

Reads the policy's architecture (``--model-config``, the demo's model, ``model.path``'s
config.json, or a built-in table when the path is a cluster's and not on this machine) and the
job config, runs the memory model (``cluster/memory_model.py``) and prints a per-GPU table and
a verdict (``--json``: one object). torch is not imported: the command is arithmetic only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.argtypes import positive_int, positive_number
from cluster.memory_advice import advise, largest_micro_batch, smallest_world_size
from cluster.architecture import Architecture, PlanError
from cluster.memory_model import (FIXED_OVERHEAD_BYTES, FRAGMENTATION, GIB, ROWS, SAFETY_MARGIN, SHARDING_MODES,
                                  Footprint, LearnerShape, MemoryOptions, memory_options, plan_memory)

if TYPE_CHECKING:
    from cluster.config import Config


# Public config.json numbers of models the GPU job configs name, used only when model.path
# does not exist on this machine (planning on a laptop for a cluster's /models).
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                                  intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-1.5B-Instruct": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                                  intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-7B-Instruct": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                                intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, tie_word_embeddings=False),
    "Meta-Llama-3-8B-Instruct": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                                     intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, tie_word_embeddings=False),
}


# -- where the architecture comes from -------------------------------------------------------

def demo_architecture(settings) -> Architecture:
    """The demo's Llama (``cluster.demo.build_policy``) for ``settings`` (a ``DemoSettings``)."""
    from cluster.demo import ALPHABET
    from learner.tokenizer import SPECIAL_TOKENS

    return Architecture(model_type="llama", vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET),
                        hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
                        num_layers=settings.num_layers, num_heads=settings.num_heads,
                        num_kv_heads=settings.num_heads, head_dim=settings.hidden_size // settings.num_heads,
                        tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False)


def resolve_architecture(cfg: "Config", model_config: str | None) -> tuple[Architecture, str]:
    """The policy's architecture and a sentence saying where it came from.

    In order: ``--model-config`` (a config.json or a model directory); the demo's model when
    ``model.path`` is null; ``model.path``/config.json; and, only when ``model.path`` does not
    exist on this machine, the built-in table keyed by the directory's name.
    """
    def read(file: Path) -> Architecture:
        try:
            return Architecture.from_hf_config(json.loads(file.read_text()))
        except (OSError, ValueError) as e:
            raise PlanError(f"{file}: {e}") from None

    if model_config is not None:
        path = Path(model_config)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise PlanError(f"--model-config {model_config}: no such config.json")
        return read(file), f"{file} (--model-config)"
    if cfg.model.path is None:
        return demo_architecture(cfg.demo), "the demo's own model (model.path is null), from the demo: settings"
    path = Path(cfg.model.path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PlanError(f"model.path {path} has no config.json")
        return read(path / "config.json"), str(path / "config.json")
    known = KNOWN_CONFIGS.get(path.name)
    if known is None:
        raise PlanError(f"model.path {path} does not exist here and {path.name!r} is not in the built-in table "
                        f"({', '.join(KNOWN_CONFIGS)}): pass --model-config PATH (a config.json or model directory)")
    return (Architecture.from_hf_config(known),
            f"{path} does not exist here: built-in table entry {path.name!r} (--model-config PATH to use a file)")


# -- the command -----------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU learner memory of a job, and whether it fits",
                       description="Estimate the per-GPU memory of each learner rank (parameters, gradients, "
                                   "optimizer state, activations, logits of policy, critic and reference) from "
                                   "the policy's config.json and the job config; say whether it fits and which "
                                   "option to turn on if not. Nothing is loaded or trained.")
    p.add_argument("config", help="job config YAML, e.g. deploy/jobs/gsm8k-0.5b-rm-1node.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. learner.micro_batch_size=4")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--model-config", metavar="PATH", help="the policy's config.json (or its directory), "
                                                          "instead of model.path's")
    p.add_argument("--sharding", choices=SHARDING_MODES, help="learner.sharding (default full)")
    for flag, name in (("--cpu-offload", "learner.cpu_offload"),
                       ("--activation-checkpointing", "learner.activation_checkpointing"),
                       ("--reference-offload", "learner.reference_offload")):
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{name} (default off)")
    p.add_argument("--gpus-per-node", type=positive_int, help="learner.gpus_per_node (default 8)")
    p.add_argument("--gpu-memory-gib", type=positive_number, help="learner.gpu_memory_gib (default 80)")
    p.set_defaults(handler=plan_command)


def plan_command(args) -> int:
    from cluster.cli import load

    cfg = load(args)
    try:
        options = memory_options(cfg.learner, sharding=args.sharding, cpu_offload=args.cpu_offload,
                                 activation_checkpointing=args.activation_checkpointing,
                                 reference_offload=args.reference_offload, gpus_per_node=args.gpus_per_node,
                                 gpu_memory_gib=args.gpu_memory_gib)
        arch, source = resolve_architecture(cfg, args.model_config)
    except PlanError as e:
        print(f"rlrelay: plan: {e}", file=sys.stderr)
        return 2
    report = build_report(arch, LearnerShape.from_config(cfg), options, cfg)
    report["config"], report["model"]["source"] = str(args.config), source
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def build_report(arch: Architecture, shape: LearnerShape, options: MemoryOptions, cfg: "Config") -> dict:
    """Everything ``rlrelay plan`` prints, as plain data (bytes as integers)."""
    result = plan_memory(arch, shape, options)
    steps = advise(arch, shape, options)
    # Alternatives to the ladder: with the options as they are if a rung fixes it, else on top of all rungs.
    ladder_fits = bool(steps) and steps[-1][1].fits
    alt_options = options if ladder_fits else \
        dataclasses.replace(options, **{k: v for r, _ in steps for k, v in r.change.items()})
    rollout_gpus = cfg.rollout.num_gpus
    weights = 2 * arch.policy_params
    return {
        "model": {"architecture": dataclasses.asdict(arch), "description": arch.describe(),
                  "policy_params": arch.policy_params, "critic_params": arch.critic_params},
        "learner": {"device": "gpu" if shape.mixed_precision else "cpu", "world_size": shape.world_size, "nodes": math.ceil(shape.world_size / options.gpus_per_node),
                    "compute": "bf16 (fp32 master weights and gradient reduction)" if shape.mixed_precision
                    else "fp32 on CPU (learner.num_gpus=0): bytes are host memory per rank",
                    "micro_batch_size": shape.micro_batch_size, "micro_batch_tokens": shape.micro_batch_tokens,
                    "seq_len": shape.seq_len,
                    "response_len": shape.response_len, "critic": shape.critic, "reference": shape.reference},
        "options": dataclasses.asdict(options),
        "per_gpu": {name: _row_dict(result.column(name)) for name in result.resident}
        | {"peak": _row_dict(result.peak)},
        "peak_model": result.peak_model,
        "overhead_bytes": result.overhead_bytes,
        "forward_pass_bytes": result.forward_bytes,
        "total_bytes": result.total_bytes,
        "usable_bytes": result.usable_bytes,
        "host_bytes_per_rank": result.host_bytes,
        "fits": result.fits,
        "advice": [{"setting": r.setting, "cost": r.cost, "total_bytes": p.total_bytes, "fits": p.fits}
                   for r, p in steps],
        "alternatives": None if result.fits else {
            "with_ladder": not ladder_fits,
            "micro_batch_size": largest_micro_batch(arch, shape, alt_options),
            "world_size": smallest_world_size(arch, shape, alt_options)},
        # gpu_memory_utilization is a share of the whole GPU, also for an engine on a fraction of
        # one; the GPU is taken to be the learner's kind (learner.gpu_memory_gib).
        "rollout": {"workers": cfg.rollout.num_workers, "gpus_per_worker": rollout_gpus,
                    "weights_bytes_bf16": weights, "gpu_memory_gib": options.gpu_memory_gib,
                    "kv_cache_bytes": int(cfg.rollout.gpu_memory_utilization * options.gpu_memory_gib * GIB) - weights
                    if rollout_gpus > 0 else None},
    }


def _micro(learner: dict) -> str:
    if learner["micro_batch_tokens"]:
        return f"micro-batches of up to {learner['micro_batch_tokens']} tokens"
    return f"micro-batch {learner['micro_batch_size']} x {learner['seq_len']} tokens"


def _row_dict(fp: Footprint) -> dict:
    return dataclasses.asdict(fp) | {"total": fp.total}


def _gib(n: int, unit: int = GIB) -> str:
    return f"{n / unit:.2f}"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.2f} MiB"


def render(report: dict) -> str:
    """The human-readable plan: a per-GPU table (GiB), the verdict and what to turn on."""
    learner, opts, per_gpu = report["learner"], report["options"], report["per_gpu"]
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    lines = [f"rlrelay plan: {report['config']}",
             f"model: {report['model']['source']}",
             f"  {report['model']['description']}",
             f"learner: {learner['world_size']} rank(s) on {learner['nodes']} node(s) of {opts['gpus_per_node']} "
             f"GPUs x {opts['gpu_memory_gib']:g} GiB; {learner['compute']}",
             f"  sharding {opts['sharding']}, activation checkpointing {on(opts['activation_checkpointing'])}, "
             f"reference offload {on(opts['reference_offload'])}, cpu offload {on(opts['cpu_offload'])}",
             f"  {_micro(learner)} (model.max_model_len {learner['seq_len']}), "
             f"logits over {learner['response_len']} response tokens (rollout.max_new_tokens)",
             ""]
    columns = list(per_gpu)
    unit, name = (GIB, "GiB") if per_gpu["peak"]["total"] >= GIB else (1024**2, "MiB")  # the demo's are tiny
    where = "per GPU" if learner["device"] == "gpu" else "per rank"
    lines.append(f"{f'{where}, training step ({name})':<30}" + "".join(f"{c:>11}" for c in columns))
    for row in (*ROWS, "total"):
        label = {"optimizer": "optimizer state", "total": "total (tensors)"}.get(row, row)
        lines.append(f"  {label:<28}" + "".join(f"{_gib(per_gpu[c][row], unit):>11}" for c in columns))
    context = f"{FIXED_OVERHEAD_BYTES / GIB:g} GiB context + " if learner["device"] == "gpu" else ""  # none on CPU
    peak = report["peak_model"]
    lines += [f"  {'overhead':<28}{'':>{11 * (len(columns) - 1)}}{_gib(report['overhead_bytes'], unit):>11}",
              f"  (columns: each model while it computes; peak: while the {peak} trains, the others resident; "
              f"overhead: {context}{FRAGMENTATION:.0%} fragmentation)",
              f"forward pass (old/ref log-probs, values): {_gib(report['forward_pass_bytes'])} GiB incl. overhead"]
    if report["host_bytes_per_rank"]:
        lines.append(f"host memory for offloaded state: {_gib(report['host_bytes_per_rank'])} GiB per rank")
    usable = f"{_gib(report['usable_bytes'])} GiB usable ({opts['gpu_memory_gib']:g} GiB less a " \
             f"{SAFETY_MARGIN:.0%} safety margin)"
    verdict = "FITS" if report["fits"] else "DOES NOT FIT"
    lines.append(f"verdict: {verdict}: {_gib(report['total_bytes'])} GiB planned {where}, {usable}")
    if report["advice"]:
        lines.append("to fit, turn on in this order (cheapest first):")
        for i, step in enumerate(report["advice"], 1):
            lines.append(f"  {i}. {step['setting']:<38} -> {_gib(step['total_bytes'])} GiB "
                         f"{'fits' if step['fits'] else 'still too much'}   ({step['cost']})")
    alt = report["alternatives"]
    if alt is not None:
        if not alt["with_ladder"]:
            what = "or, instead, with the options as they are"
        else:
            what = "with all of these on, also" if report["advice"] else "with every option already on"
        key = "micro_batch_tokens" if learner["micro_batch_tokens"] else "micro_batch_size"
        mb = f"learner.{key}={alt['micro_batch_size']}" if alt["micro_batch_size"] else "no micro-batch"
        ws = (f"learner.world_size={alt['world_size']} "
              f"({math.ceil(alt['world_size'] / opts['gpus_per_node'])} node(s))" if alt["world_size"] else "no size")
        lines.append(f"{what}: {mb} fits; or more GPUs: {ws} fits")
    ro = report["rollout"]
    where = f"{ro['workers']} worker(s) x {ro['gpus_per_worker']:g} GPU" if ro["gpus_per_worker"] else \
        f"{ro['workers']} CPU worker(s)"
    if ro["kv_cache_bytes"] is None:  # CPU engines
        kv = ""
    elif ro["kv_cache_bytes"] > 0:
        kv = (f"; at rollout.gpu_memory_utilization of a {ro['gpu_memory_gib']:g} GiB GPU about "
              f"{_gib(ro['kv_cache_bytes'])} GiB is left for the KV cache and activations")
    else:
        kv = (f"; THE WEIGHTS DO NOT FIT in rollout.gpu_memory_utilization of a {ro['gpu_memory_gib']:g} GiB GPU: "
              f"vLLM will not start")
    lines.append(f"rollout (informational): vLLM weights {_size(ro['weights_bytes_bf16'])} in bf16 per engine, "
                 f"{where}{kv}")
    return "\n".join(lines)
