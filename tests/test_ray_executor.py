"""The `ray` executor: stage actors in a placement group, driven by a coordinator actor,
against the unsliced Hugging Face model and against the `local` executor."""

from __future__ import annotations

import pytest
import torch

from reference import PROMPTS, assert_stores_equal, hf_generate, hf_hidden_by_row, run_lens
from tiny_models import FAMILIES, final_norm, load_reference


@pytest.fixture(scope="module")
def stage_pool(ray_cluster):
    """Four stage actors reused by every run in this module (process start-up is seconds)."""
    from actors.executor import RayExecutor

    pool = RayExecutor(cpus_per_stage=1, persistent=True)
    yield pool
    pool.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_ray_stages_equal_unsliced_and_local(family, stage_pool, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[family]
    model = load_reference(path)
    generated, pad = hf_generate(model, PROMPTS, 6)
    n_layers = model.config.num_hidden_layers
    _, local = run_lens(path, tmp_path / "local.zarr", num_stages=2, micro_batch_size=2)
    for num_stages in (4, 3, 2, 1) if family == "llama" else (2,):  # llama's first run fills the pool
        summary, store = run_lens(
            path, tmp_path / f"ray{num_stages}.zarr", num_stages=num_stages, executor="ray", executor_pool=stage_pool,
            micro_batch_size=2,  # two micro-batches in flight, the first of left-padded rows of 7 and 3 tokens
        )  # fmt: skip
        assert len(summary["stages"]) == num_stages
        assert len({info["pid"] for info in summary["stage_info"]}) == num_stages  # one process each
        for row in range(len(PROMPTS)):
            assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
            acts = torch.from_numpy(store.activations(row))[:, 0]
            n = acts.shape[1] - 1
            for layer in range(n_layers):
                ours = acts[layer, :n]
                if layer == n_layers - 1:
                    ours = final_norm(model)(ours)
                torch.testing.assert_close(
                    ours, hf_hidden_by_row(generated, pad, row, layer + 1)[:n], atol=1e-5, rtol=0
                )
        assert_stores_equal(store, local)


def test_ray_sweep_shares_the_stage_before_the_edit_and_equals_local(stage_pool, tiny_checkpoints, tmp_path):
    """A coefficient sweep steering every position at layer 2: the first stage (layers 0-1) runs
    each prompt once and the second widens its output to one row per coefficient, across actors."""
    import numpy as np

    from actors.stage import SteeringEdit

    path = tiny_checkpoints["qwen3"]
    v = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    common = dict(
        num_stages=2, max_new_tokens=3, score_ids=(40, 41), micro_batch_size=6, coefficients=(-2.0, 0.0, 2.0),
        steering=(SteeringEdit(2, "attn_in", v, "all", 1.0),),
    )  # fmt: skip
    summary, ray = run_lens(path, tmp_path / "ray.zarr", executor="ray", executor_pool=stage_pool, **common)
    _, local = run_lens(path, tmp_path / "local.zarr", share_prefix=False, **common)
    assert_stores_equal(ray, local)
    np.testing.assert_allclose(ray["scores"], local["scores"], atol=1e-5)
    first, second = (info["tokens"] for info in summary["stage_info"])
    assert first < second


def test_stages_work_on_different_micro_batches_at_once(ray_cluster, tmp_path):
    from tiny_models import save_tiny

    # Big enough that one step takes milliseconds, so overlap is a property of the schedule.
    path = save_tiny(
        "llama", tmp_path / "m", hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8
    )
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(8)]
    summary, _ = run_lens(
        path, tmp_path / "s.zarr", prompts=prompts, num_stages=2, executor="ray", micro_batch_size=2,
        micro_batches_in_flight=4, activations=None, max_new_tokens=12,
    )  # fmt: skip
    first, second = (info["timeline"] for info in summary["stage_info"])
    overlaps = sum(
        1 for mb_a, a0, a1 in first for mb_b, b0, b1 in second if mb_a != mb_b and min(a1, b1) - max(a0, b0) > 0
    )
    assert overlaps > 0, "stage 0 never computed while stage 1 did: the pipeline is serialised"
