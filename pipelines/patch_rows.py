"""The rows of `python -m pipelines.patch`: prompts with their interventions, from a JSONL file (one
object a line) or given inline, read and checked here, each refusal one line naming the
file:line (or rows[i]), the field and what is valid.

A row: `{"prompt": text, "edits": [edit, ...], "targets": [text, ...]?}`. An edit:
`{"op": patch|ablate|scale|add, "layer", "site", "positions"?, "coefficient"?, "source"?,
"align"?, "values"?}`: `source` is another row's index (its activations are copied, that row
runs first); `values` is a `.npy` file, or `{"store": <lens.zarr>, "row": i}`, the activations an
earlier lens run stored (`capture.activations`) at this edit's layer and site."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actors.interventions import OPS, Intervention, PatchSource
from pipelines.config import ConfigError
from pipelines.datasets import jsonl_records

ROW_FIELDS = ("prompt", "edits", "targets")
EDIT_FIELDS = ("op", "layer", "site", "positions", "coefficient", "source", "align", "values")


def read_rows(source) -> list[tuple[str, dict]]:
    """[(where, row object)] from a JSONL path or an inline list."""
    if source is None or source == "" or (not isinstance(source, str) and not len(source)):
        raise ConfigError('rows is not set: give a JSONL file (rows=rows.jsonl, one {"prompt", "edits"} a line)')
    if not isinstance(source, str):
        return [(f"rows[{i}]", _plain(r)) for i, r in enumerate(source)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"rows={source!r}: no such file")
    out = jsonl_records(path)
    if not out:
        raise ConfigError(f"rows={source!r} holds no row")
    return out


def _plain(value):
    """An OmegaConf node (inline rows) as plain dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def row_edits(rows: list[tuple[str, dict]], n_layers: int, d_model: int) -> list[tuple]:
    """Each row's edits as actors' Interventions, with a PatchSource on every row another row copies
    from."""
    edits, sources = [], set()
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError(f"{where}: field 'prompt' needs non-empty text")
        unknown = sorted(set(row) - set(ROW_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}: valid fields are {list(ROW_FIELDS)}")
        if not isinstance(row.get("edits", []), list):
            raise ConfigError(f"{where}: field 'edits' needs a list of edits")
        mine = []
        for e, spec in enumerate(row.get("edits", [])):
            edit = _edit(f"{where}: edits[{e}]", spec, len(rows), n_layers, d_model)
            if getattr(edit, "source", None) is not None:
                sources.add(edit.source)
            mine.append(edit)
        edits.append(mine)
    return [tuple(([PatchSource(r)] if r in sources else []) + mine) for r, mine in enumerate(edits)]


def _edit(where: str, spec, n_rows: int, n_layers: int, d_model: int):
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected an object with fields {list(EDIT_FIELDS)}")
    unknown = sorted(set(spec) - set(EDIT_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}: valid fields are {list(EDIT_FIELDS)}")
    op, layer, site = spec.get("op"), spec.get("layer"), spec.get("site")
    if op not in (*OPS, "add"):
        raise ConfigError(f"{where}: op={op!r}: choose one of {[*OPS, 'add']}")
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ConfigError(f"{where}: layer={layer!r} is out of range: valid is 0..{n_layers - 1}")
    source = spec.get("source")
    if source is not None and (not isinstance(source, int) or not 0 <= source < n_rows):
        raise ConfigError(f"{where}: patch source={source!r} is out of range: rows are 0..{n_rows - 1}")
    values = None if spec.get("values") is None else _values(where, spec["values"], op, layer, site, d_model)
    coefficient = spec.get("coefficient", 1.0)
    if isinstance(coefficient, bool) or not isinstance(coefficient, int | float):
        raise ConfigError(f"{where}: coefficient={coefficient!r}: give a number")
    try:
        return Intervention(
            op, layer, site, spec.get("positions", "all"), float(coefficient), values=values, source=source,
            align=spec.get("align", "start"),
        )  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _values(where: str, values, op: str, layer: int, site: str, d_model: int) -> np.ndarray:
    """A `.npy` file's array, or an earlier lens run's stored activations at (layer, site)."""
    if isinstance(values, str):
        try:
            array = np.load(Path(values).expanduser(), allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where}: values={values!r} is not a readable .npy file ({err})") from None
    elif isinstance(values, dict) and set(values) == {"store", "row"}:
        array = _stored(where, values["store"], values["row"], layer, site)
    else:
        raise ConfigError(f"{where}: values={values!r}: give a .npy file or {{store: <lens.zarr>, row: i}}")
    want = (d_model,) if op in ("ablate", "add") else (None, d_model)
    if array.ndim != len(want) or array.shape[-1] != d_model:
        shape = "[d_model]" if len(want) == 1 else "[positions, d_model]"
        raise ConfigError(f"{where}: values have shape {list(array.shape)}; {op} needs {shape} with d_model={d_model}")
    return array


def _stored(where: str, store: str, row, layer: int, site: str) -> np.ndarray:
    from actors.store import LensStore, StoreError

    try:
        lens = LensStore.open(store)
        n = lens.group["tokens"].shape[0]
        if not isinstance(row, int) or not 0 <= row < n:
            raise ConfigError(f"{where}: values row={row!r} is out of range: the store has rows 0..{n - 1}")
        if layer not in lens.layers or site not in lens.components:
            raise ConfigError(
                f"{where}: the store holds layers {lens.layers} and sites {lens.components}, not layer {layer} {site}"
            )
        values = lens.activations(row)[lens.layers.index(layer), lens.components.index(site)]
    except StoreError as err:
        raise ConfigError(f"{where}: {err}") from None
    return np.asarray(values.float() if hasattr(values, "float") else values, np.float32)
