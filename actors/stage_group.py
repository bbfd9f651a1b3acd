"""The stages of one run as one object with named calls: it owns the rank topology (the ranks
of each stage), the tensor-parallel rendezvous, and how each call is dispatched and collected.

Dispatch: the micro-batch calls (`start`, `step`, `expand`, `finish`, `lane_step`,
`drop_patch_sources`, the Jacobian fit's `jacobian_rows`, `_block`, `_drop`) and `setup` go to every rank of the stages they name
(tensor-parallel ranks run the same step together); the reports (`stats`, `jacobian_take`) go
to rank 0 of each stage. Collection: a stage's output and its lens chunks are
rank 0's (every rank computes the merged lens; only rank 0's spec says `reports`, so the others
send none); every rank's handle is still waited for, so an error on any rank surfaces. Both rules are declared here once, so the coordinator never names a
worker method or a rank. Calls return executor handles (object refs on Ray), so the
coordinator can chain one stage's output into the next without waiting.
"""

from __future__ import annotations

from dataclasses import replace

from actors.stage import StageSpec, StageWorker


class StageGroup:
    """Workers for `specs` (stage-major, `tp_size` ranks per stage) created by `executor`."""

    def __init__(self, executor, specs: list[StageSpec]):
        self.executor = executor
        self.specs = [replace(spec, reports=spec.tp_rank == 0) for spec in specs]
        self.workers = executor.create(self.specs)
        tp = specs[0].tp_size
        self.ranks = [self.workers[s : s + tp] for s in range(0, len(self.workers), tp)]  # [stage][rank]

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    def _every_rank(self, stages, method, *args, num_returns: int = 1) -> list:
        """Dispatch to every rank of `stages`: [handle], stage-major, rank 0 first."""
        return [self.executor.call(w, method, *args, num_returns=num_returns) for s in stages for w in self.ranks[s]]

    def _first_rank(self, stages, method, *args) -> list:
        """Dispatch to rank 0 of each of `stages`: [handle]."""
        return [self.executor.call(self.ranks[s][0], method, *args) for s in stages]

    def _all_stages(self):
        return range(self.num_stages)

    def collect(self, calls: list) -> list:
        """Wait for every call (an error on any rank surfaces here) and return the lens chunks
        they carry (rank 0's: the others report none), in call order."""
        return [chunk for handle in calls for chunk in (self.executor.get(handle) or [])]

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> list[dict]:
        """Join each stage's tensor-parallel group (rendezvous at its rank 0's own node, never
        the head's), load weights and install hooks; waits for every rank."""
        ex, acks = self.executor, []
        for ranks in self.ranks:
            init = None
            if len(ranks) > 1:
                ip, port = ex.get(ex.call(ranks[0], StageWorker.address))
                init = f"tcp://{ip}:{port}"
            acks += [ex.call(w, StageWorker.setup, init) for w in ranks]
        return [ex.get(a) for a in acks]

    def rejoin(self, timeout: float | None = None) -> None:
        """After a stage failure: every rank takes its spec again (a restarted process loads
        its slice); raises while a restarted actor is not answering yet, or TimeoutError when
        one has not answered within `timeout` seconds (a restart still waiting for a node)."""
        ex = self.executor
        calls = [ex.call(worker, StageWorker.rejoin, spec) for worker, spec in zip(self.workers, self.specs)]
        for call in calls:
            ex.get(call, timeout=timeout)

    # -- micro-batch lifecycle ----------------------------------------------------------------
    def start(self, stages, mb: int, attention_mask, positions, edits, shared: bool = False) -> list:
        return self._every_rank(stages, StageWorker.start, mb, attention_mask, positions, edits, shared)

    def step(self, stage: int, mb: int, tokens, upstream, upstream_rows=None) -> tuple[object, list]:
        """One stage's step: (rank 0's output handle, every rank's lens-chunk handle)."""
        args = (mb, tokens, upstream) if upstream_rows is None else (mb, tokens, upstream, upstream_rows)
        calls = self._every_rank([stage], StageWorker.step, *args, num_returns=2)  # each (output, chunks)
        return calls[0][0], [pair[1] for pair in calls]

    def expand(self, stages, mb: int, index, edits, prefix=None) -> list:
        return self._every_rank(stages, StageWorker.expand, mb, index, edits, prefix)

    def lane_step(self, stage: int, lane: int, plan: dict, feed, upstream) -> tuple[object, list]:
        """One stage's call of a continuous-batching lane (actors/lane.py): (rank 0's output
        handle, every rank's lens-chunk handle)."""
        calls = self._every_rank([stage], StageWorker.lane_step, lane, plan, feed, upstream, num_returns=2)
        return calls[0][0], [pair[1] for pair in calls]

    def lane_call(self, lane: int, plan: dict, feed) -> tuple[object, list]:
        """One call of lane `lane` through every stage, each stage's output handed to the next:
        (the last stage's output handle, every stage's and rank's lens-chunk handles)."""
        hidden, calls = None, []
        for s in range(self.num_stages):
            hidden, chunk_calls = self.lane_step(s, lane, plan, feed, hidden)
            calls += chunk_calls
        return hidden, calls

    def finish(self, mb: int, last_tokens, stages=None) -> list:
        return self._every_rank(self._all_stages() if stages is None else stages, StageWorker.finish, mb, last_tokens)

    def drop_patch_sources(self) -> list:
        """Every rank forgets the activations its patch-source rows lent (actors/interventions.py)."""
        return self._every_rank(self._all_stages(), StageWorker.drop_patch_sources)

    # -- the Jacobian-lens fit (actors/jacobian_fit.py, driven by actors/jacobian_coordinator.py) --
    def jacobian_rows(self, stage: int, key, x, lengths):
        """`stage` takes micro-batch `key` (ids or the previous stage's output) and runs its forward,
        keeping the graph: its output's handle."""
        return self._every_rank([stage], StageWorker.jacobian, "rows", key, x, lengths)[0]

    def jacobian_block(self, stage: int, key, lo: int, cotangent=None):
        """`stage`'s backward of output dimensions `lo..`: the handle of the cotangent at its input."""
        return self._every_rank([stage], StageWorker.jacobian, "block", key, lo, cotangent)[0]

    def jacobian_drop(self, key) -> list:
        return self._every_rank(self._all_stages(), StageWorker.jacobian, "drop", key)

    def jacobian_take(self) -> list:
        """Handles of each stage's sums {layer: [d, d] float64}, handed over and reset."""
        return self._first_rank(self._all_stages(), StageWorker.jacobian, "take")

    # -- reports ------------------------------------------------------------------------------
    def stats(self) -> list:
        """Handles of each stage's cheap counters (for the progress bar)."""
        return self._first_rank(self._all_stages(), StageWorker.stats)

    def info(self) -> list[dict]:
        """Every rank's description (pid, layers, timings), waited for."""
        ex = self.executor
        return [ex.get(ex.call(w, StageWorker.info)) for w in self.workers]

    def pid(self, stage: int) -> int:
        """The process id of `stage`'s rank 0."""
        return self.executor.get(self._first_rank([stage], StageWorker.info)[0])["pid"]
