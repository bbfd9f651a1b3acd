"""Where each model family keeps its parts: one table, so no code branches on model names.

An adapter names attribute paths inside a Hugging Face `...ForCausalLM` and the submodules of
one decoder layer that the capture and steering hooks attach to.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelAdapter:
    """Attribute paths of one architecture family (dotted, from the `...ForCausalLM` root)."""

    family: str
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    # Inside one decoder layer:
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"  # output = `attn_in` (post-LayerNorm input of attention)
    mlp_norm: str = "post_attention_layernorm"  # output = `mlp_in`


# Llama, Mistral and Qwen2/3 share Llama's layout; a family with another layout gets its own row.
ADAPTERS: dict[str, ModelAdapter] = {family: ModelAdapter(family) for family in ("llama", "mistral", "qwen2", "qwen3")}


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter for a Hugging Face `config.model_type`; a clear error for unknown families."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model family model_type={model_type!r}: supported families are "
            f"{sorted(ADAPTERS)} (add a row to actors/adapters.py ADAPTERS)"
        ) from None


def get_path(root, dotted: str):
    """`get_path(model, "model.layers")` is `model.model.layers`."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
