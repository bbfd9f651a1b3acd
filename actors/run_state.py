"""One run's state, from its plan to its summary. The plan is made before any stage starts:
the run's rows (each prompt times its edits), checked against the model; its micro-batches
(and which of their columns and stages rows of one prompt share); its store, opened with its
layout and attributes; and every stage's spec. The coordinator then adds the stages, the
tokenizer and the progress bar, writes each finished micro-batch through `RunState.write`, and
records `RunState.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from actors.run_spec import RunSpec, SettingError, captured_layers, check_run, stage_capture
from actors.run_store import FinishedBatch, RunStore, lay_out_batch
from actors.slicing import plan_stages
from actors.stage import StageSpec
from actors.steering import first_column, row_layout
from actors.store import StoreLayout

if TYPE_CHECKING:
    from actors.progress import StageStats
    from actors.stage_group import StageGroup


def left_pad(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) [rows, longest prompt], int64: each prompt at the right end of its
    row, so every row's next token is the last column."""
    cols = max(len(p) for p in prompts)
    ids = np.full((len(prompts), cols), pad_id, np.int64)
    mask = np.zeros((len(prompts), cols), np.int64)
    for i, p in enumerate(prompts):
        ids[i, cols - len(p) :], mask[i, cols - len(p) :] = p, 1
    return ids, mask


class RowPrompts:
    """Each row's prompt token ids where rows repeat prompts (a sweep): `prompts[sources[row]]`,
    without a copy per row."""

    def __init__(self, prompts, sources: np.ndarray):
        self.prompts, self.sources = prompts, sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int):
        return self.prompts[int(self.sources[row])]

    def __iter__(self):
        return (self.prompts[int(p)] for p in self.sources)


@dataclass(slots=True)  # a corpus run has a MicroBatch per micro_batch_size rows: kept small
class MicroBatch:
    """Rows `rows` of the run, one store batch. Its left-padded prompt ids are made from the
    run's prompts when first needed and dropped, with its steps, once it is written (`release`):
    a run holds only its unfinished batches' arrays, whatever its rows."""

    index: int
    rows: slice
    prompts: object  # the run's prompt token ids by row (RunState.prompts)
    pad_id: int
    coefficients: np.ndarray  # [batch] the recorded steering coefficient of each row
    edits: tuple = ()  # [batch] each row's RowEdits
    steps: int = 0
    generated: list = field(default_factory=list)  # [batch] arrays, one per step
    last: object = None  # handle of the last stage's latest step output
    scores: list = field(default_factory=list)  # [batch, len(score_ids)] per generated step
    calls: list = field(default_factory=list)  # handles of its stage calls (lens chunks and acks), every rank
    counted: int = 0  # progress-bar units counted for this micro-batch
    gen_len: np.ndarray | None = None  # [batch] each row's generated length once it ended, 0 before
    _padded: tuple | None = field(default=None, repr=False)

    @property
    def input_ids(self) -> np.ndarray:
        """[batch, prompt_cols] the rows' prompts, left-padded: every row's next token is the last column."""
        return self._pad()[0]

    @property
    def attention_mask(self) -> np.ndarray:
        """[batch, prompt_cols] 1 on prompt tokens, 0 on padding."""
        return self._pad()[1]

    def _pad(self) -> tuple:
        if self._padded is None:
            self._padded = left_pad([self.prompts[r] for r in range(self.rows.start, self.rows.stop)], self.pad_id)
        return self._padded

    def release(self) -> None:
        """Written: let go of what only generating it needed (its padded ids, steps, lengths and
        handles), allocating nothing in their place (a rerun makes them anew): small objects made
        per batch and kept to the run's end would pin the allocator's pages between the batches'
        large transient arrays, and the driver would grow with the rows."""
        self._padded = self.last = self.gen_len = None
        self.generated = self.scores = self.calls = ()


