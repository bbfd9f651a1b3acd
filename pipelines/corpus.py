"""Prompts from a corpus: stream the rows of a JSONL, Parquet, CSV or plain-text file (a local
path or an object-storage URL) or of a Hugging Face `datasets` dataset (saved to disk, or named on
the hub), take rows `corpus.skip` .. `skip + limit`, read each one's prompt and the limits it may
carry itself (`max_new_tokens`, `stop`), and hash what was taken, never holding the whole corpus.

A row's corpus index is its 0-based position among the corpus's rows (blank lines of a JSONL or
text file are not rows); a bad row is refused naming `<path> row <index>` (and its line) and the
field.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

from actors.packed_rows import PackedRows, PackedValues

FORMATS = ("jsonl", "parquet", "csv", "text", "dataset", "hf_hub")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
DEFAULT_FIELDS = ("prompt", "text", "question")  # corpus.field unset: the first the corpus has
HUB = "hf:"  # corpus.path=hf:<dataset id>[:<config name>] names a dataset on the Hugging Face hub
TEXT_FIELD = "text"  # the one field of a plain-text corpus's rows: the line
BATCH_ROWS = 1024  # rows read at a time from Parquet and `datasets`


class CorpusError(ValueError):
    """A corpus that cannot be read as asked; the message names the file (and row) and field."""


@dataclass(frozen=True)
class Row:
    index: int  # the row's corpus index
    where: str  # "<path> row <index>" (and its line, in a line format)
    fields: dict  # the row's values by field name


@dataclass
class CorpusPrompts:
    """The selected rows, in corpus order: their prompts' texts and token ids, what each row
    asks of its own (actors.run_spec.CorpusRows) and the corpus's identity (path, format,
    field, row range, row count and the content hash of the selected rows; never the rows)."""

    texts: list[str] | PackedRows
    token_ids: list[list[int]] | PackedRows
    rows: object  # actors.run_spec.CorpusRows
    identity: dict


def corpus_format(path: str, fmt: str | None) -> str:
    """`corpus.format`, or the format told by the path: `hf:` a hub dataset, a directory a saved
    dataset, else the extension."""
    from actors import storage_fs

    if fmt:
        return fmt
    if str(path).startswith(HUB):
        return "hf_hub"
    name = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, kind in EXTENSIONS.items():
        if name.endswith(ext):
            return kind
    fs, p = storage_fs.filesystem(path)
    if fs.isdir(p):
        return "dataset"
    if not fs.exists(p):
        raise CorpusError(f"corpus.path={str(path)!r} does not exist: give a file, a directory or hf:<name>")
    raise CorpusError(
        f"corpus.path={path!r}: its format cannot be told from its name: use a file ending in "
        f"{sorted(EXTENSIONS)}, a saved `datasets` directory or hf:<name>, or set corpus.format to one of {list(FORMATS)}"
    )


def read_corpus(corpus, encode) -> CorpusPrompts:
    """The rows `corpus` (the config's `corpus` group) selects, each prompt encoded to token
    ids by `encode(text)`. Refuses (CorpusError) a file not in its format, a missing or
    non-string field, a bad `max_new_tokens` or `stop`, and an empty selection."""
    from actors.run_spec import CorpusRows

    fmt = corpus_format(corpus.path, corpus.format)
    digest = hashlib.sha256()
    texts, token_ids, stops = PackedRows("text"), PackedRows("ids"), PackedRows("text")  # packed: none held
    index, budgets = PackedValues("int64"), PackedValues("int32")
    name = None
    with contextlib.closing(_rows(corpus, fmt)) as rows:  # a file left early is closed
        for row in rows:
            if name is None:
                name = _field(corpus, fmt, row)
            text = _prompt(row, name)
            budget, stop = _max_new_tokens(row), _stop(row)
            digest.update(json.dumps([row.index, text, budget or None, list(stop)]).encode() + b"\n")
            stops.append(json.dumps(list(stop)) if stop else "")
            texts.append(text)
            token_ids.append(encode(text))
            index.append(row.index)
            budgets.append(budget)
            if corpus.limit is not None and len(texts) == corpus.limit:
                break
    if not texts:
        raise CorpusError(
            f"corpus {corpus.path} holds no rows from corpus.skip={corpus.skip}"
            f"{'' if corpus.limit is None else f' (corpus.limit={corpus.limit})'}: the run would have no prompts; "
            "choose a smaller corpus.skip or another corpus"
        )
    identity = {
        "path": str(corpus.path), "format": fmt, "field": name, "split": corpus.split if fmt in ("dataset", "hf_hub") else None,
        "skip": corpus.skip, "limit": corpus.limit, "rows": len(texts), "sha256": digest.hexdigest(),
    }  # fmt: skip
    return CorpusPrompts(
        texts, token_ids, identity=identity,
        rows=CorpusRows(str(corpus.path), name, index, budgets, stops),
    )  # fmt: skip


# -- the rows of each format ------------------------------------------------------------------
def _rows(corpus, fmt: str) -> Iterator[Row]:
    """The corpus's rows from row `corpus.skip` on, as `Row`s; a missing file or directory, or
    one not in the format, is one CorpusError."""
    readers = {"jsonl": _jsonl_rows, "text": _text_rows, "csv": _csv_rows, "parquet": _parquet_rows,
               "dataset": _dataset_rows, "hf_hub": _hub_rows}  # fmt: skip
    return readers[fmt](corpus)


def _needs(module: str, fmt: str):
    """`module` imported, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(
            f"a {fmt} corpus needs the {module.split('.')[0]!r} package: pip install 'distlens[corpus]'"
        ) from None


def _open(path, mode: str = "rb"):
    from actors import storage_fs

    try:
        fs, p = storage_fs.filesystem(path)
        return fs.open(p, mode)
    except FileNotFoundError:
        raise CorpusError(f"corpus.path={str(path)!r} does not exist: give a file, a directory or hf:<name>") from None
    except IsADirectoryError:
        raise CorpusError(
            f"corpus.path={str(path)!r} is a directory: set corpus.format=dataset for a saved one"
        ) from None


def _lines(corpus, kind: str) -> Iterator[tuple[int, int, str]]:
    """(corpus index, line number, text) of the non-blank lines from row `corpus.skip` on;
    a line that is not UTF-8 is refused."""
    index = 0
    with _open(corpus.path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if index >= corpus.skip:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(
                        f"corpus {corpus.path} row {index} (line {number}) is not UTF-8 ({err.reason} at byte "
                        f"{err.start}): a {kind} corpus is UTF-8 text; set corpus.format to its format"
                    ) from None
                yield index, number, text.rstrip("\r\n")
            index += 1


def _jsonl_rows(corpus) -> Iterator[Row]:
    for index, number, line in _lines(corpus, "jsonl"):
        where = f"{corpus.path} row {index} (line {number})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"corpus {where} is not JSON ({err.msg}, column {err.colno}): a jsonl corpus holds one JSON "
                "object per line; set corpus.format to the file's format"
            ) from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"corpus {where} is a JSON {type(record).__name__}, not an object: a jsonl corpus holds one "
                'JSON object per line, e.g. {"prompt": "..."}'
            )
        yield Row(index, where, record)


