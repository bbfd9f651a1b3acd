"""Tiny random-weight checkpoints of real architectures, built in the tests themselves.

Every parameter is random, norm weights and biases included: with norm weights of 1 a norm
applied twice, the wrong norm module or a dropped norm weight changes values by ~1e-6 and
passes; here it cannot.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen3", "mistral", "gpt2", "gpt_neox", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe")

# Where each family's final norm and decoder layers are, written here independently of the
# project's adapter table (the tests' references must not be the code under test).
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def tiny_config(family: str, **overrides):
    import transformers as tf

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
    # Gemma: a short sliding window, so local layers really differ from global ones on these
    # prompts, and a soft-cap small enough to change the logits visibly.
    gemma = dict(head_dim=16, sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                 query_pre_attn_scalar=16, tie_word_embeddings=True)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "gemma2":
        return tf.Gemma2Config(**{**common, **gemma})
    if family == "gemma3_text":
        types = ["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2 + 1)
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}  # fmt: skip
        return tf.Gemma3TextConfig(
            **{**common, **gemma}, layer_types=types[: common["num_hidden_layers"]], rope_parameters=rope
        )
    if family == "qwen3_moe":
        # 4 experts, 2 per token; layer 2 keeps a dense MLP, as mlp_only_layers allows
        return tf.Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 mlp_only_layers=[2], norm_topk_prob=True, **common)  # fmt: skip
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=common["hidden_size"], n_layer=common["num_hidden_layers"], n_head=common["num_attention_heads"],
            n_inner=common["intermediate_size"], n_positions=common["max_position_embeddings"],
            vocab_size=common["vocab_size"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=common["hidden_size"], intermediate_size=common["intermediate_size"],
            num_hidden_layers=common["num_hidden_layers"], num_attention_heads=common["num_attention_heads"],
            vocab_size=common["vocab_size"], max_position_embeddings=common["max_position_embeddings"],
            rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    raise ValueError(family)


@torch.no_grad()
def randomise(model) -> None:
    """Matrices ~ N(0, 0.1) (larger than the default init, so layers disagree visibly); norm
    gains uniform in [0.5, 1.5] (Gemma's RMSNorm scales by 1 + weight, so its weights are
    uniform in [-0.5, 0.5]); biases ~ N(0, 0.1)."""
    for module in model.modules():
        centred = "Gemma" in type(module).__name__ and "RMSNorm" in type(module).__name__
        for name, p in module.named_parameters(recurse=False):
            if p.ndim >= 2:
                p.normal_(0, 0.1)
            elif name == "bias":
                p.normal_(0, 0.1)
            else:
                p.uniform_(-0.5, 0.5) if centred else p.uniform_(0.5, 1.5)


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight `...ForCausalLM` saved as safetensors at `path` (no tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    randomise(model)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def final_norm(model):
    """The unsliced model's final norm module."""
    obj = model
    for part in FINAL_NORM.get(model.config.model_type, "model.norm").split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model):
    obj = model
    for part in LAYERS.get(model.config.model_type, "model.layers").split("."):
        obj = getattr(obj, part)
    return obj
