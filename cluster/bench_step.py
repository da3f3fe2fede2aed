"""``rlrelay bench step``: one PPO step of the demo job taken apart, and what overlapping
generation with training buys.

The figures are the controller's own per-step timings (``timing/*`` rows of the run's
``metrics.jsonl``). Each measurement is a real training job through ``cluster.launch.train`` on
``deploy/jobs/demo.yaml`` (plus ``--set`` overrides) of ``--warmup`` + ``--steps`` + 1 steps, of
which the ``--steps`` in the middle are kept: the first ones pay for cold caches and, in
asynchronous mode, generate without overlap; the last step of an asynchronous run has no next
batch to generate, so it drains the pipeline instead of being a steady step.

Per run:

- ``step_parts_s``: the driver's critical path, summing to ``step_s`` step by step:
  ``wait_rollout`` (synchronous: drawing prompts, generating and scoring; asynchronous: the
  learner waiting on the background generation), ``logprobs`` (old and reference log-probs and
  values), ``update`` (the PPO epochs), ``weight_sync`` (export and every worker's load) and
  ``driver`` (what is left: collation, advantages, bookkeeping);
- ``rollout_s``: the acting side, ``generate`` and ``score``, and ``idle``, how long the finished
  batch waited for the learner (the rollout workers' idle time in asynchronous mode);
- ``samples_per_s``: samples trained on per second of step.

Four runs: synchronous (``trainer.async_staleness=0``) and asynchronous (``=1``) under two
layouts of the machine's threads:

- ``split``: one rollout worker with one thread and a one-thread learner, so generation and
  training each have about a core of the two, as on a cluster where each has its own GPUs;
- ``default``: the demo's own threads (two rollout workers of one thread, a two-thread learner):
  on two shared cores both phases already use every core, and overlap has little to win.

A synchronous step is the acting half (``wait_rollout``) followed by the learning half (the
rest). Run side by side, a step takes at best the longer of the two halves: ``overlap`` reports
the asynchronous step time against that bound, and the target is within ``TARGET_OVERLAP_RATIO``
of it under the split.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from cluster.bench import spread

DEMO_JOB = Path(__file__).resolve().parents[1] / "deploy" / "jobs" / "demo.yaml"

TARGET_OVERLAP_RATIO = 1.15
"""Asynchronous step within 1.15x of max(generation, training) of the synchronous run (split layout)."""

LAYOUTS = {
    # name: config overrides. Thread counts stand in for pinning: no config key places a
    # worker on given cores, and the reward worker and the driver run on either core.
    "split": ["rollout.num_workers=1", "rollout.num_threads=1", "learner.num_threads=1"],
    "default": [],
}

STEP_PARTS = {"wait_rollout": "timing/wait_rollout", "logprobs": "timing/forward", "update": "timing/update",
              "weight_sync": "timing/weight_sync"}
"""Parts of the driver's step (report name: controller metric); ``driver`` is the remainder."""

ROLLOUT_PARTS = {"generate": "timing/generate", "score": "timing/score", "idle": "timing/rollout_idle"}
"""The acting side of a step (report name: controller metric)."""

MODES = {"sync": 0, "async": 1}
"""Run name: ``trainer.async_staleness``."""

log = logging.getLogger("rlrelay")


