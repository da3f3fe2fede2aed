"""Where a run's numbers go: Weights & Biases, the run directory, and the console.

The run directory holds ``metrics.jsonl`` (one line per step), ``summary.json`` and
``curves.png`` (reward, KL and eval accuracy over steps), so a run can be read without W&B.
W&B runs offline when no ``WANDB_API_KEY`` is set; ``wandb sync`` uploads it later. W&B is
a mirror of what the run directory holds, so a W&B failure (a server that cannot be reached,
a wandb-core process that died) is a warning and the run goes on; it never costs the run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import wandb

from actors.types import Rollout
from cluster.job_spec import current_submission_id, job_tag
from cluster.security import redact

PROGRESS_KEYS = (("reward/mean", "reward"), ("eval/accuracy", "eval"), ("kl/value", "kl"),
                 ("policy/clipfrac", "clip"), ("timing/step", "s/step"))


log = logging.getLogger(__name__)

# W&B's own spellings of its modes, as a user may set them in WANDB_MODE.
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled",
             "shared": "shared"}


def wandb_mode(requested: str, environ: dict[str, str] | None = None) -> str:
    """The mode to start W&B in: ``auto`` follows a ``WANDB_MODE`` the user set, else goes
    online with an API key and offline without one."""
    environ = os.environ if environ is None else environ
    if requested != "auto":
        return requested
    from_env = ENV_MODES.get(environ.get("WANDB_MODE", "").strip().lower())
    if from_env:
        return from_env
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Logs one run to W&B, the run directory, and a progress line on stderr."""

    def __init__(self, run_dir: Path, *, project: str, name: str, mode: str, config: dict[str, Any],
                 tags: Sequence[str] = (), run_id: str | None = None, total_steps: int = 0,
                 resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self._history = _read_history(run_dir / "metrics.jsonl", upto=resume_step)
        # A resumed run re-does the steps after its checkpoint: their old rows are dropped.
        with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in self._history)
        self._metrics_file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._started = time.time()
        self._console = True  # the progress line on stderr, until stderr cannot be written
        # A run submitted as a Ray job (rlrelay submit, ray job submit, a KubeRay RayJob) carries
        # the job's submission id, so a W&B run leads back to its Ray job.
        ray_job = current_submission_id(os.environ)
        tags = list(dict.fromkeys([*tags, *([job_tag(ray_job)] if ray_job else [])]))
        # Secrets never reach the W&B config, even if a user put one in a config value.
        config = redact({**config, "ray_job_id": ray_job}, os.environ)
        self.mode = wandb_mode(mode)
        self.run = self._init(self.mode, project=project, name=name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config, tags=tags, reinit="create_new")
        self.run_id = self.run.id if self.run is not None and self.mode != "disabled" else None

    def _init(self, mode: str, **kwargs: Any):
        """A W&B run in ``mode``; online falls back to offline, and offline to none, with a
        warning: the run directory keeps every number either way."""
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                run = wandb.init(mode=attempt, **kwargs)
                self.mode = attempt
                return run
            except Exception as e:  # CommError, UsageError, a timeout, an OSError: W&B's, not the run's
                log.warning("W&B did not start in %s mode (%s: %s)", attempt, type(e).__name__, str(e).strip())
        log.warning("W&B is off for this run; its metrics are in %s", self.run_dir / "metrics.jsonl")
        self.mode = "disabled"
        return None

    def _wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """One call on the W&B run. Its first failure turns W&B off for the rest of the run with
        a warning; metrics.jsonl, summary.json and the console go on."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as e:
            log.warning("W&B %s failed (%s: %s); W&B is off for the rest of this run, metrics go on "
                        "to %s", what, type(e).__name__, e, self.run_dir / "metrics.jsonl")
            self.run = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # An explicit step: a resumed offline run restarts W&B's own counter at 0 (DESIGN).
        self._wandb("log", lambda run: run.log(metrics, step=step))
        row = {"step": step, **metrics}
        self._history.append(row)
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        self._progress(step, metrics)

    def log_samples(self, step: int, rollouts: Sequence[Rollout], rewards: Sequence[float], limit: int = 16) -> None:
        """A fresh W&B table of generations (prompt, response, answer, reward, version)."""
        if self.run is None:
            return
        table = wandb.Table(columns=["step", "prompt", "response", "answer", "reward", "policy_version"])
        for r, reward in list(zip(rollouts, rewards))[:limit]:
            table.add_data(step, r.prompt_text, r.response_text, r.answer, reward, r.policy_version)
        self._wandb("log of samples", lambda run: run.log({"samples": table}, step=step))

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{label} {metrics[key]:.3g}" for key, label in PROGRESS_KEYS if key in metrics]
        width = 24
        done = int(width * step / max(1, self.total_steps))
        bar = "#" * done + "." * (width - done)
        if not self._console:
            return
        try:
            print(f"[{bar}] " + "  ".join(parts), file=sys.stderr, flush=True)
        except OSError:  # the reader of stderr went away (a closed pipe, a dropped ssh): train on
            self._console = False

    def finish(self, summary: dict[str, Any]) -> None:
        summary = {**summary, "wandb_run_id": self.run_id, "wall_seconds": round(time.time() - self._started, 1)}
        self._wandb("summary", lambda run: run.summary.update(summary))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._plot()
        self._metrics_file.close()
        self._wandb("finish", lambda run: run.finish())

    def abort(self) -> None:
        """Close a run that failed: W&B marks it failed; metrics so far stay on disk."""
        self._metrics_file.close()
        self._wandb("finish", lambda run: run.finish(exit_code=1))

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("reward/mean", "reward"), ("kl/value", "KL to reference"), ("eval/accuracy", "eval accuracy")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
        for ax, (key, title) in zip(axes, panels):
            points = [(row["step"], row[key]) for row in self._history if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=100)
        plt.close(fig)


def _read_history(path: Path, upto: int | None) -> list[dict[str, float]]:
    """Rows of an earlier attempt of this run up to step ``upto`` (none for a fresh run). A line
    that is no metrics row (the last one, torn by a crash mid-write) is left out with a warning."""
    if upto is None or not path.is_file():
        return []
    rows, torn = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn.append(number)
    if torn:
        log.warning("%s: left out line(s) %s, which hold no metrics row (a write cut short by a crash?)", path,
                    ", ".join(map(str, torn[:5])) + (" ..." if len(torn) > 5 else ""))
    return [row for row in rows if row["step"] <= upto]
