"""Scoring with a Hugging Face sequence-classification reward model loaded from a local path.

The reward of a response is the model's single logit at the last token of
``prompt + response``, or, for a chat prompt and a model whose tokenizer has a chat template,
of the chat rendered by that template (``RewardModelScorer.texts``). HF's seq-cls models pick that token as the last one that is not
``config.pad_token_id``, so the tokenizer's pad id and the config's must agree; the helpers
here make sure they do, for scoring and for training (``reward/train.py``) alike.

A text longer than the model can take is cut from the left: the start of the prompt goes
first, and the end of the response, where the scored token is, always stays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding

from actors.types import ChatMessage

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_NO_TOKENIZER_LIMIT = 10**9
"""A tokenizer ``model_max_length`` at or above this says "unknown" (transformers puts 1e30
there when the checkpoint names none), not a limit of the model."""


def context_length(tokenizer, model) -> int | None:
    """Tokens the model can take: the smaller of its position table (``max_position_embeddings``,
    GPT-2's ``n_positions``) and its tokenizer's ``model_max_length`` where that is a real
    limit (RoBERTa has 514 position rows but 512 usable positions); None if neither says."""
    limits = [getattr(model.config.get_text_config(), "max_position_embeddings", None),
              tokenizer.model_max_length]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < _NO_TOKENIZER_LIMIT]
    return min(limits, default=None)


def ensure_pad_token(tokenizer, model) -> None:
    """Give the tokenizer a pad token (eos if it has none) and set the same id on the model config.

    Many decoder tokenizers (Llama, GPT-2) ship without a pad token; without one a batch cannot
    be padded and HF's seq-cls head refuses batches larger than one. Padding with eos is safe
    here because the attention mask hides the pads and the pooled token is the last non-pad
    one; the price is that a text that itself ends in eos is pooled one token earlier.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the reward model's tokenizer has neither a pad token nor an eos token; "
                "set one of them (tokenizer.pad_token = ...) before scoring"
            )
        tokenizer.pad_token = tokenizer.eos_token
    # The head finds the scored token through the config's pad id, so it must be the id the
    # tokenizer pads with, even if the checkpoint's config says otherwise.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def encode(tokenizer, texts: Sequence[str], max_length: int | None) -> BatchEncoding:
    """Tokenize a batch for a reward model: right padding, pytorch tensors.

    Right padding, whatever the tokenizer's default: HF's head finds the last real token on
    either side, but models with absolute position embeddings (GPT-2, OPT) number positions
    from the first column, so a left-padded text would be scored at shifted positions and its
    reward would depend on the other texts in its batch (rotary models like Llama are immune).
    """
    return tokenizer(
        without_doubled_bos(tokenizer, texts),
        padding=True,
        padding_side="right",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )


def without_doubled_bos(tokenizer, texts: Sequence[str]) -> list[str]:
    """The texts, less a leading BOS where the tokenizer adds its own: a chat prompt rendered by
    a template that writes the BOS (Llama 3's does) would otherwise be scored with two."""
    bos = tokenizer.bos_token
    if not bos or tokenizer.bos_token_id not in tokenizer("").input_ids:
        return list(texts)
    return [text[len(bos):] if text.startswith(bos) else text for text in texts]


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class RewardModelScorer:
    """A reward model (``AutoModelForSequenceClassification`` with one label) from a local path.

    Each text is cut to its last ``max_length`` tokens; None takes the model's context
    (`context_length`), and a ``max_length`` beyond it is refused.

    Example::

        scorer = RewardModelScorer("/ckpt/rm", batch_size=16)
        scorer.score(["12+30="], ["42"])  # -> [2.31]
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"reward model path {path!r} is not a directory")
        if dtype not in _DTYPES:
            raise ValueError(f"reward model dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"reward model batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"reward model max_length must be >= 1 or None, got {max_length}")
        self.path = path
        self.batch_size = batch_size
        self.device = torch.device(device)

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Truncating from the left keeps the end of the response, which is the token scored.
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_DTYPES[dtype])
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model at {path!r} has num_labels={self.model.config.num_labels}; "
                "a reward model needs exactly one (a scalar score)"
            )
        ensure_pad_token(self.tokenizer, self.model)
        # Past its context a model with absolute positions raises (IndexError) and a rotary one
        # scores positions it never saw in training: always truncate to the context.
        context = context_length(self.tokenizer, self.model)
        if max_length is not None and context is not None and max_length > context:
            raise ValueError(f"reward model at {path!r}: max_length={max_length} exceeds the model's context "
                             f"of {context} tokens (max_position_embeddings, or the tokenizer's model_max_length)")
        self.max_length = context if max_length is None else max_length
        """Tokens scored per text (the last ones); None only for a model that states no context."""
        self.model.to(self.device).eval()

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              messages: Sequence[Sequence[ChatMessage] | None] | None = None) -> list[float]:
        """The reward model's logit for each response, in batches of ``batch_size``
        (`texts` says what text is scored)."""
        return [value for value, _ in self.score_and_fill(prompts, responses, messages)]

    def score_and_fill(self, prompts: Sequence[str], responses: Sequence[str],
                       messages: Sequence[Sequence[ChatMessage] | None] | None = None) -> list[tuple[float, bool]]:
        """``score``'s logits, each with whether its text filled ``max_length``: cut to its last
        tokens, it may have lost its prompt (a response as long as the context loses all of it)."""
        texts = self.texts(prompts, responses, messages)
        scores: list[tuple[float, bool]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = encode(self.tokenizer, texts[start : start + self.batch_size], self.max_length)
                filled = (batch["attention_mask"].sum(dim=1) >= self.max_length).tolist() \
                    if self.max_length is not None else [False] * len(batch["input_ids"])
                logits = self.model(**batch.to(self.device)).logits  # [B, 1]
                scores.extend(zip(logits[:, 0].float().tolist(), filled))
        return scores

    def texts(self, prompts: Sequence[str], responses: Sequence[str],
              messages: Sequence[Sequence[ChatMessage] | None] | None = None) -> list[str]:
        """What is scored: for a chat prompt (``messages``) and a reward model whose tokenizer
        has a chat template, its chat rendered by that template with the response as the
        assistant's turn, as such models are trained (the policy's rendering would bring the
        policy's system prompt and no end-of-turn token); otherwise the prompt as the policy
        saw it followed by the response."""
        if len(prompts) != len(responses) or (messages is not None and len(messages) != len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses"
                             + (f" and {len(messages)} message lists" if messages is not None else ""))
        chats = messages if messages is not None and uses_chat_template(self.tokenizer) else [None] * len(prompts)
        return [prompt + response if chat is None else self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in chat] + [{"role": "assistant", "content": response}],
                    tokenize=False)
                for prompt, response, chat in zip(prompts, responses, chats)]
