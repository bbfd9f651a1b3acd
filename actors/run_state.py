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
from actors.store import StoreLayout, consecutive

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
    """Each row's prompt token ids where rows repeat prompts (a sweep): the prompt of
    `rows.source(row)`, without a copy per row."""

    def __init__(self, prompts, rows):
        self.prompts, self.rows = prompts, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        return self.prompts[self.rows.source(row)]

    def __iter__(self):
        return (self[r] for r in range(len(self)))


@dataclass(slots=True)  # a corpus run has a MicroBatch per micro_batch_size rows: kept small
class MicroBatch:
    """Rows `rows` of the run, one store batch, made when it is first needed (`RunState.batch`)
    and let go once it is written. Its left-padded prompt ids are made from the run's prompts
    when first needed and dropped, with its steps, once it is written (`release`): a run holds
    only its unfinished batches, whatever its rows."""

    index: int
    rows: slice
    prompts: object  # the run's prompt token ids by row (RunState.prompts)
    pad_id: int
    sources: np.ndarray  # [batch] the prompt each row runs
    coefficients: np.ndarray  # [batch] the recorded steering coefficient of each row
    ends: tuple  # [batch] each row's stop conditions (actors/stopping.RowEnd)
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
    """One run's state: its plan (made by `plan_run`) and what the coordinator adds as the run
    goes. Per row it holds nothing: a row's prompt, edits, stop conditions and stored values are
    read from `rows`, `prompts` and `ends` when its micro-batch is made (`batch`)."""

    prompts: object  # [rows] token ids, a prompt once per row that runs it
    prompt_texts: object  # the prompts' texts (by prompt, not row), or None: decoded
    rows: object  # actors/steering.RowLayout: each row's prompt, edits and coefficient
    ends: object  # actors/stopping.RowEnds: each prompt's stop conditions
    corpus_index: object  # [prompts] each prompt's corpus index (a corpus's packed values), or None: the prompt's
    kinds: tuple  # the edits' distinct kinds (the store's `edit_kind` indexes them)
    n_edits: int  # the most edits a row carries
    n_steps: int  # the most tokens any row may generate (the store's `n_steps`)
    any_stop: bool  # some row has stop strings (they need the tokenizer)
    bounds: list  # [(start, end)] each stage's layers
    specs: list  # the StageSpec of every stage and rank
    run_store: RunStore
    size: int  # rows per micro-batch (the last may have fewer)
    todo: list  # the indices of the micro-batches not yet in the store
    live: dict = field(default_factory=dict)  # {index: MicroBatch} made and not yet written
    stages: StageGroup | None = None
    tokenizer: object = None  # None also when the checkpoint has none
    bar: object = None  # the progress bar
    stats: StageStats | None = None
    batching: dict = field(default_factory=dict)  # the summary's batching figures (row-steps computed, useful)
    generated_tokens: int = 0  # tokens generated by the rows written so far (this run, not resumed ones)
    positions_written: int = 0  # their stored positions (prompt and generated)

    @property
    def n_batches(self) -> int:
        return -(-len(self.rows) // self.size)

    def batch_rows(self, index: int) -> range:
        """The rows of micro-batch `index`."""
        return range(index * self.size, min((index + 1) * self.size, len(self.rows)))

    def batch(self, index: int) -> MicroBatch:
        """Micro-batch `index`: the one in progress, or made now from the run's rows."""
        mb = self.live.get(index)
        if mb is None:
            rows = self.batch_rows(index)
            span = slice(rows.start, rows.stop)
            sources = self.rows.sources(span)
            mb = self.live[index] = MicroBatch(
                index, span, self.prompts, self.pad_id, sources, np.asarray(self.rows.coefficients(span), np.float32),
                tuple(self.ends[int(p)] for p in sources), self.rows.edits(span),
            )  # fmt: skip
        return mb

    @property
    def pad_id(self) -> int:
        return self.specs[0].sampling.pad_token_id

    def end(self, row: int):
        """Row `row`'s stop conditions (its micro-batch is in progress)."""
        mb = self.batch(row // self.size)
        return mb.ends[row - mb.rows.start]

    def ended(self, row: int, generated: list[int]) -> bool:
        """Whether row `row`'s generation ends with `generated` (its ids so far)."""
        return self.end(row).ended(generated, self.tokenizer)

    def budget(self, indices) -> int:
        """The most tokens the rows of micro-batches `indices` may generate, summed (the progress
        bar's total), read a micro-batch at a time."""
        return sum(self.ends[int(p)].budget for i in indices for p in self.rows.sources(_span(self.batch_rows(i))))

    def row_arrays(self, mb: MicroBatch) -> dict:
        """What the store records of each row of `mb`: its prompt, its corpus row and its edits."""
        out = {"source": mb.sources.astype(np.int32), "corpus_index": _corpus_index(self.corpus_index, mb.sources)}
        if self.n_edits:
            index = {k: i for i, k in enumerate(self.kinds)}
            out["edit_kind"] = np.full((len(mb.sources), self.n_edits), -1, np.int32)
            out["edit_coefficient"] = np.full((len(mb.sources), self.n_edits), np.nan, np.float32)
            for r, edits in enumerate(mb.edits):
                for j, e in enumerate(edits):
                    out["edit_kind"][r, j], out["edit_coefficient"][r, j] = index[e.kind], e.coefficient
        return out

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
            "batches_run": [[run[0], run[-1] + 1] for run in consecutive(self.todo)],  # ranges: a few numbers
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
            coefficients=mb.coefficients, rows=self.row_arrays(mb), scores=scores, chunks=chunks,
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
                [prompt_texts[int(p)] for p in mb.sources]
                if prompt_texts
                else [tok.decode(mb.input_ids[i, pad[i] :]) for i in range(rows)]
            )
        store.write_batch(mb.index, mb.rows, data, texts)
        self.generated_tokens += int(np.sum(gen_len))
        self.positions_written += int(data["lengths"].sum())
        mb.release()
        self.live.pop(mb.index, None)


def _span(rows: range) -> slice:
    return slice(rows.start, rows.stop)


def _corpus_index(index, sources: np.ndarray) -> np.ndarray:
    """[rows] the corpus index of each of `sources` (a micro-batch's prompts): the range from the
    least to the most read at once from a corpus's packed values; None (inline prompts): the
    prompt's own index."""
    if index is None:
        return sources.astype(np.int64)
    first = int(sources.min())
    return np.asarray(index[first : int(sources.max()) + 1], np.int64)[sources - first]


def plan_run(spec: RunSpec, prompts: list[list[int]], prompt_texts: list[str] | None, stops=None) -> RunState:
    """Check the run against the model, lay out its rows and micro-batches, open its store
    and make its stages' specs. `stops`: [prompt] each prompt's own `RowStop` (or None). Every
    row is read once here (the checks, the store's shape), none of them kept."""
    from transformers import AutoConfig

    from actors.stopping import RowEnds

    config = AutoConfig.from_pretrained(spec.model.path)
    # Rows are prompts with their own edits, all in the same forward passes: a coefficient
    # sweep runs prompt p as rows p*M .. p*M + M-1, one per coefficient.
    s = spec.steering
    try:
        rows = row_layout(len(prompts), s.edits, s.coefficients, s.vectors, s.rows, config.hidden_size)
    except ValueError as err:
        raise SettingError("steering.rows" if s.rows is not None else "steering.edits", f": {err}") from None
    ends = RowEnds(spec.generation, stops, len(prompts))
    for prompt in range(len(prompts)):  # every prompt's stop strings, before the other checks
        ends[prompt]
    if not rows.one_per_prompt:
        prompts = RowPrompts(prompts, rows)
    source = None if rows.one_per_prompt else rows.source
    budgets = (ends[r if source is None else source(r)].budget for r in range(len(rows)))  # in row order
    check_run(spec, config, prompts, budgets, source)
    n_layers = config.num_hidden_layers
    layers = captured_layers(spec.capture, n_layers)
    bounds = plan_stages(config, spec.cluster.num_stages)
    longest = n_steps = 0  # the store's positions and steps per row
    any_stop = False
    for r, ids in enumerate(prompts):
        end = ends[r if source is None else source(r)]
        longest, n_steps = max(longest, len(ids) + end.budget), max(n_steps, end.budget)
        any_stop = any_stop or bool(end.stop)
    layout = _layout(spec, config, len(prompts), rows, layers, longest, n_steps)
    run_store = _open_store(spec, config, layout, rows, bounds)
    size = spec.cluster.micro_batch_size
    done = run_store.store.done_batches()
    return RunState(
        prompts=prompts, prompt_texts=prompt_texts, rows=rows, ends=ends, corpus_index=None if spec.corpus is None else spec.corpus.index,
        kinds=rows.kinds, n_edits=rows.n_edits, n_steps=n_steps, any_stop=any_stop, bounds=bounds,
        specs=stage_specs(spec, bounds, layers, rows.vectors, rows.steered), run_store=run_store, size=size,
        todo=[i for i in range(-(-len(rows) // size)) if i not in done],
    )  # fmt: skip


def _layout(spec: RunSpec, config, n_rows: int, rows, layers: tuple, longest: int, n_steps: int) -> StoreLayout:
    """The store's shape for `n_rows` rows (the longest `longest` positions with the tokens it
    may generate, `n_steps` the most any row generates), layers and lenses."""
    return StoreLayout(
        n_prompts=n_rows,
        n_positions=longest,
        layers=layers,
        components=tuple(spec.capture.components),
        k=spec.capture.k,
        batch_rows=spec.cluster.micro_batch_size,
        hidden=config.hidden_size,
        activations=spec.capture.activations,
        n_scores=len(spec.steering.score_ids),
        n_steps=n_steps,
        n_edits=rows.n_edits,
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


def _repeats(run: RunState, mb: MicroBatch, share_prefix: bool) -> bool:
    """Whether prefix sharing applies: it is on and the micro-batch repeats a prompt."""
    return share_prefix and len(np.unique(mb.sources)) < len(mb.sources)


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