@dataclass
class RunState:
    """One run's state: its plan (made by `plan_run`) and what the coordinator adds as the run goes."""

    prompts: list  # [rows] token ids, a prompt once per row that runs it
    prompt_texts: list | None  # the prompts' texts (by prompt, not row), or None: decoded
    sources: np.ndarray  # [rows] the prompt each row runs
    row_arrays: dict  # what the store records of each row's steering (`_edit_arrays`)
    bounds: list  # [(start, end)] each stage's layers
    specs: list  # the StageSpec of every stage and rank
    run_store: RunStore
    micro_batches: list  # every MicroBatch of the run
    todo: list  # the micro-batches not yet in the store
    ends: list  # [rows] each row's stop conditions (actors/stopping.RowEnd)
    stages: StageGroup | None = None
    tokenizer: object = None  # None also when the checkpoint has none
    bar: object = None  # the progress bar
    stats: StageStats | None = None
    batching: dict = field(default_factory=dict)  # the summary's batching figures (row-steps computed, useful)
    generated_tokens: int = 0  # tokens generated by the rows written so far (this run, not resumed ones)
    positions_written: int = 0  # their stored positions (prompt and generated)

    @property
    def n_steps(self) -> int:
        """The most tokens any row may generate (the store's `n_steps`)."""
        return max(end.budget for end in self.ends)

    def ended(self, row: int, generated: list[int]) -> bool:
        """Whether row `row`'s generation ends with `generated` (its ids so far)."""
        return self.ends[row].ended(generated, self.tokenizer)

    @property
    def store(self):
        return self.run_store.store

    def summary(self, t0: float, t_loaded: float, t_done: float, restarts: int, ray_cluster) -> dict:
        """What the run did (recorded in the store, returned by `Coordinator.run`): the clock at
        the start, once loaded and when done, the stage restarts and the Ray cluster the driver
        joined (None outside Ray)."""
        stage_info = self.stages.info()
        n_new, n_pos = self.generated_tokens, self.positions_written
        decode_s = t_done - t_loaded
        return {
            "store": str(self.store.path),
            "stages": [list(b) for b in self.bounds],
            "batches_run": [mb.index for mb in self.todo],
            "generated_tokens": n_new,
            "positions": n_pos,
            "load_s": round(t_loaded - t0, 3),
            "generate_s": round(decode_s, 3),
            "tokens_per_s": round(n_new / decode_s, 3) if decode_s else None,
            "positions_per_s": round(n_pos / decode_s, 3) if decode_s else None,
            "stage_restarts": restarts,
            "stage_info": stage_info,
            "ray_cluster": ray_cluster,
            **self.batching,
        }

    def write(self, mb: MicroBatch, chunks, generation, generated=None, scores=None) -> None:
        """Lay one micro-batch out by row position, write it whole, count its tokens and
        positions, and release it. `generation`: the run's GenerationSettings; `generated`
        [batch, steps] and `scores` [batch, steps, n] (default: the micro-batch's own steps);
        `mb.gen_len` each row's generated length."""
        store, prompt_texts = self.store, self.prompt_texts
        if generated is None:
            generated = np.stack(mb.generated, axis=1)
            scores = np.stack(mb.scores, axis=1) if mb.scores else None
        finished = FinishedBatch(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, generated=generated,
            coefficients=mb.coefficients, rows={k: v[mb.rows] for k, v in self.row_arrays.items()}, scores=scores, chunks=chunks,
        )  # fmt: skip
        data, gen_len = lay_out_batch(
            finished, store.attrs["layout"], generation.sampling.eos_token_ids, self.n_steps, mb.gen_len
        )
        gen = finished.generated
        rows, prompt_cols = mb.input_ids.shape
        pad = (mb.attention_mask == 0).sum(1)
        texts = {"generated_text": [""] * rows, "prompt_text": [""] * rows}  # no tokenizer: empty, but written
        tok = self.tokenizer
        if tok is not None:
            texts["generated_text"] = [tok.decode(gen[i, : gen_len[i]], skip_special_tokens=True) for i in range(rows)]
            texts["prompt_text"] = (
                [prompt_texts[r] for r in self.sources[mb.rows]]
                if prompt_texts
                else [tok.decode(mb.input_ids[i, pad[i] :]) for i in range(rows)]
            )
        store.write_batch(mb.index, mb.rows, data, texts)
        self.generated_tokens += int(np.sum(gen_len))
        self.positions_written += int(data["lengths"].sum())
        mb.release()


