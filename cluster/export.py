"""``rlrelay export``: a checkpoint's policy as a Hugging Face model directory.

Runs in one process without a process group: DCP reads every rank's shards and assembles
the full tensors. Nothing is unpickled (JSON metadata, ``weights_only`` tensor payloads).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from learner.checkpoint import CheckpointError, JsonMetadataReader


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (safetensors weights, config, tokenizer) from a checkpoint directory."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model_files = checkpoint / "model"
    if not (checkpoint / "learner").is_dir() or not (model_files / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete rlrelay checkpoint (needs learner/ and model/)")
    config = AutoConfig.from_pretrained(model_files)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = JsonMetadataReader(str(checkpoint / "learner"))
    saved = reader.read_metadata().state_dict_metadata
    names = [k for k in skeleton.state_dict() if f"policy/{k}" in saved]
    missing = [k for k, _ in skeleton.named_parameters() if k not in names]
    if missing:
        raise CheckpointError(f"{checkpoint}: policy weights missing from the checkpoint, e.g. {missing[:3]}")
    target = {f"policy/{k}": torch.empty(tuple(saved[f"policy/{k}"].size), dtype=saved[f"policy/{k}"].properties.dtype)
              for k in names}
    dcp.load(target, storage_reader=JsonMetadataReader(str(checkpoint / "learner")))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: target[f"policy/{k}"] for k in names}, strict=False)
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_files).save_pretrained(out_dir)
    # The model's own generation defaults (eos ids, sampling settings), not the ones
    # save_pretrained derives from the config.
    generation = model_files / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out_dir / "generation_config.json")
    return out_dir
