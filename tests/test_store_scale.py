"""A store that scales (issue 28): objects grow with shards, not chunks; a shard is written whole,
once, and its micro-batches are recorded done only after it, so a driver killed at any point
(after a shard, between a shard and its records, inside a shard's object write, or Ctrl-C with a
shard half full) resumes to a store equal to an uninterrupted run's and to the unsliced HF model;
the bytes-per-cell figure is the stored bytes over the cells; `verify` reads one shard at a time
and `view --rows` only the shards of its rows; xarray opens a store lazily."""

from __future__ import annotations

import json
import math
import re
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from driver import run_driver
from zarr.storage import LocalStore, WrapperStore

from actors.store import LensStore, StoreLayout
from reference import assert_kl_to_final_matches_hf, assert_stores_equal, run_lens

# Twelve rows of different lengths, one micro-batch each.
TWELVE = [[5 + i + j for j in range(2 + i % 5)] for i in range(12)]
DRIVER = ["cluster=inprocess", "cluster.micro_batch_size=1", "storage.shard_batches=2", "generation.max_new_tokens=4",
          "progress=false", "plot.max_prompts=0"]  # fmt: skip
DRIVER_PROMPTS = '["The lighthouse keeper", "Once upon a time", "In the", "A cat sat on the", "Far", "Rain fell"]'


def _data_files(store: LensStore, name: str) -> list[Path]:
    return [p for p in (store.path / name / "c").rglob("*") if p.is_file()]


