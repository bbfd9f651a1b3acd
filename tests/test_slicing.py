"""Layer split planning and per-stage weight loading."""

from __future__ import annotations

import pytest

from actors.slicing import build_stage, meta_model, plan_stages
from tiny_models import tiny_config


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 7, 8])
def test_plan_covers_every_layer_contiguously(num_stages):
    config = tiny_config("llama", num_hidden_layers=8)
    bounds = plan_stages(config, num_stages)
    assert len(bounds) == num_stages
    assert bounds[0][0] == 0 and bounds[-1][1] == 8
    assert all(a < b for a, b in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(num_stages - 1))


def test_plan_balances_parameters_with_an_untied_embedding_on_stage_0():
    # Embedding 4096 x 64 = 262k parameters against 8 layers of about 33k: stage 0 gets fewer layers.
    config = tiny_config("llama", num_hidden_layers=8, vocab_size=4096)
    bounds = plan_stages(config, 2)
    assert bounds[0][1] - bounds[0][0] < bounds[1][1] - bounds[1][0]
    tied = tiny_config("llama", num_hidden_layers=8, vocab_size=4096, tie_word_embeddings=True)
    assert plan_stages(tied, 2) == [(0, 4), (4, 8)]


@pytest.mark.parametrize("num_stages", [0, 5])
def test_stage_counts_out_of_range_are_refused(num_stages):
    from actors.run_spec import ClusterSettings, SettingError, check_cluster

    with pytest.raises(SettingError, match=rf"num_stages={num_stages} is out of range: valid is 1\.\.4") as err:
        check_cluster(ClusterSettings(num_stages=num_stages), tiny_config("llama"))
    assert err.value.field == "cluster.num_stages"


def test_each_stage_loads_only_its_own_weights(tiny_checkpoints):
    import torch
    from transformers import AutoConfig

    path = tiny_checkpoints["qwen3"]
    config = AutoConfig.from_pretrained(path)
    full = meta_model(config)
    per_layer = _params(full.model.layers[0])
    head = _params(full.lm_head) + _params(full.model.norm)
    first, norm0, head0 = build_stage(path, config, 0, 1, torch.float32, "cpu")
    later, norm2, head2 = build_stage(path, config, 2, 4, torch.float32, "cpu")
    assert first.embed_tokens is not None and later.embed_tokens is None
    assert _params(first) == _params(full.model.embed_tokens) + per_layer
    assert _params(later) == 2 * per_layer
    assert _params(norm2) + _params(head2) == head
    assert not any(p.is_meta for p in later.parameters())
    assert len(later.layers) == 2 and later.start == 2
