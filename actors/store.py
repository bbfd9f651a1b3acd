"""The lens store: one Zarr v3 group per run, compressed and chunk-aligned, with named
dimensions (so `xarray.open_zarr` labels them) and per-batch completion records.

Layout (dimension names in brackets):
  tokens [prompt, position] int32 (-1 past the end), lengths / prompt_lengths [prompt],
  corpus_index [prompt] int64: the corpus row the row's prompt is (inline prompts: their index),
  prompt_text / generated_text [prompt], layer [layer], component [component],
  lens_mask [prompt, position]: the lens exists there (every token but the last),
  topk_ids / topk_logprobs [prompt, layer, component, position, k],
  entropy / target_logprob / target_rank / kl_to_final [prompt, layer, component, position],
  tuned_topk_ids ... tuned_kl_to_final: the same fields for the tuned lens, when the run records it,
  jacobian_topk_ids ... jacobian_kl_to_final: the same for the Jacobian lens, when it records it
  (`layout.lenses` lists the lenses; `LensStore.field(name, lens)` reads any),
  activations [prompt, layer, component, position, hidden] (optional; bfloat16 as uint16 bits),
  batch_done [batch]: written after the batch's data, one chunk per batch.
The group attr `complete` is set last; a store without it never reads as finished.

Every array is sharded (Zarr v3 sharding): its chunks stay (micro-batch rows, 1 layer, 1
component, 512 positions), and one shard, one stored object, holds every chunk of the rows of
`layout.shard_batches` micro-batches. A shard is written whole, once: finished micro-batches wait
in the writer's memory until every micro-batch of their shard is finished (or `flush()`), then
the shard's arrays are written and only then its batches' completion records (see DESIGN_NOTES.md,
"A store that scales").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from actors import storage_fs
from actors.vocabulary import LENSES, lens_array

SCHEMA_VERSION = 3  # 2: kl_to_final; per-row steering (source, ...); 3: sharded (layout.shard_batches)
READABLE_VERSIONS = (2, 3)  # a schema-2 store (one object per chunk) reads the same; it is not resumed
SHARD_BYTES = 32 * 2**20  # auto shard_batches: the micro-batches whose arrays hold about this much, uncompressed,
SHARD_ROWS = 1024  # and at most this many rows (what a killed driver can lose is one shard's finished rows)
LENS_ARRAYS = ("topk_ids", "topk_logprobs", "entropy", "target_logprob", "target_rank", "kl_to_final")


def compressor():
    """The codec every distlens Zarr array is compressed with (lens stores, trace.zarr)."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