def plan_run(spec: RunSpec, prompts: list[list[int]], prompt_texts: list[str] | None, stops=None) -> RunState:
    """Check the run against the model, lay out its rows and micro-batches, open its store
    and make its stages' specs. `stops`: [prompt] each prompt's own `RowStop` (or None)."""
    from transformers import AutoConfig

    from actors.stopping import row_ends

    config = AutoConfig.from_pretrained(spec.model.path)
    # Rows are prompts with their own edits, all in the same forward passes: a coefficient
    # sweep runs prompt p as rows p*M .. p*M + M-1, one per coefficient.
    s = spec.steering
    try:
        rows = row_layout(len(prompts), s.edits, s.coefficients, s.vectors, s.rows, config.hidden_size)
    except ValueError as err:
        raise SettingError("steering.rows" if s.rows is not None else "steering.edits", f": {err}") from None
    n_given = len(prompts)
    prompt_ends = row_ends(spec.generation, stops, n_given)
    if np.array_equal(rows.sources, np.arange(n_given)):  # a row per prompt: no second list per row
        ends = prompt_ends
    else:
        prompts, ends = RowPrompts(prompts, rows.sources), [prompt_ends[p] for p in rows.sources]
    check_run(spec, config, prompts, [end.budget for end in ends], rows.sources)
    n_layers = config.num_hidden_layers
    cap = spec.capture
    layers = captured_layers(cap, n_layers)
    bounds = plan_stages(config, spec.cluster.num_stages)
    layout = _layout(spec, config, prompts, rows, layers, [end.budget for end in ends])
    row_arrays = _edit_arrays(rows, rows.kinds, layout.n_edits)
    # each row's corpus row (inline prompts: the prompt's index among those given)
    corpus_index = np.arange(n_given, dtype=np.int64) if spec.corpus is None else spec.corpus.index
    row_arrays["corpus_index"] = np.asarray(corpus_index, np.int64)[rows.sources]
    run_store = _open_store(spec, config, layout, rows, bounds)
    store = run_store.store
    mbs = _micro_batches(spec, prompts, rows, spec.generation.sampling.pad_token_id)
    todo = [mb for mb in mbs if mb.index not in store.done_batches()]
    return RunState(
        prompts=prompts, prompt_texts=prompt_texts, sources=rows.sources, row_arrays=row_arrays, bounds=bounds,
        specs=stage_specs(spec, bounds, layers, rows.vectors, rows.steered), run_store=run_store, micro_batches=mbs, todo=todo, ends=ends,
    )  # fmt: skip


def _layout(spec: RunSpec, config, prompts, rows, layers: tuple, budgets: list[int]) -> StoreLayout:
    """The store's shape for these rows (each generating at most its `budgets`), layers and lenses."""
    return StoreLayout(
        n_prompts=len(prompts),
        n_positions=max(len(p) + b for p, b in zip(prompts, budgets)),
        layers=layers,
        components=tuple(spec.capture.components),
        k=spec.capture.k,
        batch_rows=spec.cluster.micro_batch_size,
        hidden=config.hidden_size,
        activations=spec.capture.activations,
        n_scores=len(spec.steering.score_ids),
        n_steps=max(budgets),
        n_edits=max((len(e) for e in rows.edits), default=0),
        lenses=tuple(spec.capture.lenses),
        shard_batches=spec.storage.shard_batches,
    )


def _open_store(spec: RunSpec, config, layout: StoreLayout, rows, bounds) -> RunStore:
    """The run's store (`storage.existing` says what happens to one already there), its
    attributes naming the stage split, the edit kinds, the tuned lens's translators and the
    Jacobian lens's fit."""
    cap = spec.capture
    kinds = rows.kinds
    attrs = {**spec.attrs, "stages": [list(b) for b in bounds], "edit_kinds": [list(k) for k in kinds]}
    if "tuned" in cap.lenses:  # which translators the tuned_* arrays came from
        from actors.tuned_lens import check_translators

        meta = check_translators(cap.tuned_lens, spec.model.name, config.hidden_size, config.num_hidden_layers)
        attrs["tuned_lens"] = {
            "path": cap.tuned_lens,
            **{k: meta.get(k) for k in ("model", "revision", "tokens_seen")},
        }
    if "jacobian" in cap.lenses:  # which fit the jacobian_* arrays came from
        from actors.jacobian_lens import check_file

        meta = check_file(cap.jacobian_lens, spec.model.name, config.hidden_size, config.num_hidden_layers)
        attrs["jacobian_lens"] = {
            "path": cap.jacobian_lens,
            **{k: meta.get(k) for k in ("model", "revision", "sequences", "tokens", "positions", "skip")},
        }
    return RunStore.open(spec.storage.path, layout, attrs, spec.storage.existing, rows.vectors)


