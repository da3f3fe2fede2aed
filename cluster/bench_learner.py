"""``rlrelay bench learner``: one learner rank's training throughput and peak memory per memory
option, with the planner's prediction beside each.

No Ray and no vLLM: the learner's plain ``LearnerRank`` runs in a fresh process per option
(world size 1, NCCL on a GPU, gloo on CPU), so every option starts from an empty allocator
and its peak is its own. A Qwen2-shaped model is built from a config (random weights): the
``0.5b`` preset has Qwen2.5-0.5B's shape, ``0.5b-llama`` a Llama-shaped 0.5B with a 32k
vocabulary, ``tiny`` is for CPU and the tests.

Per option it reports:

- ``update_s``: one optimizer step over ``--micro-steps`` micro-batches of ``--micro-batch``
  sequences of ``--seq-len`` tokens (``--prompt-len`` of prompt, the rest response), the
  learner's own PPO losses, gradient clipping and AdamW; ``forward_s``: the no-grad pass
  before it (old and reference log-probs, values);
  With ``--ragged`` the rows have random lengths and are arranged as the learner's driver
  deals them to a rank (longest first, micro-batches by ``--micro-batch`` rows or by a
  ``--micro-tokens`` budget); ``--unsorted`` keeps them in generated order, cut by count;
- ``train_tokens_per_s``: real (unpadded) tokens through forward and backward per second of
  ``update_s``;
- ``mfu``: model FLOPs per second over the GPU's dense bf16 peak. Model FLOPs per sequence
  are 6 x the blocks' parameters x seq_len, plus 6 x layers x seq_len^2 x q_dim for causal
  attention (half of a full square, the work flash attention does), plus 6 x the lm_head's
  parameters x the response length (only response positions need logits, and the learner
  computes no others); a critic adds its blocks and attention. Recomputation is not counted:
  neither the blocks' under activation checkpointing nor the chunked head's second logits
  matmul in backward;
  ``matmul_tflops`` is an 8192^3 bf16 product measured in the same run, the achievable bound;
- ``peak_allocated_gib`` (``torch.cuda.max_memory_allocated`` over set-up, forward and
  update) beside ``planned_tensors_gib`` (the plan without its fixed overhead), and
  ``peak_reserved_gib`` and ``device_used_gib`` (what ``nvidia-smi`` would show) beside
  ``planned_total_gib``; on CPU, ``peak_rss_gib``: the option's process's peak resident memory
  (Python, torch and gloo included).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from cluster.bench import spread
from cluster.gpu_bounds import GIB, dense_peak_tflops, measure_bounds

PRESETS = {
    # Qwen2.5-0.5B's shape: grouped k/v heads, q/k/v biases, tied embeddings, 152k vocabulary.
    "0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen2.5-1.5B's shape.
    "1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    # A Llama-shaped 0.5B: 32k vocabulary (untied), 16 blocks of 1536, head dim 128 (4 k/v heads).
    # Qwen's 0.5B spends a third of its FLOPs in a 152k-vocabulary head on a narrow 896-wide
    # trunk; this shape is the other common kind of 0.5B, whose work is in wide matmuls.
    "0.5b-llama": dict(model_type="llama", vocab_size=32000, hidden_size=1536, intermediate_size=4096,
                       num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False),
    # The demo's policy (cluster/demo.py): for profiling the CPU demo's learner.
    "demo": dict(model_type="llama", vocab_size=16, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Qwen's 152k vocabulary on a small trunk: the head's share of memory and time, on a CPU.
    "vocab152k": dict(model_type="qwen2", vocab_size=151936, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}

OPTIONS = {
    # name: config overrides. Policy only (GRPO, no KL) unless the name says ppo.
    "full": [],
    "grad_op": ["learner.sharding=grad_op"],
    "none": ["learner.sharding=none"],
    "full+ckpt": ["learner.activation_checkpointing=true"],
    "grad_op+ckpt": ["learner.sharding=grad_op", "learner.activation_checkpointing=true"],
    "full+offload": ["learner.cpu_offload=true"],
    "full+compile": ["learner.compile=true"],
    "grad_op+compile": ["learner.sharding=grad_op", "learner.compile=true"],
    # The model's own lm_head and [B, T, V] logits instead of the chunked head.
    "full+logits": ["learner.chunked_head=false"],
    "grad_op+compile+logits": ["learner.sharding=grad_op", "learner.compile=true", "learner.chunked_head=false"],
    # Padding-free micro-batches (learner/packing.py); they differ from the rest on --ragged rows.
    "full+packed": ["learner.pack_sequences=true"],
    "grad_op+compile+packed": ["learner.sharding=grad_op", "learner.compile=true", "learner.pack_sequences=true"],
    # PPO as the demo runs it: a critic, and a reference for the KL penalty in the reward.
    "ppo-full": ["algorithm.advantage_estimator=gae", "algorithm.kl_coef=0.05"],
    "ppo-full+ckpt": ["algorithm.advantage_estimator=gae", "algorithm.kl_coef=0.05",
                      "learner.activation_checkpointing=true"],
}
POLICY_ONLY = ["algorithm.advantage_estimator=grpo", "rollout.samples_per_prompt=4", "algorithm.kl_coef=0"]

def register_args(p) -> None:
    from cluster.argtypes import count, positive_int, positive_number

    p.add_argument("--preset", choices=sorted(PRESETS), default="0.5b", help="model shape")
    p.add_argument("--options", default="full,grad_op,none,full+ckpt,full+offload,ppo-full",
                   help=f"memory options to measure, comma-separated, from {', '.join(OPTIONS)}")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt-len", type=positive_int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--micro-batch", type=positive_int, default=4, help="sequences per micro-batch")
    p.add_argument("--micro-steps", type=positive_int, default=4, help="micro-batches accumulated per optimizer step")
    p.add_argument("--steps", type=positive_int, default=3, help="timed optimizer steps per option (after one warm-up)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (fp32, gloo) even when a GPU is present")
    p.add_argument("--peak-tflops", type=positive_number, help="dense bf16 peak of the GPU (default: from its name)")
    p.add_argument("--timeout", type=positive_number, default=900.0, help="seconds allowed per option")
    p.add_argument("--ragged", action="store_true",
                   help="random lengths (prompts 1/4 to all of --prompt-len, responses 1 to the rest) instead of full rows")
    p.add_argument("--unsorted", action="store_true",
                   help="keep rows in generated order, cut by count (the learner's dealing before rows were "
                        "arranged by length); default: arranged as the driver deals them to a rank")
    p.add_argument("--micro-tokens", type=count, default=0, metavar="N",
                   help="learner.micro_batch_tokens for every option (micro-batches cut by a token budget)")
    p.add_argument("--threads", type=count, default=0, metavar="N",
                   help="learner.num_threads: torch CPU threads of the one rank (default 0: every core this "
                        "process may run on, for CPU AdamW under full+offload and for a CPU learner)")
    p.add_argument("--profile", type=count, default=0, metavar="ROWS",
                   help="also profile one forward + update per option (torch.profiler) and report its top ROWS ops")


def run(args, progress: Callable[[dict], None] | None = None) -> dict:
    """Every option in its own process; ``progress(result so far)`` after each, so a run cut
    short by a machine's time limit keeps the options it finished."""
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"rlrelay: bench learner: unknown option(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(OPTIONS)}")
    if not 0 < args.prompt_len < args.seq_len:
        raise SystemExit("rlrelay: bench learner: --prompt-len must be between 0 and --seq-len")
    result = {"bench": "learner", "device": torch.cuda.get_device_name() if gpu else "cpu",
              "torch": torch.__version__, "preset": args.preset,
              "batch": {"micro_batch": args.micro_batch, "micro_steps": args.micro_steps, "seq_len": args.seq_len,
                        "prompt_len": args.prompt_len, "ragged": args.ragged, "unsorted": args.unsorted,
                        "micro_tokens": args.micro_tokens,
                        "tokens_per_update": args.micro_batch * args.micro_steps * args.seq_len}}
    if gpu:
        peak = args.peak_tflops or dense_peak_tflops(torch.cuda.get_device_name())
        result["peak_bf16_tflops"] = peak
        bounds = in_fresh_process(measure_bounds, {}, args.timeout)
        result |= {"bounds_error": bounds["error"]} if "error" in bounds else bounds
    # One rank has the machine to itself: the config's default of 2 threads would leave the
    # offloaded optimizer step on 2 of a GPU host's cores.
    result["threads"] = args.threads or len(os.sched_getaffinity(0))  # the cores this process may use
    with tempfile.TemporaryDirectory(prefix="rlrelay-bench-learner-") as tmp:
        model_dir = Path(tmp) / "model"
        result["model"] = build_model(model_dir, PRESETS[args.preset], seed=args.seed)
        result["options"] = {}
        for name in names:
            budget = [f"learner.micro_batch_tokens={args.micro_tokens}"] if args.micro_tokens else []
            spec = dict(model_dir=str(model_dir), overrides=POLICY_ONLY + OPTIONS[name] + budget, gpu=gpu,
                        ragged=args.ragged, unsorted=args.unsorted,
                        seq_len=args.seq_len, prompt_len=args.prompt_len, micro_batch=args.micro_batch,
                        micro_steps=args.micro_steps, steps=args.steps, threads=result["threads"], profile=args.profile,
                        seed=args.seed)
            figures = in_fresh_process(measure_option, spec, args.timeout)
            if "error" not in figures and gpu and result.get("peak_bf16_tflops"):
                figures["mfu"] = spread([f / (result["peak_bf16_tflops"] * 1e12) for f in figures.pop("flops_per_s")])
            else:
                figures.pop("flops_per_s", None)
            result["options"][name] = figures
            if progress is not None:
                progress(result)
    return result


