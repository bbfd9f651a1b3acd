"""What the steering drivers compose and write, read back: the steer config's own micro-batch
size, and stores of runs that captured no lens layer (steering sweeps) verify whole and say
what was not captured."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.store import LensStore, StoreError
from reference import run_lens

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_steer(*overrides: str):
    from hydra import compose, initialize_config_dir

    from pipelines.config import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("steer", overrides=list(overrides))


@pytest.mark.parametrize("cluster", [[], ["cluster=inprocess"], ["cluster=gpu"]])
def test_steer_config_batches_32_rows_whichever_cluster_file(cluster):
    """A sweep replicates each prompt once per coefficient along the batch: conf/steer.yaml's
    micro-batch size wins over the cluster file's (4 or 8)."""
    assert compose_steer(*cluster).cluster.micro_batch_size == 32


def test_command_line_micro_batch_size_wins_over_the_steer_config():
    assert compose_steer("cluster=inprocess", "cluster.micro_batch_size=8").cluster.micro_batch_size == 8


def test_store_without_captured_layers_verifies_whole(tiny_checkpoints, tmp_path):
    """A run that captures no layer (as the steer driver's sweeps) writes no lens arrays and no
    lens_mask chunk; that store is whole."""
    from driver import run_driver

    _, store = run_lens(tiny_checkpoints["llama"], tmp_path / "sweep.zarr", layers=(), activations=None)
    assert store.is_complete and store.layers == []
    assert store.verify() == []
    result = run_driver("pipelines.verify", str(store.path), cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_store_with_captured_layers_and_a_missing_lens_mask_chunk_fails_verify(tiny_checkpoints, tmp_path):
    _, store = run_lens(tiny_checkpoints["llama"], tmp_path / "lens.zarr", layers=(0, 1), activations=None)
    chunks = [p for p in (store.path / "lens_mask" / "c").rglob("*") if p.is_file()]
    chunks[0].unlink()
    problems = LensStore.open(store.path).verify()
    assert any(p.startswith(f"lens_mask: 1 of {len(chunks)} chunks missing") for p in problems), problems


def test_activations_of_a_store_without_them_say_how_to_capture_them(tiny_checkpoints, tmp_path):
    _, store = run_lens(tiny_checkpoints["llama"], tmp_path / "lens.zarr", activations=None)
    with pytest.raises(StoreError, match=r"not captured.*capture\.activations=float32\|bfloat16\|float16"):
        store.activations(0)