def stage_specs(spec: RunSpec, bounds, layers: tuple, vectors, steered) -> list[StageSpec]:
    """One StageSpec per stage and tensor-parallel rank; `vectors` the steering table, `steered`
    every (layer, site) some row edits (the stages hook those)."""
    capture = stage_capture(spec.capture, layers)
    return [
        StageSpec(
            stage=s,
            num_stages=len(bounds),
            start=a,
            end=b,
            model_path=spec.model.path,
            dtype=spec.model.dtype,
            device=spec.cluster.device,
            tp_rank=r,
            tp_size=spec.cluster.tp_size,
            capture=capture,
            sampling=spec.generation.sampling,
            vectors=vectors,
            steered=steered,
            tune=spec.tune,
            score_ids=tuple(spec.steering.score_ids),
        )  # fmt: skip
        for s, (a, b) in enumerate(bounds)
        for r in range(spec.cluster.tp_size)
    ]


def _edit_arrays(rows, kinds, n_edits: int) -> dict:
    """What the store records of every row's steering: its prompt and its edits."""
    out = {"source": rows.sources.astype(np.int32)}
    if n_edits:
        index = {k: i for i, k in enumerate(kinds)}
        out["edit_kind"] = np.full((len(rows.edits), n_edits), -1, np.int32)
        out["edit_coefficient"] = np.full((len(rows.edits), n_edits), np.nan, np.float32)
        for r, edits in enumerate(rows.edits):
            for j, e in enumerate(edits):
                out["edit_kind"][r, j], out["edit_coefficient"][r, j] = index[e.kind], e.coefficient
    return out


def _micro_batches(spec: RunSpec, prompts, rows, pad_id: int) -> list[MicroBatch]:
    out = []
    b = spec.cluster.micro_batch_size
    for index, start in enumerate(range(0, len(prompts), b)):
        stop = min(start + b, len(prompts))
        coefs = np.asarray(rows.coefficients[start:stop], np.float32)
        out.append(MicroBatch(index, slice(start, stop), prompts, pad_id, coefs, rows.edits[start:stop]))
    return out


def _repeats(run: RunState, mb: MicroBatch, share_prefix: bool) -> bool:
    """Whether prefix sharing applies: it is on and the micro-batch repeats a prompt."""
    sources = run.sources[mb.rows]
    return share_prefix and len(np.unique(sources)) < len(sources)


def shared_columns(run: RunState, mb: MicroBatch, share_prefix: bool) -> int:
    """How many leading prompt columns none of the micro-batch's edits touches, when it
    repeats prompts; 0 = nothing to share. At least the last prompt column is always left
    out: its logits choose the first token, once per row."""
    if not _repeats(run, mb, share_prefix):
        return 0
    cols = mb.input_ids.shape[1]
    pad = int((mb.attention_mask == 0).sum(1).min())
    starts = [first_column(e.positions, cols, pad) for row in mb.edits for e in row]
    return max(0, min([cols - 1, *starts]))


def shared_stages(run: RunState, mb: MicroBatch, share_prefix: bool) -> int:
    """How many leading stages hold only layers before every edit of the micro-batch, when
    it repeats prompts: their prompt columns are alike for every row of a prompt. Never the
    last stage (its logits choose the first token, once per row)."""
    if not _repeats(run, mb, share_prefix):
        return 0
    bounds = run.bounds
    first = min([e.layer for row in mb.edits for e in row], default=bounds[-1][0])
    return sum(1 for _, end in bounds[:-1] if end <= first)