@dataclass(frozen=True)
class StoreLayout:
    n_prompts: int
    n_positions: int
    layers: tuple[int, ...]
    components: tuple[str, ...]
    k: int
    batch_rows: int  # prompts per micro-batch = rows per chunk
    hidden: int = 0
    activations: str | None = None
    position_chunk: int = 512
    n_scores: int = 0  # logits of chosen tokens (e.g. answer letters) at every generated step
    n_steps: int = 1
    n_edits: int = 0  # most steering edits on one row
    lenses: tuple[str, ...] = ("logit",)  # the logit lens's arrays always; `tuned_*` / `jacobian_*` with those
    shard_batches: int | None = None  # micro-batches per shard; None: about SHARD_BYTES of arrays (`sharded`)

    @property
    def n_batches(self) -> int:
        return -(-self.n_prompts // self.batch_rows)


def row_bytes(layout: StoreLayout) -> int:
    """What one row's arrays hold, uncompressed (the lens fields, activations, tokens, scores)."""
    cells = len(layout.layers) * len(layout.components) * layout.n_positions
    per_cell = len(layout.lenses) * (layout.k * 8 + 4 * 4)  # topk ids + logprobs; 4 scalar fields
    if layout.activations:
        per_cell += layout.hidden * (4 if layout.activations == "float32" else 2)
    return cells * per_cell + layout.n_positions * 5 + layout.n_steps * layout.n_scores * 4 + 64


def sharded(layout: StoreLayout) -> StoreLayout:
    """`layout` with its micro-batches per shard settled: as given (at most every batch), or the
    most whose arrays hold SHARD_BYTES uncompressed in at most SHARD_ROWS rows (at least one)."""
    by_size = SHARD_BYTES // max(1, row_bytes(layout) * layout.batch_rows)
    wanted = layout.shard_batches or min(by_size, SHARD_ROWS // layout.batch_rows)
    return dataclasses.replace(layout, shard_batches=int(min(max(1, wanted), max(1, layout.n_batches))))


class StoreError(RuntimeError):
    pass


def _storage_errors(method):
    """A LensStore write that the storage refuses (a full disk, a quota, a lost mount) stops
    the run with one StoreError line naming the store; what was finished stays, and the store
    does not read as complete until a resumed run finishes it."""

    @functools.wraps(method)
    def write(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            raise StoreError(
                f"writing {self.path} failed: {err.strerror or err}; every finished micro-batch is kept and the "
                "store does not read as complete: free space (or fix the storage), then run the same command "
                "with resume=true"
            ) from err

    return write


class LensStore:
    """Writer and reader of one run's `lens.zarr`: a local path (`path` is a `Path`) or an
    object-storage URL (`path` is the URL string; see actors/storage_fs.py)."""

    def __init__(self, path, group: zarr.Group):
        self.path = storage_fs.location(path)
        self.group = group
        self._pending: dict[int, dict[int, _Finished]] = {}  # shard -> batch -> a finished batch not yet written
        self._done: frozenset[int] | None = None  # the batches recorded done (read once, then kept up to date)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path, layout: StoreLayout, attrs: dict, vectors=None) -> LensStore:
        """All arrays and their metadata up front; data arrives batch by batch. `vectors`: the
        run's steering table [n_vectors, hidden], written now (attrs `edit_kinds` say which
        vector, layer, site and positions each `edit_kind` index means)."""
        path = storage_fs.location(path)
        storage_fs.remove(write_log_path(path))  # a replaced store's log goes too
        layout = sharded(layout)
        g = zarr.open_group(storage_fs.zarr_store(path), mode="w", zarr_format=3)
        p, pos, b = layout.n_prompts, layout.n_positions, layout.batch_rows
        pc = min(layout.position_chunk, pos)
        n_l, n_c, k = len(layout.layers), len(layout.components), layout.k

        def array(name, shape, chunks, dtype, fill, dims):
            # A shard: the rows of `shard_batches` micro-batches, every chunk of the other dimensions.
            shards = (chunks[0] * layout.shard_batches,) + tuple(
                max(1, -(-n // c)) * c for n, c in zip(shape[1:], chunks[1:])
            )  # a dimension of size 0 (no layer captured) still has one chunk's room
            fills = {} if fill is None else {"fill_value": fill, "compressors": compressor()}
            g.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, dimension_names=dims, **fills)

        array("tokens", (p, pos), (b, pos), "int32", -1, ["prompt", "position"])
        array("lens_mask", (p, pos), (b, pos), "bool", False, ["prompt", "position"])
        array("lengths", (p,), (b,), "int32", 0, ["prompt"])
        array("prompt_lengths", (p,), (b,), "int32", 0, ["prompt"])
        array("coefficient", (p,), (b,), "float32", np.nan, ["prompt"])  # the row's sweep coefficient
        array("source", (p,), (b,), "int32", -1, ["prompt"])  # the prompt (of those given) the row runs
        array("corpus_index", (p,), (b,), "int64", -1, ["prompt"])  # the row's corpus row (or prompt index)
        if layout.n_edits:
            e = layout.n_edits
            array("edit_kind", (p, e), (b, e), "int32", -1, ["prompt", "edit"])  # index into attrs edit_kinds
            array("edit_coefficient", (p, e), (b, e), "float32", np.nan, ["prompt", "edit"])
        if vectors is not None and len(vectors):
            g.create_array(
                "steering_vector", data=np.asarray(vectors, np.float32), dimension_names=["vector", "hidden"]
            )
        if layout.n_scores:
            shape = (p, layout.n_steps, layout.n_scores)
            array("scores", shape, (b,) + shape[1:], "float32", np.nan, ["prompt", "step", "choice"])
        for name in ("prompt_text", "generated_text"):
            array(name, (p,), (b,), str, None, ["prompt"])
        g.create_array("layer", data=np.asarray(layout.layers, np.int32), dimension_names=["layer"])
        g.create_array("component", shape=(n_c,), dtype=str, dimension_names=["component"])
        g["component"][:] = np.asarray(layout.components, dtype=object)
        dims5 = ["prompt", "layer", "component", "position", "k"]
        dims4 = dims5[:4]
        for lens in layout.lenses:
            name = lambda field, lens=lens: lens_array(field, lens)  # noqa: E731
            array(name("topk_ids"), (p, n_l, n_c, pos, k), (b, 1, 1, pc, k), "int32", -1, dims5)
            array(name("topk_logprobs"), (p, n_l, n_c, pos, k), (b, 1, 1, pc, k), "float32", np.nan, dims5)
            array(name("entropy"), (p, n_l, n_c, pos), (b, 1, 1, pc), "float32", np.nan, dims4)
            array(name("target_logprob"), (p, n_l, n_c, pos), (b, 1, 1, pc), "float32", np.nan, dims4)
            array(name("target_rank"), (p, n_l, n_c, pos), (b, 1, 1, pc), "int32", -1, dims4)
            array(name("kl_to_final"), (p, n_l, n_c, pos), (b, 1, 1, pc), "float32", np.nan, dims4)
        if layout.activations:
            storage = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[layout.activations]
            dims = ["prompt", "layer", "component", "position", "hidden"]
            shape = (p, n_l, n_c, pos, layout.hidden)
            array("activations", shape, (b, 1, 1, pc, layout.hidden), storage, 0, dims)
            g["activations"].attrs["dtype"] = layout.activations
        g.create_array(
            "batch_done", shape=(layout.n_batches,), chunks=(1,), shards=(layout.shard_batches,), dtype="bool",
            fill_value=False, compressors=compressor(), dimension_names=["batch"],
        )  # fmt: skip
        g.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "layout": layout_dict(layout), "complete": False})
        return cls(path, g)

    @classmethod
    def open(cls, path, mode: str = "r") -> LensStore:
        path = storage_fs.location(path)
        if not storage_fs.is_file(storage_fs.join(path, "zarr.json")):
            raise StoreError(f"no lens store at {path} (missing zarr.json)")
        store = storage_fs.zarr_store(path, read_only=mode == "r")
        g = zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)
        version = g.attrs.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"store {path} has schema_version={version!r}; this code reads {list(READABLE_VERSIONS)}")
        return cls(path, g)

    # -- writing ----------------------------------------------------------------------------
    @property
    def shard_batches(self) -> int:
        """Micro-batches per shard (1 for a schema-2 store, where each batch had its own chunks)."""
        return int(self.group.attrs["layout"].get("shard_batches") or 1)

    def shard_of(self, batch: int) -> range:
        """The micro-batches whose rows share `batch`'s shard."""
        s, n = self.shard_batches, self.group["batch_done"].shape[0]
        first = batch // s * s
        return range(first, min(first + s, n))

    @_storage_errors
    def write_batch(
        self, batch: int, rows: slice, data: dict[str, np.ndarray], texts: dict[str, list[str]], mark_done: bool = True
    ) -> None:
        """Take one finished micro-batch's rows (every position). Its shard is written once every
        micro-batch of the shard not yet in the store is finished (until then the rows wait in
        memory), then the shard's completion records. `mark_done=False` writes what is due but
        records nothing (a test's fault: killed between the data and its record)."""
        shard = batch // self.shard_batches
        self._pending.setdefault(shard, {})[batch] = _Finished(rows, data, texts, mark_done)
        if set(self.shard_of(batch)) - self.done_batches() <= set(self._pending[shard]):
            self._write_shard(shard)

    def flush(self, raise_errors: bool = True) -> None:
        """Write every micro-batch still waiting for the rest of its shard (a run that ends
        early keeps them; a resumed run adds the rest of the shard to what is stored).
        `raise_errors=False`, for a run already stopping on another error: a write the storage
        refuses is logged, not raised (its batches stay unrecorded and are run again on resume)."""
        try:
            self._flush()
        except StoreError as err:
            if raise_errors:
                raise
            logging.getLogger("distlens").warning("%s", err)

    @_storage_errors
    def _flush(self) -> None:
        for shard in sorted(self._pending):
            self._write_shard(shard)

    def _write_shard(self, shard: int) -> None:
        """The waiting micro-batches of `shard`: their arrays, each as few writes as the rows
        allow (one, a whole shard, unless some of its batches were stored by an earlier run),
        then their completion records. Each write is logged (`<store>.writes.jsonl` beside the
        store, outside the Zarr hierarchy: one record per batch when the shard's write begins and
        one when its record is set) with the chunks it covers."""
        pending = self._pending[shard]
        batches = sorted(pending)
        chunk = self.group["tokens"].chunks[0]
        records = {b: {"batch": b, "shard": shard, "rows": [pending[b].rows.start, pending[b].rows.stop],
                       "prompt_chunks": list(range(pending[b].rows.start // chunk, -(-pending[b].rows.stop // chunk)))}
                   for b in batches}  # fmt: skip
        for b in batches:
            self._log({"event": "begin", **records[b]})
        # Every chunk is written, even one equal to the fill value, so `verify` can tell a
        # missing shard from an empty one (a runtime setting, read when an array is opened).
        with zarr.config.set({"array.write_empty_chunks": True}):
            for run in consecutive(batches):
                rows = slice(pending[run[0]].rows.start, pending[run[-1]].rows.stop)
                for name in pending[run[0]].data:
                    self.group[name][rows] = np.concatenate([pending[b].data[name] for b in run])
                for name in pending[run[0]].texts:
                    self.group[name][rows] = np.asarray([t for b in run for t in pending[b].texts[name]], dtype=object)
            if not all(pending[b].mark_done for b in batches):
                return
            for run in consecutive(batches):
                self.group["batch_done"][run[0] : run[-1] + 1] = True
        self._done = self.done_batches() | set(batches)
        del self._pending[shard]
        for b in batches:
            self._log({"event": "done", **records[b]})

    def discard_partial_writes(self) -> list:
        """Remove what a writer killed mid-object left: zarr writes a local object to
        `<key>.<uuid>.partial` and renames it whole (an object store's put is whole already), so
        such a file is never part of the store. Returns what was removed."""
        if storage_fs.is_url(self.path):
            return []
        leftovers = storage_fs.glob(self.path, "**/*.partial")
        for path in leftovers:
            storage_fs.remove(path)
        return leftovers

    def _log(self, record: dict) -> None:
        storage_fs.RecordLog(write_log_path(self.path)).append(
            {**record, "pid": os.getpid(), "time": round(time.time(), 3)}
        )

    def write_log(self) -> list[dict]:
        """Every batch write so far, in order (over resumed runs too)."""
        return storage_fs.RecordLog(write_log_path(self.path)).records()

    def done_batches(self) -> frozenset[int]:
        """The micro-batches recorded done: read shard by shard the first time, then kept up to
        date by this writer (so asking per micro-batch costs nothing)."""
        if self._done is None:
            done = self.group["batch_done"]
            self._done = frozenset(
                int(block.start + i) for block in row_blocks(done) for i in np.flatnonzero(done[block])
            )
        return self._done

    @_storage_errors
    def mark_complete(self, summary: dict) -> None:
        """Write what still waits, then record the run complete with `summary`, to which the
        store's size figures are added (`summary["storage"]`: `size()`). A store with a batch
        not recorded done is refused (StoreError): it must never read complete."""
        self.flush()
        n_batches = self.group["batch_done"].shape[0]
        missing = sorted(set(range(n_batches)) - self.done_batches())
        if missing:
            raise StoreError(
                f"{self.path}: micro-batches {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of "
                f"{n_batches}) were not written, so the run is not marked complete: run it again with resume=true"
            )
        summary["storage"] = self.size()
        self.group.attrs.update({"complete": True, "summary": summary})
        zarr.consolidate_metadata(storage_fs.zarr_store(self.path), zarr_format=3)

    def size(self) -> dict:
        """What the stored rows cost: `bytes` (every array's objects, data and metadata; the
        group's own zarr.json, which holds these attributes, is left out), `objects`, `cells`
        (the (row, layer, position) cells holding a lens value: each row's length - 1 positions,
        times the layers captured), `bytes_per_cell` (bytes / cells) and `padded_cells` (rows x
        layers x the layout's positions: what every row is padded to)."""
        g = self.group
        arrays = [arr for _, arr in g.arrays()]
        n_bytes = sum(arr.nbytes_stored() for arr in arrays)
        objects = sum(1 + stored_objects(arr) for arr in arrays)
        lengths = g["lengths"]
        positions = sum(int(np.maximum(lengths[block] - 1, 0).sum()) for block in row_blocks(lengths))
        n_layers = g["layer"].shape[0]
        cells = positions * n_layers
        return {
            "bytes": int(n_bytes), "objects": int(objects), "cells": int(cells),
            "bytes_per_cell": round(n_bytes / cells, 3) if cells else None,
            "padded_cells": int(lengths.shape[0] * n_layers * g["tokens"].shape[1]),
        }  # fmt: skip

    # -- checking ---------------------------------------------------------------------------
    EXPECTED_DTYPES = {
        "tokens": "int32", "lengths": "int32", "prompt_lengths": "int32", "lens_mask": "bool",
        "topk_ids": "int32", "topk_logprobs": "float32", "entropy": "float32", "target_logprob": "float32",
        "target_rank": "int32", "kl_to_final": "float32", "coefficient": "float32", "batch_done": "bool",
        "corpus_index": "int64",
    }  # fmt: skip

    def verify(self) -> list[str]:
        """Problems with this store, one line each (empty: the store is whole): metadata agrees
        with the arrays, shapes and dtypes are right, the completion record agrees, and every
        chunk of a finished store is present."""
        g, problems = self.group, []
        layout = g.attrs.get("layout")
        if not isinstance(layout, dict):
            return ["attrs: no 'layout' record"]
        p, pos, k = layout.get("n_prompts"), layout.get("n_positions"), layout.get("k")
        n_l, n_c = len(layout.get("layers", [])), len(layout.get("components", []))
        expected_shapes = {
            "tokens": (p, pos), "lens_mask": (p, pos), "lengths": (p,), "prompt_lengths": (p,),
            "topk_ids": (p, n_l, n_c, pos, k), "topk_logprobs": (p, n_l, n_c, pos, k),
            "entropy": (p, n_l, n_c, pos), "target_logprob": (p, n_l, n_c, pos), "target_rank": (p, n_l, n_c, pos),
            "kl_to_final": (p, n_l, n_c, pos), "layer": (n_l,), "component": (n_c,),
        }  # fmt: skip
        for lens in layout.get("lenses", ["logit"])[1:]:  # the tuned (Jacobian) lens's arrays: the logit lens's shapes
            if lens not in LENSES:
                problems.append(f"layout: lens {lens!r} is not one of {list(LENSES)}")
                continue
            for field in LENS_ARRAYS:
                expected_shapes[lens_array(field, lens)] = expected_shapes[field]
        names = set(g.array_keys())
        for name, shape in expected_shapes.items():
            if name not in names:
                problems.append(f"{name}: array missing")
            elif tuple(g[name].shape) != tuple(shape):
                problems.append(f"{name}: shape {tuple(g[name].shape)} but the layout record says {tuple(shape)}")
        dtypes = dict(self.EXPECTED_DTYPES)
        for lens in layout.get("lenses", ["logit"])[1:]:
            dtypes.update({lens_array(f, lens): dtypes[f] for f in LENS_ARRAYS})
        for name, dtype in dtypes.items():
            if name in names and str(g[name].dtype) != dtype:
                problems.append(f"{name}: dtype {g[name].dtype}, expected {dtype}")
        if "layer" in names and g["layer"][:].tolist() != list(layout.get("layers", [])):
            problems.append(f"layer: {g['layer'][:].tolist()} but the layout record says {layout.get('layers')}")
        if "batch_done" not in names:
            return [*problems, "batch_done: completion record missing"]
        return problems + self._verify_records(layout) + self._verify_objects(layout)

    def _verify_records(self, layout: dict) -> list[str]:
        """The completion records agree with the layout and with the `complete` attr."""
        g, problems = self.group, []
        n_done = g["batch_done"].shape[0]
        p = layout.get("n_prompts")
        n_batches = -(-p // layout["batch_rows"]) if p else 0
        if n_done != n_batches:
            problems.append(f"batch_done: {n_done} batches recorded, the layout implies {n_batches}")
        undone = sorted(set(range(n_done)) - self.done_batches())
        if not g.attrs.get("complete"):
            return [*problems, f"incomplete: batches {undone} not finished (no 'complete' record)"]
        if undone:
            problems.append(f"batch_done: batches {undone} not done but the store says complete")
        return problems

    def _verify_objects(self, layout: dict) -> list[str]:
        """Every data object (shard) of a finished store is there and decodes, read one row
        block (one shard's rows) at a time, so memory stays bounded by a shard, whatever the rows;
        each row's tokens end where its length says."""
        g = self.group
        if not g.attrs.get("complete"):
            return []
        problems = []
        # A run that captured no layer (a steering sweep scores answers only) writes no lens: its
        # lens_mask stays all False by its fill value, and the lens arrays have no chunks at all.
        lens_names = {lens_array(f, lens) for f in LENS_ARRAYS for lens in layout.get("lenses", ["logit"])}
        unwritten = {"lens_mask", *lens_names} if not layout.get("layers") else set()
        for name in sorted(set(g.array_keys()) - unwritten):
            arr = g[name]
            total, stored = object_count(arr), stored_objects(arr)
            if stored != total:
                problems.append(f"{name}: {total - stored} of {total} chunks missing (stored objects: shards)")
                continue
            try:
                for block in row_blocks(arr):
                    arr[block]
            except Exception as err:  # a damaged object: the codec's own error names what failed
                problems.append(f"{name}: a stored object does not decode: {type(err).__name__}: {err}")
        if not problems and "tokens" in g and "lengths" in g:
            problems += self._verify_lengths()
        return problems

    def _verify_lengths(self) -> list[str]:
        """Each row's tokens are set before its length and -1 after it, block by block."""
        g = self.group
        tokens, lengths = g["tokens"], g["lengths"]
        for block in row_blocks(tokens):
            n = lengths[block]
            ids = tokens[block]
            inside = np.arange(ids.shape[1])[None, :] < n[:, None]
            bad = np.flatnonzero(((ids >= 0) != inside).any(axis=1))
            if len(bad):
                row = block.start + int(bad[0])
                return [f"tokens: row {row} does not match its length {int(n[bad[0]])} (set before it, -1 after)"]
        return []

    # -- reading ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def is_complete(self) -> bool:
        return bool(self.group.attrs.get("complete")) and len(self.done_batches()) == self.group["batch_done"].shape[0]

    @property
    def layers(self) -> list[int]:
        return self.group["layer"][:].tolist()

    @property
    def components(self) -> list[str]:
        return [str(c) for c in self.group["component"][:]]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.group[name][:]

    @property
    def lenses(self) -> list[str]:
        """The lenses this store records: "logit" first, then any of "tuned", "jacobian"."""
        return list(self.group.attrs["layout"].get("lenses", ["logit"]))

    def field(self, name: str, lens: str = "logit"):
        """The zarr array of lens field `name` (e.g. "entropy") for `lens` ("logit", "tuned" or "jacobian")."""
        if lens not in self.lenses:
            raise StoreError(f"lens={lens!r}: store {self.path} records {self.lenses}")
        return self.group[lens_array(name, lens)]

    def tokens(self, prompt: int) -> np.ndarray:
        n = int(self.group["lengths"][prompt])
        return self.group["tokens"][prompt, :n]

    def top1_table(
        self, prompt: int, component: str = "resid_post", lens: str = "logit"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 lens token ids and probabilities, `[layer, position]`, for one prompt, over
        the positions that have a lens (every token but the last). `-1`/NaN where not captured."""
        ci = self.components.index(component)
        n = int(self.group["lengths"][prompt]) - 1
        ids = self.field("topk_ids", lens)[prompt, :, ci, :n, 0]
        probs = np.exp(self.field("topk_logprobs", lens)[prompt, :, ci, :n, 0])
        return ids, probs

    def activations(self, prompt: int):
        """Raw activations `[layer, component, position, hidden]` in their stored dtype
        (bfloat16 comes back as a torch tensor, since numpy has none)."""
        if "activations" not in self.group:
            raise StoreError(
                f"store {self.path} has no activations: they were not captured; capture them with "
                "capture.activations=float32|bfloat16|float16"
            )
        arr = self.group["activations"]
        n = int(self.group["lengths"][prompt])
        values = arr[prompt, :, :, :n]
        if arr.attrs.get("dtype") == "bfloat16":
            import torch

            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        return values


@dataclass(frozen=True)
class _Finished:
    """A finished micro-batch waiting for the rest of its shard."""

    rows: slice
    data: dict
    texts: dict
    mark_done: bool


def consecutive(batches: list[int]) -> list[list[int]]:
    """Sorted batch numbers as runs of consecutive ones (consecutive batches hold consecutive rows)."""
    runs: list[list[int]] = []
    for b in batches:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def row_blocks(arr) -> list[slice]:
    """`arr`'s first dimension cut at its shards (its chunks where it has none): the blocks a
    reader takes one at a time, so that no read holds more than one stored object's rows."""
    step = (arr.shards or arr.chunks)[0]
    return [slice(i, min(i + step, arr.shape[0])) for i in range(0, arr.shape[0], step)]


def stored_objects(arr) -> int:
    """How many of `arr`'s data objects (shards, or chunks where it has none) are stored."""
    per_object = 1 if arr.shards is None else int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks)]))
    return arr.nchunks_initialized // per_object


def object_count(arr) -> int:
    """How many data objects `arr` has when whole."""
    grid = arr.shards or arr.chunks
    return int(np.prod([-(-n // c) for n, c in zip(arr.shape, grid)]))


def write_log_path(store_path) -> Path | str:
    """`<store>.writes.jsonl`, beside the store: its record of batch writes (on object storage a
    folder of one object per record: storage_fs.RecordLog)."""
    return storage_fs.beside(store_path, ".writes.jsonl")


def layout_dict(layout: StoreLayout) -> dict:
    d = dict(vars(layout))
    d["layers"], d["components"] = list(layout.layers), list(layout.components)
    return json.loads(json.dumps(d))
