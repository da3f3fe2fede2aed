"""Checks of a job's inputs that run on the driver before Ray starts.

Each one is what some worker would find in its constructor or first step, after minutes of
actor start-up, and on every worker at once; here it is one error that names the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cluster.config import Config, ConfigError
from cluster.data import DataError

log = logging.getLogger("rlrelay")


def check_reward_config(cfg: Config, train_prompts: list, train_path: str) -> None:
    """What every reward worker would check in its constructor, once here before Ray starts, so
    that a misspelled function or a missing reward model is one clear error, not N failed actors;
    and that every training prompt has an answer the built-in functions can score against (a
    missing one failed every sample of the first step, after the actors had started)."""
    from reward.rules import BUILTINS, resolve_reward_function

    for spec in cfg.reward.functions:
        try:
            function = resolve_reward_function(spec.name)
        except ValueError as e:
            raise ConfigError(f"reward.functions: {e}") from None
        if spec.name not in BUILTINS:
            continue
        unscorable = []
        for prompt in train_prompts:
            try:  # a built-in checks its answer before it looks at the response
                function(prompt.text or "", "", prompt.answer)
            except ValueError as e:
                if cfg.reward.on_failure == "error":
                    raise DataError(f"data.train_path {train_path}: {prompt.label}: {e}") from None
                unscorable.append(prompt.label)
        if unscorable:  # reward.on_failure=drop or zero: counted in reward/failures
            fate = ("their prompt groups leave the batch (reward/dropped_groups)" if cfg.reward.on_failure == "drop"
                    else "their samples score 0")
            log.warning("data.train_path %s: %s cannot score %d prompt(s) (e.g. %s); with reward.on_failure=%s %s",
                        train_path, spec.name, len(unscorable), unscorable[0], cfg.reward.on_failure, fate)
    if cfg.reward.model is not None:
        positions = check_reward_model(cfg.reward.model.path, cfg.reward.model.max_length)
        limit = cfg.reward.model.max_length or positions
        if limit is not None and limit < cfg.model.max_model_len:
            log.warning("reward.model: texts over %d tokens (of the reward model's tokenizer) are cut to their last %d, "
                        "so a long response's prompt is lost first; model.max_model_len=%d allows longer ones "
                        "(reward/model_truncated counts them)", limit, limit, cfg.model.max_model_len)


def check_reward_model(path: str, max_length: int | None = None) -> int | None:
    """A local sequence-classification model with one label, by its config.json. A causal LM
    loads as one with a freshly initialised (random) score head, and with a one-label config
    such a run went to the end scoring noise. Returns its positions (None when unstated)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"reward.model.path {path!r} is not a model directory (no config.json): give a local "
                          f"Hugging Face sequence-classification model")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"reward.model.path {path!r}: config.json is not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"reward.model.path {path!r} is a {', '.join(map(str, architectures)) or 'model of no stated'} "
                          f"architecture, not a sequence-classification reward model (its score head would be "
                          f"random): train one with reward/train.py or give an *ForSequenceClassification model")
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if labels != 1:
        raise ConfigError(f"reward.model.path {path!r} has {labels} labels; a reward model has exactly one "
                          f"(a scalar score)")
    text = config.get("text_config") or config
    positions = text.get("max_position_embeddings", text.get("n_positions"))
    if max_length is not None and isinstance(positions, int) and max_length > positions:
        # Also refused by the worker at start-up, with the tokenizer's limit too; here before Ray starts.
        raise ConfigError(f"reward.model.max_length={max_length} exceeds the {positions} positions of the reward "
                          f"model at {path!r}: lower it, or leave it unset to use the model's context")
    return positions if isinstance(positions, int) else None


def check_eval_judge(cfg: Config, eval_prompts: list, eval_path: str | None) -> None:
    """The eval judge exists and can judge every eval prompt's answer (a non-numeric answer
    under numeric_match would fail the first evaluation, after the actors started)."""
    from reward.rules import BUILTINS, resolve_reward_function

    name = cfg.eval_judge()
    try:
        judge = resolve_reward_function(name)
    except ValueError as e:
        raise ConfigError(f"trainer.eval_function: {e}") from None
    if name not in BUILTINS:
        return  # a user's function is called on real responses only
    for prompt in eval_prompts:
        try:
            judge(prompt.text or "", "", prompt.answer)
        except ValueError as e:
            raise DataError(f"data.eval_path {eval_path}: {prompt.label}: eval judge {name}: {e}") from None


def check_model_dir(path: str) -> None:
    """A local directory only: a name that is not one would be looked up on the model hub (by
    every actor), and a typo would wait for the network before failing."""
    if not Path(path).is_dir():
        raise ConfigError(f"model.path {path!r} is not a directory (a local Hugging Face model directory)")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path {path!r} has no config.json: not a Hugging Face model directory")


def check_writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rlrelay-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: {str(path)!r} is not a writable directory ({e.strerror or e})") from None
