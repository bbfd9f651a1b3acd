"""Tiny random-weight checkpoints of real architectures, built in the tests themselves."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen3", "mistral")


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real models
        vocab_size=256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(family)


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight `...ForCausalLM` saved as safetensors at `path` (no tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init make layers disagree visibly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
