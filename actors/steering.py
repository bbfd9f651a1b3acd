"""Steering edits, per row: every row of a run carries its own edits (vector index, layer, site,
positions, coefficient) into the run's small vector table, which each stage receives once. A
coefficient sweep, a packed multi-dataset study and a transfer matrix are all row layouts.

The edit is `h += coefficient * vector` at `site` of `layer`, on `positions`: all, prompt,
generated, last (the last prompt token), or an int i (positions >= i of the row's own tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.vocabulary import STEERING_POSITIONS, STEERING_SITES


def _check_where(site: str, positions) -> None:
    if site not in STEERING_SITES:
        raise ValueError(f"unknown steering site {site!r}: choose one of {list(STEERING_SITES)}")
    if isinstance(positions, bool) or not (isinstance(positions, int) or positions in STEERING_POSITIONS):
        raise ValueError(f"steering positions={positions!r}: choose one of {list(STEERING_POSITIONS)} or an int index")
    if isinstance(positions, int) and positions < 0:
        raise ValueError(
            f"steering positions={positions} is negative: an int i steers every position >= i "
            "(counted from the prompt's first token, 0 = all); for the last prompt token use 'last'"
        )


@dataclass(frozen=True)
class SteeringEdit:
    """One edit every row carries, its vector inline; a sweep multiplies `coefficient` by each
    row's sweep coefficient."""

    layer: int
    site: str
    vector: np.ndarray  # [d_model] float32
    positions: str | int = "all"
    coefficient: float = 1.0

    def __post_init__(self):
        _check_where(self.site, self.positions)


@dataclass(frozen=True)
class RowEdit:
    """One edit of one row: `vector` indexes the run's vector table."""

    vector: int
    layer: int
    site: str
    positions: str | int = "all"
    coefficient: float = 1.0

    def __post_init__(self):
        _check_where(self.site, self.positions)

    @property
    def kind(self) -> tuple:
        """What the edit adds where, without its coefficient."""
        return (self.vector, self.layer, self.site, self.positions)


@dataclass(frozen=True, eq=False)
class VectorEdit:
    """One row's edit carrying its own vector (a served request's: its vectors are not in a
    table the stages received at set-up)."""

    values: np.ndarray  # [d_model] float32
    layer: int
    site: str
    positions: str | int = "all"
    coefficient: float = 1.0

    def __post_init__(self):
        _check_where(self.site, self.positions)


class RowLayout:
    """A run's rows: which prompt each row runs, with which edits, and the coefficient recorded
    for it, read a range of rows at a time (`sources`, `edits`, `coefficients` of a slice of
    rows). `SweepRows` computes them from the row number; `ListedRows` holds them as listed."""

    vectors: np.ndarray  # [n_vectors, d_model] float32, the table every stage holds
    n_rows: int
    edit_sets: tuple  # every distinct row's edits (a sweep: one per coefficient)

    def __len__(self) -> int:
        return self.n_rows

    @property
    def steered(self) -> tuple[tuple[int, str], ...]:
        """Every (layer, site) some row edits: where the stages hook."""
        return tuple(sorted({(e.layer, e.site) for row in self.edit_sets for e in row}))

    @property
    def kinds(self) -> tuple[tuple, ...]:
        """The distinct (vector, layer, site, positions) of the run's edits, in first-use order."""
        return tuple(dict.fromkeys(e.kind for row in self.edit_sets for e in row))

    @property
    def n_edits(self) -> int:
        """The most edits a row carries."""
        return max((len(e) for e in self.edit_sets), default=0)


class SweepRows(RowLayout):
    """The sweep shorthand: prompt p runs as rows p*M .. p*M + M-1, one per coefficient of the
    sweep (M of them), each carrying every edit scaled by it. Nothing is held per row."""

    def __init__(self, vectors, n_prompts: int, sweep: np.ndarray, per_coefficient: tuple):
        self.vectors, self.sweep, self.per_coefficient = vectors, sweep, per_coefficient
        self.n_rows, self.edit_sets = n_prompts * len(sweep), per_coefficient

    @property
    def one_per_prompt(self) -> bool:
        """Row i runs prompt i, for every row."""
        return len(self.sweep) == 1

    def sources(self, rows: slice) -> np.ndarray:
        return np.arange(rows.start, rows.stop) // len(self.sweep)

    def source(self, row: int) -> int:
        return row // len(self.sweep)

    def edits(self, rows: slice) -> tuple:
        return tuple(self.per_coefficient[r % len(self.sweep)] for r in range(rows.start, rows.stop))

    def coefficients(self, rows: slice) -> np.ndarray:
        return self.sweep[np.arange(rows.start, rows.stop) % len(self.sweep)]


