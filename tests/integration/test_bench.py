"""`rlrelay bench rollout|sync|scale|step|learner|reward` through the real CLI, with tiny settings: each prints one
JSON object whose figures are present and consistent. No assertion on speed: the machines are
shared, and a bench that is slow today is still correct."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from helpers import run_cli

pytestmark = pytest.mark.integration

TINY_MODEL = ("--hidden", "128", "--layers", "2", "--intermediate", "256")
ROUNDING = 2e-3
"""Relative slack for sums of figures: each is printed to four significant digits (an error of
up to 5e-4 of its value), so a sum of parts and the printed total may differ by ~1e-3 of it."""


def bench(*args: str) -> dict:
    done = run_cli("bench", *args, "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)  # stdout holds the JSON alone (engine and Ray logs go to stderr)


def assert_spread(s: dict, n: int, positive: bool = True) -> None:
    assert len(s["runs"]) == n
    assert all(math.isfinite(v) for v in s["runs"])
    assert s["min"] <= s["median"] <= s["max"]
    if positive:
        assert s["min"] > 0


def test_bench_rollout_compares_vllm_with_transformers_on_equal_work():
    out = bench("rollout", *TINY_MODEL, "--batch", "4", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2",
                "--pool-workers", "1", "--kv-cache-gib", "0.25")
    assert out["bench"] == "rollout"
    assert 300_000 < out["model"]["params"] < 400_000
    for name in ("transformers_generate", "rollout_worker_in_process", "vllm_raw_in_process", "rollout_pool_ray"):
        assert_spread(out["tokens_per_s"][name], n=2)
    for name, ratio in out["ratio_to_transformers"].items():
        assert_spread(ratio, n=2)
        runs = out["tokens_per_s"][name]["runs"]
        hf = out["tokens_per_s"]["transformers_generate"]["runs"]
        assert ratio["runs"] == pytest.approx([a / b for a, b in zip(runs, hf)], rel=1e-2)
    # Both engines again beside the pool, with Ray running: like-for-like ratios and Ray's cost.
    tps = {name: s["runs"] for name, s in out["tokens_per_s"].items()}
    for name in ("transformers_generate_ray_up", "vllm_raw_in_process_ray_up"):
        assert_spread(out["tokens_per_s"][name], n=2)
    ray_up = out["with_ray_up"]
    for name, (num, den) in {"pool_to_transformers": ("rollout_pool_ray", "transformers_generate_ray_up"),
                             "vllm_raw_to_transformers": ("vllm_raw_in_process_ray_up", "transformers_generate_ray_up"),
                             "transformers_slowdown": ("transformers_generate_ray_up", "transformers_generate"),
                             "vllm_raw_slowdown": ("vllm_raw_in_process_ray_up", "vllm_raw_in_process")}.items():
        assert ray_up[name]["runs"] == pytest.approx([a / b for a, b in zip(tps[num], tps[den])], rel=1e-2), name
    assert out["target"]["rollout_pool_met_with_ray_up"] == (ray_up["pool_to_transformers"]["median"] >= 1.3)
    assert_spread(out["per_token_ms_batch1"]["vllm_raw"], n=2)
    assert out["matmul_bound_tokens_per_s"] > 0
    target = out["target"]
    assert target["ratio_min"] == 1.3
    for key, name in (("rollout_worker_met", "rollout_worker_in_process"), ("rollout_pool_met", "rollout_pool_ray")):
        assert target[key] == (out["ratio_to_transformers"][name]["median"] >= 1.3), key


def test_bench_sync_breaks_a_push_into_parts_that_add_up():
    out = bench("sync", *TINY_MODEL, "--workers", "2", "--pushes", "2", "--kv-cache-gib", "0.25")
    assert out["bench"] == "sync"
    assert out["model"]["bytes"] == 4 * out["model"]["params"]
    assert out["copy_bound_s"] > 0 and out["copy_bandwidth_gbps"]["median"] > 0
    prod = out["production"]
    for name in ("push_s", "export_s", "broadcast_s", "worker_load_s", "push_gbps"):
        assert_spread(prod[name], n=2)
    for i in range(2):
        # export and broadcast are consecutive parts of one push; verify and load lie inside the broadcast.
        assert prod["export_s"]["runs"][i] + prod["broadcast_s"]["runs"][i] == pytest.approx(
            prod["push_s"]["runs"][i], rel=ROUNDING, abs=2e-3)
        assert prod["worker_verify_s"]["runs"][i] + prod["worker_load_s"]["runs"][i] <= prod["broadcast_s"]["runs"][i]
    assert prod["transport"] == out["target"]["transport"] == "shared_memory"  # auto, on a one-node cluster
    for inst in out["instrumented"].values():
        for name in ("gather_s", "pack_s", "put_s", "worker_load_s", "ours_s", "ours_to_copy_bound"):
            assert_spread(inst[name], n=2)
        for i in range(2):
            parts = sum(inst[k]["runs"][i] for k in ("gather_s", "pack_s", "put_s", "worker_get_s"))
            assert parts == pytest.approx(inst["ours_s"]["runs"][i], rel=ROUNDING, abs=2e-3)
            assert inst["checksum_pass_s"]["runs"][i] > 0
        assert inst["buckets"] == inst["tensors"] > 1  # one bucket (or slot) per tensor
    assert sorted(out["instrumented"]) == ["object_store", "shared_memory"]
    assert out["target"]["ours_steady_to_copy_bound"] == \
        out["instrumented"]["shared_memory"]["ours_steady_to_copy_bound"]
    assert "put_unpacked_numpy_dict_s" in out["variants"] and "checksum_crc32_s" in out["variants"]
    assert len(out["memory"]["rollout_workers"]) == 2
    assert all(m["rss_mib"] > 0 for m in out["memory"]["rollout_workers"])
    assert out["target"]["met_steady"] == (out["target"]["ours_steady_to_copy_bound"] <= 2.0)


def test_bench_scale_measures_the_control_plane_with_stand_in_workers():
    out = bench("scale", "--workers", "2,3", "--prompts", "24", "--samples", "2", "--response-tokens", "8",
                "--latency", "0.05", "--steps", "2", "--update-kib", "4", "--extrapolate", "16")
    assert out["bench"] == "scale"
    assert [s["workers"] for s in out["sizes"]] == [2, 3]
    for size in out["sizes"]:
        assert_spread(size["step_s"], n=2)
        # Every step waits at least for the stand-ins' latency.
        assert size["step_s"]["min"] >= 0.05
        assert 0 < size["overhead_share"] < 1
        parts = size["breakdown"]
        for i in range(2):
            total = parts["total_s"]["runs"][i]
            summed = sum(parts[k]["runs"][i] for k in ("build_s", "dispatch_s", "fetch_s", "merge_s")) \
                + parts["wait_beyond_latency_s"]["runs"][i] + 0.05
            assert summed == pytest.approx(total, rel=ROUNDING, abs=2e-3)
        assert_spread(size["push_s"], n=2)
        assert size["records_mib_per_step"] > 0
        assert size["actor_uss_mib_median"] > 0
    assert out["bare_actor_memory"]["rss_mib"] > 0
    assert set(out["wait_loop_us_per_completion"]) == {"32", "128", "512"}
    assert all(v["median"] > 0 for v in out["wait_loop_us_per_completion"].values())
    extra = out["extrapolated"]
    assert extra["workers"] == 16 and math.isfinite(extra["actor_set_wait_loop_cpu_s"])
    assert extra["stand_in_memory_gib"] > 0


def test_bench_step_takes_steps_apart_and_compares_overlap_with_its_bound():
    # One layout keeps the test to two short training runs; the other layout's config is
    # checked without training in the next test.
    out = bench("step", "--steps", "2", "--warmup", "1", "--layouts", "split", "--set", "rollout.prompts_per_step=8",
                "--set", "rollout.samples_per_prompt=4")
    assert out["bench"] == "step"
    assert out["settings"]["samples_per_step"] == 32
    assert set(out["layouts"]) == {"split"}
    split = out["layouts"]["split"]["resources"]
    assert split["rollout_workers"] * split["rollout_threads_per_worker"] == split["learner_threads_per_rank"] == 1
    for layout in out["layouts"].values():
        for mode, staleness in (("sync", 0), ("async", 1)):
            r = layout[mode]
            assert r["async_staleness"] == staleness and r["staleness_max"] == staleness
            assert r["samples_per_step"]["runs"] == [32, 32]
            assert_spread(r["step_s"], n=2)
            assert_spread(r["samples_per_s"], n=2)
            for name in ("wait_rollout", "logprobs", "update", "weight_sync", "driver"):
                assert_spread(r["step_parts_s"][name], n=2, positive=name != "wait_rollout")
            for name in ("generate", "score", "idle"):
                assert_spread(r["rollout_s"][name], n=2, positive=name != "idle")
            for i in range(2):
                step = r["step_s"]["runs"][i]
                # The parts are the step's critical path, and the controller's samples/s is per step.
                assert sum(p["runs"][i] for p in r["step_parts_s"].values()) == pytest.approx(step, rel=ROUNDING, abs=5e-3)
                assert r["samples_per_s"]["runs"][i] == pytest.approx(32 / step, rel=1e-2)
                if mode == "sync":  # waiting on the rollout is generating and scoring it
                    acting = r["rollout_s"]["generate"]["runs"][i] + r["rollout_s"]["score"]["runs"][i]
                    assert acting <= r["step_parts_s"]["wait_rollout"]["runs"][i] * (1 + ROUNDING) + 2e-3
        overlap = layout["overlap"]
        # The bound is half of a synchronous step split in two, so it is never longer than the step.
        assert overlap["bound_s"] <= overlap["sync_step_s"]["median"]
        for i in range(2):
            assert overlap["sync_generation_s"]["runs"][i] + overlap["sync_training_s"]["runs"][i] == pytest.approx(
                overlap["sync_step_s"]["runs"][i], rel=ROUNDING, abs=2e-3)
        assert overlap["bound_s"] == max(overlap["sync_generation_s"]["median"], overlap["sync_training_s"]["median"])
        assert overlap["async_to_bound"] == pytest.approx(overlap["async_step_s"]["median"] / overlap["bound_s"],
                                                          abs=1e-3)
        assert overlap["speedup"] == pytest.approx(overlap["sync_step_s"]["median"] / overlap["async_step_s"]["median"],
                                                   abs=1e-3)
        assert overlap["met"] == (overlap["async_to_bound"] <= out["target"]["async_to_bound_max"])
    assert out["target"]["met_split"] == out["layouts"]["split"]["overlap"]["met"]


def test_bench_step_layouts_are_the_demo_and_a_split_of_the_cores(tmp_path):
    from cluster import bench_step

    args = argparse.Namespace(overrides=["rollout.prompts_per_step=8"], steps=2, warmup=1, seed=0)
    default = bench_step._config(args, "default", "sync", tmp_path / "d")
    split = bench_step._config(args, "split", "async", tmp_path / "s")
    assert (default.rollout.num_workers, default.learner.num_threads) == (2, 2)  # the demo's own
    assert (split.rollout.num_workers, split.rollout.num_threads, split.learner.num_threads) == (1, 1, 1)
    assert (default.trainer.async_staleness, split.trainer.async_staleness) == (0, 1)
    assert split.rollout.prompts_per_step == 8 and split.trainer.steps == 4  # --set kept; warm-up + steps + 1
    with pytest.raises(SystemExit, match="unknown.*spilt"):
        bench_step.run(argparse.Namespace(steps=1, warmup=1, layouts="spilt"))


def test_bench_learner_on_cpu_arranges_ragged_rows_as_the_driver_does():
    """The learner bench on CPU (fp32, gloo, one rank) with ragged rows: arranged longest first
    and cut by a token budget (packed rows: of real tokens), or left as generated; the same real
    tokens either way."""
    common = ("learner", "--preset", "tiny", "--cpu", "--seq-len", "48", "--prompt-len", "16", "--micro-batch", "2",
              "--micro-steps", "3", "--steps", "1", "--ragged")
    arranged = bench(*common, "--options", "full,full+logits,full+packed", "--micro-tokens", "64")
    unsorted = bench(*common, "--options", "full,full+logits", "--unsorted")
    for out in (arranged, unsorted):
        assert out["bench"] == "learner" and out["device"] == "cpu"
        for name, figures in out["options"].items():
            assert "error" not in figures, figures.get("traceback", figures.get("error"))
            assert_spread(figures["update_s"], n=1)
            assert sum(figures["micro_sizes"]) == 6 and figures["peak_rss_gib"] > 0
    assert unsorted["options"]["full"]["micro_sizes"] == [2, 2, 2]
    assert arranged["options"]["full"]["tokens"] == unsorted["options"]["full"]["tokens"] < 6 * 48
    # Rows of up to 48 tokens under a 64-token budget: the longest run alone, short ones in pairs.
    assert arranged["options"]["full"]["micro_sizes"][0] == 1
    # Packed, a pass holds rows whose real tokens fit the budget: never fewer rows per pass.
    packed = arranged["options"]["full+packed"]["micro_sizes"]
    assert len(packed) <= len(arranged["options"]["full"]["micro_sizes"])


def test_bench_reward_times_both_isolations_on_the_same_samples():
    out = bench("reward", "--samples", "50", "--repeats", "2", "--functions", "exact_match,numeric_match")
    assert out["bench"] == "reward"
    assert out["functions"] == ["exact_match", "numeric_match"] and out["samples"] == 50
    for isolation in ("process", "thread"):
        assert_spread(out["us_per_call"][isolation], n=2)
    assert out["process_over_thread_us_per_call"] == pytest.approx(
        out["us_per_call"]["process"]["median"] - out["us_per_call"]["thread"]["median"], abs=0.1)
    assert_spread(out["process_start_ms"], n=2)


def test_bench_learner_runs_without_the_cli_as_on_a_lent_gpu_machine(tmp_path):
    """`python -m cluster.bench_learner` (the GPU machine has no Ray, so no `rlrelay`): one line
    per option by default, each printed (and --out rewritten) as its option ends, so a run a time
    limit cuts short keeps what it finished; the JSON object with --json. ``--threads`` reaches the
    learner rank in each option's process."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "figures.json"
    args = [sys.executable, "-m", "cluster.bench_learner", "--preset", "tiny", "--cpu", "--seq-len", "32",
            "--prompt-len", "16", "--micro-batch", "2", "--micro-steps", "1", "--steps", "1", "--options", "full,grad_op",
            "--threads", "1", "--out", str(out)]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    written = json.loads(out.read_text())
    assert list(written["options"]) == ["full", "grad_op"]
    assert all("error" not in f for f in written["options"].values()), written["options"]
    assert written["threads"] == 1 and [f["threads"] for f in written["options"].values()] == [1, 1]
    printed = done.stdout.splitlines()
    # The header once, then an option a line.
    assert len(printed) == 3 and printed[0].startswith("cpu, torch ") and "CPU threads 1" in printed[0]
    assert printed[1].startswith("  full: ") and printed[2].startswith("  grad_op: ") and "tok/s" in printed[2]
    done = subprocess.run(args + ["--json"], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text()) and list(printed["options"]) == ["full", "grad_op"]
