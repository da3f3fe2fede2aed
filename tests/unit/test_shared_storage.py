"""Checkpoints on a cluster: every learner rank writes its own shards where *it* sees
``trainer.checkpoint_dir``. On a directory that is not shared between nodes they landed on each
rank's own disk, the driver logged "checkpoint written", and the loss showed only when a resume
read the checkpoint. Refused at start (the ranks must see a file the driver writes there) and
checked at every save. Ray is replaced by stand-ins here; this tests the checks, not Ray."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cluster.controller as controller_module
import cluster.learner_group as learner_group
from cluster.checkpoints import CheckpointManager
from cluster.config import ConfigError, load_config
from cluster.controller import Controller
from cluster.data import SamplerState
from learner.checkpoint import METADATA_FILE, CheckpointError, JsonMetadataWriter, RankState, missing_shards
from learner.worker import LearnerRank


def write_shards(path: Path) -> None:
    dcp.save({"w": torch.arange(6.0), "b": torch.ones(3)}, storage_writer=JsonMetadataWriter(str(path)))


def test_missing_shards_names_what_the_driver_cannot_read(tmp_path):
    write_shards(tmp_path)
    assert missing_shards(tmp_path) == []
    shard = next(p for p in tmp_path.iterdir() if p.suffix == ".distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # cut short
    assert missing_shards(tmp_path) == [shard.name]
    shard.unlink()
    assert missing_shards(tmp_path) == [shard.name]
    (tmp_path / METADATA_FILE).unlink()
    assert missing_shards(tmp_path) == [METADATA_FILE]


class Rank:
    """A learner rank that sees the file system from ``root`` (another node's disk unless ``/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sees = types.SimpleNamespace(remote=lambda path, token: LearnerRank.sees(None, self.local(path), token))
        self.save_checkpoint = types.SimpleNamespace(remote=lambda path: write_shards(Path(self.local(path))) or
                                                     RankState(param_groups={}, schedulers={}, rng=""))

    def local(self, path: str) -> str:
        """Where ``path`` is on this rank's node."""
        return str(self.root / path.lstrip("/")) if self.root != Path("/") else path


def group(monkeypatch, roots: list[Path]) -> learner_group.LearnerGroup:
    monkeypatch.setattr(learner_group, "wait", lambda refs, timeout_s, what, limit=None: list(refs))
    g = learner_group.LearnerGroup.__new__(learner_group.LearnerGroup)
    g.ranks = [Rank(root) for root in roots]
    g.timeout_s = 600
    return g


def test_a_checkpoint_directory_the_ranks_do_not_share_is_refused_at_start(tmp_path, monkeypatch):
    shared = tmp_path / "ck"
    shared.mkdir()
    group(monkeypatch, [Path("/"), Path("/")]).check_shared(shared, "trainer.checkpoint_dir")
    other_node = tmp_path / "node2"
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_dir: learner rank 1 cannot read what the driver "
                                          r"writes in .*: .* storage that the driver and every learner node share"):
        group(monkeypatch, [Path("/"), other_node]).check_shared(shared, "trainer.checkpoint_dir")
    # Only the ranks asked: rank 0 alone writes the final model.
    group(monkeypatch, [Path("/"), other_node]).check_shared(shared, "run.dir", ranks=1)
    assert list(shared.iterdir()) == []  # the probe is removed, whatever the answer


def test_a_checkpoint_whose_shards_the_driver_cannot_read_fails_the_save(tmp_path, monkeypatch):
    monkeypatch.setattr(controller_module, "alive_nodes", lambda: 1)
    cfg = load_config(None, [])
    checkpoints = CheckpointManager(tmp_path / "ck", keep_last=2)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    collector = types.SimpleNamespace(rollout=None, reward=None, sampler=types.SimpleNamespace(prompts=[]),
                                      reward_norm=None)
    ctl = Controller(cfg, collector=collector, eval_prompts=[], learner=group(monkeypatch, [tmp_path / "rank-disk"]),
                     tracker=types.SimpleNamespace(run_id=None), checkpoints=checkpoints, model_path=str(model),
                     pad_token_id=0)
    ctl.resume_sampler = SamplerState(epoch=0, position=0)
    with pytest.raises(CheckpointError, match=rf"/\.step-000004\.tmp-\w+/learner: the learner ranks wrote "
                                              rf"{METADATA_FILE} where the driver cannot read it: "
                                              r"trainer.checkpoint_dir must be storage"):
        ctl.save(4)
    assert checkpoints.checkpoints() == [] and list(checkpoints.root.iterdir()) == []
    # Where the driver sees the shards, the checkpoint is written.
    ctl.learner = group(monkeypatch, [Path("/")])
    assert ctl.save(4) == checkpoints.root / "step-000004"
