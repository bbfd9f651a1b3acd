"""`reference.assert_stores_equal`, which every resume, object-storage, multi-node and job test
relies on: one changed value in any array of a real store, an extra array, or a changed
determining attr makes it fail; an unchanged copy, and attrs equal runs may differ in, pass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from actors.steering import SteeringEdit
from actors.store import LensStore
from reference import assert_stores_equal, run_lens


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory) -> LensStore:
    """A sweep of two coefficients with the tuned lens, scores and activations: every kind of
    array a lens store holds (tuned_*, scores, coefficient, source, edit_*, steering_vector,
    prompt_lengths, the texts)."""
    from actors.tuned_lens import Translators, save_translators

    root = tmp_path_factory.mktemp("equality")
    g = torch.Generator().manual_seed(3)
    translators = Translators((0, 1, 2), 64)
    with torch.no_grad():
        translators.weight.copy_(0.1 * torch.randn(3, 64, 64, generator=g))
        translators.bias.copy_(0.1 * torch.randn(3, 64, generator=g))
    save_translators(root / "t.safetensors", translators, {"model": "tiny"})
    vector = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    _, store = run_lens(
        tiny_checkpoints["llama"], root / "lens.zarr", num_stages=2, micro_batch_size=2, max_new_tokens=3, k=3,
        lenses=("logit", "tuned"), tuned_lens=str(root / "t.safetensors"), score_ids=(40, 41),
        coefficients=(-1.0, 1.0), steering=(SteeringEdit(2, "resid_pre", vector, "all", 1.0),),
    )  # fmt: skip
    return store


def _copy(store: LensStore, to) -> zarr.Group:
    shutil.copytree(store.path, to)
    return zarr.open_group(str(to), mode="r+", use_consolidated=False)


def _change_one_value(group: zarr.Group, name: str) -> None:
    """One element of array `name`, the first that is not its fill value, changed."""
    arr = group[name]
    values = arr[:]
    if values.dtype.kind == "f":
        where = tuple(np.argwhere(~np.isnan(values))[0])
        changed = values[where] + 0.01  # far above the float tolerance
    elif values.dtype.kind == "b":
        where = (0,) * values.ndim
        changed = not values[where]
    elif values.dtype.kind in "iu":
        where = tuple(np.argwhere(values != arr.fill_value)[0])
        changed = values[where] + 1
    else:  # texts
        where = (0,) * values.ndim
        changed = str(values[where]) + "x"
    with zarr.config.set({"array.write_empty_chunks": True}):
        arr[where] = changed


def test_the_store_holds_every_kind_of_array(store):
    names = set(store.group.array_keys())
    expected = {"tuned_topk_ids", "tuned_entropy", "tuned_kl_to_final", "scores", "coefficient", "source",
                "edit_kind", "edit_coefficient", "steering_vector", "prompt_lengths", "prompt_text",
                "generated_text", "activations"}  # fmt: skip
    assert expected <= names, expected - names
    assert not np.isnan(store["scores"]).all() and not np.isnan(store["tuned_entropy"]).all()


def test_an_unchanged_copy_is_equal(store, tmp_path):
    _copy(store, tmp_path / "copy.zarr")
    assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"), atol=0)


@pytest.mark.parametrize("name", ["tuned_entropy", "tuned_topk_ids", "scores"])
def test_one_value_changed_in_a_tuned_array_or_the_scores_is_caught(name, store, tmp_path):
    _change_one_value(_copy(store, tmp_path / "copy.zarr"), name)
    with pytest.raises(AssertionError, match=name):
        assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"))


def test_one_value_changed_in_any_array_is_caught(store, tmp_path):
    for i, name in enumerate(sorted(store.group.array_keys())):
        _change_one_value(_copy(store, tmp_path / f"copy{i}.zarr"), name)
        with pytest.raises(AssertionError, match=name):
            assert_stores_equal(store, LensStore.open(tmp_path / f"copy{i}.zarr"))


def test_an_extra_array_is_caught(store, tmp_path):
    group = _copy(store, tmp_path / "copy.zarr")
    group.create_array("extra", data=np.zeros(3, np.int32))
    with pytest.raises(AssertionError, match="extra"):
        assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"))
    with pytest.raises(AssertionError, match="extra"):
        assert_stores_equal(LensStore.open(tmp_path / "copy.zarr"), store)


@pytest.mark.parametrize(
    ("attr", "value"),
    [("fingerprint", "0123456789abcdef"), ("complete", False), ("edit_kinds", []),
     ("model", {"name": "other", "revision": None})],
)  # fmt: skip
def test_a_changed_determining_attr_is_caught(attr, value, store, tmp_path):
    group = _copy(store, tmp_path / "copy.zarr")
    group.attrs[attr] = value
    with pytest.raises(AssertionError, match=attr):
        assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"))


def test_a_changed_layout_is_caught(store, tmp_path):
    group = _copy(store, tmp_path / "copy.zarr")
    group.attrs["layout"] = {**group.attrs["layout"], "position_chunk": 256}
    with pytest.raises(AssertionError, match="layout"):
        assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"))


def test_attrs_equal_runs_differ_in_pass(store, tmp_path):
    """Timings, pids, paths, the placement and the Ray cluster are not the numbers."""
    group = _copy(store, tmp_path / "copy.zarr")
    group.attrs["summary"] = {**group.attrs["summary"], "generate_s": 123.0, "store": "elsewhere"}
    group.attrs["stages"] = [[0, 1], [1, 4]]
    group.attrs["tuned_lens"] = {**group.attrs["tuned_lens"], "path": "/elsewhere/t.safetensors"}
    group.attrs["ray_cluster"] = {"kind": "joined", "address": "127.0.0.1:6379"}
    assert_stores_equal(store, LensStore.open(tmp_path / "copy.zarr"))
