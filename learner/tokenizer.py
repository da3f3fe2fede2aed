"""A character-level tokenizer built locally with the `tokenizers` library.

No tokenizer can be downloaded on the machines this project runs on, so small demo models
use one built from an alphabet: every character is exactly one token, after four special
tokens with fixed ids::

    0 <pad>   1 <s>   2 </s>   3 <unk>   4.. the alphabet, in the order given

Choices, and why:

- **No BOS (or EOS) is added on encode.** ``"12+30="`` encodes to exactly six ids, so the
  prompt the learner trains on, the prompt vLLM tokenizes (``add_special_tokens=True`` by
  default) and the token counts everyone reasons about are the same sequence. Sequences end
  with ``</s>`` because the training data appends it, not because the tokenizer does.
- **Decoding joins tokens without spaces** (a ``Fuse`` decoder), so
  ``decode(encode(s)) == s`` for every string over the alphabet; the default decoder of a
  bare `tokenizers.Tokenizer` would put a space between every pair of characters.
- The model is a BPE with no merges: it splits the input into single characters, and a
  character outside the alphabet becomes ``<unk>``. No normalizer or pre-tokenizer, so
  spaces and newlines in the alphabet are ordinary characters.

The result is a `transformers.PreTrainedTokenizerFast`; saved with ``save_pretrained`` it
loads back with ``AutoTokenizer.from_pretrained``, which is how vLLM loads it from a model
directory.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def build_char_tokenizer(
    alphabet: str, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Build a tokenizer with one token per character of `alphabet` (ids from 4 on).

    `alphabet` must not repeat a character. When `out_dir` is given the tokenizer is also
    saved there with ``save_pretrained``.
    """
    if not alphabet:
        raise ValueError("alphabet is empty")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet repeats characters: {alphabet!r}")

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=10**6,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
