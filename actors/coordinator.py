"""The coordinator: owns one run. It plans the layer split, creates the stage workers through
an executor, streams micro-batches through the pipeline (several in flight, so stages work at
the same time), and writes the lens chunks the stages return into the Zarr store.

A plain class: the driver calls it in-process (`executor=local`) or creates it as a Ray actor
(`executor=ray`), and it then drives stage actors.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from actors import head_watch, storage_fs
from actors.executor import ClusterError, LocalExecutor, RayExecutor
from actors.progress import StageStats, progress_bar
from actors.run_spec import RunSpec, SettingError, check_run, stage_capture
from actors.run_store import FinishedBatch, RunStore, lay_out_batch
from actors.slicing import plan_stages
from actors.stage import LostStateError, StageSpec
from actors.stage_group import StageGroup
from actors.steering import first_column, row_layout
from actors.store import StoreLayout

log = logging.getLogger("distlens")


@dataclass
class _MicroBatch:
    index: int
    rows: slice
    input_ids: np.ndarray  # [batch, prompt_cols], left-padded
    attention_mask: np.ndarray  # [batch, prompt_cols]
    coefficients: np.ndarray  # [batch] the recorded steering coefficient of each row
    edits: tuple = ()  # [batch] each row's RowEdits
    steps: int = 0
    generated: list = field(default_factory=list)  # [batch] arrays, one per step
    last: object = None  # handle of the last stage's latest step output
    scores: list = field(default_factory=list)  # [batch, len(score_ids)] per generated step
    calls: list = field(default_factory=list)  # handles of its stage calls (lens chunks and acks), every rank
    counted: int = 0  # progress-bar units counted for this micro-batch


class Coordinator:
    """Runs `spec`. `executor`: an executor to use (and leave open) instead of a new one.

    `stepped(mb, steps)` is called after each micro-batch step: a no-op here; tests subclass it
    to act at a chosen point of a run (e.g. to kill a stage's process)."""

    DESC = "generate (tokens per row)"

    def __init__(self, spec: RunSpec, executor=None):
        self.spec = spec
        self._given_executor = executor
        self.restarts = 0

    def stepped(self, mb: int, steps: int) -> None:
        """Micro-batch `mb` has made `steps` steps (its tokens are back at the coordinator)."""

    def loading(self) -> None:
        """The stage workers exist and are about to load their weights."""

    def run(self, prompts: list[list[int]], prompt_texts: list[str] | None = None) -> dict:
        """Generate from `prompts` (token ids) and write the lens store; returns a summary.
        Holds the store's lease (actors/lease.py) throughout: one driver at a time per store."""
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
                return self._run(prompts, prompt_texts)
        finally:
            lease.release()

    def _run(self, prompts: list[list[int]], prompt_texts: list[str] | None) -> dict:
        from transformers import AutoConfig

        spec = self.spec
        config = AutoConfig.from_pretrained(spec.model.path)
        # Rows are prompts with their own edits, all in the same forward passes: a coefficient
        # sweep runs prompt p as rows p*M .. p*M + M-1, one per coefficient.
        s = spec.steering
        try:
            rows = row_layout(len(prompts), s.edits, s.coefficients, s.vectors, s.rows, config.hidden_size)
        except ValueError as err:
            raise SettingError("steering.rows" if s.rows is not None else "steering.edits", f": {err}") from None
        self._sources = rows.sources
        prompts = [prompts[p] for p in self._sources]
        check_run(spec, config, prompts)
        n_layers = config.num_hidden_layers
        cap = spec.capture
        layers = tuple(range(n_layers)) if cap.layers is None else tuple(sorted(i % n_layers for i in cap.layers))
        longest = max(len(p) for p in prompts)
        bounds = plan_stages(config, spec.cluster.num_stages)
        n_positions = longest + spec.generation.max_new_tokens
        layout = StoreLayout(
            n_prompts=len(prompts),
            n_positions=n_positions,
            layers=layers,
            components=tuple(spec.capture.components),
            k=spec.capture.k,
            batch_rows=spec.cluster.micro_batch_size,
            hidden=config.hidden_size,
            activations=spec.capture.activations,
            n_scores=len(spec.steering.score_ids),
            n_steps=spec.generation.max_new_tokens,
            n_edits=max((len(e) for e in rows.edits), default=0),
            lenses=tuple(cap.lenses),
        )
        kinds = rows.kinds
        self._row_arrays = self._edit_arrays(rows, kinds, layout.n_edits)
        attrs = {**spec.attrs, "stages": [list(b) for b in bounds], "edit_kinds": [list(k) for k in kinds]}
        if "tuned" in cap.lenses:  # which translators the tuned_* arrays came from
            from actors.tuned_lens import check_translators

            meta = check_translators(cap.tuned_lens, spec.model.name, config.hidden_size, n_layers)
            attrs["tuned_lens"] = {
                "path": cap.tuned_lens,
                **{k: meta.get(k) for k in ("model", "revision", "tokens_seen")},
            }
        run_store = RunStore.open(spec.storage.path, layout, attrs, spec.storage.existing, rows.vectors)
        store = run_store.store
        mbs = self._micro_batches(prompts, rows, spec.generation.sampling.pad_token_id)
        todo = [mb for mb in mbs if mb.index not in store.done_batches()]
        if not todo and store.is_complete:  # a resumed run that had already finished
            return dict(store.attrs["summary"], batches_run=[])
        capture = stage_capture(cap, layers)
        specs = [
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
                vectors=rows.vectors,
                steered=rows.steered,
                tune=spec.tune,
                score_ids=tuple(spec.steering.score_ids),
            )  # fmt: skip
            for s, (a, b) in enumerate(bounds)
            for r in range(spec.cluster.tp_size)
        ]
        handler = self._run_log(storage_fs.join(storage_fs.parent(spec.storage.path), "run.log"))
        executor = self._given_executor or (
            LocalExecutor() if spec.cluster.executor == "local" else RayExecutor.for_cluster(spec.cluster)
        )
        t0 = time.perf_counter()
        try:
            try:
                self.stages = StageGroup(executor, specs)
                self._bounds = bounds
                log.info(
                    "run: %d prompts in %d micro-batches (%d to do), stages %s, executor %s",
                    len(prompts), len(mbs), len(todo), [list(b) for b in bounds], executor.name,
                )  # fmt: skip
                if spec.attrs.get("ray_cluster"):  # which cluster the driver joined or started
                    ray_cluster = spec.attrs["ray_cluster"]
                    log.info("ray cluster: %s at %s", ray_cluster["kind"], ray_cluster["address"])
                self.loading()
                self._setup()
                self._tokenizer()  # loaded before the clock starts: decoding texts is part of writing
            except BaseException:
                run_store.abandon()
                raise
            run_store.started()
            t_loaded = time.perf_counter()
            generated = self._generate(todo, store, prompt_texts)
            t_done = time.perf_counter()
            stage_info = self.stages.info()
            n_new = int(sum(len(g) for g in generated.values()))
            n_pos = int(sum(int(store.group["lengths"][mb.rows].sum()) for mb in todo))
            decode_s = t_done - t_loaded
            summary = {
                "store": str(store.path),
                "stages": [list(b) for b in bounds],
                "batches_run": [mb.index for mb in todo],
                "generated_tokens": n_new,
                "positions": n_pos,
                "load_s": round(t_loaded - t0, 3),
                "generate_s": round(decode_s, 3),
                "tokens_per_s": round(n_new / decode_s, 3) if decode_s else None,
                "positions_per_s": round(n_pos / decode_s, 3) if decode_s else None,
                "stage_restarts": self.restarts,
                "stage_info": stage_info,
                "ray_cluster": spec.attrs.get("ray_cluster"),
            }
            store.mark_complete(summary)
            log.info("complete: %s (%d tokens, %s tokens/s)", store.path, n_new, summary["tokens_per_s"])
        except BaseException as err:
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
    @staticmethod
    def _run_log(path) -> logging.Handler:
        """The run log beside the store (appended to by resumed runs), written by whichever
        process runs the coordinator, the driver or a Ray actor (on object storage the object is
        rewritten at each record, so it is there batch by batch)."""
        handler = storage_fs.log_handler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        return handler

    @staticmethod
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

    def _micro_batches(self, prompts, rows, pad_id: int) -> list[_MicroBatch]:
        out = []
        b = self.spec.cluster.micro_batch_size
        for index, start in enumerate(range(0, len(prompts), b)):
            group = prompts[start : start + b]
            coefs = np.asarray(rows.coefficients[start : start + b], np.float32)
            cols = max(len(p) for p in group)
            ids = np.full((len(group), cols), pad_id, np.int64)
            mask = np.zeros((len(group), cols), np.int64)
            for i, p in enumerate(group):  # left padding: every row's next token is the last column
                ids[i, cols - len(p) :] = p
                mask[i, cols - len(p) :] = 1
            edits = rows.edits[start : start + b]
            out.append(_MicroBatch(index, slice(start, start + len(group)), ids, mask, coefs, edits))
        return out

    # -- generation -----------------------------------------------------------------------------
    def _submit(self, mb: _MicroBatch, tokens, shared_stages: int = 0, base=None, index=None) -> None:
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

    def _repeats(self, mb: _MicroBatch) -> bool:
        """Whether prefix sharing applies: it is on and the micro-batch repeats a prompt."""
        sources = self._sources[mb.rows]
        return self.spec.steering.share_prefix and len(np.unique(sources)) < len(sources)

    def _shared_columns(self, mb: _MicroBatch) -> int:
        """How many leading prompt columns none of the micro-batch's edits touches, when it
        repeats prompts; 0 = nothing to share. At least the last prompt column is always left
        out: its logits choose the first token, once per row."""
        if not self._repeats(mb):
            return 0
        cols = mb.input_ids.shape[1]
        pad = int((mb.attention_mask == 0).sum(1).min())
        starts = [first_column(e.positions, cols, pad) for row in mb.edits for e in row]
        return max(0, min([cols - 1, *starts]))

    def _shared_stages(self, mb: _MicroBatch) -> int:
        """How many leading stages hold only layers before every edit of the micro-batch, when
        it repeats prompts: their prompt columns are alike for every row of a prompt. Never the
        last stage (its logits choose the first token, once per row)."""
        if not self._repeats(mb):
            return 0
        first = min([e.layer for row in mb.edits for e in row], default=self._bounds[-1][0])
        return sum(1 for _, end in self._bounds[:-1] if end <= first)

    def _start(self, mb: _MicroBatch) -> None:
        spec, stages = self.spec, self.stages
        every = range(stages.num_stages)
        split, early = self._shared_columns(mb), self._shared_stages(mb)
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
        _, base, index = np.unique(self._sources[mb.rows], return_index=True, return_inverse=True)
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

    def _generate(self, todo: list[_MicroBatch], store, prompt_texts) -> dict[int, list]:
        spec = self.spec
        queue, inflight, generated = list(todo), {}, {}
        self._bar = progress_bar(len(todo) * spec.generation.max_new_tokens, self.DESC, spec.progress)
        self._stats = StageStats(self.stages, self._bar, self.DESC)
        while queue or inflight:
            try:
                self._advance(queue, inflight, generated, store, prompt_texts)
            except Exception as err:
                if not self._stage_lost(err):
                    raise
                if spec.cluster.tp_size > 1:
                    raise ClusterError(
                        f"a stage actor died and is not restarted (tp_size={spec.cluster.tp_size}: a tensor-parallel "
                        "group cannot re-form mid-run); finished micro-batches are in the store: run again "
                        "with resume=true"
                    ) from err
                self._recover(err, queue, inflight)
        self._bar.close()
        return generated

    def _advance(self, queue, inflight, generated, store, prompt_texts) -> None:
        """Fill the pipeline, then take one step's result from whichever micro-batch is ready."""
        spec, ex, bar = self.spec, self.stages.executor, self._bar
        while queue and len(inflight) < spec.cluster.micro_batches_in_flight:
            mb = queue.pop(0)
            self._start(mb)
            inflight[mb.index] = mb
        keys = list(inflight)
        mb = inflight[keys[ex.wait_first([inflight[k].last for k in keys])]]
        out = ex.get(mb.last)
        if "scores" in out:  # logits of score_ids; step 0 is the answer position
            mb.scores.append(out["scores"])
        mb.generated.append(out["tokens"])
        mb.steps += 1
        bar.update(1)
        mb.counted += 1
        self._stats.tick()
        self.stepped(mb.index, mb.steps)
        if mb.steps < spec.generation.max_new_tokens and not out["finished"].all():
            self._submit(mb, mb.last)
            return
        bar.update(spec.generation.max_new_tokens - mb.steps)
        mb.counted = spec.generation.max_new_tokens
        mb.calls += self.stages.finish(mb.index, mb.last)
        generated.update(self._write(mb, self.stages.collect(mb.calls), store, prompt_texts))
        del inflight[mb.index]
        log.info(
            "batch %d written: rows %d-%d, %d steps%s",
            mb.index, mb.rows.start, mb.rows.stop - 1, mb.steps, self._stats.text(),
        )  # fmt: skip

    def _stage_lost(self, err: Exception) -> bool:
        """A stage actor died, or restarted and lost its state (Ray actors only)."""
        if self.stages.executor.name != "ray":
            return False
        from ray.exceptions import RayActorError

        return isinstance(err, RayActorError | LostStateError)

    def _setup(self) -> None:
        """Load every stage's weights; a stage actor lost while loading is restarted from the
        same budget as one lost mid-run (`cluster.max_restarts`), or the run stops in one line."""
        spec = self.spec
        while True:
            try:
                self.stages.setup()
                return
            except Exception as err:
                if not self._stage_lost(err):
                    raise
                if spec.cluster.tp_size > 1:
                    raise ClusterError(
                        f"a stage actor died while loading its weights and is not restarted (tp_size="
                        f"{spec.cluster.tp_size}: a tensor-parallel group cannot re-form); run again"
                    ) from err
                self._count_failure(err, "while loading weights; loading again")
                self._rejoin()

    def _count_failure(self, err: Exception, doing: str) -> None:
        """One more stage failure against `cluster.max_restarts`: logged, or the run stops."""
        spec = self.spec
        self.restarts += 1
        reason = str(err).strip().splitlines()[0][:200]
        log.warning("stage failure %d of at most %d (%s): %s", self.restarts, spec.cluster.max_restarts, doing, reason)
        print(f"[distlens] a stage failed ({reason}); {doing}", file=sys.stderr)
        if self.restarts > spec.cluster.max_restarts:
            raise ClusterError(
                f"stages failed {self.restarts} times (cluster.max_restarts={spec.cluster.max_restarts}); "
                "finished micro-batches are in the store: run again with resume=true"
            ) from err

    def _recover(self, err: Exception, queue: list, inflight: dict) -> None:
        """Wait for every stage to answer again (Ray restarts a dead actor, which reloads its
        weights), set them up, and re-run the micro-batches that were in flight from their
        first step: finished micro-batches are in the store and are not touched."""
        self._count_failure(err, f"re-running {len(inflight)} micro-batch(es)")
        self._rejoin()
        self._setup()
        self._stats.forget()
        for mb in sorted(inflight.values(), key=lambda m: m.index, reverse=True):
            self._bar.update(-mb.counted)
            mb.steps, mb.counted, mb.generated, mb.scores, mb.calls, mb.last = 0, 0, [], [], [], None
            queue.insert(0, mb)
        inflight.clear()

    def _rejoin(self) -> None:
        """Wait (bounded by `cluster.restart_timeout_s`) until every stage answers again: a
        restarted actor whose node died waits for Ray to find it a node with room."""
        spec = self.spec
        deadline = time.monotonic() + spec.cluster.restart_timeout_s
        while True:
            try:
                self.stages.rejoin(timeout=max(1.0, deadline - time.monotonic()))
                break
            except Exception as again:
                if not (self._stage_lost(again) or isinstance(again, TimeoutError)):
                    raise
                if time.monotonic() > deadline:
                    ex = self.stages.executor
                    raise ClusterError(
                        f"a lost stage did not come back within cluster.restart_timeout_s="
                        f"{spec.cluster.restart_timeout_s:g}: it waited for a node with room for {ex.bundle} "
                        f"(available now: {ex.available()}); add a node, then run again with resume=true"
                    ) from again
                time.sleep(0.2)

    def _write(self, mb: _MicroBatch, chunks, store, prompt_texts) -> dict[int, list]:
        """Lay one micro-batch out by row position and write it whole; returns each row's
        generated ids."""
        spec = self.spec
        finished = FinishedBatch(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, generated=np.stack(mb.generated, axis=1),
            coefficients=mb.coefficients, rows={k: v[mb.rows] for k, v in self._row_arrays.items()}, scores=np.stack(mb.scores, axis=1) if mb.scores else None, chunks=chunks,
        )  # fmt: skip
        data, gen_len = lay_out_batch(
            finished, store.attrs["layout"], spec.generation.sampling.eos_token_ids, spec.generation.max_new_tokens
        )
        gen = finished.generated
        rows, prompt_cols = mb.input_ids.shape
        pad = (mb.attention_mask == 0).sum(1)
        texts = {"generated_text": [""] * rows, "prompt_text": [""] * rows}  # no tokenizer: empty, but written
        tok = self._tokenizer()
        if tok is not None:
            texts["generated_text"] = [tok.decode(gen[i, : gen_len[i]], skip_special_tokens=True) for i in range(rows)]
            texts["prompt_text"] = (
                [prompt_texts[r] for r in self._sources[mb.rows]]
                if prompt_texts
                else [tok.decode(mb.input_ids[i, pad[i] :]) for i in range(rows)]
            )
        store.write_batch(mb.index, mb.rows, data, texts)
        return {mb.rows.start + i: gen[i, : gen_len[i]].tolist() for i in range(rows)}

    def _tokenizer(self):
        if not hasattr(self, "_tok"):
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.spec.model.path)
            except Exception:  # tiny test checkpoints may carry no tokenizer
                self._tok = None
        return self._tok
