"""`rlrelay keys`: the key reference is read from the config dataclasses, so it is complete."""

from __future__ import annotations

from cluster.cli import main
from cluster.config import Config, load_config, to_dict
from cluster.config_keys import key_reference


def leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            out |= leaves(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_key_of_the_default_config_is_listed_with_a_docstring():
    keys = {k.key: k for k in key_reference()}
    # reward.model is None by default and reward.functions a list: their fields are listed as
    # reward.model.* and reward.functions[].*, the rest match the resolved config one to one.
    resolved = {k for k in leaves(to_dict(Config())) if not k.startswith(("reward.model", "reward.functions"))}
    listed = {k for k in keys if not k.startswith(("reward.model.", "reward.functions[]."))}
    assert listed == resolved
    assert {"reward.model.path", "reward.functions[].name", "reward.functions[].weight"} <= set(keys)
    undocumented = [k for k, doc in keys.items() if len(doc.doc) < 8]
    assert undocumented == [], f"config fields without a docstring: {undocumented}"


def test_listed_types_and_defaults_are_the_ones_load_config_applies():
    keys = {k.key: k for k in key_reference()}
    cfg = load_config(None)
    assert keys["learner.lr"].type == "float" and keys["learner.lr"].default == repr(cfg.learner.lr)
    assert keys["run.dir"].type == "str | None" and keys["run.dir"].default == "None"
    assert keys["rollout.autoscale"].default == "False"


def test_keys_command_filters_by_prefix(capsys):
    assert main(["keys", "rollout.autoscale"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rollout.autoscale: bool = False\n") and "rollout.autoscale_high: float = 0.5" in out
    assert "learner." not in out
    assert main(["keys", "no.such"]) == 2
    assert "no config key starts with 'no.such'" in capsys.readouterr().err
