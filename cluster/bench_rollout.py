"""``rlrelay bench rollout``: generation throughput of the rollout side against transformers.

One random Llama (``cluster.bench.build_model``: it never emits end-of-sequence, so every
response is exactly ``--new-tokens`` long in both engines) and the same prompts go through:

- transformers ``generate`` (sampling at temperature 1, no top-k, ``min_new_tokens`` =
  ``max_new_tokens``), in this process;
- a ``RolloutWorker`` built in this process (the engine is in-process anyway: uni executor),
  which is what a pool member runs, records and log-probs included; and vLLM's own
  ``LLM.generate`` on the same engine with ``ignore_eos``, to tell vLLM's cost from ours;
- the Ray ``RolloutPool`` with ``--pool-workers`` workers (the threads split between them),
  which adds the actor calls and the transfer of ``Rollout`` records; its runs are interleaved
  with transformers and raw vLLM in this process again, so that a like-for-like ratio with the
  same Ray instance on the cores is printed too (``with_ray_up``).

Both engines use ``--threads`` torch threads, runs are interleaved (transformers, worker, raw
vLLM, ...) so that load from other tenants of the machine hits them alike, and a warm-up run
of each is excluded. Batch-1 step times and a GEMM roofline say how far each is from the
matmul bound, and how much is fixed per-step cost.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from cluster.bench import BENCH_ALPHABET, build_model, bench_config, shape_from_args, spread

TARGET_RATIO = 1.3
"""Issue 9: vLLM at least 1.3x transformers generate (~30M params, batch 64, 128 new tokens)."""

_PROMPT_CHARS = BENCH_ALPHABET.replace(" ", "")

log = logging.getLogger("rlrelay")


def run(args) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)  # before vLLM starts: it forbids changing it afterwards
    shape = shape_from_args(args)
    rng = random.Random(args.seed)
    # A fresh prompt set per run (the first one is the warm-up), the same for every engine.
    prompt_sets = [["".join(rng.choice(_PROMPT_CHARS) for _ in range(args.prompt_len)) for _ in range(args.batch)]
                   for _ in range(args.repeats + 1)]
    with tempfile.TemporaryDirectory(prefix="rlrelay-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir, shape, args.seed)
        gflops = [_gemm_gflops(torch) for _ in range(3)]
        hf = _Transformers(model_dir, args.new_tokens)
        worker = _in_process_worker(model_dir, args)

        tps = {"transformers_generate": [], "rollout_worker_in_process": [], "vllm_raw_in_process": []}
        for i, prompts in enumerate(prompt_sets):
            _timed_round({"transformers_generate": hf.generate,
                          "rollout_worker_in_process": lambda p: _worker_generate(worker, p, args, step=i),
                          "vllm_raw_in_process": lambda p: _raw_generate(worker, p, args, step=i)},
                         prompts, i, tps, args.new_tokens)
        batch1 = {"transformers": [], "vllm_raw": []}
        for i in range(args.repeats):
            one = prompt_sets[i + 1][:1]
            started = time.perf_counter()
            hf.generate(one)
            batch1["transformers"].append((time.perf_counter() - started) / args.new_tokens * 1e3)
            started = time.perf_counter()
            _raw_generate(worker, one, args, step=100 + i)
            batch1["vllm_raw"].append((time.perf_counter() - started) / args.new_tokens * 1e3)

        pool = _pool_tokens_per_s(model_dir, prompt_sets, args, hf, worker) if args.pool_workers > 0 else None

    def ratio(num: str, den: str) -> dict:  # run by run: interleaved runs saw the same load
        return spread([a / b for a, b in zip(tps[num], tps[den])])

    ratios = {name: ratio(name, "transformers_generate") for name in ("rollout_worker_in_process",
                                                                        "vllm_raw_in_process")}
    ray_up = None
    if pool is not None:
        tps.update(pool["tokens_per_s"])
        ratios["rollout_pool_ray"] = ratio("rollout_pool_ray", "transformers_generate")
        ray_up = {
            # Like for like: the pool against transformers with the same Ray instance running.
            "pool_to_transformers": ratio("rollout_pool_ray", "transformers_generate_ray_up"),
            "vllm_raw_to_transformers": ratio("vllm_raw_in_process_ray_up", "transformers_generate_ray_up"),
            # What an idle Ray instance on the same cores costs each engine in this process.
            "transformers_slowdown": ratio("transformers_generate_ray_up", "transformers_generate"),
            "vllm_raw_slowdown": ratio("vllm_raw_in_process_ray_up", "vllm_raw_in_process"),
        }
    gemm = statistics.median(gflops)
    return {
        "bench": "rollout",
        "model": {"params": params, "hidden": shape.hidden, "layers": shape.layers,
                  "intermediate": shape.intermediate, "heads": shape.heads, "vocab": len(BENCH_ALPHABET) + 4,
                  "dtype": "float32", "weights": "random; never emits end-of-sequence"},
        "settings": {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "threads": args.threads, "repeats": args.repeats, "pool_workers": args.pool_workers,
                     "pool_threads_per_worker": _pool_threads(args) if args.pool_workers else 0,
                     "vllm_path": "RolloutWorker built in this process (uni executor, the engine a pool "
                                  "member runs); rollout_pool_ray: RolloutPool of Ray actors"},
        "tokens_per_s": {name: spread(runs) for name, runs in tps.items()},
        "ratio_to_transformers": ratios,
        "with_ray_up": ray_up,
        "per_token_ms_batch1": {name: spread(runs) for name, runs in batch1.items()},
        "gemm_gflops": spread(gflops),
        "matmul_bound_tokens_per_s": round(gemm * 1e9 / (2 * params)),
        "pool_start_s": pool["start_s"] if pool else None,
        "target": {"ratio_min": TARGET_RATIO, "rollout_worker_met": ratios["rollout_worker_in_process"]["median"]
                   >= TARGET_RATIO, "rollout_pool_met": ratios["rollout_pool_ray"]["median"] >= TARGET_RATIO
                   if pool else None,
                   "rollout_pool_met_with_ray_up": ray_up["pool_to_transformers"]["median"] >= TARGET_RATIO
                   if pool else None},
    }


def _timed_round(engines: dict, prompts: list[str], i: int, tokens_per_s: dict[str, list[float]],
                 new_tokens: int) -> None:
    """Run ``prompts`` through each engine in turn; run 0 is the warm-up and is not kept."""
    for name, generate in engines.items():
        started = time.perf_counter()
        per_response = generate(prompts)
        seconds = time.perf_counter() - started
        if set(per_response) != {new_tokens}:
            raise RuntimeError(f"{name} produced responses of {sorted(set(per_response))} tokens, not {new_tokens}: "
                               f"the comparison would not be like for like")
        log.info("bench rollout: %s run %d%s: %.0f tokens/s", name, i, " (warm-up)" if i == 0 else "",
                 sum(per_response) / seconds)
        if i > 0:
            tokens_per_s[name].append(sum(per_response) / seconds)


def _gemm_gflops(torch) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 1024**3 / (time.perf_counter() - started) / 1e9


class _Transformers:
    """transformers ``generate`` with the same sampling as the rollout worker."""

    def __init__(self, model_dir: Path, new_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.new_tokens = new_tokens

    def generate(self, prompts: list[str]) -> list[int]:
        # Every prompt has the same length, so the batch needs no padding.
        ids = self.torch.tensor([self.tokenizer.encode(p) for p in prompts])  # [B, P]
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=self.new_tokens,
                                      max_new_tokens=self.new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        # min_new_tokens holds end-of-sequence back, so every row has exactly new_tokens more.
        return [out.shape[1] - ids.shape[1]] * len(prompts)


def _in_process_worker(model_dir: Path, args):
    from actors.rollout_worker import EngineSettings, RolloutWorker

    return RolloutWorker(0, EngineSettings(model_path=str(model_dir), num_threads=args.threads, seed=args.seed,
                                           max_model_len=args.prompt_len + args.new_tokens + 1,
                                           kv_cache_gib=args.kv_cache_gib))


def _sampling(args):
    from actors.types import SamplingSettings

    return SamplingSettings(temperature=1.0, max_new_tokens=args.new_tokens, samples_per_prompt=1)


def _prompts(texts: list[str]):
    from actors.types import Prompt

    return tuple(Prompt(index=i, text=t) for i, t in enumerate(texts))


def _worker_generate(worker, texts: list[str], args, step: int) -> list[int]:
    from actors.types import GenerateRequest

    rollouts = worker.generate(GenerateRequest(prompts=_prompts(texts), sampling=_sampling(args), step=step,
                                               seed=args.seed))
    return [len(r.response_token_ids) for r in rollouts]


def _raw_generate(worker, texts: list[str], args, step: int) -> list[int]:
    """vLLM's ``LLM.generate`` on the worker's own engine, same sampling, no ``Rollout`` records.

    Reaches into the worker's engine (``_llm``): only the bench does this, to split the
    worker's time into vLLM's part and ours.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = worker._llm.get_tokenizer()
    inputs = [TokensPrompt(prompt_token_ids=tokenizer.encode(t)) for t in texts]
    params = [SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=0,
                             seed=step * len(texts) + i) for i in range(len(texts))]
    outputs = worker._llm.generate(inputs, params, use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outputs]


