"""The Zarr store: named dimensions, chunk-aligned batches, completion records and resume."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from actors.store import LensStore, StoreError
from reference import PROMPTS, assert_stores_equal, run_lens

FIVE = [*PROMPTS, [30, 31], [40, 41, 42, 43]]  # micro-batches of 2, 2 and 1 prompts


@pytest.fixture
def finished(tiny_checkpoints, tmp_path):
    _, store = run_lens(tiny_checkpoints["llama"], tmp_path / "full.zarr", prompts=FIVE, micro_batch_size=2)
    return store


def test_xarray_opens_store_with_named_dimensions(finished):
    ds = xr.open_zarr(finished.path)
    assert ds["topk_ids"].dims == ("prompt", "layer", "component", "position", "k")
    assert ds["entropy"].dims == ("prompt", "layer", "component", "position")
    assert ds["activations"].dims == ("prompt", "layer", "component", "position", "hidden")
    assert ds["tokens"].dims == ("prompt", "position")
    assert ds.sizes["prompt"] == len(FIVE) and ds.sizes["layer"] == 4
    assert (ds["layer"].values == np.arange(4)).all()


def test_arrays_are_compressed_and_chunked_by_micro_batch(finished):
    arr = finished.group["topk_logprobs"]
    assert arr.chunks[0] == 2 and arr.chunks[1] == 1  # one micro-batch, one layer per chunk
    assert any("blosc" in type(c).__name__.lower() for c in arr.compressors)
    assert finished.attrs["complete"] and finished.is_complete
    assert finished.done_batches() == {0, 1, 2}


def _wipe_rows(group, rows: slice) -> list[str]:
    """Overwrite `rows` of every per-prompt array with a value no run writes there (booleans
    flipped); returns the arrays' names."""
    wiped = []
    for name, arr in group.arrays():
        if arr.metadata.dimension_names[0] != "prompt":
            continue
        old = arr[rows]
        if old.dtype == bool:
            arr[rows] = ~old
        elif old.dtype.kind in "iuf":
            arr[rows] = np.full_like(old, -77)  # ids, lengths and ranks are >= -1; no float is exactly -77
        else:
            arr[rows] = np.full(old.shape, "wiped", dtype=object)
        wiped.append(name)
    return wiped


def test_resume_recomputes_only_unfinished_batches(finished, tiny_checkpoints, tmp_path):
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(finished.path, partial)
    g = zarr.open_group(str(partial), mode="r+", use_consolidated=False)
    # As if the run died after batch 0: later batches' records and every array of their rows never landed.
    g["batch_done"][1:] = False
    wiped = _wipe_rows(g, slice(2, None))
    g.attrs["complete"] = False
    compared = ["tokens", "lengths", "lens_mask", "topk_ids", "target_rank", "topk_logprobs", "entropy"]
    assert set(wiped) >= {*compared, "target_logprob", "activations", "prompt_lengths", "coefficient", "prompt_text"}
    assert not LensStore.open(partial).is_complete
    with pytest.raises(StoreError, match="already holds a run"):
        run_lens(tiny_checkpoints["llama"], partial, prompts=FIVE, micro_batch_size=2)
    summary, resumed = run_lens(tiny_checkpoints["llama"], partial, prompts=FIVE, micro_batch_size=2, existing="resume")
    assert summary["batches_run"] == [[1, 3]]  # batches 1 and 2
    assert resumed.is_complete
    assert_stores_equal(resumed, finished)
    for name in wiped:  # and every other per-prompt array, texts included
        ours, theirs = resumed.group[name][:], finished.group[name][:]
        if ours.dtype.kind == "f":
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-6, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_a_store_with_a_batch_not_written_is_never_marked_complete(finished, tmp_path):
    """The last guard of a run's end: were a micro-batch lost (never re-run), marking the store
    complete is refused, naming the batch, and the store stays incomplete."""
    import shutil

    path = tmp_path / "gap.zarr"
    shutil.copytree(finished.path, path)
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    g["batch_done"][1] = False
    g.attrs["complete"] = False
    store = LensStore.open(path)
    with pytest.raises(StoreError, match=r"micro-batches \[1\] \(1 of 3\) were not written"):
        store.mark_complete({})
    assert not LensStore.open(path).is_complete


