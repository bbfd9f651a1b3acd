"""A run's store over its lifetime: create it, resume it (same config and layout only), or
replace it (the old one set aside and put back if the new run cannot start), and lay each
finished micro-batch out by row position for writing.

The coordinator asks for a store with `RunStore.open(...)`, writes finished micro-batches with
the store's `write_batch` (which holds them until their shard is whole; `flush()` writes what
waits), and calls `started()` once compute is under way or `abandon()` if nothing was computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors import storage_fs
from actors.store import LensStore, StoreError, StoreLayout, layout_dict, sharded, write_log_path
from actors.vocabulary import lens_fill

log = logging.getLogger("distlens")


def config_changes(old, new, limit: int = 3) -> str:
    """'capture.k 10 -> 3, ...': the settings that differ between two recorded configs, leaving
    out where results are stored and how stages are spread (they do not change the numbers)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    skip = ("storage.", "cluster.", "resume", "overwrite", "progress", "plot.")
    keys = [k for k in dict.fromkeys([*a, *b]) if not k.startswith(skip) and a.get(k) != b.get(k)]

    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in keys[:limit]]
    return ", ".join(parts) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


class RunStore:
    """The store of one run (`store`), and what was set aside to make room for it."""

    def __init__(self, store: LensStore, created: bool, replaced: list[tuple[Path | str, Path | str]]):
        self.store = store
        self.created = created  # this run made the store (new, or replacing an old one)
        self.replaced = replaced  # (path, where it was set aside) of an overwritten store and its log

    @classmethod
    def open(cls, path, layout: StoreLayout, attrs: dict, existing: str, vectors=None) -> RunStore:
        """`existing`: what to do with a store already at `path`: refuse | resume | overwrite.
        A resume needs the same fingerprint (config) and the same layout (micro-batch numbers
        index rows through the rows per batch, so a store cut another way cannot continue)."""
        path = storage_fs.location(path)
        replaced = []
        if storage_fs.exists(storage_fs.join(path, "zarr.json")):
            if existing == "overwrite":  # set aside until the new run is under way
                for old in (path, write_log_path(path)):
                    aside = storage_fs.beside(old, ".replaced")
                    storage_fs.remove(aside, ignore_errors=True)
                    if storage_fs.exists(old):
                        storage_fs.move(old, aside)
                        replaced.append((old, aside))
            else:
                store = LensStore.open(path, mode="r+")
                same = store.attrs.get("fingerprint") == attrs.get("fingerprint")
                if existing == "resume" and same:
                    stored, wanted = store.attrs.get("layout") or {}, layout_dict(sharded(layout))
                    differ = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]
                    if differ:
                        raise StoreError(
                            f"output path {path} holds this config's run laid out differently ({', '.join(differ)}; "
                            "batch_rows is cluster.micro_batch_size, shard_batches storage.shard_batches): resume "
                            "with the settings it was started with, or pass overwrite=true to start again"
                        )
                    store.discard_partial_writes()
                    return cls(store, created=False, replaced=[])
                if existing == "resume":  # resume was asked for, and the config differs
                    changed = config_changes(store.attrs.get("config"), attrs.get("config"))
                    raise StoreError(
                        f"output path {path} already holds a run with another config"
                        f"{' (' + changed + ')' if changed else ''}: resume continues the same config only; "
                        "pass overwrite=true to replace it, or choose another storage.run"
                    )
                what = "another config" if not same else "this config"
                raise StoreError(
                    f"output path {path} already holds a run with {what}: pass resume=true to "
                    "continue it (same config only), overwrite=true to replace it, or choose another storage.run"
                )
        elif storage_fs.names(path):
            raise StoreError(f"output path {path} exists and is not a lens store: choose another storage.run")
        return cls(LensStore.create(path, layout, attrs, vectors), created=True, replaced=replaced)

    def abandon(self) -> None:
        """Nothing was computed: leave no store behind (and an overwritten one back)."""
        if not self.created:
            return
        storage_fs.remove(self.store.path, ignore_errors=True)
        storage_fs.remove(write_log_path(self.store.path))
        for old, aside in self.replaced:
            storage_fs.move(aside, old)
        log.info("nothing computed: %s", "the replaced store is back" if self.replaced else "no store left")

    def started(self) -> None:
        """The new run is under way: the store it replaces goes."""
        for _, aside in self.replaced:
            storage_fs.remove(aside, ignore_errors=True)
        self.replaced = []


@dataclass
class FinishedBatch:
    """One micro-batch as the pipeline produced it, in its left-padded column layout."""

    input_ids: np.ndarray  # [batch, prompt_cols], left-padded
    attention_mask: np.ndarray  # [batch, prompt_cols]
    generated: np.ndarray  # [batch, steps] sampled ids (pad after a row's end)
    coefficients: np.ndarray  # [batch]
    rows: dict  # per-row arrays stored as they are: source, edit_kind, edit_coefficient
    scores: np.ndarray | None  # [batch, steps, choices] or None
    chunks: list  # LensChunks of every stage


def lay_out_batch(
    batch: FinishedBatch, layout: dict, eos_token_ids, max_new_tokens: int, gen_len=None
) -> tuple[dict, np.ndarray]:
    """The batch's arrays by row position (left pads removed): `(data, generated_lengths)`.
    `gen_len`: each row's generated length (default: through its first EOS).

    Row i's token p sits at position p of its own sequence; its lens exists at positions
    [0, length - 1) (the last token has no target)."""
    gen = batch.generated
    rows, prompt_cols = batch.input_ids.shape
    pad = (batch.attention_mask == 0).sum(1)
    if gen_len is None:
        eos = np.isin(gen, eos_token_ids)
        gen_len = np.where(eos.any(1), eos.argmax(1) + 1, gen.shape[1])
    gen_len = np.asarray(gen_len)
    length = prompt_cols - pad + gen_len
    cols = np.concatenate([batch.input_ids, gen], axis=1)
    n_pos, layers = layout["n_positions"], layout["layers"]
    tokens = np.full((rows, n_pos), -1, np.int32)
    for i in range(rows):
        tokens[i, : length[i]] = cols[i, pad[i] : pad[i] + length[i]]
    data = {
        "tokens": tokens,
        "lengths": length.astype(np.int32),
        "prompt_lengths": (prompt_cols - pad).astype(np.int32),
        "coefficient": batch.coefficients,
        **batch.rows,
    }
    if batch.scores is not None:
        scores = np.full((rows, max_new_tokens, batch.scores.shape[2]), np.nan, np.float32)
        for i in range(rows):  # a row's scores end where its generation ended
            scores[i, : gen_len[i]] = batch.scores[i, : gen_len[i]]
        data["scores"] = scores
    template = {}
    for c in batch.chunks:
        for name, arr in c.arrays.items():
            if name not in template:
                shape = (rows, len(layers), arr.shape[2], n_pos) + arr.shape[4:]
                template[name] = np.full(shape, lens_fill(name) or 0, arr.dtype)
    for c in batch.chunks:
        l0 = layers.index(c.layers[0])
        for i in range(rows):
            a, b = max(c.col_start, pad[i]), min(c.col_end, pad[i] + length[i] - 1)
            if a >= b:
                continue
            for name, arr in c.arrays.items():
                template[name][i, l0 : l0 + len(c.layers), :, a - pad[i] : b - pad[i]] = arr[
                    i, :, :, a - c.col_start : b - c.col_start
                ]
    data.update(template)
    if "topk_ids" in template:
        data["lens_mask"] = (template["topk_ids"][:, :, :, :, 0] >= 0).any(axis=(1, 2))
    return data, gen_len
