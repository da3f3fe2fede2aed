"""A run's directory: held by one driver at a time, refused or cleared when an earlier run's
outputs are in it, and removed again when a job is refused before writing anything."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cluster.checkpoints import CheckpointManager
from cluster.config import ConfigError
from cluster.controller import RunSummary

log = logging.getLogger("rlrelay")


def clear_earlier_run(run_dir: Path, checkpoints: CheckpointManager, overwrite: bool) -> None:
    """Refuse a run that continues none of its own checkpoints where an earlier run left
    checkpoints or metrics (rotation would delete the new run's checkpoints in favour of the
    old, higher-numbered ones, a later ``--resume auto`` would pick one of those, and the old
    metrics would be emptied), or remove them with ``run.overwrite``."""
    earlier = checkpoints.checkpoints()
    metrics = run_dir / "metrics.jsonl"
    found = bool(earlier) or (metrics.is_file() and metrics.stat().st_size > 0)
    what = f"{len(earlier)} checkpoint(s), the latest {earlier[-1]}" if earlier else f"{metrics}"
    if found and not overwrite:
        # Without a checkpoint (one that ended early with trainer.save_every=0) there is nothing to continue.
        how = "--resume auto continues it" if earlier else "it left no checkpoint to continue from"
        raise ConfigError(f"run directory {run_dir} holds an earlier run ({what}): {how}, another run.name or "
                          f"run.dir starts a new one beside it, run.overwrite=true replaces it")
    if not overwrite:
        return
    if found:
        log.warning("run.overwrite=true: removing the earlier run in %s (%s)", run_dir, what)
    for path in earlier:
        shutil.rmtree(path)
    # Also its offline W&B runs (`wandb sync runs/<name>/wandb/offline-run-*` would upload them
    # beside the new one), and what a run that failed before its first step left.
    for name in ("final_model", "wandb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        (run_dir / name).unlink(missing_ok=True)


LOCK_NAME = ".rlrelay.lock"


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    try:
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
    except OSError:  # a parent this user may not enter: check_writable names it; nothing to undo
        return []
    return missing


def remove_if_unused(made: list[Path], run_dir: Path, locked: bool) -> None:
    """Undo the directories this job made when it failed before writing anything into them (a
    pre-check refused the config, the model or the data): empty ones, and a run directory
    holding only this job's lock when ``locked`` (the lock still held, so no other job can
    have taken it). Anything else stays, another job's lock included."""
    for path in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
        try:
            if locked and path == run_dir and [p.name for p in path.iterdir()] == [LOCK_NAME]:
                (path / LOCK_NAME).unlink()
            path.rmdir()
        except OSError:  # not empty (the job wrote something there), or already gone
            pass


def completed_run(run_dir: Path, steps: int) -> RunSummary | None:
    """The summary of the run in ``run_dir`` if it ran to its end at ``steps`` steps (final
    checkpoint, model and evaluation, then summary.json, written last); None otherwise,
    e.g. after a crash between its last checkpoint and its summary, whose end a resume redoes."""
    try:
        saved = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("steps_completed") != steps or saved.get("stopped_early"):
        return None
    return RunSummary(steps_completed=steps, eval_before=saved.get("eval_before"), eval_after=saved.get("eval_after"))


def is_own_checkpoint(checkpoint: Path, checkpoints: CheckpointManager) -> bool:
    """Whether ``checkpoint`` is one of this run's own. Only then does its W&B run continue:
    resuming another run's checkpoint (a fork of it, a fine-tune) must not write into that
    run's W&B history."""
    return checkpoint.resolve().parent == checkpoints.root.resolve()


@contextmanager
def exclusive(run_dir: Path, made: Sequence[Path] = ()) -> Iterator[None]:
    """Hold the run directory for this driver: a second job with the same run directory (the
    same run.name, started from another shell) would interleave its metrics and replace this
    one's checkpoints. An advisory lock (flock), released when the process ends however it ends.
    ``made``: the directories this job created for itself, removed again (``remove_if_unused``)
    if the job fails while they hold nothing; a job refused here removes nothing."""
    with _lock(run_dir) as f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        except BaseException:
            remove_if_unused(list(made), run_dir, locked=True)
            raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock(run_dir: Path) -> IO[str]:
    """The run directory's lock file, open and locked by this process. A job that fails while
    starting removes the lock file (and the directory) before it lets go of the lock, so one
    that opened the file just before that gets the lock of a file no longer there, which a
    third job would not see: it takes the lock again, on whatever the path names now."""
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)  # removed by the job that gave it up
        f = open(run_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"run directory {run_dir} is in use by a running job ({owner}): set another run.name "
                              f"or run.dir, or wait for it to end") from None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(run_dir / LOCK_NAME)):
                return f
        except FileNotFoundError:
            pass
        f.close()
