"""The lens store: one Zarr v3 group per run, compressed and chunk-aligned, with named
dimensions (so `xarray.open_zarr` labels them) and per-batch completion records.

Layout (dimension names in brackets):
  tokens [prompt, position] int32 (-1 past the end), lengths / prompt_lengths [prompt],
  corpus_index [prompt] int64: the corpus row the row's prompt is (inline prompts: their index),
  prompt_text / generated_text [prompt], layer [layer], component [component],
  lens_mask [prompt, position]: the lens exists there (every token but the last),
  topk_ids / topk_logprobs [prompt, layer, component, position, k],
  entropy / target_logprob / target_rank / kl_to_final [prompt, layer, component, position],
  tuned_topk_ids ... tuned_kl_to_final: the same fields for the tuned lens, when the run records it
  (`layout.lenses` lists the lenses; `LensStore.field(name, lens)` reads either),
  activations [prompt, layer, component, position, hidden] (optional; bfloat16 as uint16 bits),
  batch_done [batch]: written after the batch's data, one chunk per batch.
The group attr `complete` is set last; a store without it never reads as finished.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from actors import storage_fs
from actors.vocabulary import LENSES, lens_array

SCHEMA_VERSION = 2  # 2: kl_to_final; per-row steering (source, edit_kind, edit_coefficient, steering_vector)
LENS_ARRAYS = ("topk_ids", "topk_logprobs", "entropy", "target_logprob", "target_rank", "kl_to_final")


def _compressor():
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
    lenses: tuple[str, ...] = ("logit",)  # the logit lens's arrays always; `tuned_*` arrays with "tuned"


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

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path, layout: StoreLayout, attrs: dict, vectors=None) -> LensStore:
        """All arrays and their metadata up front; data arrives batch by batch. `vectors`: the
        run's steering table [n_vectors, hidden], written now (attrs `edit_kinds` say which
        vector, layer, site and positions each `edit_kind` index means)."""
        path = storage_fs.location(path)
        storage_fs.remove(write_log_path(path))  # a replaced store's log goes too
        g = zarr.open_group(storage_fs.zarr_store(path), mode="w", zarr_format=3)
        p, pos, b = layout.n_prompts, layout.n_positions, layout.batch_rows
        pc = min(layout.position_chunk, pos)
        n_l, n_c, k = len(layout.layers), len(layout.components), layout.k

        def array(name, shape, chunks, dtype, fill, dims):
            g.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=_compressor(),
                dimension_names=dims,
            )  # fmt: skip

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
            g.create_array(
                name,
                shape=(p,),
                chunks=(b,),
                dtype=str,
                dimension_names=["prompt"],
                config={"write_empty_chunks": True},
            )
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
        n_batches = -(-p // b)
        array("batch_done", (n_batches,), (1,), "bool", False, ["batch"])
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
        if version != SCHEMA_VERSION:
            raise StoreError(f"store {path} has schema_version={version!r}; this code reads {SCHEMA_VERSION}")
        return cls(path, g)

    # -- writing ----------------------------------------------------------------------------
    @_storage_errors
    def write_batch(
        self, batch: int, rows: slice, data: dict[str, np.ndarray], texts: dict[str, list[str]], mark_done: bool = True
    ) -> None:
        """Write one micro-batch's rows (every position, so its chunks are written whole and
        once), then its completion record. Each write is logged (`<store>.writes.jsonl` beside
        the store, outside the Zarr hierarchy: one record when it begins and one when its record
        is set) with the chunks it covers."""
        g = self.group
        chunk = g["tokens"].chunks[0]
        chunks = list(range(rows.start // chunk, -(-rows.stop // chunk)))
        self._log({"event": "begin", "batch": batch, "rows": [rows.start, rows.stop], "prompt_chunks": chunks})
        # Every chunk is written, even one equal to the fill value, so `verify` can tell a
        # missing chunk from an empty one (a runtime setting: it is not stored with the array).
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name, value in data.items():
                g[name][rows] = value
            for name, values in texts.items():
                g[name][rows] = np.asarray(values, dtype=object)
            if not mark_done:
                return
            g["batch_done"][batch] = True
        self._log({"event": "done", "batch": batch, "rows": [rows.start, rows.stop], "prompt_chunks": chunks})

    def _log(self, record: dict) -> None:
        storage_fs.RecordLog(write_log_path(self.path)).append(
            {**record, "pid": os.getpid(), "time": round(time.time(), 3)}
        )

    def write_log(self) -> list[dict]:
        """Every batch write so far, in order (over resumed runs too)."""
        return storage_fs.RecordLog(write_log_path(self.path)).records()

    def done_batches(self) -> set[int]:
        return set(np.flatnonzero(self.group["batch_done"][:]).tolist())

    @_storage_errors
    def mark_complete(self, summary: dict) -> None:
        self.group.attrs.update({"complete": True, "summary": summary})
        zarr.consolidate_metadata(storage_fs.zarr_store(self.path), zarr_format=3)

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
        for lens in layout.get("lenses", ["logit"])[1:]:  # the tuned lens's arrays: the logit lens's shapes
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
        done = g["batch_done"][:]
        n_batches = -(-p // layout["batch_rows"]) if p else 0
        if done.shape != (n_batches,):
            problems.append(f"batch_done: {done.shape[0]} batches recorded, the layout implies {n_batches}")
        if not g.attrs.get("complete"):
            return [
                *problems,
                f"incomplete: batches {np.flatnonzero(~done).tolist()} not finished (no 'complete' record)",
            ]
        if not done.all():
            problems.append(
                f"batch_done: batches {np.flatnonzero(~done).tolist()} not done but the store says complete"
            )
        # A run that captured no layer (a steering sweep scores answers only) writes no lens: its
        # lens_mask stays all False by its fill value, and the lens arrays have no chunks at all.
        lens_names = {lens_array(f, lens) for f in LENS_ARRAYS for lens in layout.get("lenses", ["logit"])}
        unwritten = {"lens_mask", *lens_names} if not layout.get("layers") else set()
        for name in sorted(names - unwritten):
            arr = g[name]
            if arr.nchunks_initialized != arr.nchunks:
                problems.append(f"{name}: {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing")
        return problems

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
        """The lenses this store records: ["logit"] or ["logit", "tuned"]."""
        return list(self.group.attrs["layout"].get("lenses", ["logit"]))

    def field(self, name: str, lens: str = "logit"):
        """The zarr array of lens field `name` (e.g. "entropy") for `lens` ("logit" or "tuned")."""
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


def write_log_path(store_path) -> Path | str:
    """`<store>.writes.jsonl`, beside the store: its record of batch writes (on object storage a
    folder of one object per record: storage_fs.RecordLog)."""
    return storage_fs.beside(store_path, ".writes.jsonl")


def layout_dict(layout: StoreLayout) -> dict:
    d = dict(vars(layout))
    d["layers"], d["components"] = list(layout.layers), list(layout.components)
    return json.loads(json.dumps(d))
