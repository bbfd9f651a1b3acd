"""Causal interventions as row edits, next to steering's `h += c * v` (actors/steering.py): a row
carries `Intervention`s (patch, ablate, scale), each applied at a (layer, site, positions) hook
by the stage that owns the layer; a row carrying `PatchSource(key)` lends its activations to the
rows that patch from `key`. A row carrying `KLReference(key)` keeps its next-token distributions on
the last stage, and a row carrying `KLTo(key)` reports KL(reference || itself) at each position
(`sequence_scores`: with each position's log-prob of the row's next token, for perplexity).

- `scale`: h <- c * h.
- `add`: h <- h + c * `values` [d_model] (steering, at any site and any set of positions).
- `ablate`: h <- 0, or h <- `values` [d_model] (e.g. the mean over a reference set of rows).
- `patch` from stored values: h[p] <- `values`[p] [positions, d_model], the row's own positions
  (an activation array of an earlier run); from a row: h[p] <- the source row's activation at
  the same site, at the same position counted from the prompt's start (`align="start"`) or from
  its end (`align="end"`). A row patch touches prompt positions only.

At one hook, a row's own edits apply in the order it carries them (steering's additions after
them), then the hook records the activations of the rows that are sources (as they flow on),
then the row patches read them. A source row therefore feeds rows of its own micro-batch and of
every micro-batch its stage runs after it: the runner (actors/tracing.py) puts source rows first,
and a stage runs its calls in the order they were submitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.lens_window import capture_mask
from actors.vocabulary import INTERVENTION_SITES, STEERING_POSITIONS

OPS = ("patch", "ablate", "scale", "add")
ALIGNS = ("start", "end")


@dataclass(frozen=True)
class PatchSource:
    """This row's activations at every intervened (layer, site) are patch source `key`."""

    key: int


@dataclass(frozen=True, eq=False)
class Intervention:
    op: str  # one of OPS
    layer: int
    site: str
    positions: object = "all"  # all, prompt, generated, last, an int i (>= i) or a tuple of positions
    coefficient: float = 1.0  # scale's factor; add's multiplier
    values: np.ndarray | None = None  # ablate, add: [d_model] (ablate: None = zero); patch: [positions, d_model]
    source: int | None = None  # patch: the key of the PatchSource row it copies
    align: str = "start"  # patch from a row: positions counted from the prompt's start or end

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"intervention op={self.op!r}: choose one of {list(OPS)}")
        if self.site not in INTERVENTION_SITES:
            raise ValueError(
                f"intervention site={self.site!r}: choose one of {list(INTERVENTION_SITES)} (resid_mid is read after "
                "the layer keeps its residual: an edit there reaches the MLP's input only; use mlp_in)"
            )
        if self.align not in ALIGNS:
            raise ValueError(f"intervention align={self.align!r}: choose one of {list(ALIGNS)}")
        p = self.positions
        if isinstance(p, (list, tuple)):
            if not p or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in p):
                raise ValueError(f"intervention positions={list(p)}: a list of positions needs ints >= 0")
            object.__setattr__(self, "positions", tuple(int(i) for i in p))
        elif isinstance(p, bool) or not (isinstance(p, int) and p >= 0 or p in STEERING_POSITIONS):
            raise ValueError(
                f"intervention positions={p!r}: choose one of {list(STEERING_POSITIONS)}, an int i >= 0 "
                "(every position >= i) or a list of positions"
            )
        if self.op == "patch" and (self.values is None) == (self.source is None):
            raise ValueError("a patch copies either stored `values` or a `source` row: give exactly one")
        if self.op != "patch" and self.source is not None:
            raise ValueError(f"source={self.source} belongs to a patch; op={self.op!r} takes none")
        if self.source is not None and self.positions == "generated":
            raise ValueError("a patch from a row touches prompt positions only: positions='generated' has none")
        if self.op == "add" and self.values is None:
            raise ValueError("an add needs `values`: a [d_model] vector")
        if self.values is not None:
            values = np.asarray(self.values, np.float32)
            want = 2 if self.op == "patch" else 1
            if values.ndim != want:
                shape = "[d_model]" if want == 1 else "[positions, d_model]"
                raise ValueError(f"{self.op} values have shape {list(values.shape)}; expected {shape}")
            object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class KLReference:
    """This row's next-token distributions are reference `key` (kept on the last stage)."""

    key: int


