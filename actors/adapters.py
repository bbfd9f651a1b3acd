"""Where each model family keeps its parts and how it differs: one table, so stage code never
branches on a family's name.

An adapter names attribute paths inside a Hugging Face `...ForCausalLM`, where each capture and
steering site sits inside one decoder layer, and the per-family behaviour a stage needs
(learned position embeddings, per-layer-type rotary tables, the cache argument's name, a final
logit soft-cap, checkpoint names that differ from the module names, experts stored one by one
but held stacked). Embedding scales (Gemma) and norm placement live in Hugging Face's own
modules, which the stages run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A site is (module path inside the decoder layer, "" for the layer itself; which tensor):
# "in" is the tensor the module reads (its first argument, positional or `hidden_states=`),
# "out" the tensor it returns (the first element when it returns a tuple).
Site = tuple[str, str]

# Pre-norm layers (Llama, Mistral, Qwen, Phi-3, Qwen3-MoE): attention and MLP read normed inputs.
PRE_NORM_SITES: dict[str, Site] = {
    "resid_pre": ("", "in"),
    "attn_in": ("self_attn", "in"),  # = input_layernorm(resid_pre)
    "attn_out": ("self_attn", "out"),
    "resid_mid": ("post_attention_layernorm", "in"),  # = resid_pre + attn_out
    "mlp_in": ("mlp", "in"),  # = post_attention_layernorm(resid_mid); a MoE block's router reads it too
    "mlp_out": ("mlp", "out"),  # a MoE block's combined (routed, weighted) output
    "resid_post": ("", "out"),
}
# Gemma 2/3 norm before *and* after attention and MLP: what a block adds to the residual stream
# is the post-norm's output, and the MLP's input norm is pre_feedforward_layernorm.
SANDWICH_SITES: dict[str, Site] = {
    "resid_pre": ("", "in"),
    "attn_in": ("self_attn", "in"),
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("pre_feedforward_layernorm", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
    "resid_post": ("", "out"),
}
# OLMo-2 has no input norms: attention and MLP read the residual stream itself, and norms sit
# after them. `attn_in`/`mlp_in` are still "what the block reads" (an edit there changes only
# that block's input, not the residual stream).
POST_NORM_SITES: dict[str, Site] = {
    "resid_pre": ("", "in"),
    "attn_in": ("self_attn", "in"),
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("mlp", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
    "resid_post": ("", "out"),
}
GPT2_SITES: dict[str, Site] = {
    "resid_pre": ("", "in"),
    "attn_in": ("attn", "in"),  # = ln_1(resid_pre)
    "attn_out": ("attn", "out"),
    "resid_mid": ("ln_2", "in"),
    "mlp_in": ("mlp", "in"),  # = ln_2(resid_mid)
    "mlp_out": ("mlp", "out"),
    "resid_post": ("", "out"),
}
# GPT-NeoX: with `use_parallel_residual` (Pythia) attention and MLP both read the block input,
# so there is no residual between them: `resid_mid` exists only without it.
NEOX_SITES: dict[str, Site] = {
    "resid_pre": ("", "in"),
    "attn_in": ("attention", "in"),  # = input_layernorm(resid_pre)
    "attn_out": ("attention", "out"),
    "resid_mid": ("post_attention_layernorm", "in"),
    "mlp_in": ("mlp", "in"),  # = post_attention_layernorm(resid_pre) when parallel
    "mlp_out": ("mlp", "out"),
    "resid_post": ("", "out"),
}


@dataclass(frozen=True)
class StackedExperts:
    """A parameter held as one stacked tensor `[experts, ...]` that checkpoints store one
    tensor per expert: each of `parts` (with `{e}` for the expert) is stacked over experts, and
    several parts are then concatenated along `dim` (gate and up projections, in that order)."""

    target: str  # parameter name suffix, e.g. "mlp.experts.gate_up_proj"
    parts: tuple[str, ...]  # e.g. ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")
    dim: int = 1


@dataclass(frozen=True)
class ModelAdapter:
    """One architecture family (paths dotted from the `...ForCausalLM` root)."""

    family: str
    embed: str = "model.embed_tokens"
    position_embed: str | None = None  # learned absolute positions added on the first stage (GPT-2's wpe)
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"  # None: no rotary positions
    rotary_per_layer_type: bool = False  # Gemma 3: one rotary table per layer type (local/global bases)
    cache_kwarg: str = "cache"  # the decoder layer's name for its KV cache argument
    sites: dict[str, Site] = field(default_factory=lambda: PRE_NORM_SITES)
    parallel_residual: str | None = None  # config flag that removes `resid_mid` (GPT-NeoX)
    logit_softcap: str | None = None  # config field: logits = cap * tanh(logits / cap) (Gemma)
    renames: tuple[tuple[str, str], ...] = ()  # (module key prefix, checkpoint key prefix) to try too
    stacked: tuple[StackedExperts, ...] = ()
    tensor_parallel: bool = True  # DeepSpeed AutoTP shards this family's stages exactly
    tp_local_heads: str | None = None  # attention that reads head counts from its config (Phi-3)
    tp_sharded_norms: tuple[tuple[str, str], ...] = ()  # (norm, projection it normalises) split by AutoTP
    caveat: str = ""  # one line for the README's family table

    def sites_for(self, config) -> dict[str, Site]:
        """The sites this model has (a config flag can remove one)."""
        if self.parallel_residual and getattr(config, self.parallel_residual, False):
            return {k: v for k, v in self.sites.items() if k != "resid_mid"}
        return dict(self.sites)

    def softcap(self, config) -> float | None:
        return getattr(config, self.logit_softcap, None) if self.logit_softcap else None


_MOE = (
    StackedExperts("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    StackedExperts("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)),
)

ADAPTERS: dict[str, ModelAdapter] = {
    **{family: ModelAdapter(family) for family in ("llama", "mistral", "qwen2", "qwen3")},
    "phi3": ModelAdapter(
        "phi3",
        tp_local_heads="self_attn",
        caveat="fused qkv_proj / gate_up_proj; with tensor parallelism each rank's attention gets its own head counts",
    ),
    "gpt2": ModelAdapter(
        "gpt2",
        embed="transformer.wte",
        position_embed="transformer.wpe",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        rotary=None,
        sites=GPT2_SITES,
        tensor_parallel=False,  # AutoTP has no policy for its Conv1D layers and fused c_attn
        caveat="learned absolute positions (wpe) added on the first stage; lm_head is tied to wte; no tensor parallelism",
    ),
    "gpt_neox": ModelAdapter(
        "gpt_neox",
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        rotary="gpt_neox.rotary_emb",
        cache_kwarg="layer_past",
        sites=NEOX_SITES,
        parallel_residual="use_parallel_residual",
        renames=(("lm_head.", "embed_out."),),
        caveat="no resid_mid with use_parallel_residual (Pythia): attention and MLP both read resid_pre",
    ),
    "gemma2": ModelAdapter(
        "gemma2",
        sites=SANDWICH_SITES,
        logit_softcap="final_logit_softcapping",
        caveat="attn_out/mlp_out are after the post-norms (what is added to the residual); the lens soft-caps logits",
    ),
    "gemma3_text": ModelAdapter(
        "gemma3_text",
        sites=SANDWICH_SITES,
        rotary_per_layer_type=True,
        logit_softcap="final_logit_softcapping",
        caveat="as Gemma 2; local and global layers use their own rotary bases",
    ),
    "olmo2": ModelAdapter(
        "olmo2",
        sites=POST_NORM_SITES,
        tp_sharded_norms=(("self_attn.q_norm", "self_attn.q_proj"), ("self_attn.k_norm", "self_attn.k_proj")),
        caveat="no input norms: attn_in is resid_pre as attention reads it, mlp_in is resid_mid as the MLP reads it",
    ),
    "qwen3_moe": ModelAdapter(
        "qwen3_moe",
        stacked=_MOE,
        caveat="mlp_out is the routed block's combined output; steering mlp_in also moves the router; "
        "with tensor parallelism the experts are replicated, not split (AutoTP shards nn.Linear only)",
    ),
}


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
    """`get_path(model, "model.layers")` is `model.model.layers`; `""` is `root` itself."""
    obj = root
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj
