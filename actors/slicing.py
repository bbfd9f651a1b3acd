"""Cut a decoder-only model into contiguous stages and build one stage's modules from only
its own tensors.

The split balances parameters held per stage. The lens head (final norm + lm_head) sits on
every stage, so it does not move the balance; the embedding counts on the first stage unless
it is tied to lm_head (then it costs nothing extra there).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from actors.adapters import ModelAdapter, adapter_for, get_path
from actors.checkpoint import TensorIndex


def meta_model(config):
    """The full architecture with no storage behind its tensors: free to build at any size."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_stages(config, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous `[start, end)` layer ranges, one per stage, minimising the largest stage's
    parameter count (exact dynamic programme over split points)."""
    n_layers = config.num_hidden_layers  # 1 <= num_stages <= n_layers: actors.run_spec.check_cluster
    adapter = adapter_for(config.model_type)
    model = meta_model(config)
    costs = [_numel(layer) for layer in get_path(model, adapter.layers)]
    embed_cost = 0 if getattr(config, "tie_word_embeddings", False) else _numel(get_path(model, adapter.embed))
    if adapter.position_embed:
        embed_cost += _numel(get_path(model, adapter.position_embed))
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(stage: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (embed_cost if stage == 0 else 0)

    inf = float("inf")
    # best[s][j]: smallest max-load placing layers [0, j) on stages 0..s-1
    best = [[inf] * (n_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n_layers - (num_stages - s) + 1):
            for i in range(s - 1, j):
                cand = max(best[s - 1][i], load(s - 1, i, j))
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    bounds, j = [], n_layers
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


class StageModel(nn.Module):
    """Decoder layers `[start, end)` of one model (plus the embedding on the first stage).

    The class name ends in `Model` and it carries the HF `config` on purpose: DeepSpeed AutoTP
    picks its sharding policy by matching `...Model` in the module repr and reads head counts
    (including grouped key/value heads) from `config`. A container without them either fails
    to match or, given an explicit injection policy, shards key/value heads wrongly.
    """

    def __init__(self, config, adapter: ModelAdapter, start: int, end: int, embed, position_embed, layers, rotary):
        super().__init__()
        self.config = config
        self.adapter = adapter
        self.start, self.end = start, end
        self.embed_tokens = embed
        self.position_embed = position_embed  # learned absolute positions (first stage), or None
        self.layers = layers
        self.rotary_emb = rotary

    def layer_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
        """x: token ids [batch, new] on the first stage, else hidden [batch, new, d_model];
        attention_mask: [batch, past + new] (1 = real token); returns hidden [batch, new, d_model]."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        if self.embed_tokens is not None and self.position_embed is not None:
            hidden = hidden + self.position_embed(position_ids)  # generate's ids: left pads don't count
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        kinds = {index: self.layer_type(index) for index in range(self.start, self.end)}
        masks, rotary = {}, {}
        for index, kind in kinds.items():
            if kind not in masks:
                # Size the mask against this stage's own first layer of that kind: the cache's
                # other layers live on other stages and stay empty here.
                masks[kind] = builders[kind](
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    cache=cache,
                    position_ids=position_ids,
                    layer_idx=index,
                )
                if self.adapter.rotary_per_layer_type:
                    rotary[kind] = self.rotary_emb(hidden, position_ids, kind)
        if self.rotary_emb is not None and not self.adapter.rotary_per_layer_type:
            rotary = dict.fromkeys(masks, self.rotary_emb(hidden, position_ids))
        for index, layer in zip(range(self.start, self.end), self.layers):
            kind = kinds[index]
            extra = {"position_embeddings": rotary[kind]} if rotary else {}
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                use_cache=True,
                **{self.adapter.cache_kwarg: cache},
                **extra,
            )
        return hidden


def _checkpoint_keys(key: str, adapter: ModelAdapter, alias) -> list[str]:
    """Names `key` may be stored under: itself, the family's renames, then `alias` (a tie)."""
    names = [key] + [old + key[len(new) :] for new, old in adapter.renames if key.startswith(new)]
    return names + ([alias(key)] if alias is not None else [])


