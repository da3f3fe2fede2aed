"""``rlrelay bench rollout|sync|scale|step|learner|reward``: figures measured in one run, printed as a table or,
with ``--json``, as one JSON object.

- ``rollout`` (``cluster/bench_rollout.py``): tokens/s of vLLM through a ``RolloutWorker`` and
  through the Ray ``RolloutPool``, against transformers ``generate`` on the same model and prompts.
- ``sync`` (``cluster/bench_sync.py``): one weight push learner → W rollout workers, broken into
  gather, pack, object-store put, the workers' get, verify and the engine's reload, against the
  machine's memory-copy bandwidth measured in the same run.
- ``scale`` (``cluster/bench_scale.py``): the control plane alone, a stand-in worker that sleeps
  instead of generating, run through the real ``RolloutPool`` at several pool sizes.
- ``reward`` (``cluster/bench_reward.py``): a reward worker's cost per function call with the
  functions in a child process against in a thread, and the child's start time.

Every figure is measured ``--repeats`` (or ``--steps``/``--pushes``) times after a warm-up and
reported as median, min and max: the machines are shared and single runs are noisy.

Nothing heavy is imported here (the CLI's ``--help`` stays instant): each bench module is
imported by its handler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.argtypes import count, nonnegative_number, positive_int, positive_ints, positive_number
from cluster.config_pools import WEIGHT_TRANSPORTS

BENCH_ALPHABET = "0123456789+=-? abcdefghijklmnopqrstuvwxyz"
"""Characters of the bench models' char tokenizer (44 tokens with the 4 specials)."""

HEAD_DIM = 64
"""Attention head size of the bench models: vLLM's CPU attention rejects small ones such as 16."""


# -- the command line ---------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("bench", help="measure rollout throughput, weight sync, the learner (tokens/s, MFU, memory), "
                                          "reward-call cost, control-plane overhead, or one step taken apart",
                       description="Benchmarks measured in one run on a fresh local Ray instance (figures are "
                                   "medians with min/max over several runs, after a warm-up).")
    bench = p.add_subparsers(dest="bench", required=True)

    r = bench.add_parser("rollout", help="tokens/s of vLLM rollout workers vs transformers generate")
    _model_args(r, hidden=512, layers=9, intermediate=1536)
    r.add_argument("--batch", type=positive_int, default=64, help="prompts per generate call (one sample each)")
    r.add_argument("--prompt-len", type=positive_int, default=16, help="tokens per prompt (random characters)")
    r.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per prompt, forced in both")
    r.add_argument("--threads", type=positive_int, default=2, help="torch threads of both engines")
    r.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each engine (after one warm-up)")
    r.add_argument("--pool-workers", type=count, default=2,
                   help="workers of the Ray RolloutPool measured too, threads split between them (0: skip)")
    r.add_argument("--kv-cache-gib", type=positive_number, default=1.0, help="KV cache per vLLM engine")
    _common_args(r)
    r.set_defaults(handler=bench_command, bench_module="cluster.bench_rollout")

    s = bench.add_parser("sync", help="seconds to push the policy from the learner to W rollout workers")
    _model_args(s, hidden=1024, layers=8, intermediate=2816)
    s.add_argument("--workers", type=positive_int, default=2, help="rollout workers (real vLLM engines) receiving the push")
    s.add_argument("--pushes", type=positive_int, default=5, help="consecutive pushes measured on each path")
    s.add_argument("--bucket-mib", type=count, default=0,
                   help="0: share the gathered tensors as the learner does; N: copy into flat N-MiB buckets instead")
    s.add_argument("--kv-cache-gib", type=positive_number, default=0.25, help="KV cache per vLLM engine")
    s.add_argument("--transport", choices=WEIGHT_TRANSPORTS, default="auto",
                   help="transport of the production pushes (rollout.weight_transport); both are instrumented")
    s.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure transport variants (flat bucket sizes, warm pack buffer, no pack, checksums)")
    _common_args(s)
    s.set_defaults(handler=bench_command, bench_module="cluster.bench_sync")

    learn = bench.add_parser("learner", help="one learner rank's tokens/s, MFU and peak memory per memory option")
    from cluster.bench_learner import register_args as learner_args  # argparse only at import

    learner_args(learn)
    _common_args(learn)
    learn.set_defaults(handler=bench_command, bench_module="cluster.bench_learner")

    rw = bench.add_parser("reward", help="per-call cost of reward functions in a child process vs a thread")
    from cluster.bench_reward import register_args as reward_args  # argparse only at import

    reward_args(rw)
    _common_args(rw)
    rw.set_defaults(handler=bench_command, bench_module="cluster.bench_reward")

    c = bench.add_parser("scale", help="controller overhead per step with stand-in workers (no vLLM)")
    c.add_argument("--workers", type=positive_ints, default=[4, 8, 16, 32], help="pool sizes, comma-separated, grown in order")
    c.add_argument("--prompts", type=positive_int, default=1024, help="prompts per step")
    c.add_argument("--samples", type=positive_int, default=4, help="samples per prompt")
    c.add_argument("--response-tokens", type=positive_int, default=128, help="tokens in every stand-in response")
    c.add_argument("--latency", type=nonnegative_number, default=0.5, help="seconds every stand-in generate call takes")
    c.add_argument("--steps", type=positive_int, default=5, help="timed steps per pool size (after one warm-up)")
    c.add_argument("--num-cpus", type=nonnegative_number, default=0.05, help="Ray CPUs per stand-in actor")
    c.add_argument("--update-kib", type=positive_int, default=1024, help="size of the weight update broadcast, KiB")
    c.add_argument("--extrapolate", type=positive_int, default=512, help="pool size to extrapolate the figures to")
    _common_args(c)
    c.set_defaults(handler=bench_command, bench_module="cluster.bench_scale")

    st = bench.add_parser("step", help="one PPO step of the demo job taken apart; synchronous vs asynchronous")
    st.add_argument("--steps", type=positive_int, default=5, help="timed steps per run (after the warm-up)")
    st.add_argument("--warmup", type=positive_int, default=1, help="steps run first and not timed (at least 1)")
    st.add_argument("--layouts", default="split,default",
                    help="thread layouts to run, comma-separated: split (rollout and learner on a core each), "
                         "default (the demo's own); each runs once synchronous and once asynchronous")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override of deploy/jobs/demo.yaml for every run, e.g. rollout.prompts_per_step=16 "
                         "(repeatable; the bench's own keys win)")
    _common_args(st)
    st.set_defaults(handler=bench_command, bench_module="cluster.bench_step")


