"""The `ray` executor: stage actors in a placement group, driven by a coordinator actor,
against the unsliced Hugging Face model and against the `local` executor."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from reference import (
    PROMPTS,
    assert_kl_to_final_matches_hf,
    assert_stores_equal,
    hf_generate,
    hf_hidden_by_row,
    run_lens,
)
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
    # llama: one layer a stage (its first run fills the pool) and an uneven split; every family: 2
    for num_stages in (4, 3) if family == "llama" else (2,):
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
        if num_stages == 3:  # the final states flow back through Ray to every stage actor
            assert assert_kl_to_final_matches_hf(model, store) > 0


def test_ray_sweep_shares_the_stage_before_the_edit_and_equals_local(stage_pool, tiny_checkpoints, tmp_path):
    """A coefficient sweep steering every position at layer 2: the first stage (layers 0-1) runs
    each prompt once and the second widens its output to one row per coefficient, across actors."""
    import numpy as np

    from actors.steering import SteeringEdit

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


def test_one_row_micro_batches_three_in_flight_on_ray_equal_generate(stage_pool, tiny_checkpoints, tmp_path):
    """Three micro-batches of one row each, all in the pipeline at once across stage actors:
    every row's tokens and every layer's hidden state are HF's for that row."""
    path = tiny_checkpoints["qwen3"]
    model = load_reference(path)
    generated, pad = hf_generate(model, PROMPTS, 6)
    summary, store = run_lens(
        path, tmp_path / "ray.zarr", num_stages=3, executor="ray", executor_pool=stage_pool, micro_batch_size=1,
        micro_batches_in_flight=3,
    )  # fmt: skip
    for info in summary["stage_info"]:
        assert [mb for mb, _, _ in info["timeline"][:3]] == [0, 1, 2]  # all three entered before any went on
    n_layers = model.config.num_hidden_layers
    for row in range(len(PROMPTS)):
        assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for layer in range(n_layers):
            ours = final_norm(model)(acts[layer, :n]) if layer == n_layers - 1 else acts[layer, :n]
            torch.testing.assert_close(ours, hf_hidden_by_row(generated, pad, row, layer + 1)[:n], atol=1e-5, rtol=0)


def test_every_stage_takes_each_micro_batch_in_flight_before_any_comes_back(stage_pool, tiny_checkpoints, tmp_path):
    """Overlap as an ordering fact of the schedule, not a race of clocks. The coordinator sends
    every stage the prefill of each micro-batch in flight before it waits for any result, and
    an actor runs one caller's calls in the order they were sent, so each stage's step log
    starts with micro-batches 0, 1, 2: stage k-1 holds i+1 while stage k works on i (a
    coordinator that waited for each micro-batch would log 0, 0, 0, ...). With 3 in flight,
    micro-batch 3 enters only after one of the first three has taken all its steps."""
    new = 4
    summary, _ = run_lens(
        tiny_checkpoints["llama"], tmp_path / "s.zarr", prompts=[[5 + i, 6, 7, 8] for i in range(8)], num_stages=2,
        executor="ray", executor_pool=stage_pool, micro_batch_size=2, micro_batches_in_flight=3, activations=None,
        max_new_tokens=new,
    )  # fmt: skip
    assert len(summary["stage_info"]) == 2
    for info in summary["stage_info"]:
        order = [mb for mb, _, _ in info["timeline"]]  # micro-batch of each step, in the order run
        assert order[:3] == [0, 1, 2], order
        assert Counter(order) == {mb: new for mb in range(4)}, order  # the prefill, then new - 1 decode steps
        last_step = {mb: max(i for i, m in enumerate(order) if m == mb) for mb in range(3)}
        assert min(last_step.values()) < order.index(3), order