def _pool_threads(args) -> int:
    return max(1, args.threads // args.pool_workers)


def _pool_tokens_per_s(model_dir: Path, prompt_sets: list[list[str]], args, hf: "_Transformers", worker) -> dict:
    """The same prompts through a ``RolloutPool`` of Ray actors (driver → actors → records back),
    interleaved with transformers and raw vLLM in this process again, now with Ray running.

    On a small machine Ray's own processes (GCS, raylet, agents, idle workers) share the
    cores with the engines and slow them; measuring both engines again beside the pool tells
    that cost apart from the pool's own (actor calls, records)."""
    import ray

    from cluster.launch import init_ray
    from cluster.pools import RolloutPool

    n = args.pool_workers
    cfg = bench_config([f"rollout.num_workers={n}", f"rollout.num_threads={_pool_threads(args)}",
                        f"rollout.num_cpus={args.threads / n}", f"rollout.kv_cache_gib={args.kv_cache_gib}",
                        f"rollout.max_new_tokens={args.new_tokens}",
                        f"model.max_model_len={args.prompt_len + args.new_tokens + 1}", f"run.seed={args.seed}",
                        f"ray.num_cpus={max(args.threads, os.cpu_count() or 1)}"])
    # The in-process engine set OMP_NUM_THREADS for itself; Ray's processes would inherit it,
    # and an engine whose OpenMP default differs from its thread setting fails in vLLM's CPU
    # attention when Ray runs generate on another thread of the actor. Ray sets it per actor
    # from num_cpus when it is unset.
    os.environ.pop("OMP_NUM_THREADS", None)
    init_ray(cfg)
    pool = None
    try:
        started = time.perf_counter()
        pool = RolloutPool(cfg, str(model_dir))
        pool.ready()
        start_s = time.perf_counter() - started
        runs = {"transformers_generate_ray_up": [], "vllm_raw_in_process_ray_up": [], "rollout_pool_ray": []}

        def through_pool(texts: list[str], step: int) -> list[int]:
            rollouts = pool.generate(_prompts(texts), _sampling(args), step=step, seed=args.seed)
            if len(rollouts) != len(texts):
                raise RuntimeError(f"the pool returned {len(rollouts)} responses for {len(texts)} prompts")
            return [len(r.response_token_ids) for r in rollouts]

        for i, texts in enumerate(prompt_sets):
            _timed_round({"transformers_generate_ray_up": hf.generate,
                          "vllm_raw_in_process_ray_up": lambda p: _raw_generate(worker, p, args, step=i),
                          "rollout_pool_ray": lambda p: through_pool(p, i)},
                         texts, i, runs, args.new_tokens)
        return {"tokens_per_s": runs, "start_s": round(start_s, 2)}
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
