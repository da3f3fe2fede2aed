"""The ``rlrelay`` command line.

Each group of subcommands lives in its own module with a ``register(subparsers)`` function
that adds its parsers and sets ``handler``. Heavy imports (ray, torch, vllm, wandb) happen
inside the handlers, so ``rlrelay --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback

from cluster.bench import register as register_bench  # bench rollout|sync|scale (imports nothing heavy)
from cluster.control import register as register_control  # status, scale
from cluster.jobs import register as register_jobs  # submit, jobs, logs, stop (imports nothing heavy)
from cluster.plan import register as register_plan  # plan (arithmetic only)


def register(sub) -> None:
    p = sub.add_parser("train", help="run a training job",
                       description="Run a training job. Without --address (and without RAY_ADDRESS) it starts "
                                   "a fresh local Ray instance; with one it joins that cluster.")
    p.add_argument("config", help="job config YAML, e.g. deploy/jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.steps=2 rollout.num_workers=2")
    p.add_argument("--address", help="Ray cluster to join (HOST:PORT or 'auto'); sets ray.address")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the run's latest checkpoint ('auto'; starts fresh if there is none) "
                        "or from the checkpoint directory PATH")
    p.set_defaults(handler=train_command, owns_run=True)

    p = sub.add_parser("export", help="write a checkpoint's policy as a Hugging Face model directory")
    p.add_argument("checkpoint", help="checkpoint directory, e.g. runs/demo/checkpoints/step-000030")
    p.add_argument("out_dir", help="output directory (safetensors weights, config, tokenizer)")
    p.set_defaults(handler=export_command)

    p = sub.add_parser("config", help="print the resolved config as JSON (validates it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=config_command)

    p = sub.add_parser("keys", help="list every config key: type, default, what it does",
                       description="Every key of the config tree, read from the config dataclasses (type, "
                                   "default, docstring); set one in the YAML or as key=value.")
    p.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. learner. or rollout.auto")
    p.set_defaults(handler=keys_command)


def load(args) -> "object":
    """The validated config of a subcommand's CONFIG and overrides, or exit 2 naming the problem."""
    from cluster.config import ConfigError, load_config

    overrides = list(args.overrides)
    if getattr(args, "address", None) is not None:  # an empty one is refused by name, not dropped
        overrides.append(f"ray.address={json.dumps(args.address)}")  # a JSON string is YAML, quoted
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        print(f"rlrelay: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_command(args) -> int:
    from cluster.config import to_dict

    print(json.dumps(to_dict(load(args)), indent=2))
    return 0


def keys_command(args) -> int:
    from cluster.config_keys import format_reference, key_reference

    keys = [k for k in key_reference() if k.key.startswith(args.prefix)]
    if not keys:
        print(f"rlrelay: no config key starts with {args.prefix!r}", file=sys.stderr)
        return 2
    print(format_reference(keys))
    return 0


def train_command(args) -> int:
    import os

    from cluster.security import client_auth_env

    cfg = load(args)
    if cfg.ray.target(os.environ) != "local":
        # Joining a token cluster needs token mode in this client, and Ray reads the mode once,
        # at import: a token found without RAY_AUTH_MODE turns it on before ray is imported.
        os.environ.update(client_auth_env(os.environ))
    from cluster.launch import train

    from ray.exceptions import RayTaskError

    from cluster.actor_set import WorkerFailure
    from cluster.collect import RewardFailure
    from cluster.config import ConfigError
    from cluster.controller import TrainingDiverged
    from cluster.data import DataError
    from cluster.jobs import ClusterUnreachable
    from cluster.security import InsecureClusterError
    from learner.checkpoint import CheckpointError

    try:
        summary = train(cfg, resume=args.resume)
    except InsecureClusterError as e:
        print(f"rlrelay: refused: {e}", file=sys.stderr)
        return 2
    except (ConfigError, DataError) as e:  # found before the run started: no traceback to read
        print(f"rlrelay: {'data' if isinstance(e, DataError) else 'config'} error: {e}", file=sys.stderr)
        return 2
    except ClusterUnreachable as e:
        print(f"rlrelay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run's own handler is in place
        print("rlrelay: interrupted (`--resume auto` continues from the latest checkpoint, if any)", file=sys.stderr)
        return 130
    except (WorkerFailure, RewardFailure, TrainingDiverged, CheckpointError, RayTaskError, OSError) as e:
        # The run started and failed for a reason its message names; the traceback (the driver's,
        # and a worker's own inside a RayTaskError) goes to the run directory, not the terminal.
        where = cfg.run.path / "error.txt"
        try:
            where.write_text("".join(traceback.format_exception(e)))
            saved = f"rlrelay: traceback in {where}"
        except OSError as unwritable:  # the failure may be the run directory itself
            saved = f"rlrelay: (could not write {where}: {unwritable.strerror or unwritable})"
        print(f"rlrelay: run failed: {failure_summary(e)}\n{saved}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": str(cfg.run.path), "steps_completed": summary.steps_completed,
                      "eval_before": summary.eval_before, "eval_after": summary.eval_after,
                      "stopped_early": summary.stopped_early}))
    return 0


def failure_summary(e: BaseException) -> str:
    """One line for a failed run: a worker's exception by the method that raised it."""
    from ray.exceptions import RayTaskError

    if isinstance(e, RayTaskError):
        cause = e.cause
        lines = str(cause).strip().splitlines() if cause is not None else []
        return f"{e.function_name} raised {type(cause).__name__}" + (f": {lines[-1]}" if lines else "")
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def export_command(args) -> int:
    from cluster.export import export_checkpoint
    from learner.checkpoint import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except (OSError, CheckpointError) as e:  # not a checkpoint, or a damaged one
        print(f"rlrelay: export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(out)}))
    return 0


# Modules contributing subcommands, in the order they appear in --help.
REGISTRARS = [register, register_control, register_jobs, register_bench, register_plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlrelay", description="Distributed RL for language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTRARS:
        add(sub)
    args, extra = parser.parse_known_args(argv)
    # argparse ends a positional list at the first option, so `train CONFIG --resume auto
    # key=value` would leave the override unparsed: a key=value anywhere joins the overrides.
    if hasattr(args, "overrides") and all("=" in t and not t.startswith("-") for t in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "owns_run", False):
        # `rlrelay config ... | head` ends quietly. Not for a training driver: a broken pipe to
        # a helper process (W&B's service, a closed log reader) must not kill it unsaved.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
