"""The critic is the policy checkpoint's trunk under a zero value head, loaded quietly but
checked: the causal LM's head is expected to be left over, a missing trunk weight is not."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.models import load_critic


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_critic_takes_the_checkpoints_trunk_without_a_load_report(request, fixture, caplog):
    model_dir = request.getfixturevalue(fixture)
    with caplog.at_level(logging.WARNING):
        critic = load_critic(str(model_dir), torch.float32)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    saved = load_file(str(model_dir / "model.safetensors"))
    trunk = critic.trunk.state_dict()
    assert torch.equal(trunk["embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(trunk["layers.1.mlp.down_proj.weight"], saved["model.layers.1.mlp.down_proj.weight"])
    assert float(critic.value_head.weight.detach().abs().sum()) == 0.0


def test_a_trunk_weight_missing_from_the_checkpoint_is_an_error_naming_it(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"critic's trunk lacks .*layers\.1\.mlp\.down_proj\.weight"):
        load_critic(str(broken), torch.float32)
