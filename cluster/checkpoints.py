"""Run checkpoints on disk: atomic, rotated, and loadable without unpickling anything.

```
<run dir>/checkpoints/
  step-000004/                    complete checkpoints only (renamed into place when done)
    learner/                      DCP shards of policy, critic and their optimizers
      __0_0.distcp ...            (one file per learner rank)
      .metadata.json              DCP metadata as JSON (learner/checkpoint.py)
    learner_ranks.json            optimizer param groups, LR schedulers and schedule, RNG, per rank
    driver.json                   step, policy version, data position, KL/normaliser state, W&B id
    model/                        config + tokenizer of the policy, so `rlrelay export` needs nothing else
  .step-000006.tmp-x1y2/          a checkpoint being written (ignored by resume; removed on failure)
```

A checkpoint directory is written under a temporary name and renamed into place when
complete, so a crash never leaves one that looks valid; older ones are removed only after
the new one is complete (keep the last K). Learner ranks write their own shards, so on a
multi-node cluster the checkpoint directory must be on storage every learner node and the
driver reach (NFS, a mounted bucket).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config_parse import ConfigError
from learner.checkpoint import RankState
from learner.schedule import LRSchedule

log = logging.getLogger("rlrelay")

_NAME = re.compile(r"^step-(\d{6,})$")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


@dataclass(kw_only=True)
class DriverState:
    """Everything the driver needs to continue a run exactly where a checkpoint left it."""

    step: int
    """Training steps completed."""
    version: int
    """Policy version the learner holds (and the rollout workers held)."""
    sampler_epoch: int
    """Data position: completed passes over the training set."""
    sampler_position: int
    """Data position: prompts taken from the current pass."""
    kl_controller: dict[str, float | bool]
    """KL controller state: the coefficient, and whether an adaptive controller adapted it (only
    then does a resume restore it; a fixed coefficient is the resumed job's config's)."""
    reward_normalizer: dict[str, float] | None
    """Running reward statistics, when reward normalisation is on."""
    wandb_run_id: str | None
    """W&B run id, so a resumed run logs into the same run."""
    eval_before: float | None
    """Held-out accuracy of the starting policy, measured before step 1."""
    consecutive_skips: int = 0
    """Updates skipped in a row for a non-finite loss or gradient."""
    extra: dict = field(default_factory=dict)
    """Room for later fields without breaking old checkpoints."""


class CheckpointManager:
    """Writes, rotates and finds the checkpoints of one run."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step``."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.tmp-", dir=self.root))

    def commit(self, tmp: Path, step: int, driver: DriverState, ranks: list[RankState], model_path: str) -> Path:
        """Finish a checkpoint written into ``tmp``: plain state, model files, rename, rotate."""
        (tmp / "driver.json").write_text(json.dumps(dataclasses.asdict(driver), indent=1))
        (tmp / "learner_ranks.json").write_text(json.dumps([dataclasses.asdict(r) for r in ranks]))
        model_dir = tmp / "model"
        model_dir.mkdir()
        for name in MODEL_FILES:
            if (Path(model_path) / name).is_file():
                shutil.copy2(Path(model_path) / name, model_dir / name)
        _fsync_tree(tmp)
        final = self.root / f"step-{step:06d}"
        replaced = None
        if final.exists():  # a re-run of the same step after a resume replaces it
            # Renamed out of the way first, deleted last: a crash meanwhile leaves both copies whole.
            replaced = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.replaced-", dir=self.root))
            os.rename(final, replaced / final.name)
        try:
            os.rename(tmp, final)
        except BaseException:
            if replaced is not None:  # the new one is not in place: the old one goes back
                os.rename(replaced / final.name, final)
                replaced.rmdir()
            raise
        for old in [*self.checkpoints()[:-self.keep_last], *([replaced] if replaced else [])]:
            try:
                shutil.rmtree(old)
            except OSError as e:  # rotation goes on; what it could not remove is said, not hidden
                log.warning("checkpoint rotation could not remove all of %s (%s): what is left stays", old, e)
                shutil.rmtree(old, ignore_errors=True)
        return final

    def set_aside_after(self, step: int) -> Path | None:
        """Move the checkpoints past ``step`` into ``abandoned-<time>/`` (kept, not deleted);
        returns that directory, or None when there were none.

        A resume from an earlier checkpoint of the run starts another timeline: left in place,
        the later ones would outrank its new checkpoints in rotation (which keeps the highest
        steps) and in ``--resume auto``, mixing the two."""
        later = [p for p in self.checkpoints() if int(_NAME.match(p.name).group(1)) > step]
        if not later:
            return None
        aside = self.root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for path in later:
            os.rename(path, aside / path.name)
        return aside

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)


def run_signature(uses_critic: bool, model_path: str) -> dict:
    """What a checkpoint's learner state depends on: whether a critic is trained, and the
    policy's shape. Recorded in ``DriverState.extra`` and compared before a resume starts."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config") or config
    return {"critic": uses_critic,
            "model": {k: text.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}}


def check_resumable(driver: DriverState, signature: dict, path: Path) -> None:
    """Refuse, before anything starts, a resume whose job differs from the checkpoint's in what
    its learner state depends on (checkpoints written before signatures were kept pass)."""
    saved = driver.extra.get("signature")
    if saved is None:
        return
    if saved["critic"] != signature["critic"]:
        had = "trains a critic (advantage_estimator=gae)" if saved["critic"] else "has no critic"
        raise ConfigError(f"--resume: checkpoint {path} {had}, this job's algorithm.advantage_estimator "
                          f"{'needs one' if signature['critic'] else 'does not'}: resume with the checkpoint's "
                          f"estimator, or start a new run")
    if saved["model"] != signature["model"]:
        raise ConfigError(f"--resume: checkpoint {path} holds a policy of shape {saved['model']}, model.path "
                          f"has {signature['model']}")


def resolve_resume(spec: str | None, manager: CheckpointManager) -> Path | None:
    """``auto``: the latest complete checkpoint of the run, or None (start fresh); else a path."""
    if spec is None:
        return None
    if spec == "auto":
        latest = manager.latest()
        log.info("resume auto: %s", f"continuing from {latest}" if latest else "no checkpoint yet, starting fresh")
        return latest
    path = Path(spec)
    if not (path / "driver.json").is_file() or not (path / "learner").is_dir():
        raise ConfigError(f"--resume {spec}: not a complete rlrelay checkpoint (needs driver.json and learner/)")
    return path


def read_checkpoint(path: Path) -> tuple[DriverState, list[RankState]]:
    """The plain state of a checkpoint: JSON only, nothing unpickled."""
    try:
        driver = DriverState(**json.loads((path / "driver.json").read_text()))
        ranks = [RankState(**{**r, "schedule": LRSchedule(**r["schedule"]) if r.get("schedule") else None})
                 for r in json.loads((path / "learner_ranks.json").read_text())]
    except (OSError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} is incomplete or malformed: {e}") from None
    return driver, ranks


def _fsync_tree(root: Path) -> None:
    # The rename must not become visible before the files' data is on disk.
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
