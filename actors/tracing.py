"""Interventions and causal traces on the pipeline stages, driven from the driver's process.

Rows (prompts with their edits, actors/interventions.py) run one forward through the stages in
micro-batches and come back as, at each row's last prompt position, the logits of a few chosen
tokens, the log-normaliser and the greedy next token: never the vocabulary. Rows carrying a
`PatchSource` are put first, so a source runs before (or beside) every row it feeds.

A causal trace's cells (pair, site, layer, position) are rows: the pair's corrupted prompt with
the clean row's activation restored at that one place. A pair's first micro-batch runs its clean
row (the patch source) and its corrupted row through every stage; a cell patched at a layer of
stage s then takes the corrupted row's input to stage s from that micro-batch (the stages before
s would compute exactly it again), so it runs stages s.. only. Every call is submitted without
waiting; on Ray a pair's micro-batches overlap across the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.interventions import Intervention, KLReference, KLTo, PatchSource, check_width
from actors.run_state import left_pad
from actors.sampling import SamplingSpec
from actors.stage import StageSpec
from actors.stage_group import StageGroup


@dataclass(frozen=True)
class TracePair:
    clean: tuple  # token ids
    corrupt: tuple  # token ids, as many as clean
    target: int
    foil: int | None = None


@dataclass
class RowScores:
    scores: np.ndarray  # [rows, n score ids] logits at the last prompt position
    logz: np.ndarray  # [rows] logsumexp of that position's logits: log-prob = score - logz
    next_token: np.ndarray  # [rows] the greedy next token
    token_logprob: list = field(default_factory=list)  # [rows] each [positions]: log p(next token) (sequence_scores)
    kl: list = field(default_factory=list)  # [rows] each [positions]: KL(reference || row), NaN without one


class InterventionRunner:
    """Stages of the checkpoint at `model_path` (HF config `hf_config`) on `executor`, hooked at
    `sites` (every (layer, site) pair an intervention may touch) and reporting the logits of
    `score_ids`. `micro_batch`: rows per micro-batch. `sequence_scores`: the last stage also
    reports each position's next-token log-prob and KL to a reference row (KLReference, KLTo)."""

    def __init__(
        self, model_path, hf_config, num_stages: int, executor, sites, score_ids, micro_batch: int = 16,
        dtype: str = "float32", device: str = "cpu", pad_id: int = 0, sequence_scores: bool = False,
    ):  # fmt: skip
        from actors.slicing import plan_stages

        self.config, self.pad_id, self.micro_batch = hf_config, pad_id, micro_batch
        self.n_layers, self.d_model = hf_config.num_hidden_layers, hf_config.hidden_size
        self.score_ids = tuple(int(i) for i in score_ids)
        check_sites(hf_config, sites)
        self.bounds = plan_stages(hf_config, num_stages)
        n = len(self.bounds)
        steered = tuple(sorted({(int(layer), site) for layer, site in sites}))
        self.sites = set(steered)
        specs = [
            StageSpec(
                s, n, a, b, str(model_path), dtype=dtype, device=device, steered=steered,
                score_ids=self.score_ids, sampling=SamplingSpec(pad_token_id=pad_id), sequence_scores=sequence_scores,
            )
            for s, (a, b) in enumerate(self.bounds)
        ]  # fmt: skip
        self.executor = executor
        self.stages = StageGroup(executor, specs)
        self.stages.setup()
        self._next_mb = 0

    def stage_of(self, layer: int) -> int:
        return next(s for s, (a, b) in enumerate(self.bounds) if a <= layer < b)

    def _submit(self, ids: np.ndarray, mask: np.ndarray, edits, first: int = 0, upstream=None, rows=None):
        """One micro-batch through stages `first..`: (each stage's output handle, every call)."""
        mb, self._next_mb = self._next_mb, self._next_mb + 1
        stages = range(first, self.stages.num_stages)
        calls = self.stages.start(stages, mb, mask, "all", list(edits))
        outs, x = [], upstream
        for s in stages:
            x, chunks = self.stages.step(s, mb, ids, x, rows if s == first else None)
            outs.append(x)
            calls += chunks
        return outs, calls + self.stages.finish(mb, x, stages)

    def _wait(self, calls: list) -> None:
        for call in calls:
            self.executor.get(call)

    def _scores(self, handle, mask=None) -> RowScores:
        """The last stage's output; with `mask` [rows, cols] (left-padded), the per-position
        readout cut to each row's own positions."""
        out = self.executor.get(handle)
        n = len(out["tokens"])
        got = RowScores(
            np.asarray(out.get("scores", np.zeros((n, 0)))), np.asarray(out.get("score_logz", np.zeros(n))),
            np.asarray(out["tokens"]),
        )  # fmt: skip
        if mask is not None and "kl" in out:
            got.token_logprob = [np.asarray(v)[m.astype(bool)] for v, m in zip(out["token_logprob"], mask)]
            got.kl = [np.asarray(v)[m.astype(bool)] for v, m in zip(out["kl"], mask)]
        return got

    # -- rows with any edits --------------------------------------------------------------------
    def run_rows(self, prompts: list, edits: list) -> RowScores:
        """Every row `prompts[i]` (token ids) with its edits `edits[i]` (Interventions, a
        PatchSource, steering VectorEdits), left-padded in micro-batches, source rows first."""
        if len(edits) != len(prompts):
            raise ValueError(f"edits are given for {len(edits)} rows; there are {len(prompts)} prompts")
        self._check_rows(edits)
        order = sorted(
            range(len(prompts)), key=lambda r: not any(isinstance(e, PatchSource | KLReference) for e in edits[r])
        )
        handles, calls = [], []
        for lo in range(0, len(order), self.micro_batch):
            rows = order[lo : lo + self.micro_batch]
            ids, mask = left_pad([prompts[r] for r in rows], self.pad_id)
            outs, more = self._submit(ids, mask, [tuple(edits[r]) for r in rows])
            handles.append((rows, outs[-1], mask))
            calls += more
        try:
            self._wait(calls)
            n = len(prompts)
            result = RowScores(
                np.zeros((n, len(self.score_ids)), np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64),
                [None] * n, [None] * n,
            )  # fmt: skip
            for rows, handle, mask in handles:
                got = self._scores(handle, mask)
                result.scores[rows], result.logz[rows], result.next_token[rows] = got.scores, got.logz, got.next_token
                for i, r in enumerate(rows):
                    if got.kl:
                        result.token_logprob[r], result.kl[r] = got.token_logprob[i], got.kl[i]
            return result
        finally:
            self._wait(self.stages.drop_patch_sources())

    def _check_rows(self, edits) -> None:
        refs = [e.key for row in edits for e in row if isinstance(e, KLReference)]
        if len(refs) != len(set(refs)):
            raise ValueError(f"KL reference keys are carried by more than one row: {sorted(refs)}")
        for r, row in enumerate(edits):
            if sum(isinstance(e, KLReference | KLTo) for e in row) > 1:
                raise ValueError(f"rows[{r}] carries more than one KLReference/KLTo: a row is a reference or compared")
            for e in row:
                if isinstance(e, KLTo) and e.key not in refs:
                    raise ValueError(f"rows[{r}]: KL reference {e.key} is out of range: no row carries it")
        keys = [e.key for row in edits for e in row if isinstance(e, PatchSource)]
        for r, row in enumerate(edits):
            ivs = [e for e in row if isinstance(e, Intervention)]
            check_width(ivs, self.d_model, f"rows[{r}]")
            for iv in ivs:
                if not 0 <= iv.layer < self.n_layers:
                    raise ValueError(
                        f"rows[{r}]: intervention layer {iv.layer} is out of range: 0..{self.n_layers - 1}"
                    )
                if (iv.layer, iv.site) not in self.sites:  # no hook there: the edit would do nothing
                    raise ValueError(
                        f"rows[{r}]: an intervention at layer {iv.layer} {iv.site}, where these stages have no hook "
                        f"(they hook {sorted(self.sites)}): give that (layer, site) in `sites`"
                    )
                if iv.source is not None and iv.source not in keys:
                    raise ValueError(
                        f"rows[{r}]: patch source {iv.source} is out of range: no row carries it "
                        f"(sources: {sorted(set(keys))})"
                    )
        if len(keys) != len(set(keys)):
            raise ValueError(f"patch source keys are carried by more than one row: {sorted(keys)}")

    # -- causal tracing -------------------------------------------------------------------------
    def trace_pair(self, pair: TracePair, key: int, sites, layers, one_at_a_time: bool = False) -> dict:
        """Every cell (site, layer, position) of one pair: the corrupted prompt with the clean
        activation restored there. Returns {"target" [S, L, P] log-probs, "foil" (or None),
        "clean", "corrupt" (log-probs of target and foil at the unpatched runs), "cells" run}.
        `one_at_a_time`: each cell its own pass of one row through every stage, waited for
        before the next (the benchmark's baseline: a run per cell, the clean source kept)."""
        n_pos = len(pair.corrupt)
        ids = np.asarray([pair.clean, pair.corrupt], np.int64)
        outs, calls = self._submit(ids, np.ones_like(ids), [(PatchSource(key),), ()])
        base = outs[-1]
        cells = [(s, la, p) for s in range(len(sites)) for la in range(len(layers)) for p in range(n_pos)]
        by_stage: dict = {}
        for cell in cells:
            by_stage.setdefault(self.stage_of(layers[cell[1]]), []).append(cell)
        handles = []
        for first in sorted(by_stage):
            group = by_stage[first]
            size = 1 if one_at_a_time else self.micro_batch
            for lo in range(0, len(group), size):
                chunk = group[lo : lo + size]
                edits = [(Intervention("patch", layers[la], sites[s], (p,), source=key),) for s, la, p in chunk]
                cell_ids = np.repeat(ids[1:], len(chunk), axis=0)
                start = 0 if one_at_a_time else first  # one at a time: every stage, from the tokens
                upstream, rows = (outs[start - 1], [1] * len(chunk)) if start else (None, None)
                cell_outs, more = self._submit(cell_ids, np.ones_like(cell_ids), edits, start, upstream, rows)
                handles.append((chunk, cell_outs[-1]))
                calls += more
                if one_at_a_time:
                    self._wait(more)
        try:
            self._wait(calls)
            t, f = self.score_ids.index(pair.target), None if pair.foil is None else self.score_ids.index(pair.foil)
            got = self._scores(base)
            out = {
                "clean": _logprobs(got, 0, t, f), "corrupt": _logprobs(got, 1, t, f), "cells": len(cells),
                "target": np.full((len(sites), len(layers), n_pos), np.nan, np.float32),
                "foil": None if f is None else np.full((len(sites), len(layers), n_pos), np.nan, np.float32),
            }  # fmt: skip
            for chunk, handle in handles:
                got = self._scores(handle)
                for i, (s, la, p) in enumerate(chunk):
                    target, foil = _logprobs(got, i, t, f)
                    out["target"][s, la, p] = target
                    if f is not None:
                        out["foil"][s, la, p] = foil
            return out
        finally:
            self._wait(self.stages.drop_patch_sources())

    def close(self) -> None:
        self.executor.shutdown()


def check_sites(hf_config, sites) -> None:
    """Every (layer, site) is a site this model family has (`adapters`), at a layer it has."""
    from actors.adapters import adapter_for

    have = adapter_for(hf_config.model_type).sites_for(hf_config)
    for layer, site in sites:
        if site not in have:
            raise ValueError(
                f"site {site!r} is not available for model family {hf_config.model_type!r}: it has {sorted(have)}"
            )
        if not 0 <= layer < hf_config.num_hidden_layers:
            raise ValueError(f"layer {layer} is out of range: valid is 0..{hf_config.num_hidden_layers - 1}")


def _logprobs(got: RowScores, row: int, target: int, foil: int | None) -> tuple:
    lp = got.scores[row] - got.logz[row]
    return float(lp[target]), None if foil is None else float(lp[foil])
