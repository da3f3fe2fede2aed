"""Tiny models built from a config (nothing can be downloaded here), for tests."""

from __future__ import annotations

from pathlib import Path

TINY_ALPHABET = "0123456789+=-? abcdefghijklmnopqrstuvwxyz"


def make_tiny_model(out_dir: Path, *, tie: bool = False, seed: int = 0, hidden: int = 128, heads: int = 2,
                    layers: int = 2) -> Path:
    """A randomly initialised Llama + char tokenizer saved as a HF model directory.

    head_dim 64: vLLM's CPU attention rejects small head sizes such as 16.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(TINY_ALPHABET, out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir

def make_tiny_reward_model(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama sequence classifier (one logit) + char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from learner.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(TINY_ALPHABET, out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out_dir)
    return out_dir
