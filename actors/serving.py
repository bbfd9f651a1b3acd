"""The serving engine: one stage group and one continuous batch that requests join and leave
while it runs (the Serve replica's side of `distlens serve`; the HTTP side is pipelines/serve.py).
Each request is a row with its own prompt, sampling, stop conditions, steering (`VectorEdit`s)
and lens opt-in; the stages run it in the lanes of actors/lane.py, the calls corpus runs make.

One thread steps the lanes. Requests are handed in by `submit` from any thread and answered
through their `Ticket`'s `notify(event)`: `("token", id, logprobs)` per generated token, then
`("done", finish_reason, lens)` or `("error", status, message)`. A lost stage actor is restarted
within `cluster.max_restarts` and the requests in flight run again from their first token; a
client that already received tokens gets no token twice (the re-run's are the same: greedy, or
the request's own seed)."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from actors.recovery import StageRecovery
from actors.run_state import left_pad
from actors.sampling import SamplingSpec
from actors.stage_group import StageGroup
from actors.stopping import RowEnd

log = logging.getLogger("distlens")


@dataclass(frozen=True)
class ServeRequest:
    """One request as the engine runs it (checked where it entered: pipelines/serve_api.py)."""

    ids: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: SamplingSpec | None = None  # None: the server's (greedy)
    edits: tuple = ()  # actors.steering.VectorEdits
    lens: tuple[int, ...] | None = None  # the row positions whose lens comes back, or None
    logprobs: int | None = None  # top log-probs reported per generated token (0: the chosen token's only)


class Busy(Exception):
    """The queue of waiting requests is full (HTTP 429)."""


class Unavailable(Exception):
    """The engine is stopped or its stages failed beyond their restart budget (HTTP 503)."""


class Ticket:
    """One request's handle: `notify(event)` is called from the engine's thread."""

    def __init__(self, request: ServeRequest, notify):
        self.request, self.notify = request, notify
        self.row = -1  # its row id, given at `submit`
        self.generated: list[int] = []
        self.sent = 0  # tokens the client has (a re-run after a stage failure skips them)
        self.chunks: list = []  # LensChunks of this row, every stage
        self.cancelled = False
        self.done = False


@dataclass
class _Lane:
    index: int
    rows: list = field(default_factory=list)
    last: object = None
    calls: list = field(default_factory=list)
    evicted: list = field(default_factory=list)


class ServeEngine:
    """Requests through the stage group made of `specs` by `executor`. `cluster`: the restart
    budget and the lanes' shape (`micro_batches_in_flight` lanes of `micro_batch_size` rows);
    `eos`: the ids that end a row; `tokenizer` decodes stop strings; at most `max_waiting`
    requests wait for a slot."""

    def __init__(self, specs, executor, cluster, eos, pad_id: int, tokenizer, max_waiting: int = 64):
        self.cluster, self.eos, self.pad_id, self.tokenizer = cluster, frozenset(eos), pad_id, tokenizer
        self.max_waiting = max_waiting
        self.size, self.n_lanes = cluster.micro_batch_size, cluster.micro_batches_in_flight
        self.recovery = StageRecovery(cluster)
        self.stages = StageGroup(executor, specs)
        self.recovery.setup(self.stages)
        self.rows: dict[int, Ticket] = {}  # admitted (or re-queued) rows by row id
        self.ends: dict[int, RowEnd] = {}
        self.waiting: deque = deque()
        self.lanes: dict[int, _Lane] = {}
        self.turn = -1
        self.failed: str | None = None  # why the engine stopped serving
        self.closed = False
        self.served = 0
        self.reruns = 0  # rows run again after a stage failure
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="distlens-serve", daemon=True)
        self._thread.start()

    # -- from any thread ---------------------------------------------------------------------
    def submit(self, request: ServeRequest, notify) -> Ticket:
        """Queue `request`; raises Busy when `max_waiting` requests already wait, Unavailable
        when the engine no longer serves."""
        ticket = Ticket(request, notify)
        with self._cond:
            if self.failed or self.closed:
                raise Unavailable(self.failed or "the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are waiting (serve.max_waiting={self.max_waiting})")
            row = ticket.row = next(self._ids)
            self.rows[row] = ticket
            self.ends[row] = RowEnd(request.max_tokens, tuple(request.stop), self.eos)
            self.waiting.append(row)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: a waiting row leaves the queue, a running one its lane at its next step."""
        with self._cond:
            ticket.cancelled = True
            if ticket.row in self.waiting:
                self.waiting.remove(ticket.row)
                self._forget(ticket.row)

    def health(self) -> dict:
        with self._cond:
            return {
                "status": "failed" if self.failed else "closed" if self.closed else "ok",
                "reason": self.failed,
                "waiting": len(self.waiting),
                "running": sum(len(lane.rows) for lane in self.lanes.values()),
                "served": self.served,
                "stage_restarts": self.recovery.restarts,
                "rows_run_again": self.reruns,
            }

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for row in list(self.rows):
            self._finish_error(row, 503, "the server is shutting down")

    # -- the engine's thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.closed and not self.lanes and not self.waiting:
                    self._cond.wait()
                if self.closed:
                    return
            try:
                self._open_lanes()
                if self.lanes:
                    self._advance()
            except Exception as err:  # noqa: BLE001 - every failure is answered, none ends the thread
                self._failure(err)

    def _failure(self, err: Exception) -> None:
        """A lost stage: restart within the budget and run the rows in flight again. Anything
        else (or a spent budget): the rows in flight get 503 and, for a spent budget, so does
        every later request."""
        if self.recovery.lost(self.stages, err):
            try:
                self.recovery.recovered(self.stages, err, "re-running the requests in flight")
                self._requeue_in_flight()
                return
            except Exception as fatal:  # noqa: BLE001
                err = fatal
                with self._cond:
                    self.failed = f"the stages failed: {str(fatal).strip().splitlines()[0][:300]}"
        log.error("serving: %s: %s", type(err).__name__, err)
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        for row in sorted({r for lane in self.lanes.values() for r in (*lane.rows, *lane.evicted)}):
            self._finish_error(row, 503, f"the request failed in the stages ({message}); send it again")
        self.lanes.clear()
        if self.failed:
            with self._cond:
                waiting, self.waiting = list(self.waiting), deque()
            for row in waiting:
                self._finish_error(row, 503, self.failed)

    def _requeue_in_flight(self) -> None:
        """After a stage restart: every row in a lane runs again from its first token."""
        again = sorted({r for lane in self.lanes.values() for r in (*lane.rows, *lane.evicted)} & self.rows.keys())
        self.reruns += len(again)
        for row in again:
            ticket = self.rows[row]
            ticket.generated, ticket.chunks = [], []
        with self._cond:
            self.waiting.extendleft(reversed(again))
        self.lanes.clear()

    def _open_lanes(self) -> None:
        for k in range(self.n_lanes):
            if k not in self.lanes and self.waiting:
                admit = self._take(self.size)
                if admit is None:
                    return
                self.lanes[k] = _Lane(k)
                self._submit(self.lanes[k], [], admit, fresh=True)

    def _advance(self) -> None:
        """One lane's step: each row's token to its client, ended and cancelled rows go, waiting rows come in."""
        ex = self.stages.executor
        keys = sorted(self.lanes, key=lambda k: (k <= self.turn, k))  # lanes in turn (actors/continuous.py)
        lane = self.lanes[keys[ex.wait_first([self.lanes[k].last for k in keys])]]
        self.turn = lane.index
        out = ex.get(lane.last)
        self._collect(lane)
        ended = []
        for j, row in enumerate(out["rows"]):
            ticket = self.rows[row]
            token = int(out["tokens"][j])
            ticket.generated.append(token)
            if len(ticket.generated) > ticket.sent and not ticket.cancelled:
                ticket.sent += 1
                ticket.notify(("token", token, out["logprobs"][j] if "logprobs" in out else None))
            if ticket.cancelled or self.ends[row].ended(ticket.generated, self.tokenizer):
                ended.append(row)
        free = self.size - (len(lane.rows) - len(ended))
        self._submit(lane, ended, self._take(free))
        for row in ended:  # a row without a lens is answered now; one with a lens once its chunks are in
            if self.rows[row].request.lens is None:
                self._finish(row)
        if not lane.rows:
            self._collect(lane)
            del self.lanes[lane.index]

    def _take(self, n: int) -> dict | None:
        """Up to `n` waiting rows as one left-padded group to prefill, or None."""
        with self._cond:
            rows = [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]
        if not rows:
            return None
        reqs = [self.rows[r].request for r in rows]
        ids, mask = left_pad([list(q.ids) for q in reqs], self.pad_id)
        return {
            "rows": rows, "input_ids": ids, "attention_mask": mask, "edits": [tuple(q.edits) for q in reqs],
            "lens": [q.lens for q in reqs], "sampling": [q.sampling for q in reqs],
            "logprobs": [q.logprobs for q in reqs],
        }  # fmt: skip

    def _submit(self, lane: _Lane, evict: list, admit: dict | None, fresh: bool = False) -> None:
        plan = {"open": fresh, "evict": evict, "admit": admit}
        hidden, calls = self.stages.lane_call(lane.index, plan, lane.last)
        gone = set(evict)
        lane.rows = [r for r in lane.rows if r not in gone] + (admit["rows"] if admit else [])
        lane.last, lane.calls, lane.evicted = hidden, calls, list(evict)

    def _collect(self, lane: _Lane) -> None:
        """The lens chunks of the lane's latest call to their rows; the rows it let go are answered."""
        for chunk in self.stages.collect(lane.calls):
            if chunk.micro_batch in self.rows:
                self.rows[chunk.micro_batch].chunks.append(chunk)
        for row in lane.evicted:
            if row in self.rows:
                self._finish(row)
        lane.calls, lane.evicted = [], []

    def _finish(self, row: int) -> None:
        ticket = self._forget(row)
        if ticket.cancelled:
            return
        q, gen = ticket.request, ticket.generated
        reason = "stop" if gen and (gen[-1] in self.eos or len(gen) < q.max_tokens) else "length"
        lens = _row_lens(ticket.chunks, q.lens) if q.lens is not None else None
        self.served += 1
        ticket.notify(("done", reason, lens))

    def _finish_error(self, row: int, status: int, message: str) -> None:
        if row in self.rows:
            ticket = self._forget(row)
            if not ticket.cancelled:
                ticket.notify(("error", status, message))

    def _forget(self, row: int) -> Ticket:
        with self._cond:  # `cancel` reads the rows from another thread
            self.ends.pop(row, None)
            ticket = self.rows.pop(row)
        ticket.done = True
        return ticket