# -- the model -------------------------------------------------------------------------------

def build_model(out_dir: Path, shape: dict, seed: int = 0) -> dict:
    """Save a random model of ``shape`` (fp32, as the learner loads it); returns its sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**shape, max_position_embeddings=32768, rope_theta=1e6,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    arch = architecture(shape)
    return {"params": sum(p.numel() for p in model.parameters()), "description": arch.describe()}


def architecture(shape: dict):
    from cluster.architecture import Architecture

    return Architecture.from_hf_config(shape)


def model_flops(arch, seq_len: int, response_len: int, critic: bool) -> float:
    """Forward + backward FLOPs of one sequence through the trained models (module docstring)."""
    blocks = 6 * arch.num_layers * arch.block_params * seq_len
    attention = 6 * arch.num_layers * seq_len * seq_len * arch.q_dim  # causal: half of the square
    lm_head = 6 * arch.vocab_size * arch.hidden_size * response_len  # only response positions need logits
    return blocks + attention + lm_head + (blocks + attention if critic else 0)


# -- one option, in its own process ------------------------------------------------------------

def bench_batch(rows: int, prompt_len: int, response: int, vocab: int, ragged: bool, g):
    """Random token rows of ``prompt_len`` + ``response`` tokens; ``ragged``: prompts of 1/4 to all
    of ``prompt_len`` and responses of 1 to ``response`` tokens (uniform), right-padded."""
    import torch

    from learner.batch import RolloutBatch

    if ragged:
        prompts = torch.randint(max(1, prompt_len // 4), prompt_len + 1, (rows,), generator=g)
        responses = torch.randint(1, response + 1, (rows,), generator=g)
    else:
        prompts, responses = torch.full((rows,), prompt_len), torch.full((rows,), response)
    seq_len = prompt_len + response
    attention = (torch.arange(seq_len)[None] < (prompts + responses)[:, None]).long()
    return RolloutBatch(input_ids=torch.randint(2, vocab, (rows, seq_len), generator=g) * attention,
                        attention_mask=attention, prompt_lengths=prompts,
                        response_mask=(torch.arange(response)[None] < responses[:, None]).float(),
                        rollout_logprobs=torch.zeros(rows, response))


def measure_option(*, model_dir: str, overrides: list[str], gpu: bool, seq_len: int, prompt_len: int,
                   micro_batch: int, micro_steps: int, steps: int, threads: int = 2, profile: int = 0,
                   ragged: bool = False, unsorted: bool = False, seed: int = 0) -> dict:
    """Set up one learner rank with ``overrides`` and time its forward and update passes."""
    import torch

    from cluster.bench import bench_config
    from cluster.memory_model import LearnerShape, memory_options, plan_memory
    from learner.batch import Minibatch, TrainBatch, arrange_by_length, micro_batch_sizes
    from learner.worker import LearnerRank

    response = seq_len - prompt_len
    cfg = bench_config([*overrides, f"model.path={model_dir}", f"model.max_model_len={seq_len}",
                        f"rollout.max_new_tokens={response}", f"learner.micro_batch_size={micro_batch}",
                        f"learner.num_gpus={1 if gpu else 0}", "learner.world_size=1", "learner.max_grad_norm=1.0",
                        f"learner.num_threads={threads}"])
    shape = json.loads((Path(model_dir) / "config.json").read_text())
    arch = architecture(shape)
    plan = plan_memory(arch, LearnerShape.from_config(cfg), memory_options(cfg.learner))
    rank = LearnerRank(0, 1, model_dir, cfg.learner, cfg.algorithm, temperature=1.0, total_updates=100)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rank.setup("127.0.0.1", rank.free_port())
    setup_s = time.perf_counter() - t0

    rows = micro_batch * micro_steps
    g = torch.Generator().manual_seed(seed)
    batch = bench_batch(rows, prompt_len, response, arch.vocab_size, ragged, g)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    # As the driver deals rows to a rank (longest first, learner.micro_batch_tokens included);
    # unsorted: as generated and cut by count, the dealing before rows were arranged by length.
    if not unsorted:
        (order,) = arrange_by_length(lengths, 1)
        batch, lengths = batch.select(order), [lengths[r] for r in order]
    budget = 0 if unsorted else cfg.learner.micro_batch_tokens
    (sizes,) = micro_batch_sizes(lengths, [list(range(rows))], micro_batch, budget, cfg.learner.pack_sequences)
    responses = batch.response_mask.sum(dim=1).tolist()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    forward_s, update_s = [], []
    for i in range(steps + 1 + bool(profile)):  # the first is a warm-up, the last profiled if asked
        profiler = None
        if profile and i == steps + 1:
            from torch.profiler import ProfilerActivity
            profiler = torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu)
            profiler.__enter__()
        sync()
        t0 = time.perf_counter()
        fwd = rank.forward(batch, sizes)
        sync()
        t1 = time.perf_counter()
        critic = fwd.values is not None
        train = TrainBatch(rollouts=batch, old_logprobs=fwd.old_logprobs.cpu(),
                           advantages=torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask,
                           returns=torch.randn(batch.response_mask.shape, generator=g) if critic else None,
                           old_values=fwd.values.cpu() if critic else None,
                           ref_logprobs=None, importance_weights=None)
        out = rank.update([Minibatch(batch=train, micro_sizes=sizes, num_tokens=float(sum(responses)),
                                     num_seqs=rows)])
        sync()
        t2 = time.perf_counter()
        if out.skipped_updates:
            raise RuntimeError("the update was skipped: non-finite loss or gradient")
        if profiler is not None:
            profiler.__exit__(None, None, None)
            key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=key, row_limit=profile, max_name_column_width=60)
            continue
        if i:
            forward_s.append(t1 - t0)
            update_s.append(t2 - t1)
    tokens = sum(lengths)
    flops = sum(model_flops(arch, n, r, critic) for n, r in zip(lengths, responses))
    figures = {"overrides": overrides[len(POLICY_ONLY):], "models": ["policy"] + ["critic"] * critic
               + ["reference"] * (rank.reference is not None),
               "setup_s": round(setup_s, 2), "forward_s": spread(forward_s), "update_s": spread(update_s),
               "tokens": tokens, "micro_sizes": sizes, "threads": torch.get_num_threads(),
               "train_tokens_per_s": spread([tokens / s for s in update_s]),
               "flops_per_s": [flops / s for s in update_s],
               "planned_tensors_gib": round((plan.total_bytes - plan.overhead_bytes) / GIB, 2),
               "planned_total_gib": round(plan.total_bytes / GIB, 2), "planned_host_gib": round(plan.host_bytes / GIB, 2)}
    if profile:
        figures["profile"] = table
    if not gpu:
        # ru_maxrss is in KiB on Linux; the process is this option's own (spawned).
        figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if gpu:
        free, total = torch.cuda.mem_get_info()
        allocated = torch.cuda.max_memory_allocated()
        figures |= {"peak_allocated_gib": round(allocated / GIB, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
                    "device_used_gib": round((total - free) / GIB, 2),
                    "planned_over_measured": round((plan.total_bytes - plan.overhead_bytes) / allocated, 3)}
    rank.shutdown()
    return figures


def _child(fn, spec: dict, queue) -> None:
    try:
        queue.put(fn(**spec))
    except BaseException as e:  # report it to the parent rather than dying silently
        queue.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})


def in_fresh_process(fn, spec: dict, timeout: float) -> dict:
    """``fn(**spec)`` in a spawned process (an empty allocator, its own process group)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, spec, queue), daemon=True)
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:  # queue.Empty: the option hung or its process died (e.g. the OOM killer)
        return {"error": f"no result within {timeout:.0f} s (exit code {proc.exitcode})"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def brief(result: dict) -> str:
    """One line per option: the figures the README's GPU table takes (medians)."""
    lines = [f"{result['device']}, torch {result['torch']}, preset {result['preset']}, "
             f"micro-batch {result['batch']['micro_batch']} x {result['batch']['micro_steps']}, "
             f"seq {result['batch']['seq_len']}"
             + (f", CPU threads {result['threads']}" if "threads" in result else "")  # figures of older runs lack it
             + (", ragged" if result["batch"]["ragged"] else "")]
    for name, f in result["options"].items():
        if "error" in f:
            lines.append(f"  {name}: ERROR {f['error']}")
            continue
        parts = [f"{f['train_tokens_per_s']['median'] / 1e3:.1f}k tok/s", f"update {f['update_s']['median']:.3f} s"]
        if "mfu" in f:
            parts.append(f"MFU {100 * f['mfu']['median']:.1f} %")
        if "peak_allocated_gib" in f:
            parts.append(f"peak {f['peak_allocated_gib']} GiB (planned {f['planned_tensors_gib']})")
        else:
            parts.append(f"peak RSS {f['peak_rss_gib']} GiB (planned {f['planned_total_gib']})")
        lines.append(f"  {name}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":  # the GPU machine has no Ray: `python -m cluster.bench_learner [args]`
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.bench_learner")
    register_args(parser)
    # --json and --seed as `rlrelay bench` has them for every bench; --out for a lent machine's $OUT.
    parser.add_argument("--json", action="store_true", help="print the JSON object instead of a line per option")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and rows")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    ns = parser.parse_args()

    def progress(partial: dict) -> None:
        if ns.out:
            Path(ns.out).write_text(json.dumps(partial, indent=2))
        if not ns.json:  # the line of the option just measured (the first time, the header too)
            lines = brief(partial).splitlines()
            print("\n".join(lines if len(partial["options"]) == 1 else lines[-1:]), flush=True)

    measured = run(ns, progress)
    if ns.json:
        print(json.dumps(measured, indent=2))
