"""The model shape the memory planner works from: a decoder-only transformer read from its
Hugging Face ``config.json``, and its parameter counts (policy, critic, the parts FSDP2 keeps
gathered)."""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("llama", "mistral", "qwen2")
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DERIVED_SIZES = ("num_key_value_heads", "head_dim")
"""Sizes a config may leave out or null: they default to the attention heads and hidden / heads."""


class PlanError(ValueError):
    """The planner cannot describe this model or job; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """A decoder-only transformer (Llama, Mistral, Qwen2), as much of it as memory depends on.

    Example: ``Architecture.from_hf_config(json.load(open("model/config.json")))``
    """

    model_type: str
    """``llama``, ``mistral`` or ``qwen2``."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads (fewer than ``num_heads`` with grouped-query attention)."""
    head_dim: int
    tie_word_embeddings: bool
    """lm_head shares the embedding matrix (counted once)."""
    qkv_bias: bool
    """q/k/v projections have biases (Qwen2; Llama with ``attention_bias``)."""
    o_bias: bool
    """o_proj has a bias (Llama with ``attention_bias``)."""
    mlp_bias: bool
    """gate/up/down projections have biases (Llama with ``mlp_bias``)."""

    @classmethod
    def from_hf_config(cls, config: dict) -> "Architecture":
        """From a Hugging Face ``config.json`` mapping."""
        if not isinstance(config, dict):
            raise PlanError(f"config.json holds a {type(config).__name__}, not a JSON object")
        kind = config.get("model_type")
        if kind not in ARCHITECTURES:
            raise PlanError(f"model_type {kind!r}: the planner knows {', '.join(ARCHITECTURES)}")
        try:
            heads = config["num_attention_heads"]
            attention_bias = bool(config.get("attention_bias", False))
            for key in (*REQUIRED_SIZES, *DERIVED_SIZES):
                value = config.get(key)
                if key not in config or (value is None and key in DERIVED_SIZES):
                    continue  # a missing required size is named below; a derived one is derived
                if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                    raise PlanError(f"config.json: {key} must be a positive integer (got {value!r})")
            if heads % (config.get("num_key_value_heads") or heads):
                raise PlanError(f"config.json: num_attention_heads ({heads}) is not a multiple of "
                                f"num_key_value_heads ({config['num_key_value_heads']})")
            return cls(model_type=kind, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                       intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
                       num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                       head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=kind == "qwen2" or attention_bias, o_bias=kind != "qwen2" and attention_bias,
                       mlp_bias=kind != "qwen2" and bool(config.get("mlp_bias", False)))
        except KeyError as e:
            raise PlanError(f"config.json has no {e.args[0]!r}") from None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        """One transformer block (the FSDP2 unit): attention, MLP, two norms."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        attention = h * q + 2 * h * kv + q * h + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
        mlp = 3 * h * i + self.mlp_bias * (2 * i + h)
        return attention + mlp + 2 * h

    @property
    def policy_root_params(self) -> int:
        """Outside the blocks: embeddings, final norm, lm_head unless tied."""
        embed = self.vocab_size * self.hidden_size
        return embed + self.hidden_size + (0 if self.tie_word_embeddings else embed)

    @property
    def critic_root_params(self) -> int:
        """The critic's trunk has no lm_head; its value head is ``Linear(hidden, 1)``."""
        return self.vocab_size * self.hidden_size + self.hidden_size + self.hidden_size + 1

    @property
    def policy_params(self) -> int:
        return self.policy_root_params + self.num_layers * self.block_params

    @property
    def critic_params(self) -> int:
        return self.critic_root_params + self.num_layers * self.block_params

    def describe(self) -> str:
        tied = "tied" if self.tie_word_embeddings else "untied"
        return (f"{self.model_type}, {self.policy_params / 1e6:,.1f}M parameters ({self.num_layers} layers, "
                f"hidden {self.hidden_size}, {self.num_heads} heads / {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, MLP {self.intermediate_size}, vocab {self.vocab_size}, {tied} embeddings)")