@dataclass(frozen=True)
class KLTo:
    """Report KL(reference `key` || this row) at each position (aligned from the start)."""

    key: int


MARKS = (PatchSource, KLReference, KLTo)


def check_width(interventions, d_model: int, where: str = "intervention") -> None:
    """Every stored value array is `d_model` wide."""
    for iv in interventions:
        if iv.values is not None and iv.values.shape[-1] != d_model:
            raise ValueError(
                f"{where}: {iv.op} values have shape {list(iv.values.shape)}; this model's d_model is {d_model}"
            )


def plan(row_edits, keys) -> tuple[dict, dict, dict]:
    """A micro-batch's interventions at the hooks `keys` ((layer, site) pairs):
    `({(layer, site): [(row, Intervention), ...]}, {row: source key}, {row: KLReference or KLTo})`."""
    wanted, at, sources, compare = set(keys), {}, {}, {}
    for r, edits in enumerate(row_edits or ()):
        for e in edits:
            if isinstance(e, PatchSource):
                sources[r] = e.key
            elif isinstance(e, KLReference | KLTo):
                compare[r] = e
            elif isinstance(e, Intervention) and (e.layer, e.site) in wanted:
                at.setdefault((e.layer, e.site), []).append((r, e))
    return at, sources, compare


def steering_only(row_edits):
    """Each row's steering edits (its Interventions and marks left out), or None."""
    if row_edits is None:
        return None
    return [tuple(e for e in edits if not isinstance(e, (Intervention, *MARKS))) for edits in row_edits]


def sequence_scores(hidden_logits, tokens: torch.Tensor, view, start: int, compare: dict, kept: dict) -> dict:
    """The last stage's per-position readout of one step, for a micro-batch with marked rows
    (`compare`; none: nothing is computed): `token_logprob` [batch, new], the log-prob of each
    column's next token (this step's next column; NaN at the last and at left pads), and `kl`
    [batch, new], KL(reference || row) for rows carrying `KLTo` (else NaN). A reference row's
    log-probs are kept in `kept[key]` ([positions so far, vocab], its own positions from 0).
    `hidden_logits()` gives the step's logits [batch, new, vocab]."""
    if not compare:
        return {}
    logp = torch.log_softmax(hidden_logits().float(), dim=-1)  # [batch, new, vocab]: stays on this stage
    batch, new = logp.shape[:2]
    pos = torch.arange(start, start + new)[None, :] - view.pad[:, None]  # each column's row position
    token_lp = torch.full((batch, new), float("nan"))
    if new > 1:
        token_lp[:, :-1] = logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0].cpu()
    token_lp[pos < 0] = float("nan")
    kl = torch.full((batch, new), float("nan"))
    for r, mark in compare.items():
        if isinstance(mark, KLReference):
            real = pos[r] >= 0
            before = kept.get(mark.key)
            rows = logp[r, real.to(logp.device)].cpu()
            kept[mark.key] = rows if before is None else torch.cat([before, rows])
    for r, mark in compare.items():
        if isinstance(mark, KLTo):
            ref = kept.get(mark.key)
            if ref is None:
                raise ValueError(f"KL reference {mark.key} has not run on the last stage: it must run before its rows")
            cols = torch.nonzero((pos[r] >= 0) & (pos[r] < len(ref)))[:, 0]
            p, q = ref[pos[r, cols]], logp[r, cols.to(logp.device)].cpu()
            kl[r, cols] = (p.exp() * (p - q)).sum(-1)
    return {"token_logprob": token_lp.numpy(), "kl": kl.numpy()}