def _text_rows(corpus) -> Iterator[Row]:
    for index, number, line in _lines(corpus, "text"):
        yield Row(index, f"{corpus.path} row {index} (line {number})", {TEXT_FIELD: line})


def _csv_rows(corpus) -> Iterator[Row]:
    with _open(corpus.path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.DictReader(text)
        try:
            for index, record in enumerate(reader):
                if index < corpus.skip:
                    continue
                if None in record:  # more cells than the header names
                    raise CorpusError(
                        f"corpus {corpus.path} row {index} (line {reader.line_num}) has {len(reader.fieldnames)} "
                        f"header fields {reader.fieldnames} but more cells: a csv corpus has one header line"
                    )
                yield Row(index, f"{corpus.path} row {index} (line {reader.line_num})", record)
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"corpus {corpus.path} is not UTF-8 near line {reader.line_num + 1} ({err.reason}): a csv corpus is "
                "UTF-8 text; set corpus.format to the file's format"
            ) from None
        except csv.Error as err:
            raise CorpusError(f"corpus {corpus.path} line {reader.line_num} is not CSV ({err})") from None


def _parquet_rows(corpus) -> Iterator[Row]:
    """Row groups before `corpus.skip` are passed over unread (their row counts are in the
    footer); the rest are read `BATCH_ROWS` rows at a time."""
    pa, pq = _needs("pyarrow", "parquet"), _needs("pyarrow.parquet", "parquet")
    with _open(corpus.path) as f:
        try:
            file = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise CorpusError(
                f"corpus {corpus.path} is not a Parquet file ({' '.join(str(err).split())[:200]}): "
                "set corpus.format to the file's format"
            ) from None
        meta, start, first = file.metadata, 0, 0  # rows before row group `first`: all skipped
        while first < meta.num_row_groups and start + meta.row_group(first).num_rows <= corpus.skip:
            start += meta.row_group(first).num_rows
            first += 1
        groups = list(range(first, meta.num_row_groups))
        if not groups:
            return
        columns = _wanted(corpus, file.schema_arrow.names)  # the others are never read
        index = start
        for batch in file.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns):
            for record in batch.to_pylist():
                if index >= corpus.skip:
                    yield Row(index, f"{corpus.path} row {index}", record)
                index += 1


