"""Prompt datasets: JSONL loading with line-numbered errors, and the seeded batch order."""

from __future__ import annotations

import hashlib

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from actors.types import ChatMessage, Prompt


log = logging.getLogger("rlrelay")

DATA_FIELDS = frozenset({"prompt", "answer"})
"""The fields of a dataset line that are read."""

CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and line."""


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read ``{"prompt": str | [{"role", "content"}...], "answer": str?}`` lines into Prompts.

    ``Prompt.index`` is the 0-based position among the file's prompts (blank lines skipped),
    ``Prompt.line`` the 1-based line it was read from.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"dataset file {str(path)!r} is a directory: give the JSONL file in it")
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    prompts: list[Prompt] = []
    unread: dict[str, int] = {}  # fields other than prompt and answer: the first line holding each, in file order
    with path.open("rb") as f:  # decoded per line, so that bad bytes are reported with their line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                # utf-8-sig on the first line: a byte-order mark (as some Windows editors write)
                # is not part of the data.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                # Numbers keep their text ("2.0" stays "2.0", "1.10" is not "1.1"); NaN and
                # Infinity are not JSON; a key given twice is refused, not silently the last.
                obj = json.loads(line, parse_float=_Decimal, parse_constant=_not_json,
                                 object_pairs_hook=_no_duplicates)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            prompts.append(_parse(obj, len(prompts), lineno, where))
            for key in obj.keys() - DATA_FIELDS:
                unread.setdefault(key, lineno)
    if not prompts:
        raise DataError(f"dataset file {str(path)!r} holds no prompts")
    if unread:  # metadata, usually; a misspelt "answr" would otherwise leave every answer None
        named = ", ".join(f"{key!r} (line {line})" for key, line in list(unread.items())[:5])
        log.warning("dataset file %s: field(s) %s%s are not read (only 'prompt' and 'answer' are)", path, named,
                    ", ..." if len(unread) > 5 else "")
    return prompts


class _Decimal(str):
    """A JSON number with a fraction or exponent, as written (an answer keeps its text); not a
    string where the format wants one."""


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice")
        seen[key] = value
    return seen


def _parse(obj: object, index: int, line: int, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise DataError(f"{where}: missing the 'prompt' field")
    raw, answer = obj["prompt"], obj.get("answer")
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, str | int)):
        raise DataError(f"{where}: 'answer' must be a string or a number, got {json.dumps(answer)}")
    answer = None if answer is None else str(answer)
    if isinstance(raw, str) and not isinstance(raw, _Decimal):
        if not raw.strip():
            raise DataError(f"{where}: the prompt is empty")
        return Prompt(index=index, line=line, text=raw, answer=answer)
    if isinstance(raw, list) and raw:
        messages = []
        for m in raw:
            if not (isinstance(m, dict) and type(m.get("role")) is str and type(m.get("content")) is str):
                raise DataError(f"{where}: each chat message needs string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:  # chat templates render an unknown role as text, or fail later
                raise DataError(f"{where}: chat role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
            messages.append(ChatMessage(role=m["role"], content=m["content"]))
        return Prompt(index=index, line=line, messages=tuple(messages), answer=answer)
    raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of chat messages")


@dataclass(kw_only=True)
class SamplerState:
    """Where the sampler is; saved in checkpoints so a resumed run sees the same order."""

    epoch: int = 0
    """Completed passes over the dataset."""
    position: int = 0
    """Prompts taken from the current pass."""


def data_fingerprint(prompts: list[Prompt]) -> dict:
    """What a checkpoint's data position indexes: the number of prompts and a hash of their
    contents in order, so a resume can tell when the training set it continues is another."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(repr((p.text, p.messages, p.answer)).encode())
    return {"prompts": len(prompts), "sha256": digest.hexdigest()[:16]}


class PromptSampler:
    """Hands out fixed-size batches of prompts in a seeded order, reshuffled every pass.

    The order is a pure function of (seed, epoch), so a resumed run continues exactly where
    the checkpoint left off.
    """

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True) -> None:
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Prompt]:
        batch: list[Prompt] = []
        while len(batch) < size:
            order = self._order(self.state.epoch)
            take = order[self.state.position:self.state.position + size - len(batch)]
            batch.extend(self.prompts[i] for i in take)
            self.state.position += len(take)
            if self.state.position >= len(order):
                self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
        return batch


def drop_too_long(prompts: list[Prompt], encode, limit: int, policy: str, source: str,
                  unknown_id: int | None = None) -> tuple[list[Prompt], int]:
    """Prompts whose token count (``encode(prompt)``) is at most ``limit``, and how many were
    dropped. ``policy="error"`` raises on the first longer one instead, naming it. Prompts that
    encode to the tokenizer's ``unknown_id`` (characters it does not know, which the model then
    cannot see) are counted and logged."""
    kept, unknown = [], []
    for p in prompts:
        try:
            ids = encode(p)
        except Exception as e:  # e.g. a chat template that refuses the roles' order: name the prompt
            raise DataError(f"{source}: {p.label} cannot be encoded: {type(e).__name__}: {e}") from e
        n = len(ids)
        if unknown_id is not None and unknown_id in ids:
            unknown.append(p.label)
        if n <= limit:
            kept.append(p)
        elif policy == "error":
            raise DataError(f"{source}: {p.label} has {n} tokens, more than the {limit} that "
                            f"model.max_model_len - rollout.max_new_tokens leaves (data.too_long=skip drops such prompts)")
    if unknown:
        log.warning("%s: %d prompt(s) hold characters the tokenizer does not know (encoded as its unknown token), "
                    "e.g. %s", source, len(unknown), unknown[0])
    if prompts and not kept:
        # Skipping all of them would run eval-less (or fail later on an empty train set) with
        # only a logged count to show why.
        raise DataError(f"{source}: every one of the {len(prompts)} prompts taken from it has more than the {limit} "
                        f"tokens that model.max_model_len - rollout.max_new_tokens leaves, so data.too_long=skip "
                        f"would drop them all")
    return kept, len(prompts) - len(kept)