def _model_args(p, *, hidden: int, layers: int, intermediate: int) -> None:
    p.add_argument("--hidden", type=positive_int, default=hidden, help=f"hidden size (a multiple of {HEAD_DIM})")
    p.add_argument("--layers", type=positive_int, default=layers, help="transformer layers")
    p.add_argument("--intermediate", type=positive_int, default=intermediate, help="MLP intermediate size")


def _common_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")


def bench_command(args) -> int:
    import importlib

    module = importlib.import_module(args.bench_module)
    # vLLM and Ray's forwarded worker logs write to stdout; keep it for the result alone.
    load_before = os.getloadavg()[0]
    from cluster.config import ConfigError

    with stdout_to_stderr() as out:
        try:
            result = module.run(args)
        except ConfigError as e:  # e.g. --samples 1 where the job needs groups: before anything starts
            print(f"rlrelay: bench {args.bench}: {e}", file=sys.stderr)
            return 2
    # Other tenants of a shared machine show up here: a figure taken under load is low.
    result["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2),
                                   "cpus": os.cpu_count()}
    text = json.dumps(result, indent=2) if args.json else format_table(result)
    out.write(text + "\n")
    out.flush()
    return 0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator:
    """Point file descriptor 1 at stderr for the block; yields a stream to the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# -- figures ---------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (and the runs themselves)."""
    if not values:
        raise ValueError("no measurements")
    return {"median": significant(statistics.median(values)), "min": significant(min(values)),
            "max": significant(max(values)), "runs": [significant(v) for v in values]}


def significant(x: float) -> float:
    """Four significant digits: the machines are noisier than that."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, 3 - int(math.floor(math.log10(abs(x))))))


def format_table(result: dict, indent: int = 0) -> str:
    """A readable rendering of a bench result: one line per figure, spreads as median [min-max]."""
    lines = []
    pad = "  " * indent
    for key, value in result.items():
        if isinstance(value, dict) and "median" in value:
            lines.append(f"{pad}{key:<34} {value['median']:>12g}   [{value['min']:g} .. {value['max']:g}, "
                         f"n={len(value['runs'])}]")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(format_table(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                lines.append(f"{pad}{key}[{i}]:")
                lines.append(format_table(item, indent + 1))
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"{pad}{key:<34} {shown:>12}")
    return "\n".join(lines)


# -- the bench models ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """A Llama built from a config for the benches (random weights, char tokenizer).

    Example: ``ModelShape(hidden=512, layers=9, intermediate=1536)`` (30.7M parameters)
    """

    hidden: int
    """Hidden size; the head count is ``hidden / 64``."""
    layers: int
    """Transformer layers."""
    intermediate: int
    """MLP intermediate size."""

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM


def shape_from_args(args) -> ModelShape:
    if args.hidden % HEAD_DIM:
        raise SystemExit(f"rlrelay: --hidden must be a multiple of {HEAD_DIM} (vLLM's CPU attention), "
                         f"got {args.hidden}")
    return ModelShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)


def build_model(out_dir: Path, shape: ModelShape, seed: int) -> int:
    """Save a random Llama of ``shape`` with the char tokenizer to ``out_dir``; returns its parameters.

    The model can never emit end-of-sequence, so every response runs to exactly the token
    budget in vLLM and transformers alike (a random model samples ``</s>`` about once in
    44 tokens, and the rollout worker has no ``ignore_eos``): residual channel 0 holds a
    constant 1 that no layer writes to, and ``lm_head``'s ``</s>`` row reads only that
    channel, with weight -1e4. The cost of a forward pass is unchanged.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(BENCH_ALPHABET, out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        eos = model.lm_head.weight[tokenizer.eos_token_id]
        eos.zero_()
        eos[0] = -1e4
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def process_memory_mib(pid: int) -> dict:
    """Resident and unique memory of a process, MiB (unique: what killing it would free)."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"rss_mib": significant(info.rss / 2**20), "uss_mib": significant(info.uss / 2**20)}


class BareActor:
    """An actor whose module imports nothing heavy (this one): the floor of what a Ray actor
    process costs, beside which the stand-in rollout workers' memory is read."""

    def pid(self) -> int:
        return os.getpid()


def bench_config(overrides: list[str]):
    """The job config the pools are built from: defaults plus ``overrides``."""
    from cluster.config import load_config

    return load_config(None, [*overrides, "run.name=bench", "run.wandb_mode=disabled"])