def _stored_bytes(path: Path) -> int:
    """Every array's files (data and metadata) under a local store; the group's own zarr.json
    (attributes, the figure itself among them) left out."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.parent != path)


def test_objects_grow_with_shards_and_bytes_per_cell_is_the_stored_bytes_over_the_cells(tiny_checkpoints, tmp_path):
    from tiny_models import load_reference

    path = tiny_checkpoints["llama"]
    _, store = run_lens(path, tmp_path / "s.zarr", prompts=TWELVE, micro_batch_size=1, shard_batches=4)
    assert store.is_complete and store.verify() == []
    assert assert_kl_to_final_matches_hf(load_reference(path), store) > 0  # the rows' lens: the unsliced model's
    shards = math.ceil(12 / 4)
    per_prompt = [name for name, arr in store.group.arrays() if arr.metadata.dimension_names[0] == "prompt"]
    assert {"tokens", "topk_ids", "kl_to_final", "activations", "prompt_text"} <= set(per_prompt)
    for name in per_prompt:
        assert len(_data_files(store, name)) == shards, name  # 12 batches x 4 layers x ... chunks, 3 objects
    assert len(_data_files(store, "batch_done")) == shards
    assert store.group["topk_ids"].chunks[:2] == (1, 1)  # the chunks (what a reader takes) stay small

    # bytes per (row, layer, position) cell: the stored bytes over the lens cells, counted here
    lengths = (store["tokens"] >= 0).sum(1)
    cells = int((lengths - 1).sum()) * len(store.layers)
    expected = _stored_bytes(store.path)
    size = store.attrs["summary"]["storage"]
    assert size["bytes"] == expected and size["cells"] == cells
    assert size["bytes_per_cell"] == round(expected / cells, 3)
    assert size["padded_cells"] == 12 * len(store.layers) * store["tokens"].shape[1]
    assert store.size() == size
    checked = run_driver("pipelines.verify", str(store.path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert f"{expected} bytes in" in checked.stdout and f"{round(expected / cells, 3)} bytes per cell" in checked.stdout

    # by default a shard holds about 32 MiB of arrays: a run this small is one object per array
    _, one = run_lens(path, tmp_path / "default.zarr", prompts=TWELVE, micro_batch_size=1)
    assert one.attrs["layout"]["shard_batches"] == 12
    assert all(len(_data_files(one, name)) == 1 for name in per_prompt)
    for name in per_prompt:  # the same numbers, however they are sharded
        a, b = store[name], one[name]
        assert np.allclose(a, b, equal_nan=True, atol=1e-5) if a.dtype.kind == "f" else (a == b).all(), name


def _lens(model, tmp_path, run, *extra, faults=None):
    args = (f"model.name={model}", *DRIVER, f"prompts={DRIVER_PROMPTS}", f"storage.root={tmp_path}",
            f"storage.run={run}", *extra)  # fmt: skip
    if faults is None:
        return run_driver("pipelines.lens", *args, cwd=tmp_path)
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    return run_driver(wrapper, json.dumps(faults), "pipelines.lens", *args, cwd=tmp_path, script=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny_with_tokenizer, tmp_path_factory) -> LensStore:
    root = tmp_path_factory.mktemp("full")
    full = _lens(tiny_with_tokenizer, root, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    return LensStore.open(root / "full" / "lens.zarr")


# Six micro-batches in shards of two. (fault, exit code, batches recorded done when it stopped,
# batches whose shard write began twice over both runs)
CASES = {
    "killed-after-a-shard": ({"kill_driver": {"after_batches": 3}}, -9, {0, 1}, set()),  # batch 2 waited: lost
    "killed-between-shard-and-records": ({"kill_driver": {"after_batches": 4, "mid_write": True}}, -9, {0, 1}, {2, 3}),
    "killed-inside-the-shard-object": ({"kill_driver": {"after_batches": 4, "in_object": True}}, -9, {0, 1}, {2, 3}),
    "ctrl-c-with-a-shard-half-full": ({"interrupt_driver": {"after_batches": 3}}, 130, {0, 1, 2}, set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_driver_killed_mid_run_resumes_to_the_uninterrupted_store_and_the_hf_model(
    case, uninterrupted, tiny_with_tokenizer, tmp_path
):
    from tiny_models import load_reference

    fault, code, done, twice = CASES[case]
    cut = _lens(tiny_with_tokenizer, tmp_path, "cut", faults=fault)
    assert cut.returncode == code, cut.stderr[-3000:]
    path = tmp_path / "cut" / "lens.zarr"
    stopped = LensStore.open(path)
    assert not stopped.is_complete and any("incomplete" in p for p in stopped.verify())
    assert stopped.done_batches() == done
    partial = list(path.rglob("*.partial"))
    assert bool(partial) == ("in_object" in fault.get("kill_driver", {}))  # zarr's temporary file, never renamed
    resumed = _lens(tiny_with_tokenizer, tmp_path, "cut", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = LensStore.open(path)
    assert store.is_complete and store.verify() == [] and not list(path.rglob("*.partial"))
    assert_stores_equal(store, uninterrupted, atol=0)  # same process layout: bit for bit
    assert assert_kl_to_final_matches_hf(load_reference(tiny_with_tokenizer), store) > 0
    for name in ("prompt_text", "generated_text"):
        assert store.group[name][:].tolist() == uninterrupted.group[name][:].tolist()
    log = store.write_log()
    recorded = Counter(r["batch"] for r in log if r["event"] == "done")
    assert sorted(recorded) == list(range(6)) and set(recorded.values()) == {1}  # each batch recorded once
    begun = Counter(r["batch"] for r in log if r["event"] == "begin")
    assert {b for b, n in begun.items() if n == 2} == twice  # recorded batches were never written again
    assert all(len(_data_files(store, name)) == 3 for name in ("tokens", "topk_ids", "prompt_text"))


class ReadLog(WrapperStore):
    """A zarr store that records every key read (whole or by byte range), and the bytes."""

    def __init__(self, store):
        super().__init__(store)
        self.reads: list[tuple[str, int]] = []

    async def get(self, key, prototype, byte_range=None):
        value = await super().get(key, prototype, byte_range)
        self.reads.append((key, 0 if value is None else len(value)))
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await super().get_partial_values(prototype, key_ranges)
        self.reads += [(k, 0 if v is None else len(v)) for (k, _), v in zip(key_ranges, values)]
        return values


def _synthetic(path: Path, rows: int, hidden: int = 0, seed: int = 0) -> dict:
    """A complete store of `rows` rows written batch by batch (2 rows a batch, 2 batches a shard),
    random values (`hidden`: with float32 activations that wide); returns what was written."""
    rng = np.random.default_rng(seed)
    layout = StoreLayout(n_prompts=rows, n_positions=64, layers=(0, 1, 2, 3), components=("resid_post",), k=8,
                         batch_rows=2, shard_batches=2, hidden=hidden, activations="float32" if hidden else None)  # fmt: skip
    store = LensStore.create(path, layout, {"model": {}})
    lengths = rng.integers(2, 65, rows).astype(np.int32)
    tokens = np.where(np.arange(64)[None] < lengths[:, None], rng.integers(0, 500, (rows, 64)), -1).astype(np.int32)
    cells = (rows, 4, 1, 64)
    written = {
        "tokens": tokens, "lengths": lengths, "prompt_lengths": np.minimum(lengths, 3).astype(np.int32),
        "coefficient": np.ones(rows, np.float32), "source": np.arange(rows, dtype=np.int32),
        "corpus_index": np.arange(rows, dtype=np.int64), "lens_mask": tokens >= 0, "topk_ids": rng.integers(0, 500, (*cells, 8)).astype(np.int32),
        "topk_logprobs": rng.standard_normal((*cells, 8)).astype(np.float32),
        **{f: rng.standard_normal(cells).astype(np.float32) for f in ("entropy", "target_logprob", "kl_to_final")},
        "target_rank": rng.integers(0, 500, cells).astype(np.int32),
    }  # fmt: skip
    if hidden:
        written["activations"] = rng.standard_normal((*cells, hidden)).astype(np.float32)
    for batch in range(rows // 2):
        rows_ = slice(2 * batch, 2 * batch + 2)
        texts = {"prompt_text": [f"p{r}" for r in range(rows_.start, rows_.stop)], "generated_text": ["g", "h"]}
        store.write_batch(batch, rows_, {k: v[rows_] for k, v in written.items()}, texts)
    store.mark_complete({})
    return written


def _peak_of_verify(path: Path) -> int:
    store = LensStore.open(path)
    tracemalloc.start()
    try:
        assert store.verify() == []
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_verify_reads_one_shard_at_a_time_whatever_the_rows(tmp_path):
    small, large = tmp_path / "small.zarr", tmp_path / "large.zarr"
    _synthetic(small, 8, hidden=256)
    written = _synthetic(large, 128, hidden=256)
    whole = written["activations"].nbytes  # one array of the large store: 32 MiB; a shard of it: 1 MiB
    peak_small, peak_large = _peak_of_verify(small), _peak_of_verify(large)
    assert peak_large < 1.5 * peak_small + 2**18, (peak_small, peak_large)  # 16x the rows, not more memory
    assert peak_large < whole / 4, (peak_large, whole)
    # and it reads every object of the store: the largest single read is one shard's
    log = ReadLog(LocalStore(str(large), read_only=True))
    assert LensStore(large, zarr.open_group(log, mode="r", use_consolidated=False)).verify() == []
    shards = {p.relative_to(large).as_posix() for p in large.rglob("*") if p.is_file() and "/c/" in p.as_posix()}
    assert {key for key, _ in log.reads} >= shards
    largest = max(p.stat().st_size for p in large.rglob("*") if p.is_file())
    assert max(n for _, n in log.reads) <= largest


def test_view_of_two_rows_reads_only_their_shards_and_xarray_opens_lazily(tmp_path):
    import distlens
    from pipelines.view import lens_data

    path = tmp_path / "many.zarr"
    written = _synthetic(path, 256)
    log = ReadLog(LocalStore(str(path), read_only=True))
    store = LensStore(path, zarr.open_group(log, mode="r", use_consolidated=False))
    data = lens_data(store, None, rows=[5, 200])
    by_row = {r["row"]: r for r in data["rows"]}
    for r in (5, 200):
        n = int(written["lengths"][r])
        assert by_row[r]["tokens"] == written["tokens"][r, :n].tolist() and by_row[r]["prompt_text"] == f"p{r}"
        ids = np.frombuffer(__import__("base64").b64decode(data["arrays"][f"{r}/logit/resid_post/topk_ids"]), "<i4")
        assert (ids == written["topk_ids"][r, :, 0, :n].ravel()).all()
    shard_of = {5: 1, 200: 50}  # 4 rows a shard
    for name, arr in store.group.arrays():
        if arr.metadata.dimension_names[0] != "prompt":
            continue
        read = {key for key, _ in log.reads if key.startswith(f"{name}/c/")}
        shards = {int(re.match(rf"{name}/c/(\d+)", key).group(1)) for key in read}
        assert shards == set(shard_of.values()), (name, sorted(shards))

    # xarray: named dimensions, and nothing of the rows read until indexed (the objects removed
    # after opening are missed: the values come back as fill values)
    ds = distlens.open(path)
    assert ds["topk_ids"].dims == ("prompt", "layer", "component", "position", "k")
    assert ds["token"].dims == ("prompt", "position") and ds.sizes["prompt"] == 256
    aside = tmp_path / "aside"
    shutil.move(path / "entropy" / "c", aside)
    assert np.isnan(ds["entropy"][200].values).all()
    shutil.move(aside, path / "entropy" / "c")
    assert np.array_equal(ds["entropy"][200].values, written["entropy"][200])
    n = int(written["lengths"][200])
    assert list(ds["token"][200, :n].values) == [f"#{t}" for t in written["tokens"][200, :n]]
    assert (ds["token"][200, n:].values == "").all()