def test_resume_with_other_rows_per_batch_is_refused(finished, tiny_checkpoints, tmp_path):
    """Batch records index rows through the micro-batch size: resuming with another size would
    skip rows never computed and mark the store complete."""
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(finished.path, partial)
    g = zarr.open_group(str(partial), mode="r+")
    g["batch_done"][1:] = False
    g.attrs["complete"] = False
    with pytest.raises(StoreError, match=r"laid out differently \(batch_rows 2 -> 1"):
        run_lens(tiny_checkpoints["llama"], partial, prompts=FIVE, micro_batch_size=1, existing="resume")
    assert not LensStore.open(partial).is_complete
    assert LensStore.open(partial).done_batches() == {0}


def test_refuses_a_store_of_another_config_even_with_resume(finished, tiny_checkpoints):
    with pytest.raises(StoreError, match="another config"):
        run_lens(
            tiny_checkpoints["llama"], finished.path, prompts=FIVE, micro_batch_size=2,
            existing="resume", attrs={"fingerprint": "something-else"},
        )  # fmt: skip


def test_overwrite_replaces_the_store(finished, tiny_checkpoints):
    summary, again = run_lens(tiny_checkpoints["llama"], finished.path, prompts=PROMPTS, existing="overwrite")
    assert again.group["tokens"].shape[0] == len(PROMPTS)
    assert again.is_complete


def test_bfloat16_activations_are_stored_bit_exact(tiny_checkpoints, tmp_path):
    import torch

    _, f32 = run_lens(tiny_checkpoints["qwen3"], tmp_path / "a.zarr", activations="float32")
    _, bf16 = run_lens(tiny_checkpoints["qwen3"], tmp_path / "b.zarr", activations="bfloat16")
    assert bf16.group["activations"].attrs["dtype"] == "bfloat16"
    stored = bf16.activations(0)
    assert stored.dtype == torch.bfloat16
    expected = torch.from_numpy(f32.activations(0)).to(torch.bfloat16)
    assert torch.equal(stored.view(torch.int16), expected.view(torch.int16))


def _verify(path):
    from driver import run_driver

    return run_driver("pipelines.verify", str(path), cwd=path.parent)


def test_verify_passes_a_whole_store_and_names_each_problem(finished, tmp_path):
    import shutil

    assert finished.verify() == []
    ok = _verify(finished.path)
    assert ok.returncode == 0 and "ok" in ok.stdout
    cases = {}
    for case in ("deleted_chunk", "no_completion_record", "altered_metadata"):
        path = tmp_path / f"{case}.zarr"
        shutil.copytree(finished.path, path)
        cases[case] = path
    chunk = next((cases["deleted_chunk"] / "topk_logprobs" / "c").rglob("*"), None)
    while chunk is not None and chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    g = zarr.open_group(str(cases["no_completion_record"]), mode="r+", use_consolidated=False)
    g["batch_done"][1] = False
    g = zarr.open_group(str(cases["altered_metadata"]), mode="r+", use_consolidated=False)
    layout = dict(g.attrs["layout"])
    layout["layers"] = [0, 1, 2, 7]
    g.attrs["layout"] = layout
    expected = {
        "deleted_chunk": "topk_logprobs: 1 of",
        "no_completion_record": "batch_done: batches [1] not done but the store says complete",
        "altered_metadata": "layer: [0, 1, 2, 3] but the layout record says [0, 1, 2, 7]",
    }
    for case, path in cases.items():
        result = _verify(path)
        assert result.returncode == 1, (case, result.stderr)
        assert expected[case] in result.stderr, (case, result.stderr)
