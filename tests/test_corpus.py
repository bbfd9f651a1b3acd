"""Prompts from a corpus (`corpus.path=...`): a lens run from a JSONL, Parquet, CSV or text file,
a saved `datasets` dataset or one loaded by name (streamed; here a local folder), and from
`s3://` on moto's S3 server, stores exactly the selected rows: each row's prompt text, its tokens
(tokenized here with the tokenizer's own chat template), its corpus index, and its lens against
the unsliced Hugging Face model. The store records the corpus's identity, never its rows. A bad
corpus is refused in one line, exit 2, with no store left."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from driver import run_driver
from test_object_storage import BUCKET, s3  # noqa: F401  (s3: the moto server, a fixture of this module too)

from actors.run_spec import RowStop
from actors.store import LensStore
from reference import assert_kl_to_final_matches_hf

# Rows of different lengths, each with the fields `text` (the default prompt field: `prompt` is
# absent, and `text` comes before `question`), `question`, an id, and some with their own limits.
ROWS = [
    {
        "id": i,
        "text": "Tell me about " + "the deep blue sea " * (i % 4) + f"number {i}.",
        "question": f"What is {i} plus {i}?",
        "max_new_tokens": [None, 5, None, 2][i % 4],
        "stop": [None, ["."], None, "!"][i % 4],
    }
    for i in range(9)
]
SKIP, LIMIT = 2, 5  # rows 2..6: three micro-batches of 2
RUN = ["cluster=inprocess", "cluster.micro_batch_size=2", "generation.max_new_tokens=3", "progress=false",
       "plot.max_prompts=0"]  # fmt: skip


def _listed(row: dict) -> dict:
    """`row` with its stop strings as a list (a column of Parquet or `datasets` has one type)."""
    return {**row, "stop": [row["stop"]] if isinstance(row["stop"], str) else row["stop"]}


def write_corpus(folder: Path, fmt: str) -> Path:
    """ROWS as a corpus of `fmt`; JSONL and text with a blank line (not a row)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in ROWS]
        (path := folder / "corpus.jsonl").write_text("\n".join([*lines[:3], "", *lines[3:]]) + "\n")
    elif fmt == "text":
        lines = [r["text"] for r in ROWS]
        (path := folder / "corpus.txt").write_text("\n".join([*lines[:3], "  ", *lines[3:]]) + "\n")
    elif fmt == "csv":
        with open(path := folder / "corpus.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            for r in ROWS:  # a cell holds one stop string
                stop = r["stop"][0] if isinstance(r["stop"], list) else r["stop"]
                writer.writerow({**r, "max_new_tokens": r["max_new_tokens"] or "", "stop": stop or ""})
    elif fmt == "parquet":  # row groups of 3, so corpus.skip=2 starts inside the first
        pq.write_table(
            pa.Table.from_pylist([_listed(r) for r in ROWS]), path := folder / "corpus.parquet", row_group_size=3
        )
    elif fmt == "dataset":
        datasets.Dataset.from_list([_listed(r) for r in ROWS]).save_to_disk(str(path := folder / "saved"))
    else:  # hf_hub: a dataset loaded by name, streamed; here a local folder of JSON Lines
        (path := folder / "hub").mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(_listed(r)) + "\n" for r in ROWS))
    return path


def expected_limits(fmt: str, row: dict) -> tuple[int, tuple[str, ...]]:
    if fmt == "text":
        return 0, ()
    stop = row["stop"] or ()
    return row["max_new_tokens"] or 0, (stop,) if isinstance(stop, str) else tuple(stop)


def corpus_hash(fmt: str, rows: range, field: str) -> str:
    """sha256 over the selected rows, one JSON line each: [index, prompt, max_new_tokens, stop]."""
    digest = hashlib.sha256()
    for i in rows:
        budget, stop = expected_limits(fmt, ROWS[i])
        digest.update(json.dumps([i, ROWS[i][field], budget or None, list(stop)]).encode() + b"\n")
    return digest.hexdigest()


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the tokenizer's own chat template tokenizes it (one user turn)."""
    turn = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)["input_ids"])


def greedy_alone(model, tokenizer, ids: list[int], budget: int, stop: tuple[str, ...]) -> list[int]:
    """The row run alone through the unsliced HF model: greedy, ending at EOS (id 2), after
    `budget` tokens, or once its generated text holds a stop string (that token kept)."""
    out = list(ids)
    for _ in range(budget):
        with torch.no_grad():
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
        text = tokenizer.decode(out[len(ids) :], skip_special_tokens=False)
        if out[-1] == 2 or any(s in text for s in stop):
            break
    return out


