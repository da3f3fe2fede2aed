"""Sharded learner checkpoints through ``torch.distributed.checkpoint`` that load without pickle.

DCP's stock ``FileSystemReader`` reads the ``.metadata`` file with ``pickle.load`` and any
non-tensor entry with ``torch.load(weights_only=False)``, so loading a checkpoint directory
from an untrusted source could run code. Here:

- only tensors go through DCP (optimizer ``param_groups`` and other plain values are the
  caller's to keep as JSON), and tensor payloads load with ``weights_only=True``;
- the metadata is written and read as JSON by a ``StorageWriter``/``StorageReader`` pair
  built on DCP's file-system ones (DCP's public extension point), and the stock pickled
  ``.metadata`` is never written.

``RankState`` is the JSON part of one rank's checkpoint; ``save_trained`` and ``load_trained``
move the tensor part (each trained model's weights and optimizer moments) to and from disk.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from learner.fsdp import init_optimizer_state
from learner.schedule import LRSchedule

METADATA_FILE = ".metadata.json"

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, malformed or holds something that is not a tensor."""


class JsonMetadataWriter(FileSystemWriter):
    """DCP file-system writer whose metadata file is JSON instead of a pickle."""

    def finish(self, metadata: Metadata, results) -> None:
        storage = {wr.index: wr.storage_data for results_of_rank in results for wr in results_of_rank}
        doc = {"version": metadata.version, "state_dict_metadata": {}, "storage_data": [],
               "planner_data": _plain(metadata.planner_data)}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint entry {fqn!r} is not a tensor; keep plain values in JSON")
            doc["state_dict_metadata"][fqn] = {
                "dtype": str(md.properties.dtype), "requires_grad": md.properties.requires_grad,
                "size": list(md.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks]}
        for index, info in storage.items():
            doc["storage_data"].append({
                "fqn": index.fqn, "offset": None if index.offset is None else list(index.offset),
                "index": index.index, "relative_path": info.relative_path, "file_offset": info.offset,
                "length": info.length, "transforms": list(info.transform_descriptors or ())})
        path = Path(self.path) / METADATA_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class JsonMetadataReader(FileSystemReader):
    """DCP file-system reader for checkpoints written by ``JsonMetadataWriter``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.path} has no {METADATA_FILE}: not a complete rlrelay checkpoint")
        try:
            doc = json.loads(path.read_text())
            state = {}
            for fqn, md in doc["state_dict_metadata"].items():
                if md["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{fqn}: unsupported dtype {md['dtype']}")
                state[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=_DTYPES[md["dtype"]], requires_grad=md["requires_grad"]),
                    size=torch.Size(md["size"]),
                    chunks=[ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                            for c in md["chunks"]])
            storage = {}
            for s in doc["storage_data"]:
                index = MetadataIndex(fqn=s["fqn"], offset=None if s["offset"] is None else torch.Size(s["offset"]),
                                      index=s["index"])
                storage[index] = _StorageInfo(relative_path=s["relative_path"], offset=s["file_offset"],
                                              length=s["length"], transform_descriptors=tuple(s["transforms"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is malformed: {e!r}") from None
        metadata = Metadata(state_dict_metadata=state, planner_data=doc.get("planner_data"), storage_data=storage,
                            version=doc.get("version"))
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


def _plain(value: Any) -> Any:
    """JSON-able copy of DCP's planner data (dicts of tuples of str/int)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return value


def split_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split a (flattened-by-name) optimizer state dict into its tensors and its param groups.

    ``get_optimizer_state_dict`` returns ``{"state": {name: {"step", "exp_avg", ...}},
    "param_groups": [...]}``; tensors go through DCP, groups (floats, names) into JSON.
    """
    tensors = {}
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{key} is not a tensor")
            tensors[f"{name}/{key}"] = value
    return tensors, optim_state["param_groups"]


def join_optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


@dataclass(frozen=True, slots=True, kw_only=True)
class RankState:
    """The plain (JSON) part of a learner checkpoint from one rank; tensors go through DCP.

    Example: ``RankState(param_groups={"policy": [...]}, schedulers={"policy": {"last_epoch": 4}}, rng="...")``
    """

    param_groups: dict[str, list[dict]]
    """Optimizer param groups (lr, betas, parameter names) per trained model."""
    schedulers: dict[str, dict]
    """LR-scheduler state per trained model."""
    rng: str
    """This rank's torch RNG state, base64."""
    cuda_rng: str | None = None
    """Its CUDA generator's state, base64, when it trains on a GPU (dropout, sampling on the
    device); None on CPU and in checkpoints written before it was kept."""
    schedule: LRSchedule | None = None
    """The policy's LR schedule the state was saved under, so a resume can say why its rates
    differ; None in checkpoints written before it was kept."""
    unstepped: list[str] = dataclasses.field(default_factory=list)
    """Trained models whose optimizer had not stepped yet: the optimizer state saved for them is
    a placeholder, dropped again on load."""


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