def run(args) -> dict:
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("rlrelay: --steps and --warmup must be >= 1 (the first step of an asynchronous run "
                         "generates its batch without overlap)")
    chosen = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(LAYOUTS))
    if unknown or not chosen:
        raise SystemExit(f"rlrelay: --layouts: unknown {unknown or chosen}; choose from {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory(prefix="rlrelay-bench-step-") as tmp:
        # Every config is built (and validated) before the first run starts.
        configs = {(layout, mode): _config(args, layout, mode, Path(tmp) / f"{layout}-{mode}")
                   for layout in chosen for mode in MODES}
        runs = {}
        for (layout, mode), cfg in configs.items():
            runs[layout, mode] = _measure(cfg, args)
            log.info("bench step: %s %s: step %.3f s, %.1f samples/s", layout, mode,
                     runs[layout, mode]["step_s"]["median"], runs[layout, mode]["samples_per_s"]["median"])

    layouts = {}
    for layout in chosen:
        cfg = configs[layout, "sync"]
        layouts[layout] = {
            "resources": {"rollout_workers": cfg.rollout.num_workers,
                          "rollout_threads_per_worker": cfg.rollout.num_threads,
                          "learner_ranks": cfg.learner.world_size, "learner_threads_per_rank": cfg.learner.num_threads},
            "sync": runs[layout, "sync"],
            "async": runs[layout, "async"],
            "overlap": _overlap(runs[layout, "sync"], runs[layout, "async"]),
        }
    demo = configs[chosen[0], "sync"]
    return {
        "bench": "step",
        "settings": {"job": "deploy/jobs/demo.yaml", "overrides": list(args.overrides), "warmup": args.warmup,
                     "steps": args.steps, "samples_per_step": demo.rollout.prompts_per_step
                     * demo.rollout.samples_per_prompt, "max_new_tokens": demo.rollout.max_new_tokens},
        "layouts": layouts,
        "target": {"async_to_bound_max": TARGET_OVERLAP_RATIO, "met_split": layouts["split"]["overlap"]["met"] if "split" in layouts else None,
                   "bound": "max(generation, training) of the synchronous run: generation = its wait_rollout, "
                            "training = the rest of its step"},
    }


def _config(args, layout: str, mode: str, run_dir: Path):
    from cluster.config import ConfigError, load_config

    # The bench's own keys come last and win over --set: they make the runs comparable.
    overrides = [*args.overrides, *LAYOUTS[layout], f"trainer.async_staleness={MODES[mode]}",
                 f"trainer.steps={args.warmup + args.steps + 1}", f"run.seed={args.seed}",
                 f"run.name=bench-step-{layout}-{mode}", f"run.dir={run_dir}", "run.wandb_mode=disabled",
                 # Steps are timed, not evaluation or exports: keep what runs outside them small.
                 "trainer.eval_every=0", "data.eval_limit=8", "trainer.sample_table_every=0",
                 "trainer.save_every=0", "trainer.export_final=false"]
    try:
        return load_config(DEMO_JOB, overrides)
    except ConfigError as e:
        raise SystemExit(f"rlrelay: config error: {e}") from None


def _measure(cfg, args) -> dict:
    """Train ``cfg`` to the end and read the kept steps back from its ``metrics.jsonl``."""
    from cluster.launch import train

    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started
    lines = (cfg.run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [row for row in map(json.loads, filter(None, lines)) if "timing/step" in row]
    kept = [row for row in rows if args.warmup < row["step"] <= args.warmup + args.steps]
    if len(kept) != args.steps:
        raise RuntimeError(f"{cfg.run.name}: {len(kept)} timed steps in {cfg.run.path}, expected {args.steps}")

    def column(key: str) -> list[float]:
        # A phase a step skipped (no push after a skipped update) took no time.
        return [row.get(key, 0.0) for row in kept]

    step = column("timing/step")
    parts = {name: column(key) for name, key in STEP_PARTS.items()}
    parts["driver"] = [s - sum(p[i] for p in parts.values()) for i, s in enumerate(step)]
    return {
        "async_staleness": cfg.trainer.async_staleness,
        "samples_per_step": spread(column("rollout/samples")),
        "step_s": spread(step),
        "samples_per_s": spread(column("throughput/samples_per_s")),
        "step_parts_s": {name: spread(values) for name, values in parts.items()},
        "rollout_s": {name: spread(column(key)) for name, key in ROLLOUT_PARTS.items()},
        "staleness_max": max(column("rollout/staleness_max")),
        "run_wall_s": round(wall, 1),
    }


def _overlap(sync: dict, asynchronous: dict) -> dict:
    """The asynchronous step against the best overlap can do: the longer half of a synchronous step.

    Computed from the figures reported beside it, so each ratio is their quotient."""
    step = sync["step_s"]["runs"]
    generation = sync["step_parts_s"]["wait_rollout"]["runs"]
    generation_s = spread(generation)
    training_s = spread([s - g for s, g in zip(step, generation)])
    bound = max(generation_s["median"], training_s["median"])
    async_step = asynchronous["step_s"]["median"]
    ratio = round(async_step / bound, 4)
    return {
        "sync_step_s": sync["step_s"],
        "sync_generation_s": generation_s,
        "sync_training_s": training_s,
        "async_step_s": asynchronous["step_s"],
        "bound_s": bound,
        "async_to_bound": ratio,
        "speedup": round(sync["step_s"]["median"] / async_step, 4),
        "met": ratio <= TARGET_OVERLAP_RATIO,
    }
