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
from dataclasses import replace
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


@pytest.mark.parametrize("sweep", [None, (0.5, 2.0)], ids=["one_row_a_prompt", "two_coefficients"])
def test_a_planned_run_holds_nothing_per_row(small, tmp_path, sweep):
    """What a run's plan keeps for the whole run (`plan_run`'s RunState, before any stage starts:
    Python's current allocations while it is alive, numpy's included) for 16,384 corpus rows, a
    quarter of them with their own max_new_tokens or stop strings, against 512: a micro-batch
    index per 64 rows, nothing per row (before 2026-12-07: 49.6 bytes a row here, each row's corpus
    index, budget, source, coefficient, stop conditions and a MicroBatch per 64 rows)."""
    import gc

    from actors.run_state import plan_run
    from actors.sampling import SamplingSpec
    from pipelines.config import CorpusConf
    from pipelines.corpus import read_corpus
    from reference import run_spec

    model, text = small
    lines = text.read_text().splitlines()
    corpus = tmp_path / "limits.jsonl"  # the prompts 8 times over, every fourth row with limits of its own
    with open(corpus, "w") as out:
        for i in range(8 * len(lines)):
            own = {"max_new_tokens": 1 + i % 3, "stop": [f"w{i % 7}"]} if i % 4 == 0 else {}
            out.write(json.dumps({"prompt": lines[i % len(lines)], **own}) + "\n")
    held, sizes = {}, (512, 8 * len(lines))
    for rows in sizes:
        given = read_corpus(CorpusConf(path=str(corpus), limit=rows), lambda t: [4 + int(w[1:]) for w in t.split()])
        spec = run_spec(model_path=str(model), store_path=str(tmp_path / f"s{rows}.zarr"), corpus=given.rows,
                        max_new_tokens=2, micro_batch_size=64, coefficients=sweep, progress=False,
                        sampling=SamplingSpec(eos_token_ids=(3,), pad_token_id=0))  # fmt: skip
        first = replace(spec, storage=replace(spec.storage, path=str(tmp_path / f"first{rows}.zarr")))
        plan_run(first, given.token_ids, given.texts, given.rows.stops())  # pays the one-time costs
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        run = plan_run(spec, given.token_ids, given.texts, given.rows.stops())
        gc.collect()
        held[rows] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        m = len(sweep or (1,))
        assert run.n_steps == 3 and run.any_stop and run.n_batches == -(-rows * m // 64)
        for index in (0, 1, run.n_batches // 2, run.n_batches - 1):  # what each row's micro-batch reads back
            mb = run.batch(index)
            span = range(mb.rows.start, mb.rows.stop)
            prompts = [r // m for r in span]  # corpus line i is prompt i (no blank lines, no skip)
            stored = run.row_arrays(mb)
            assert stored["corpus_index"].tolist() == prompts and stored["source"].tolist() == prompts
            assert mb.coefficients.tolist() == [(sweep or (1.0,))[r % m] for r in span]
            assert [e.budget for e in mb.ends] == [1 + p % 3 if p % 4 == 0 else 2 for p in prompts]
            assert [e.stop for e in mb.ends] == [(f"w{p % 7}",) if p % 4 == 0 else () for p in prompts]
            assert [mb.prompts[r].tolist() for r in span] == [given.token_ids[p].tolist() for p in prompts]
        run.live.clear()
    per_row = (held[sizes[1]] - held[sizes[0]]) / ((sizes[1] - sizes[0]) * len(sweep or (1,)))
    assert per_row < 8, f"{per_row:.1f} bytes a row ({held})"


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
