"""The ``rlrelay`` command line.

Heavy imports (ray, torch, vllm, wandb) happen inside the subcommands, so ``rlrelay --help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlrelay", description="Distributed RL for language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a training job",
                       description="Run a training job. Without --address (and without RAY_ADDRESS) it starts "
                                   "a fresh local Ray instance; with one it joins that cluster.")
    p.add_argument("config", help="job config YAML, e.g. deploy/jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.steps=2 rollout.num_workers=2")
    p.add_argument("--address", help="Ray cluster to join (HOST:PORT or 'auto'); sets ray.address")

    p = sub.add_parser("config", help="print the resolved config as JSON (validates it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from cluster.config import ConfigError, load_config, to_dict

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"rlrelay: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "config":
        print(json.dumps(to_dict(cfg), indent=2))
        return 0

    from cluster.launch import train

    summary = train(cfg)
    print(json.dumps({"run_dir": str(cfg.run.path), "steps_completed": summary.steps_completed,
                      "eval_before": summary.eval_before, "eval_after": summary.eval_after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
