"""The coordinator: owns one run. It plans the run (rows, layer split, store: actors/run_state.py),
creates the stage workers through an executor, streams micro-batches through the pipeline
(several in flight, so stages work at the same time), and writes the lens chunks the stages
return into the Zarr store.

A plain class run in the driver's process; its stages run through an executor (in-process or
Ray actors).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque

import numpy as np

from actors import head_watch, storage_fs
from actors.checkpoint import load_tokenizer
from actors.continuous import ContinuousBatches
from actors.executor import LocalExecutor, RayExecutor
from actors.progress import StageStats, progress_bar
from actors.recovery import StageRecovery
from actors.run_spec import RunSpec, SettingError
from actors.run_state import MicroBatch, RunState, plan_run, shared_columns, shared_stages
from actors.stage_group import StageGroup

log = logging.getLogger("distlens")


class Coordinator:
    """Runs `spec`: a plain class run in the driver's process; its stages run through an
    executor (in-process or Ray actors). `executor`: an executor to use (and leave open)
    instead of a new one.

    `stepped(mb, steps)` is called after each micro-batch step: a no-op here; tests subclass it
    to act at a chosen point of a run (e.g. to kill a stage's process)."""

    DESC = "generate (tokens per row)"

    def __init__(self, spec: RunSpec, executor=None):
        self.spec = spec
        self._given_executor = executor
        self.recovery = StageRecovery(spec.cluster)  # failures survived (`restarts`) and the rules
        self._current: RunState | None = None  # the run in progress (or the last one)

    @property
    def stages(self) -> StageGroup:
        """The stage group of the run in progress."""
        return self._current.stages

    def stepped(self, mb: int, steps: int) -> None:
        """Micro-batch `mb` has made `steps` steps (its tokens are back at the coordinator)."""

    def loading(self) -> None:
        """The stage workers exist and are about to load their weights."""

    def run(self, prompts: list[list[int]], prompt_texts: list[str] | None = None, stops=None) -> dict:
        """Generate from `prompts` (token ids) and write the lens store; returns a summary.
        `stops`: [prompt] each prompt's own `run_spec.RowStop` (max_new_tokens, stop strings) or
        None. Holds the store's lease (actors/lease.py) throughout: one driver at a time per store."""
        from actors.lease import Lease

        lease = Lease.acquire(self.spec.storage.path, take_over=self.spec.storage.existing in ("resume", "overwrite"))
        if lease.took_over:
            owner = lease.took_over
            print(f"[distlens] {self.spec.storage.existing}: took over the lease of {owner.get('host')} pid {owner.get('pid')} "
                  f"(since {owner.get('since', '?')}), which is gone", file=sys.stderr)  # fmt: skip
        store = self.spec.storage.path

        def head_lost() -> str:  # actors/head_watch.py: the driver is about to end
            lease.release()
            return f"finished micro-batches are in {store}: start a cluster and run the same command with resume=true"

        try:
            with head_watch.on_loss(head_lost):
                return self._run(prompts, prompt_texts, stops)
        finally:
            lease.release()

    def _run(self, prompts: list[list[int]], prompt_texts: list[str] | None, stops) -> dict:
        """Plan, start the stages, generate every micro-batch not yet in the store, summarise."""
        spec = self.spec
        run = self._current = plan_run(spec, prompts, prompt_texts, stops)
        store = run.store
        if not run.todo and store.is_complete:  # a resumed run that had already finished
            return dict(store.attrs["summary"], batches_run=[])
        handler = _run_log(storage_fs.join(storage_fs.parent(spec.storage.path), "run.log"))
        executor = self._given_executor or (
            LocalExecutor() if spec.cluster.executor == "local" else RayExecutor.for_cluster(spec.cluster)
        )
        t0 = time.perf_counter()
        try:
            self._start_stages(executor)
            t_loaded = time.perf_counter()
            self._generate()
            summary = run.summary(
                t0, t_loaded, time.perf_counter(), self.recovery.restarts, spec.attrs.get("ray_cluster")
            )
            store.mark_complete(summary)
            n_new = summary["generated_tokens"]
            log.info("complete: %s (%d tokens, %s tokens/s)", store.path, n_new, summary["tokens_per_s"])
        except BaseException as err:
            store.flush(raise_errors=False)  # finished micro-batches still waiting for their shard are kept
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            log.error("stopped: %s%s", type(err).__name__, f": {first}" if first else "")
            raise
        finally:
            if self._given_executor is None:
                executor.shutdown()
            log.removeHandler(handler)
            handler.close()
        return summary

    # -- set-up ---------------------------------------------------------------------------------
    def _start_stages(self, executor) -> None:
        """Create the stages and load their weights (and the tokenizer); the store is
        abandoned if that fails, and marked started once it has not."""
        spec, run = self.spec, self._current
        try:
            run.stages = StageGroup(executor, run.specs)
            log.info(
                "run: %d prompts in %d micro-batches (%d to do), stages %s, executor %s",
                len(run.prompts), run.n_batches, len(run.todo), [list(b) for b in run.bounds], executor.name,
            )  # fmt: skip
            if spec.attrs.get("ray_cluster"):  # which cluster the driver joined or started
                ray_cluster = spec.attrs["ray_cluster"]
                log.info("ray cluster: %s at %s", ray_cluster["kind"], ray_cluster["address"])
            self.loading()
            self.recovery.setup(self.stages)
            run.tokenizer = _load_tokenizer(spec.model.path)  # before the clock starts: decoding is part of writing
            if run.tokenizer is None and run.any_stop:
                raise SettingError("generation.stop", f": stop strings need a tokenizer; {spec.model.path} has none")
        except BaseException:
            run.run_store.abandon()
            raise
        run.run_store.started()

    # -- generation -----------------------------------------------------------------------------
    def _submit(self, mb: MicroBatch, tokens, shared_stages: int = 0, base=None, index=None) -> None:
        """Feed columns `tokens` [rows, new] through every stage. The first `shared_stages`
        stages get only the distinct prompts' rows `tokens[base]`; the next stage widens their
        output back to every row (row i takes distinct row `index[i]`)."""
        hidden = None
        for s in range(self.stages.num_stages):
            if s < shared_stages:
                hidden, calls = self.stages.step(s, mb.index, tokens[base], hidden)
            elif s == shared_stages and s:
                hidden, calls = self.stages.step(s, mb.index, tokens, hidden, index)
            else:
                hidden, calls = self.stages.step(s, mb.index, tokens, hidden)
            mb.calls += calls
        mb.last = hidden

    def _start(self, mb: MicroBatch) -> None:
        spec, stages = self.spec, self.stages
        every = range(stages.num_stages)
        share = spec.steering.share_prefix
        split, early = shared_columns(self._current, mb, share), shared_stages(self._current, mb, share)
        if not split and not early:
            mb.calls += stages.start(every, mb.index, mb.attention_mask, spec.capture.positions, mb.edits)
            self._submit(mb, mb.input_ids)
            return
        # Prompts repeated along the batch (e.g. one row per coefficient): what no edit can reach runs
        # once per distinct prompt, then the stages replicate their state. That is the columns
        # before the first steered one (causal attention: they cannot see the edit) on every
        # stage, and the rest of the prompt on the stages before the first steered layer.
        # Rows are prompt-major, so the sorted distinct prompts are also in order of appearance:
        # `base` holds each one's first row and `index` maps every row to its prompt's position.
        _, base, index = np.unique(mb.sources, return_index=True, return_inverse=True)
        earlier, later = range(early), range(early, stages.num_stages)
        shared = every if split else earlier
        mb.calls += stages.start(shared, mb.index, mb.attention_mask[base], spec.capture.positions, None, True)
        prefix = None  # the last stage's output for the shared columns: their final-normed states
        if split:
            self._submit(mb, mb.input_ids[base, :split])
            prefix = mb.last
            mb.calls += stages.expand(later, mb.index, index, mb.edits, prefix)
        else:
            mb.calls += stages.start(later, mb.index, mb.attention_mask, spec.capture.positions, mb.edits)
        self._submit(mb, mb.input_ids[:, split:], early, base, index)
        mb.calls += stages.expand(earlier, mb.index, index, mb.edits, prefix)

    def batch_written(self, mb: MicroBatch, steps: int) -> None:
        """Store batch `mb` is written (after `steps` steps of its longest row)."""
        log.info(
            "batch %d written: rows %d-%d, %d steps%s",
            mb.index, mb.rows.start, mb.rows.stop - 1, steps, self._current.stats.text(),
        )  # fmt: skip

    def _generate(self) -> None:
        """Run every micro-batch still to do, each written once its rows have ended."""
        spec, run = self.spec, self._current
        run.bar = progress_bar(run.budget(run.todo), self.DESC, spec.progress)
        rows = sum(len(run.batch_rows(i)) for i in run.todo)
        run.stats = StageStats(run.stages, run.bar, self.DESC, rows_total=rows)
        if spec.generation.batching == "continuous":
            batches = ContinuousBatches(self, run)
            batches.open_lanes()
            self._until_done(
                lambda: bool(batches.lanes), batches.advance, lambda err: self._recover_lanes(err, batches)
            )
            run.batching = batches.summary()
            run.bar.close()
            return
        queue, inflight = deque(run.todo), {}
        run.batching = {"batching": "static", "row_steps": 0, "lane_steps": 0}
        self._until_done(
            lambda: bool(queue or inflight),
            lambda: self._advance(queue, inflight),
            lambda err: self._recover(err, queue, inflight),
        )
        useful, computed = run.generated_tokens, run.batching.pop("row_steps")
        steps = run.batching.pop("lane_steps")
        run.batching.update(row_steps=computed, useful_row_steps=useful,
                            slot_occupancy=round(useful / (steps * spec.cluster.micro_batch_size), 4) if steps else None)  # fmt: skip
        run.bar.close()

    def _until_done(self, pending, advance, recover) -> None:
        """`advance()` while `pending()`; a lost stage (Ray) is recovered by `recover(err)`."""
        while pending():
            try:
                advance()
            except Exception as err:
                if not self.recovery.lost(self.stages, err):
                    raise
                self.recovery.refuse_under_tp(err, loading=False)
                recover(err)

    def _advance(self, queue, inflight) -> None:
        """Fill the pipeline, then take one step's result from whichever micro-batch is ready."""
        spec, ex, bar, stats = self.spec, self.stages.executor, self._current.bar, self._current.stats
        while queue and len(inflight) < spec.cluster.micro_batches_in_flight:
            mb = self._current.batch(queue.popleft())
            inflight[mb.index] = mb  # before its calls: a stage lost during them re-runs it (`_recover`)
            self._start(mb)
        keys = list(inflight)
        mb = inflight[keys[ex.wait_first([inflight[k].last for k in keys])]]
        out = ex.get(mb.last)
        if "scores" in out:  # logits of score_ids; step 0 is the answer position
            mb.scores.append(out["scores"])
        mb.generated.append(out["tokens"])
        mb.steps += 1
        run = self._current
        run.batching["row_steps"] += len(out["tokens"])
        run.batching["lane_steps"] += 1
        budget = self._ended(mb)
        bar.update(1)
        mb.counted += 1
        stats.tick()
        self.stepped(mb.index, mb.steps)
        if not mb.gen_len.all():
            self._submit(mb, mb.last)
            return
        bar.update(budget - mb.counted)
        mb.counted = budget
        stats.rows_done += mb.rows.stop - mb.rows.start
        mb.calls += self.stages.finish(mb.index, mb.last)
        run.write(mb, self.stages.collect(mb.calls), spec.generation)
        del inflight[mb.index]
        self.batch_written(mb, mb.steps)

    def _ended(self, mb: MicroBatch) -> int:
        """Mark the rows of static micro-batch `mb` whose generation ended at its latest step
        (`mb.gen_len`); returns the micro-batch's progress budget (its rows' most tokens)."""
        run = self._current
        rows = range(mb.rows.start, mb.rows.stop)
        if mb.gen_len is None or mb.steps == 1:
            mb.gen_len = np.zeros(len(rows), np.int64)
        gen = np.stack(mb.generated, axis=1)
        for i, row in enumerate(rows):
            if not mb.gen_len[i] and run.ended(row, gen[i].tolist()):
                mb.gen_len[i] = mb.steps
        return max(end.budget for end in mb.ends)

    # -- stage failures (the rules: actors/recovery.py) ------------------------------------------
    def _recover(self, err: Exception, queue: deque, inflight: dict) -> None:
        """Re-run the micro-batches that were in flight from their first step once every stage
        answers again with its weights: finished micro-batches are in the store, untouched."""
        self.recovery.recovered(self.stages, err, f"re-running {len(inflight)} micro-batch(es)")
        self._current.stats.forget()
        for mb in sorted(inflight.values(), key=lambda m: m.index, reverse=True):
            self._current.bar.update(-mb.counted)
            mb.steps, mb.counted, mb.generated, mb.scores, mb.calls, mb.last = 0, 0, [], [], [], None
            mb.gen_len = None
            queue.appendleft(mb.index)
        inflight.clear()

    def _recover_lanes(self, err: Exception, batches: ContinuousBatches) -> None:
        """As `_recover`, for continuous batching: every row not yet complete runs again from
        its first step in fresh lanes; complete rows (written or waiting for their batch) stay."""
        self.recovery.recovered(self.stages, err, "re-running the rows in flight")
        self._current.stats.forget()
        batches.forget_in_flight()
        batches.open_lanes()


def _load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None: tiny test checkpoints may carry none."""
    try:
        return load_tokenizer(path)
    except Exception:
        return None


def _run_log(path) -> logging.Handler:
    """The run log beside the store (appended to by resumed runs), written by the process
    that runs the coordinator (on object storage the object is rewritten at each record, so
    it is there batch by batch)."""
    handler = storage_fs.log_handler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
