"""Continuous batching, the coordinator's side: `micro_batches_in_flight` lanes of up to
`micro_batch_size` live rows each. After every step of a lane the rows that ended (EOS, a stop
string, their own max_new_tokens: actors/stopping.py) leave it and waiting rows take their slots
in the lane's next call (the stages' side is actors/lane.py). Rows are admitted in row order;
a store batch (the store's `micro_batch_size` rows) is written, laid out as the static path lays
it out, once every one of its rows has ended and every earlier batch is written, so the store's
layout does not change and its finished batches stay a prefix of the run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from actors.lens_window import LensChunk
from actors.run_state import left_pad
from actors.vocabulary import lens_fill


@dataclass
class _Row:
    generated: list = field(default_factory=list)  # ids, one per step
    scores: list = field(default_factory=list)  # [n_scores] per step
    chunks: list = field(default_factory=list)  # LensChunks in the row's own positions, every stage


@dataclass
class _Lane:
    index: int
    rows: list = field(default_factory=list)  # the stages' order
    last: object = None  # handle of the last stage's output of the latest call
    calls: list = field(default_factory=list)  # lens-chunk handles of the latest call, every stage and rank
    evicted: list = field(default_factory=list)  # rows the latest call let go (complete once collected)
    steps: int = 0


class ContinuousBatches:
    """Runs every row of `run.todo`'s micro-batches through lanes; `coordinator` gives the stage
    group and its `stepped` hook. It holds only the rows in flight or waiting for their batch to
    be written (and a count per batch begun and not written), however many rows the run has."""

    def __init__(self, coordinator, run):
        self.coordinator, self.run = coordinator, run
        self.spec = coordinator.spec
        self.size = self.spec.cluster.micro_batch_size
        self.fresh = (r for i in run.todo for r in run.batch_rows(i))  # rows never admitted
        self.queue: deque = deque()  # rows to admit next: run again after a failure, or read ahead from `fresh`
        # Store batches are written in order, as the static path does: those with a row admitted,
        # in order, and how many of each one's rows are not complete.
        self.unwritten: deque = deque()
        self.left: dict[int, int] = {}
        self.rows: dict[int, _Row] = {}
        self.lanes: dict[int, _Lane] = {}
        self.row_steps = self.lane_steps = 0  # rows computed (one per row and call), lane calls that computed
        self.turn = -1  # the lane advanced last

    def generate(self) -> None:
        self.open_lanes()
        while self.lanes:
            self.advance()

    def open_lanes(self) -> None:
        for k in range(self.spec.cluster.micro_batches_in_flight):
            if self._waiting(1) and k not in self.lanes:
                self.lanes[k] = _Lane(k)
                self._submit(self.lanes[k], [], self._take(self.size), fresh=True)

    def advance(self) -> None:
        """Take one lane's step: record each row's token, let ended rows go, admit waiting rows."""
        ex, run = self.coordinator.stages.executor, self.run
        # Lanes in turn: of those ready, the one after the lane last advanced (in-process every
        # lane is ready, and always taking the first starved the others: their rows, and every
        # later batch waiting on them, were held to the end of the run).
        keys = sorted(self.lanes, key=lambda k: (k <= self.turn, k))
        lane = self.lanes[keys[ex.wait_first([self.lanes[k].last for k in keys])]]
        self.turn = lane.index
        out = ex.get(lane.last)
        self._collect(lane)
        lane.steps += 1
        ended = []
        for j, row in enumerate(out["rows"]):
            rec = self.rows[row]
            rec.generated.append(int(out["tokens"][j]))
            if "scores" in out:
                rec.scores.append(out["scores"][j])
            run.bar.update(1)
            if run.ended(row, rec.generated):
                ended.append(row)
                run.bar.update(run.end(row).budget - len(rec.generated))
                run.stats.rows_done += 1
        run.stats.tick()
        self.coordinator.stepped(lane.index, lane.steps)
        free = self.size - (len(lane.rows) - len(ended))
        self._submit(lane, ended, self._take(free))
        if not lane.rows:  # the stages let the lane go: its last rows' chunks are in this call
            self._collect(lane)
            del self.lanes[lane.index]

    def forget_in_flight(self) -> int:
        """After a stage failure: every row not yet complete goes back to the front of the queue,
        to run again from its first step; returns how many rows that is."""
        again = sorted({r for lane in self.lanes.values() for r in (*lane.rows, *lane.evicted)})
        self.run.stats.rows_done -= sum(len(lane.evicted) for lane in self.lanes.values())  # ended, run again
        for row in again:
            self.run.bar.update(-len(self.rows.pop(row).generated))
        self.queue.extendleft(reversed(again))
        self.lanes.clear()
        return len(again)

    def summary(self) -> dict:
        """Row-steps computed against useful (tokens generated), and the share of the lanes' slots
        that did useful work (useful / (lane calls x micro_batch_size)), as the static path reports them."""
        useful = self.run.generated_tokens
        return {
            "batching": "continuous",
            "row_steps": self.row_steps,
            "useful_row_steps": useful,
            "slot_occupancy": round(useful / (self.lane_steps * self.size), 4) if self.lane_steps else None,
        }

    def _waiting(self, n: int) -> int:
        """How many rows (up to `n`) wait to be admitted, reading ahead from the run's rows."""
        while len(self.queue) < n:
            row = next(self.fresh, None)
            if row is None:
                break
            self.queue.append(row)
        return min(n, len(self.queue))

    def _batch(self, row: int):
        """The store batch (MicroBatch) that holds `row`."""
        return self.run.batch(row // self.size)

    def _take(self, n: int) -> dict | None:
        """Up to `n` waiting rows as one left-padded group to prefill, or None."""
        rows = [self.queue.popleft() for _ in range(self._waiting(n))]
        if not rows:
            return None
        ids, mask = left_pad([self.run.prompts[r] for r in rows], self.spec.generation.sampling.pad_token_id)
        edits = []
        for r in rows:
            self.rows[r] = _Row()
            mb = self._batch(r)
            if mb.index not in self.left:  # its first row admitted
                self.left[mb.index] = mb.rows.stop - mb.rows.start
                self.unwritten.append(mb)
            edits.append(mb.edits[r - mb.rows.start] if mb.edits else ())
        return {"rows": rows, "input_ids": ids, "attention_mask": mask, "edits": edits}

    def _submit(self, lane: _Lane, evict: list, admit: dict | None, fresh: bool = False) -> None:
        """One call of `lane` through every stage, each stage's output handed to the next."""
        plan = {"open": fresh, "evict": evict, "admit": admit}
        hidden, calls = self.coordinator.stages.lane_call(lane.index, plan, lane.last)
        gone = set(evict)
        lane.rows = [r for r in lane.rows if r not in gone] + (admit["rows"] if admit else [])
        lane.last, lane.calls, lane.evicted = hidden, calls, list(evict)
        if lane.rows:
            self.row_steps += len(lane.rows)
            self.lane_steps += 1

    def _collect(self, lane: _Lane) -> None:
        """The lens chunks of the lane's latest call to their rows; the rows it let go are complete."""
        for chunk in self.coordinator.stages.collect(lane.calls):
            self.rows[chunk.micro_batch].chunks.append(chunk)
        for row in lane.evicted:
            self.left[self._batch(row).index] -= 1
        lane.calls, lane.evicted = [], []
        # The finished batches stay a prefix of the run (a resumed or interrupted run reads so);
        # a batch done before an earlier one waits for it, holding only its rows' small results.
        while self.unwritten and not self.left[self.unwritten[0].index]:
            self._write(self.unwritten.popleft())

    def _write(self, mb) -> None:
        """Every row of store batch `mb` has ended: lay it out as the static path does and write it."""
        rows = range(mb.rows.start, mb.rows.stop)
        recs = [self.rows.pop(r) for r in rows]
        mb.gen_len = np.array([len(rec.generated) for rec in recs])
        steps = int(mb.gen_len.max())
        generated = np.full((len(recs), steps), self.spec.generation.sampling.pad_token_id, np.int64)
        scores = None
        if recs[0].scores:
            scores = np.full((len(recs), steps, len(recs[0].scores[0])), np.nan, np.float32)
        for i, rec in enumerate(recs):
            generated[i, : len(rec.generated)] = rec.generated
            if scores is not None:
                scores[i, : len(rec.scores)] = rec.scores
        pad = (mb.attention_mask == 0).sum(1)
        chunks = batch_chunks([rec.chunks for rec in recs], pad, mb.input_ids.shape[1] + steps)
        del self.left[mb.index]
        self.run.write(mb, chunks, self.spec.generation, generated, scores)
        self.coordinator.batch_written(mb, steps)


def batch_chunks(row_chunks: list[list[LensChunk]], pad: np.ndarray, cols: int) -> list[LensChunk]:
    """Rows' lens chunks (each in its row's own positions) as one chunk per stage in the batch's
    left-padded columns (row i's position p at column `pad[i] + p`), what `lay_out_batch` reads."""
    by_stage: dict[int, list] = {}
    for i, chunks in enumerate(row_chunks):
        for c in chunks:
            by_stage.setdefault(c.stage, []).append((i, c))
    out = []
    for stage, items in sorted(by_stage.items()):
        arrays: dict[str, np.ndarray] = {}
        for i, c in items:
            for name, arr in c.arrays.items():  # arr: [1, stage_layers, component, n, ...]
                if name not in arrays:
                    shape = (len(row_chunks), *arr.shape[1:3], cols, *arr.shape[4:])
                    arrays[name] = np.full(shape, lens_fill(name) or 0, arr.dtype)
                start = int(pad[i]) + c.col_start
                arrays[name][i, :, :, start : start + c.col_end - c.col_start] = arr[0]
        out.append(LensChunk(-1, stage, items[0][1].layers, 0, cols, arrays))
    return out
