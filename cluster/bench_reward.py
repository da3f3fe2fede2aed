"""``rlrelay bench reward``: what running reward functions in a child process costs.

Per call, a ``RewardWorker`` scoring with the built-in functions in a thread of its own
process (``reward.isolation=thread``) against in a child process (``process``, the default),
and the seconds to start the child: what a call that timed out costs the next one.
No Ray: the worker class is plain, so this measures the worker alone.
"""

from __future__ import annotations

import time

from cluster.bench import spread
from reward.isolated import FunctionProcess
from reward.types import ISOLATIONS, ScoreRequest


def register_args(p) -> None:
    from cluster.argtypes import positive_int

    p.add_argument("--samples", type=positive_int, default=2000, help="samples per timed score call")
    p.add_argument("--functions", default="exact_match,numeric_match",
                   help="reward functions every sample is scored with, comma-separated")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed score calls per isolation (after one warm-up)")


def run(args) -> dict:
    from reward.worker import RewardFunctionSpec, RewardWorker  # torch: not at argparse time

    from reward.rules import resolve_reward_function

    specs = [RewardFunctionSpec(name=name.strip()) for name in args.functions.split(",") if name.strip()]
    for spec in specs:
        try:
            resolve_reward_function(spec.name)
        except ValueError as e:
            raise SystemExit(f"rlrelay: bench reward: --functions: {e}") from None
    if not specs:
        raise SystemExit("rlrelay: bench reward: --functions names no function")
    requests = [ScoreRequest(prompt=f"{i}+{i}=", response=f"the sum is {2 * i}", answer=str(2 * i))
                for i in range(args.samples)]
    calls = args.samples * len(specs)
    per_call: dict[str, dict] = {}
    for isolation in ISOLATIONS:
        worker = RewardWorker(specs, isolation=isolation)
        worker.score(requests[:10])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = worker.score(requests)
            times.append((time.perf_counter() - start) / calls * 1e6)
            if any(r.failed for r in results):
                raise RuntimeError(f"bench reward: a sample failed with {isolation} isolation: "
                                   f"{next(r.error for r in results if r.failed)}")
        worker.close()
        per_call[isolation] = spread(times)

    starts = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        FunctionProcess([s.name for s in specs]).close()
        starts.append((time.perf_counter() - start) * 1e3)
    return {
        "bench": "reward",
        "functions": [s.name for s in specs],
        "samples": args.samples,
        "us_per_call": per_call,
        "process_over_thread_us_per_call": round(per_call["process"]["median"] - per_call["thread"]["median"], 1),
        "process_start_ms": spread(starts),
    }
