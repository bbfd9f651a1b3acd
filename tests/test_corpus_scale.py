"""A corpus of thousands of rows (issue 28; the 100,000-row figures come from
`python -m pipelines.bench.corpus_scale`, whose small model and corpus these tests use: a
3-layer random Llama with a 504-word vocabulary, so that the lens over the vocabulary does not
dominate): the memory a run holds does not grow with its rows (Python's own allocations, numpy's
included, traced through a whole notebook run of 300 and of 2,048 rows), and a driver killed
midway through 2,048 rows resumes to the uninterrupted run's store, whose rows match the unsliced
HF model."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from driver import run_driver

from actors.store import LensStore
from pipelines.bench.corpus_scale import build_corpus, build_model
from reference import assert_stores_equal, lens_reference

RUN = ["cluster=inprocess", "cluster.micro_batch_size=64", "generation.max_new_tokens=2", "generation.chat_template=false",
       "progress=false", "plot.max_prompts=0"]  # fmt: skip
ROWS = 2048  # 32 micro-batches of 64


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(the benchmark's model, a corpus of ROWS rows of 2 to 24 words)."""
    root = tmp_path_factory.mktemp("corpus_scale")
    return build_model(root / "model"), build_corpus(root / "corpus.txt", ROWS)


def test_a_runs_memory_does_not_grow_with_its_rows(small, tmp_path):
    """The peak of what Python allocated (tracemalloc, numpy's arrays included) during a whole
    run of 2,048 rows against one of 300, after a first run paid the one-time costs; shards of two
    micro-batches, so the finished rows waiting for their shard are few either way. Each row now
    costs a few numbers (its prompt's ids and text wait in temporary files; measured: 160-460
    bytes a row with them packed in memory, 340 since, the peak moving with which rows wait
    together); before, 8 KB a row, most of it the lens of rows held to the end while one
    continuous-batching lane starved the other in-process, and lists of ints and padded ids for
    every row."""
    import distlens

    model, corpus = small
    run = [*RUN, "storage.shard_batches=2"]
    distlens.lens(out=tmp_path / "first", corpus=corpus, model=str(model), overrides=[*run, "corpus.limit=64"])
    peaks = {}
    for rows in (300, ROWS):
        tracemalloc.start()
        ds = distlens.lens(
            out=tmp_path / f"r{rows}", corpus=corpus, model=str(model), overrides=[*run, f"corpus.limit={rows}"]
        )
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert ds.sizes["prompt"] == rows
    per_row = (peaks[ROWS] - peaks[300]) / (ROWS - 300)
    assert per_row < 1000, f"{per_row:.0f} bytes a row ({peaks})"


def test_a_driver_killed_midway_through_thousands_of_rows_resumes_to_the_uninterrupted_store(small, tmp_path):
    from tiny_models import load_reference

    model_path, corpus = small
    # shards of 4 batches: the kill leaves four recorded (by size a shard would hold 16)
    args = [
        f"model.name={model_path}",
        f"corpus.path={corpus}",
        *RUN,
        "storage.shard_batches=4",
        f"storage.root={tmp_path}",
    ]
    full = run_driver("pipelines.lens", *args, "storage.run=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    fault = json.dumps({"kill_driver": {"after_batches": 16}})  # of 32: at row 1,024
    cut = run_driver(wrapper, fault, "pipelines.lens", *args, "storage.run=cut", cwd=tmp_path, script=True)
    assert cut.returncode == -9, cut.stderr[-3000:]
    path = tmp_path / "cut" / "lens.zarr"
    assert LensStore.open(path).done_batches() == set(range(16))  # four shards
    resumed = run_driver("pipelines.lens", *args, "storage.run=cut", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store, uninterrupted = LensStore.open(path), LensStore.open(tmp_path / "full" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, uninterrupted)
    assert store["corpus_index"].tolist() == list(range(ROWS))
    # rows on both sides of the kill and at batch edges, against the unsliced model run here
    model, n_layers = load_reference(model_path), len(store.layers)
    comp = store.components.index("resid_post")
    lengths, prompt_lengths = store["lengths"], store["prompt_lengths"]
    kl = store.group["kl_to_final"]
    for row in (0, 63, 64, 1023, 1024, 2047):
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        n = int(lengths[row]) - 1
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0, :n], normed=True)
            lenses = [lens_reference(model, out.hidden_states[li + 1][0, :n]) for li in range(n_layers - 1)]
        assert (
            tokens[0, prompt_lengths[row] :].tolist() == out.logits[0, prompt_lengths[row] - 1 : -1].argmax(-1).tolist()
        )
        for li, lens in enumerate(lenses):
            expected = (final.exp() * (final - lens)).sum(-1).numpy()
            np.testing.assert_allclose(kl[row, li, comp, :n], expected, atol=1e-4, err_msg=f"row {row} layer {li}")