def _wanted(corpus, names: list[str]) -> list[str]:
    """The columns of a corpus with a schema that a row is read for: the prompt's field (or
    every candidate) and the row's own limits; a schema without the prompt's field is refused."""
    wanted = [corpus.field] if corpus.field else [n for n in DEFAULT_FIELDS if n in names][:1]
    if not wanted or wanted[0] not in names:
        what = f"no field {corpus.field!r}" if corpus.field else f"none of the fields {list(DEFAULT_FIELDS)}"
        raise CorpusError(
            f"corpus {corpus.path} row {corpus.skip} has {what} (its columns are {names}): set corpus.field to "
            "the one holding the prompt"
        )
    return [*wanted, *(n for n in ("max_new_tokens", "stop") if n in names)]


def _dataset_rows(corpus) -> Iterator[Row]:
    """A dataset saved with `save_to_disk` (memory-mapped Arrow files: rows are read a batch at
    a time); a DatasetDict gives `corpus.split`."""
    datasets = _needs("datasets", "dataset")
    try:
        ds = datasets.load_from_disk(str(corpus.path))
    except FileNotFoundError as err:
        raise CorpusError(
            f"corpus {corpus.path} is not a saved `datasets` dataset ({' '.join(str(err).split())[:200]}): "
            "give a directory written by Dataset.save_to_disk, or set corpus.format"
        ) from None
    ds = _split(corpus, ds)
    ds = ds.select_columns(_wanted(corpus, ds.column_names))
    for start in range(corpus.skip, len(ds), BATCH_ROWS):
        batch = ds[start : start + BATCH_ROWS]
        names = list(batch)
        for i, values in enumerate(zip(*batch.values())):
            yield Row(start + i, f"{corpus.path} row {start + i}", dict(zip(names, values)))


def _split(corpus, ds):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if corpus.split not in ds:
            raise CorpusError(f"corpus.split={corpus.split!r} is not a split of {corpus.path}: it has {sorted(ds)}")
        return ds[corpus.split]
    return ds


def _hub_rows(corpus) -> Iterator[Row]:
    """A dataset named on the hub (`hf:<id>[:<config>]`, or `corpus.format=hf_hub` with a name
    or a local dataset folder), streamed: rows are fetched as they are read."""
    datasets = _needs("datasets", "hf_hub")
    name = str(corpus.path).removeprefix(HUB)
    config = None
    if ":" in name and "://" not in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=corpus.split, streaming=True)
    except Exception as err:  # not found, no access, no network, a bad split: one line naming the cause
        raise CorpusError(
            f"corpus.path={str(corpus.path)!r} cannot be loaded: {' '.join(str(err).split())[:300]}"
        ) from None
    if ds.column_names:
        ds = ds.select_columns(_wanted(corpus, ds.column_names))
    for offset, record in enumerate(ds.skip(corpus.skip) if corpus.skip else ds):
        index = corpus.skip + offset
        yield Row(index, f"{corpus.path} row {index}", dict(record))


# -- one row's values -------------------------------------------------------------------------
def _field(corpus, fmt: str, row: Row) -> str:
    """`corpus.field`, or the first of DEFAULT_FIELDS the first row has."""
    if fmt == "text":
        return TEXT_FIELD
    if corpus.field:
        return corpus.field
    for name in DEFAULT_FIELDS:
        if name in row.fields:
            return name
    raise CorpusError(
        f"corpus {row.where} has none of the fields {list(DEFAULT_FIELDS)} (it has {sorted(row.fields)}): "
        "set corpus.field to the one holding the prompt"
    )


def _prompt(row: Row, name: str) -> str:
    if name not in row.fields:
        raise CorpusError(
            f"corpus {row.where} has no field {name!r} (it has {sorted(row.fields)}): every row needs the prompt's "
            "field (corpus.field)"
        )
    text = row.fields[name]
    if not isinstance(text, str):
        raise CorpusError(f"corpus {row.where} field {name!r} is {type(text).__name__} {text!r:.60}, not a string")
    if not text.strip():
        raise CorpusError(f"corpus {row.where} field {name!r} is empty: every prompt needs text")
    return text


def _max_new_tokens(row: Row) -> int:
    """The row's own `max_new_tokens` (a CSV cell's digits too), or 0: the run's."""
    value = row.fields.get("max_new_tokens")
    if value is None or value == "":
        return 0
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CorpusError(
            f"corpus {row.where} field 'max_new_tokens' is {value!r}: give a whole number >= 1, or leave it out "
            "for generation.max_new_tokens"
        )
    return value


def _stop(row: Row) -> tuple[str, ...]:
    """The row's own stop strings: a string or a list of strings (none: ())."""
    value = row.fields.get("stop")
    if value is None or value == "":
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise CorpusError(
            f"corpus {row.where} field 'stop' is {value!r:.80}: give a non-empty string or a list of them"
        )
    return tuple(stops)