def assert_store_holds_rows(
    run: Path, rows: range, field: str, model, tokenizer, fmt: str = "jsonl", max_new_tokens: int = 3
) -> LensStore:
    """The store at `run` holds exactly ROWS[rows]: texts, prompt tokens, corpus index, greedy
    continuations (each row's own max_new_tokens and stop strings, where `fmt` carries them) and
    lens as the unsliced HF model gives them; its attrs and config record no row."""
    store = LensStore.open(run / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert store["corpus_index"].tolist() == list(rows)
    for row, i in enumerate(rows):
        text = ROWS[i][field]
        assert str(store.group["prompt_text"][row]) == text
        ids = chat_ids(tokenizer, text)
        n_prompt = int(store["prompt_lengths"][row])
        assert store.tokens(row)[:n_prompt].tolist() == ids
        budget, stop = expected_limits(fmt, ROWS[i])
        want = greedy_alone(model, tokenizer, ids, budget or max_new_tokens, stop)
        assert store.tokens(row).tolist() == want, (i, budget, stop)
    assert assert_kl_to_final_matches_hf(model, store) > 0
    comp, last = store.components.index("resid_post"), len(store.layers) - 1
    for row in range(len(rows)):  # the last layer's top-1 is the model's own argmax
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        with torch.no_grad():
            argmax = model(tokens).logits[0, :-1].argmax(-1)
        assert store["topk_ids"][row, last, comp, : tokens.shape[1] - 1, 0].tolist() == argmax.tolist()
    record = json.dumps(store.attrs) + (run / ".hydra" / "config.yaml").read_text()
    assert store.attrs["config"]["prompts"] == []
    assert not any(r[field] in record for r in ROWS)  # the identity, never the rows
    return store


@pytest.fixture(scope="module")
def hf_model(tiny_with_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_with_tokenizer)


FORMATS = ["jsonl", "parquet", "csv", "text", "dataset", "hf_hub"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_from_a_corpus_stores_its_selected_rows(fmt, hf_model, tiny_with_tokenizer, tmp_path):
    path = write_corpus(tmp_path / "corpus", fmt)
    field = "question" if fmt == "csv" else "text"  # the default (text) everywhere but one
    extra = ["corpus.field=question"] if fmt == "csv" else ["corpus.format=hf_hub"] if fmt == "hf_hub" else []
    result = run_driver(
        "pipelines.lens", f"model.name={tiny_with_tokenizer}", *RUN, f"corpus.path={path}", f"corpus.skip={SKIP}",
        f"corpus.limit={LIMIT}", *extra, f"storage.root={tmp_path}", "storage.run=r", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = range(SKIP, SKIP + LIMIT)
    store = assert_store_holds_rows(tmp_path / "r", rows, field, *hf_model, fmt=fmt)
    fmt_name = {"hf_hub": "hf_hub"}.get(fmt, fmt)
    assert store.attrs["corpus"] == {
        "path": str(path), "format": fmt_name, "field": field, "skip": SKIP, "limit": LIMIT, "rows": LIMIT,
        "split": "train" if fmt in ("dataset", "hf_hub") else None, "sha256": corpus_hash(fmt, rows, field),
    }  # fmt: skip
    assert len(store.group["batch_done"][:]) == 3


def test_a_run_reads_its_corpus_from_object_storage(s3, hf_model, tiny_with_tokenizer, tmp_path):  # noqa: F811
    """The corpus a JSONL object on moto's S3 server, read to its end."""
    env, fs = s3
    local = write_corpus(tmp_path / "corpus", "jsonl")
    fs.put_file(str(local), f"{BUCKET}/corpora/corpus.jsonl")
    url = f"s3://{BUCKET}/corpora/corpus.jsonl"
    result = run_driver(
        "pipelines.lens", f"model.name={tiny_with_tokenizer}", *RUN, f"corpus.path={url}", "corpus.skip=5",
        f"storage.root={tmp_path}", "storage.run=r", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    store = assert_store_holds_rows(tmp_path / "r", range(5, len(ROWS)), "text", *hf_model)  # to the end
    assert store.attrs["corpus"]["path"] == url and store.attrs["corpus"]["rows"] == len(ROWS) - 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_row_carries_its_own_limits(fmt, tmp_path):
    """What the scheduler is handed per prompt (actors.run_spec.CorpusRows): its corpus index,
    its own max_new_tokens (0: the run's) and stop strings, for every format."""
    from pipelines.corpus import read_corpus

    path = write_corpus(tmp_path, fmt)
    corpus = SimpleNamespace(path=str(path), field=None, format="hf_hub" if fmt == "hf_hub" else None, skip=1,
                             limit=None, split="train")  # fmt: skip
    read = read_corpus(corpus, lambda text: [len(text)])
    assert list(read.texts) == [r["text"] for r in ROWS[1:]]
    assert [ids.tolist() for ids in read.token_ids] == [[len(t)] for t in read.texts]
    assert read.rows.index[:].tolist() == list(range(1, len(ROWS)))
    want = [expected_limits(fmt, r) for r in ROWS[1:]]
    assert read.rows.max_new_tokens[:].tolist() == [b for b, _ in want]
    stops = read.rows.stops()
    assert len(stops) == len(want)
    for p, (budget, stop) in enumerate(want):
        if budget or stop:
            assert stops[p] == RowStop(budget or None, tuple(stop) if stop else None), p
        else:
            assert stops[p] is None, p


def test_packed_rows_read_back_what_was_appended():
    """The selected rows go to temporary files and come back by offset: ids and texts (empty rows,
    non-ASCII text) equal the plain lists they were appended from, across several flushes to the
    file and with rows still pending; negative indices count from the end, others are refused."""
    import random

    from actors.packed_rows import PackedRows

    rng = random.Random(0)
    ids = [[rng.randrange(50_000) for _ in range(rng.randrange(0, 40))] for _ in range(3_000)]
    texts = ["".join(rng.choice("ab é語\n") for _ in range(len(row))) for row in ids]
    packed_ids, packed_texts = PackedRows("ids"), PackedRows("text")
    packed_ids.FLUSH = packed_texts.FLUSH = 4_096  # flushed every few dozen rows: many flushes
    for i, (row, text) in enumerate(zip(ids, texts)):
        packed_ids.append(row)
        packed_texts.append(text)
        if i == 1_000:  # a read while rows are pending, then more appended
            assert packed_ids[1_000].tolist() == ids[1_000] and packed_texts[0] == texts[0]
    assert len(packed_ids) == len(packed_texts) == len(ids)
    assert [row.tolist() for row in packed_ids] == ids
    assert list(packed_texts) == texts
    assert packed_ids[-1].tolist() == ids[-1] and packed_texts[-len(texts)] == texts[0]
    for bad in (len(ids), -len(ids) - 1):
        with pytest.raises(IndexError):
            packed_ids[bad]


def test_packed_values_read_back_what_was_appended():
    """A corpus's per-row numbers (corpus index, own budget) in a temporary file: single values,
    ranges (empty, across flushes, with values still pending) and every block equal the plain
    list they were appended from."""
    import random

    from actors.packed_rows import PackedValues

    rng = random.Random(1)
    values = [rng.randrange(-(2**40), 2**40) for _ in range(5_000)]
    packed = PackedValues("int64")
    packed.FLUSH, packed.BLOCK = 800, 777  # a flush every 100 values, blocks not aligned to them
    for i, v in enumerate(values):
        packed.append(v)
        if i == 2_500:  # a read while values are pending, then more appended
            assert packed[2_500] == values[2_500] and packed[10:20].tolist() == values[10:20]
    assert len(packed) == len(values) and packed[:].tolist() == values
    assert packed[-1] == values[-1] and isinstance(packed[3], int)
    assert packed[4_990:6_000].tolist() == values[4_990:] and packed[7:7].tolist() == []
    blocks = list(packed.blocks())
    assert [start for start, _ in blocks] == list(range(0, len(values), 777))
    assert [v for _, block in blocks for v in block.tolist()] == values
    with pytest.raises(IndexError):
        packed[len(values)]


def test_the_notebook_api_runs_a_corpus(hf_model, tiny_with_tokenizer, tmp_path):
    import distlens
    from pipelines.config import ConfigError

    path = write_corpus(tmp_path / "corpus", "jsonl")
    overrides = ["cluster.micro_batch_size=2", "generation.max_new_tokens=3", "corpus.limit=3"]
    ds = distlens.lens(out=tmp_path / "nb", corpus=path, model=str(tiny_with_tokenizer), cluster="inprocess",
                       overrides=overrides)  # fmt: skip
    assert ds.corpus_index.values.tolist() == [0, 1, 2] and ds.attrs["corpus"]["rows"] == 3
    assert_store_holds_rows(tmp_path / "nb", range(3), "text", *hf_model)
    with pytest.raises(ConfigError, match="both give the prompts"):
        distlens.lens(["a prompt"], tmp_path / "both", corpus=path, model=str(tiny_with_tokenizer), cluster="inprocess")


def _file(name: str, content: str):
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_text(content)
        return [f"corpus.path={tmp / name}"]

    return make


LINE = json.dumps({"prompt": "Hello there."})
# name: (overrides as a function of tmp_path, what the one error line holds); each a driver run
BAD = {
    "not_the_named_format": (_file("c.jsonl", "prompt,id\nhello,1\n"), "c.jsonl row 0 (line 1) is not JSON"),
    "missing_field": (
        _file("c.jsonl", "\n".join([LINE, LINE, json.dumps({"text": "no prompt"})])),
        "c.jsonl row 2 (line 3) has no field 'prompt' (it has ['text'])",
    ),
    "empty_corpus": (lambda t: [*_file("c.txt", "one\ntwo\n")(t), "corpus.skip=2"], "holds no rows from corpus.skip=2"),
    "longer_than_the_context": (
        _file("c.jsonl", "\n".join([LINE, json.dumps({"prompt": "word " * 2100})])),
        "c.jsonl row 1 field 'prompt' is 2",  # ~2,100 tokens, against a context of 2,048
    ),
    "its_own_max_new_tokens_past_the_context": (
        _file("c.jsonl", json.dumps({"prompt": "Hi.", "max_new_tokens": 2040})),
        "with max_new_tokens=2040 (the row's own) that exceeds the model's context of 2048 positions",
    ),
    "both_prompts_and_a_corpus": (
        lambda t: [*_file("c.txt", "one\n")(t), "prompts=[hello]"],
        "prompts and corpus.path=",
    ),
}
# The reader's other refusals, read in this process: (file name, content, corpus settings, message)
BAD_ROWS = {
    "not_parquet": ("c.jsonl", LINE, {"format": "parquet"}, "c.jsonl is not a Parquet file"),
    "not_a_saved_dataset": ("c.jsonl", LINE, {"format": "dataset"}, "c.jsonl is not a saved `datasets` dataset"),
    "not_utf8": ("c.txt", "caf\udce9\n", {}, "c.txt row 0 (line 1) is not UTF-8"),
    "not_an_object": ("c.jsonl", '"just a string"', {}, "row 0 (line 1) is a JSON str, not an object"),
    "no_default_field": ("c.csv", "id,body\n1,hi\n", {}, "has none of the fields ['prompt', 'text', 'question']"),
    "parquet_without_the_field": ("c.parquet", None, {"field": "body"}, "c.parquet row 0 has no field 'body'"),
    "non_string_field": (
        "c.jsonl",
        LINE + '\n{"prompt": 7}',
        {},
        "row 1 (line 2) field 'prompt' is int 7, not a string",
    ),
    "empty_prompt": ("c.csv", 'prompt\n" "\n', {}, "c.csv row 0 (line 2) field 'prompt' is empty"),
    "bad_max_new_tokens": (
        "c.csv",
        "prompt,max_new_tokens\nhello,ten\n",
        {},
        "c.csv row 0 (line 2) field 'max_new_tokens' is 'ten'",
    ),
    "zero_max_new_tokens": ("c.jsonl", '{"prompt": "a", "max_new_tokens": 0}', {}, "field 'max_new_tokens' is 0"),
    "bad_stop": ("c.jsonl", '{"prompt": "a", "stop": ["x", 3]}', {}, "row 0 (line 1) field 'stop' is ['x', 3]"),
    "missing_file": ("nope.parquet", False, {}, "nope.parquet' does not exist"),
    "unknown_extension": ("c.dat", LINE, {}, "its format cannot be told from its name"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_corpus_row_is_one_line_naming_file_row_and_field(case, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.corpus import CorpusError, read_corpus

    name, content, settings, message = BAD_ROWS[case]
    path = tmp_path / name
    if name.endswith(".parquet") and content is None:
        pq.write_table(pa.table({"text": ["a"]}), path)
    elif content is not False:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))
    corpus = SimpleNamespace(**{"path": str(path), "field": None, "format": None, "skip": 0, "limit": None,
                                "split": "train", **settings})  # fmt: skip
    with pytest.raises(CorpusError) as err:
        read_corpus(corpus, lambda text: [1])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_corpus_is_refused_in_one_line(case, tiny_with_tokenizer, tmp_path):
    overrides, message = BAD[case]
    result = run_driver(
        "pipelines.lens", f"model.name={tiny_with_tokenizer}", *RUN, *overrides(tmp_path), f"storage.root={tmp_path}",
        "storage.run=r", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlens: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not list(tmp_path.rglob("*.zarr"))  # no store at all, so none reads as complete