Trained = tuple[str, nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
"""One model a rank trains: its name (``policy``, ``critic``), module, optimizer and LR scheduler."""


def missing_shards(path: str | Path) -> list[str]:
    """What a DCP directory written by ``JsonMetadataWriter`` lacks, as seen from this process:
    its metadata file, or shard files (or bytes of them) the metadata names. Each rank writes its
    shards where *it* sees ``path``: on a directory not shared between nodes they land on the
    ranks' own disks, and the checkpoint only fails when a resume reads it."""
    try:
        doc = json.loads((Path(path) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [METADATA_FILE]
    need: dict[str, int] = {}
    for s in doc.get("storage_data", []):
        need[s["relative_path"]] = max(need.get(s["relative_path"], 0), s["file_offset"] + s["length"])
    missing = []
    for name, size in sorted(need.items()):
        try:
            short = (Path(path) / name).stat().st_size < size
        except OSError:
            short = True
        if short:
            missing.append(name)
    return missing


def save_trained(path: str, trained: list[Trained]) -> tuple[dict[str, list[dict]], dict[str, dict], list[str]]:
    """Write this rank's shards of every trained model and its optimizer into the DCP directory
    ``path`` (collective). Returns the plain part for ``RankState``: param groups and scheduler
    state per model, and the models whose optimizer had not stepped yet."""
    tensors, groups, schedulers, unstepped = {}, {}, {}, []
    for name, model, opt, sched in trained:
        fresh = not opt.state
        # On an optimizer that has not stepped yet (the policy during the critic's warm-up,
        # or after skipped updates only) this takes a zero-lr step to make its state; left
        # in place, the first real update would be Adam's second (0.74x its size).
        model_sd, optim_sd = get_state_dict(model, opt)
        if fresh:
            opt.state.clear()
            unstepped.append(name)
        opt_tensors, groups[name] = split_optimizer_state(optim_sd)
        tensors.update({f"{name}/{k}": v for k, v in model_sd.items()})
        tensors.update({f"{name}_optim/{k}": v for k, v in opt_tensors.items()})
        schedulers[name] = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    dcp.save(tensors, storage_writer=JsonMetadataWriter(path))
    return groups, schedulers, unstepped


def load_trained(path: str, trained: list[Trained], state: RankState, rates: dict[str, tuple[float, float]],
                 weight_decay: float) -> None:
    """Load what ``save_trained`` wrote (any rank count FSDP2 can reshard to) into ``trained``.

    The checkpoint supplies the state (weights, moments, step counts); the caller supplies the
    settings: ``rates[name]`` is the model's (peak, next update's) learning rate. A parameter
    the checkpoint holds no moments for never had a gradient (Adam keeps no state for it, e.g.
    an expert no token was routed to): it gets Adam's fresh state, as if never stepped.
    """
    targets, structure = {}, {}
    for name, model, opt, sched in trained:
        init_optimizer_state(model, opt)
        model_sd, optim_sd = get_state_dict(model, opt)
        opt_tensors, _ = split_optimizer_state(optim_sd)
        targets.update({f"{name}/{k}": v for k, v in model_sd.items()})
        targets.update({f"{name}_optim/{k}": v for k, v in opt_tensors.items()})
        structure[name] = (model_sd, opt_tensors)
    saved = JsonMetadataReader(path).read_metadata().state_dict_metadata
    missing = [k for k in targets if k not in saved]
    weights = [k for k in missing if k.split("/", 1)[0] in structure]
    if weights:
        raise CheckpointError(f"{path} has no {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''}: "
                              f"a checkpoint of another model")
    for key in missing:  # moments and step of a parameter that never had a gradient
        targets.pop(key).zero_()
    dcp.load(targets, storage_reader=JsonMetadataReader(path))
    for name, model, opt, sched in trained:
        model_sd, opt_tensors = structure[name]
        model_sd = {k: targets[f"{name}/{k}"] for k in model_sd}
        opt_tensors = {k: targets.get(f"{name}_optim/{k}", v) for k, v in opt_tensors.items()}
        peak, rate = rates[name]
        # The settings in the checkpoint's plain state are replaced by the caller's before loading,
        # and the kernel choice too: fused AdamW where the shards are on a GPU, whatever placement saved them.
        kernels = {k: opt.param_groups[0][k] for k in ("fused", "foreach") if k in opt.param_groups[0]}
        groups = [{**g, **kernels, "lr": rate, "initial_lr": peak, "weight_decay": weight_decay}
                  for g in state.param_groups[name]]
        set_state_dict(model, opt, model_state_dict=model_sd,
                       optim_state_dict=join_optimizer_state(opt_tensors, groups))
        if name in state.unstepped:  # its saved state is save_trained's placeholder
            opt.state.clear()
        n = len(opt.param_groups)
        sched.load_state_dict({**state.schedulers[name], "base_lrs": [peak] * n, "_last_lr": [rate] * n,
                               "lr_lambdas": [None] * n})