def _mask(view, start: int, new: int, positions) -> torch.Tensor:
    """[batch, new] bool: the columns `positions` names on each row (left pads never)."""
    if isinstance(positions, int):
        cols = torch.arange(start, start + new)[None, :]
        return (cols - view.pad[:, None]) >= positions
    return capture_mask(view, start, start + new, positions)


def own_edits(hidden: torch.Tensor, view, start: int, entries) -> torch.Tensor:
    """`hidden` [batch, new, d] with each row's scale, ablate and stored patches applied."""
    for r, iv in entries:
        if iv.source is not None:
            continue
        cols = _mask(view, start, hidden.shape[1], iv.positions)[r]
        if not cols.any():
            continue
        h = hidden[r, cols].float()
        if iv.op == "scale":
            h = torch.tensor(iv.coefficient, dtype=torch.float32) * h
        elif iv.op == "add":
            h = h + torch.tensor(iv.coefficient, dtype=torch.float32) * torch.tensor(iv.values, device=h.device)
        elif iv.op == "ablate":
            h = torch.zeros_like(h) if iv.values is None else torch.tensor(iv.values).expand_as(h)
        else:
            pos = torch.arange(start, start + hidden.shape[1])[cols] - int(view.pad[r])
            if int(pos.max()) >= len(iv.values):
                raise ValueError(
                    f"a stored patch holds {len(iv.values)} positions; layer {iv.layer} {iv.site} of this row "
                    f"reaches position {int(pos.max())}"
                )
            h = torch.tensor(iv.values)[pos]
            empty = pos[~h.any(-1)]
            if len(empty):
                raise ValueError(
                    f"stored patch values are all zero at positions {empty.tolist()} (layer {iv.layer} {iv.site}): "
                    "the earlier run did not capture them (capture.positions); to zero a site, ablate it"
                )
        hidden[r, cols] = h.to(hidden.device, hidden.dtype)
    return hidden


def record_sources(hidden: torch.Tensor, view, start: int, key: tuple, sources: dict, store: dict) -> None:
    """Keep each source row's prompt columns of `hidden` in `store[(source key, layer, site)]`
    ([prompt length, d] in the row's own positions)."""
    cols = torch.arange(start, start + hidden.shape[1])
    for r, source in sources.items():
        length = int(view.prompt_cols - view.pad[r])
        kept = store.get((source, *key))
        if kept is None:
            kept = store[(source, *key)] = torch.zeros(length, hidden.shape[-1], dtype=hidden.dtype)
        pos = cols - int(view.pad[r])
        inside = (pos >= 0) & (pos < length)
        kept[pos[inside]] = hidden[r, inside.to(hidden.device)].detach().to("cpu", kept.dtype)


def row_patches(hidden: torch.Tensor, view, start: int, key: tuple, entries, store: dict) -> torch.Tensor:
    """`hidden` with each row patch applied from `store` (see `record_sources`)."""
    for r, iv in entries:
        if iv.source is None:
            continue
        src = store.get((iv.source, *key))
        if src is None:
            raise ValueError(
                f"patch source {iv.source} has not run at layer {key[0]} {key[1]} on this stage: "
                "a source row must run before (or beside) the rows it feeds"
            )
        length = int(view.prompt_cols - view.pad[r])
        cols = _mask(view, start, hidden.shape[1], iv.positions)[r]
        pos = torch.arange(start, start + hidden.shape[1]) - int(view.pad[r])
        cols &= pos < length
        if not cols.any():
            continue
        src_pos = pos[cols] if iv.align == "start" else pos[cols] + (len(src) - length)
        if int(src_pos.min()) < 0 or int(src_pos.max()) >= len(src):
            raise ValueError(
                f"patch source {iv.source} has {len(src)} prompt positions; aligned from the {iv.align}, "
                f"this row (prompt length {length}) needs position {int(src_pos.max() if src_pos.max() >= len(src) else src_pos.min())}"
            )
        hidden[r, cols] = src[src_pos].to(hidden.device, hidden.dtype)
    return hidden