def _stacked_tensor(key: str, adapter: ModelAdapter, index: TensorIndex, dtype) -> torch.Tensor | None:
    """A stacked experts parameter rebuilt from one tensor per expert (None: no rule applies)."""
    for rule in adapter.stacked:
        if not key.endswith(rule.target):
            continue
        prefix = key[: -len(rule.target)]
        parts = []
        for part in rule.parts:
            names = []
            while f"{prefix}{part.format(e=len(names))}" in index:
                names.append(f"{prefix}{part.format(e=len(names))}")
            if not names:
                return None
            loaded = index.load(names, dtype)
            parts.append(torch.stack([loaded[n] for n in names]))  # [experts, ...]
        return torch.cat(parts, dim=rule.dim) if len(parts) > 1 else parts[0]
    return None


def _materialise(
    module: nn.Module, prefix: str, index: TensorIndex, dtype, device, adapter: ModelAdapter, init, alias=None
) -> None:
    """Give `module` (built on meta) the checkpoint tensors under `prefix`, and nothing else.

    Buffers the checkpoint does not hold (a scaled embedding's scale) are computed by the
    model's own `_init_weights`, as `from_pretrained` does; loaded tensors are marked so it
    leaves them alone."""
    stored, state = {}, {}  # module name -> checkpoint key; module name -> tensor
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        key = f"{prefix}.{name}"
        found = next((k for k in _checkpoint_keys(key, adapter, alias) if k in index), None)
        if found is not None:
            stored[name] = found
        elif (stacked := _stacked_tensor(key, adapter, index, dtype)) is not None:
            state[name] = stacked
        elif isinstance(tensor, nn.Parameter):
            raise ValueError(f"checkpoint lacks tensor {key!r}")
    tensors = index.load(list(stored.values()), dtype)
    state.update({name: tensors[key] for name, key in stored.items()})
    module.load_state_dict({n: t.to(device) for n, t in state.items()}, strict=False, assign=True)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name in state:
            tensor._is_hf_initialized = True
    for sub in module.modules():
        meta = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta]
        for n in meta:
            old = getattr(sub, n)
            setattr(sub, n, torch.empty(old.shape, dtype=old.dtype, device=device))
        if meta:
            init(sub)
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors {still_meta[:4]} of {prefix} were not in the checkpoint")


_HEADS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # lens heads alive in this process


def build_stage(
    checkpoint_path, config, start: int, end: int, dtype: torch.dtype, device
) -> tuple[StageModel, nn.Module, nn.Module]:
    """Load layers `[start, end)` (and the embedding if `start == 0`) plus the lens head.

    Returns `(stage_model, final_norm, lm_head)`, holding only these tensors in memory.
    """
    adapter = adapter_for(config.model_type)
    index = TensorIndex(checkpoint_path)
    skeleton = meta_model(config)
    config = skeleton.config  # as the model resolved it (attention implementation included)
    embed_key = f"{adapter.embed}.weight"

    def tied(key: str) -> str:  # a tied lm_head is stored under the embedding's name
        return embed_key if key == f"{adapter.lm_head}.weight" else key

    def load(path: str, alias=None) -> nn.Module:
        module = get_path(skeleton, path)
        _materialise(module, path, index, dtype, device, adapter, skeleton._init_weights, alias)
        return module

    embed = load(adapter.embed) if start == 0 else None
    position_embed = load(adapter.position_embed) if start == 0 and adapter.position_embed else None
    layers = nn.ModuleList(list(get_path(skeleton, adapter.layers))[start:end])
    for offset, layer in enumerate(layers):
        _materialise(layer, f"{adapter.layers}.{start + offset}", index, dtype, device, adapter, skeleton._init_weights)
    # The lens head is replicated per stage, but stages that share a process (the local
    # executor) share one replica: the unembedding is the largest tensor of a small model.
    key = (str(Path(checkpoint_path).resolve()), str(dtype), str(device))
    norm, lm_head = _HEADS.get((*key, "norm")), _HEADS.get((*key, "head"))
    if norm is None or lm_head is None:
        norm, lm_head = load(adapter.final_norm), load(adapter.lm_head, alias=tied)
        _HEADS[(*key, "norm")], _HEADS[(*key, "head")] = norm, lm_head
    # Rotary tables are computed, not stored: build them for real on the target device.
    rotary = type(get_path(skeleton, adapter.rotary))(config=config).to(device) if adapter.rotary else None
    stage = StageModel(config, adapter, start, end, embed, position_embed, layers, rotary).eval()
    return stage, norm.eval(), lm_head.eval()