def serving_specs(spec, config) -> list:
    """The stages of a server (`spec`: a RunSpec without a store): every steering site of every
    layer hooked (a request may edit any), the run's capture (a request's lens reads a subset of
    it), no vector table (a request carries its vectors)."""
    from actors.adapters import adapter_for
    from actors.run_spec import captured_layers
    from actors.run_state import stage_specs
    from actors.slicing import plan_stages
    from actors.vocabulary import STEERING_SITES

    n = config.num_hidden_layers
    layers = captured_layers(spec.capture, n)
    have = adapter_for(config.model_type).sites_for(config)
    steered = tuple((layer, site) for layer in range(n) for site in STEERING_SITES if site in have)
    return stage_specs(spec, plan_stages(config, spec.cluster.num_stages), layers, None, steered)


def _row_lens(chunks: list, positions: tuple[int, ...]) -> dict:
    """One row's lens at `positions` from its chunks (each stage's, in the row's own positions):
    {position: {(layer, component index): {field: value}}}, the fields as the chunks name them."""
    wanted = set(positions)
    out: dict = {p: {} for p in positions}
    for c in chunks:
        for col in range(c.col_start, c.col_end):
            if col not in wanted:
                continue
            i = col - c.col_start
            for li, layer in enumerate(c.layers):
                n_comp = next(iter(c.arrays.values())).shape[2]
                for ci in range(n_comp):
                    out[col][(layer, ci)] = {name: np.asarray(arr[0, li, ci, i]) for name, arr in c.arrays.items()}
    return out