class ListedRows(RowLayout):
    """`steering.rows`: each row `(prompt index, (RowEdit, ...))`, held as given (the config holds
    them too); a row's recorded coefficient is its first edit's (0 without edits)."""

    def __init__(self, vectors, listed, n_prompts: int):
        self.vectors, self.n_prompts = vectors, n_prompts
        self._sources = np.asarray([p for p, _ in listed], np.int64)
        self._edits = tuple(tuple(e) for _, e in listed)
        self._first = np.asarray([e[0].coefficient if e else 0.0 for e in self._edits], np.float32)
        self.n_rows, self.edit_sets = len(self._edits), self._edits

    @property
    def one_per_prompt(self) -> bool:
        """Row i runs prompt i, for every row and every prompt (rows of only some prompts: no)."""
        return bool(np.array_equal(self._sources, np.arange(self.n_prompts)))

    def sources(self, rows: slice) -> np.ndarray:
        return self._sources[rows]

    def source(self, row: int) -> int:
        return int(self._sources[row])

    def edits(self, rows: slice) -> tuple:
        return self._edits[rows]

    def coefficients(self, rows: slice) -> np.ndarray:
        return self._first[rows]


def row_layout(n_prompts: int, edits=(), coefficients=None, vectors=None, rows=None, hidden: int | None = None):
    """The rows of a run. Either `rows` (each `(prompt index, (RowEdit, ...))`) over the table
    `vectors` [n, d_model], or the sweep shorthand: every prompt once per coefficient of
    `coefficients` (once when None), carrying every `SteeringEdit` of `edits` scaled by it."""
    if rows is not None:
        if edits or coefficients:
            raise ValueError("steering.rows replaces steering.edits and steering.coefficients: give one or the other")
        table = np.zeros((0, hidden or 0), np.float32) if vectors is None else np.asarray(vectors, np.float32)
        if table.ndim != 2:
            raise ValueError(f"steering.vectors has shape {table.shape}; expected [n_vectors, d_model]")
        for r, (prompt, row_edits) in enumerate(rows):
            if not 0 <= prompt < n_prompts:
                raise ValueError(f"steering.rows[{r}] runs prompt {prompt}; there are {n_prompts} prompts")
            for e in row_edits:
                if not 0 <= e.vector < len(table):
                    raise ValueError(
                        f"steering.rows[{r}] uses vector {e.vector}; the table has {len(table)} (0..{len(table) - 1})"
                    )
        return ListedRows(table, rows, n_prompts)
    sweep = np.asarray(coefficients or (1.0,), np.float32)
    table = np.stack([np.asarray(e.vector, np.float32) for e in edits]) if edits else np.zeros((0, hidden or 0))
    per_coefficient = tuple(
        tuple(
            RowEdit(v, e.layer, e.site, e.positions, float(np.float32(e.coefficient) * c)) for v, e in enumerate(edits)
        )
        for c in sweep
    )
    return SweepRows(table.astype(np.float32), n_prompts, sweep, per_coefficient)


def first_column(positions, prompt_cols: int, pad: int) -> int:
    """The first left-padded column an edit on `positions` can touch in a micro-batch of
    `prompt_cols` prompt columns whose shortest row has `pad` left pads."""
    if isinstance(positions, int):
        return pad + positions
    return {"all": 0, "prompt": 0, "last": prompt_cols - 1, "generated": prompt_cols}[positions]


def edit_terms(row_edits, table, keys, device=None) -> dict:
    """A micro-batch's edits at the hooks `keys` ((layer, site) pairs), as
    `{key: [(positions, per_row [batch, d_model] float32), ...]}`: per row, the sum of
    coefficient x vector over its edits there with those positions. Built once per micro-batch;
    a hook adds `mask(positions) * per_row` for each entry."""
    import torch

    wanted = set(keys)
    by_where: dict = {}
    for r, edits in enumerate(row_edits):
        for e in edits:
            if (e.layer, e.site) in wanted:
                by_where.setdefault((e.layer, e.site, e.positions), []).append((r, e))
    terms: dict = {}
    for (layer, site, positions), entries in by_where.items():
        per_row = _table_terms([(r, e) for r, e in entries if isinstance(e, RowEdit)], len(row_edits), table)
        for r, e in entries:  # VectorEdits: c * v in float32, each on its own row
            if not isinstance(e, RowEdit):
                values = torch.as_tensor(np.asarray(e.values, np.float32))
                if per_row is None:
                    per_row = torch.zeros(len(row_edits), len(values), dtype=torch.float32)
                per_row[r] += (torch.tensor(e.coefficient, dtype=torch.float32) * values).to(per_row.device)
        terms.setdefault((layer, site), []).append((positions, per_row if device is None else per_row.to(device)))
    return terms


def _table_terms(entries: list, rows: int, table):
    """[rows, d_model] the sum of coefficient x table vector of each row's RowEdits, or None."""
    import torch

    if not entries:
        return None
    coef = torch.zeros(rows, table.shape[0], dtype=torch.float32)
    for r, e in entries:
        coef[r, e.vector] += e.coefficient
    # A row with one edit here gets c * v exactly: its other coefficients are zeros.
    return (coef.to(table.device) @ table).clone()
