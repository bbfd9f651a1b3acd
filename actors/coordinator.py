"""The coordinator: owns one run. It plans the layer split, creates the stage workers through
an executor, streams micro-batches through the pipeline (several in flight, so stages work at
the same time), and writes the lens chunks the stages return into the Zarr store.

A plain class: the driver calls it in-process (`executor=local`) or creates it as a Ray actor
(`executor=ray`), and it then drives stage actors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.adapters import check_sites, check_tensor_parallel
from actors.executor import ClusterError, LocalExecutor, RayExecutor
from actors.sampling import SamplingSpec
from actors.slicing import plan_stages
from actors.stage import COMPONENTS, LENS_FIELDS, CaptureSpec, LostStateError, StageSpec
from actors.store import LensStore, StoreError, StoreLayout, layout_dict, remove_path, write_log_path

log = logging.getLogger("distlens")


@dataclass(frozen=True)
class RunSpec:
    model_path: str
    store_path: str
    num_stages: int = 2
    tp_size: int = 1
    executor: str = "local"
    dtype: str = "float32"
    device: str = "cpu"
    layers: tuple[int, ...] | None = None  # None = every layer
    components: tuple[str, ...] = ("resid_post",)
    k: int = 10
    lens_window: int = 64
    activations: str | None = None
    positions: str | tuple[int, ...] = "all"
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    max_new_tokens: int = 16
    micro_batch_size: int = 4
    micro_batches_in_flight: int = 2
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    placement_timeout_s: float = 60.0  # how long to wait for the cluster to place the stages
    max_restarts: int = 3  # stage-actor failures a run survives (Ray restarts the actor; tp_size 1)
    restart_timeout_s: float = 300.0  # how long to wait for a restarted stage to answer
    steering: tuple = ()  # SteeringEdits; each stage applies those on its own layers
    coefficients: tuple[float, ...] | None = None  # a sweep: every prompt runs once per coefficient
    score_ids: tuple[int, ...] = ()  # record these tokens' logits at the first generated step
    share_prefix: bool = True  # a sweep computes the columns before its edits once per prompt
    existing: str = "refuse"  # what to do with a store already at store_path: refuse | resume | overwrite
    attrs: dict = field(default_factory=dict)  # recorded in the store (config, model id, versions)
    progress: bool = True


def fingerprint(config: dict) -> str:
    """A stable hash of what determines a run's results (used to refuse mixing runs)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _MicroBatch:
    index: int
    rows: slice
    input_ids: np.ndarray  # [batch, prompt_cols], left-padded
    attention_mask: np.ndarray  # [batch, prompt_cols]
    coefficients: np.ndarray  # [batch] steering multiplier of each row
    steps: int = 0
    generated: list = field(default_factory=list)  # [batch] arrays, one per step
    last: object = None  # handle of the last stage's latest step output
    scores: list = field(default_factory=list)  # [batch, len(score_ids)] per generated step
    handles: list = field(default_factory=list)  # lens-chunk handles (and start acks)
    counted: int = 0  # progress-bar units counted for this micro-batch


def _config_changes(old, new, limit: int = 3) -> str:
    """'capture.k 10 -> 3, ...': the settings that differ between two recorded configs, leaving
    out where results are stored and how stages are spread (they do not change the numbers)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    skip = ("storage.", "cluster.", "resume", "overwrite", "progress", "plot.")
    keys = [k for k in dict.fromkeys([*a, *b]) if not k.startswith(skip) and a.get(k) != b.get(k)]

    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in keys[:limit]]
    return ", ".join(parts) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def _progress(total: int, desc: str, enabled: bool):
    try:
        import ray

        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        in_actor = False
    if in_actor:  # Ray forwards whole lines only; tqdm_ray renders a live bar on the driver
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm import tqdm
    return (
        tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)
        if not in_actor
        else tqdm(total=total, desc=desc)
    )


def _faults() -> dict:
    """Fault injection for the recovery tests, from $DISTLENS_FAULTS (JSON), e.g.
    {"kill_stage": {"stage": 1, "batch": 1, "step": 2}}: SIGKILL that stage's process once
    batch 1 has made 2 steps; {"kill_driver": {"after_batches": 2, "mid_write": true}}: SIGKILL
    this process after 2 batch writes (mid_write: after the 2nd batch's data, before its
    completion record); {"interrupt_driver": {"after_batches": 1}}: SIGINT (Ctrl-C) instead."""
    text = os.environ.get("DISTLENS_FAULTS")
    return json.loads(text) if text else {}


class Coordinator:
    """Runs `spec`. `executor`: an executor to use (and leave open) instead of a new one."""

    def __init__(self, spec: RunSpec, executor=None):
        self.spec = spec
        self._given_executor = executor
        self.restarts = 0
        self._faults = _faults()
        self._writes = 0

    def run(self, prompts: list[list[int]], prompt_texts: list[str] | None = None) -> dict:
        """Generate from `prompts` (token ids) and write the lens store; returns a summary."""
        from transformers import AutoConfig

        spec = self.spec
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        # A coefficient sweep is a batch dimension: prompt p runs as rows p*M .. p*M + M-1, one
        # per coefficient, all in the same forward passes.
        sweep = spec.coefficients or (1.0,)
        self._sources = np.repeat(np.arange(len(prompts)), len(sweep))
        row_coefficients = np.tile(np.asarray(sweep, np.float32), len(prompts))
        prompts = [prompts[p] for p in self._sources]
        config = AutoConfig.from_pretrained(spec.model_path)
        n_layers = config.num_hidden_layers
        layers = tuple(range(n_layers)) if spec.layers is None else tuple(sorted(spec.layers))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: valid is 0..{n_layers - 1}")
        bad = [c for c in spec.components if c not in COMPONENTS]
        if bad:
            raise ValueError(f"unknown component {bad[0]!r}: choose from {list(COMPONENTS)}")
        check_sites(config, spec.components, "capture.components")
        check_sites(config, [e.site for e in spec.steering], "steering.site")
        check_tensor_parallel(config, spec.tp_size)
        for name, values in (("layers", layers), ("components", spec.components)):
            twice = sorted({v for v in values if list(values).count(v) > 1})
            if twice:
                raise ValueError(f"{name} lists {twice[0]!r} more than once: give each once")
        context = getattr(config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if context and longest + spec.max_new_tokens > context:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={spec.max_new_tokens} exceeds the "
                f"model's context of {context} positions"
            )
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens: every prompt needs at least one")
        bounds = plan_stages(config, spec.num_stages)
        n_positions = longest + spec.max_new_tokens
        layout = StoreLayout(
            n_prompts=len(prompts),
            n_positions=n_positions,
            layers=layers,
            components=tuple(spec.components),
            k=spec.k,
            batch_rows=spec.micro_batch_size,
            hidden=config.hidden_size,
            activations=spec.activations,
            n_scores=len(spec.score_ids),
            n_steps=spec.max_new_tokens,
        )
        created = not (Path(spec.store_path) / "zarr.json").exists() or spec.existing == "overwrite"
        store = self._open_store(layout, bounds)
        mbs = self._micro_batches(prompts, row_coefficients, spec.sampling.pad_token_id)
        todo = [mb for mb in mbs if mb.index not in store.done_batches()]
        if not todo and store.is_complete:  # a resumed run that had already finished
            return dict(store.attrs["summary"], batches_run=[])
        capture = CaptureSpec(layers, tuple(spec.components), spec.k, spec.lens_window, spec.activations)
        specs = [
            StageSpec(
                stage=s,
                num_stages=len(bounds),
                start=a,
                end=b,
                model_path=spec.model_path,
                dtype=spec.dtype,
                device=spec.device,
                tp_rank=r,
                tp_size=spec.tp_size,
                capture=capture,
                sampling=spec.sampling,
                steering=tuple(spec.steering),
                score_ids=tuple(spec.score_ids),
            )  # fmt: skip
            for s, (a, b) in enumerate(bounds)
            for r in range(spec.tp_size)
        ]
        handler = self._run_log(Path(spec.store_path).parent / "run.log")
        executor = self._given_executor or (
            LocalExecutor()
            if spec.executor == "local"
            else RayExecutor(
                spec.cpus_per_stage,
                spec.gpus_per_stage,
                spec.placement_timeout_s,
                max_restarts=spec.max_restarts if spec.tp_size == 1 else 0,
            )
        )
        t0 = time.perf_counter()
        try:
            try:
                workers = executor.create(specs)
                self._ex, self._ranks = (
                    executor,
                    [workers[s * spec.tp_size : (s + 1) * spec.tp_size] for s in range(len(bounds))],
                )
                self._workers, self._specs, self._bounds = workers, specs, bounds
                log.info(
                    "run: %d prompts in %d micro-batches (%d to do), stages %s, executor %s",
                    len(prompts), len(mbs), len(todo), [list(b) for b in bounds], executor.name,
                )  # fmt: skip
                self._setup()
                self._tokenizer()  # loaded before the clock starts: decoding texts is part of writing
            except BaseException:
                if created:  # nothing was computed: leave no store behind (and an overwritten one back)
                    shutil.rmtree(store.path, ignore_errors=True)
                    store._write_log_path.unlink(missing_ok=True)
                    for old, aside in self._replaced:
                        aside.rename(old)
                    log.info(
                        "nothing computed: %s", "the replaced store is back" if self._replaced else "no store left"
                    )
                raise
            for _, aside in self._replaced:  # the new run is under way: the store it replaces goes
                remove_path(aside, ignore_errors=True)
            t_loaded = time.perf_counter()
            generated = self._generate(todo, store, prompt_texts)
            t_done = time.perf_counter()
            stage_info = [executor.get(executor.call(w, "info")) for w in workers]
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
    def _run_log(path: Path) -> logging.Handler:
        """The run log beside the store (appended to by resumed runs), written by whichever
        process runs the coordinator, the driver or a Ray actor."""
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        return handler

    def _open_store(self, layout: StoreLayout, bounds) -> LensStore:
        spec = self.spec
        path = Path(spec.store_path)
        attrs = {**spec.attrs, "stages": [list(b) for b in bounds]}
        self._replaced = []  # (path, where it was set aside) of an overwritten store and its write log
        if (path / "zarr.json").exists():
            if spec.existing == "overwrite":  # set aside until the new run is under way
                for old in (path, write_log_path(path)):
                    aside = old.with_name(old.name + ".replaced")
                    remove_path(aside, ignore_errors=True)
                    if old.exists():
                        old.rename(aside)
                        self._replaced.append((old, aside))
            else:
                store = LensStore.open(path, mode="r+")
                same = store.attrs.get("fingerprint") == spec.attrs.get("fingerprint")
                if spec.existing == "resume" and same:
                    # micro-batch numbers index rows through the layout (rows per batch): a
                    # store cut another way cannot be continued
                    stored, wanted = store.attrs.get("layout") or {}, layout_dict(layout)
                    differ = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]
                    if differ:
                        raise StoreError(
                            f"output path {path} holds this config's run laid out differently ({', '.join(differ)}; "
                            "batch_rows is cluster.micro_batch_size): resume with the settings it was started "
                            "with, or pass overwrite=true to start again"
                        )
                    return store
                if spec.existing == "resume":  # resume was asked for, and the config differs
                    changed = _config_changes(store.attrs.get("config"), spec.attrs.get("config"))
                    raise StoreError(
                        f"output path {path} already holds a run with another config"
                        f"{' (' + changed + ')' if changed else ''}: resume continues the same config only; "
                        "pass overwrite=true to replace it, or choose another storage.run"
                    )
                what = "another config" if not same else "this config"
                raise StoreError(
                    f"output path {path} already holds a run with {what}: pass resume=true to "
                    "continue it (same config only), overwrite=true to replace it, or choose another storage.run"
                )
        elif path.exists() and any(path.iterdir()):
            raise StoreError(f"output path {path} exists and is not a lens store: choose another storage.run")
        return LensStore.create(path, layout, attrs)

    def _micro_batches(self, prompts, coefficients, pad_id: int) -> list[_MicroBatch]:
        out = []
        b = self.spec.micro_batch_size
        for index, start in enumerate(range(0, len(prompts), b)):
            group = prompts[start : start + b]
            coefs = np.asarray(coefficients[start : start + b], np.float32)
            cols = max(len(p) for p in group)
            ids = np.full((len(group), cols), pad_id, np.int64)
            mask = np.zeros((len(group), cols), np.int64)
            for i, p in enumerate(group):  # left padding: every row's next token is the last column
                ids[i, cols - len(p) :] = p
                mask[i, cols - len(p) :] = 1
            out.append(_MicroBatch(index, slice(start, start + len(group)), ids, mask, coefs))
        return out

    def _setup(self) -> list[dict]:
        ex, acks = self._ex, []
        for ranks in self._ranks:
            init = None
            if len(ranks) > 1:  # rendezvous at rank 0's own node, never the head's
                ip, port = ex.get(ex.call(ranks[0], "address"))
                init = f"tcp://{ip}:{port}"
            acks += [ex.call(w, "setup", init) for w in ranks]
        return [ex.get(a) for a in acks]

    # -- generation -----------------------------------------------------------------------------
    def _submit(self, mb: _MicroBatch, tokens, shared_stages: int = 0, base=None, index=None) -> None:
        """Feed columns `tokens` [rows, new] through every stage. The first `shared_stages`
        stages get only the distinct prompts' rows `tokens[base]`; the next stage widens their
        output back to every row (row i takes distinct row `index[i]`)."""
        ex, hidden = self._ex, None
        for s, ranks in enumerate(self._ranks):
            if s < shared_stages:
                args = (tokens[base], hidden)
            elif s == shared_stages and s:
                args = (tokens, hidden, index)
            else:
                args = (tokens, hidden)
            outs = [ex.call(w, "step", mb.index, *args, num_returns=2) for w in ranks]
            hidden = outs[0][0]
            mb.handles += [o[1] for o in outs]
        mb.last = hidden

    def _shared_columns(self, mb: _MicroBatch) -> int:
        """How many leading prompt columns no steering edit touches, when the micro-batch
        repeats prompts (a sweep); 0 = nothing to share. At least the last prompt column is
        always left out: its logits choose the first token, once per row."""
        spec = self.spec
        sources = self._sources[mb.rows]
        if not spec.share_prefix or len(np.unique(sources)) == len(sources):
            return 0
        cols = mb.input_ids.shape[1]
        pad = int((mb.attention_mask == 0).sum(1).min())
        first = {"all": 0, "prompt": 0, "last": cols - 1, "generated": cols}
        starts = [first[e.positions] if isinstance(e.positions, str) else pad + e.positions for e in spec.steering]
        return max(0, min([cols - 1, *starts]))

    def _shared_stages(self, mb: _MicroBatch) -> int:
        """How many leading stages hold only layers before every steering edit, when the
        micro-batch repeats prompts (a sweep): their prompt columns are alike for every
        coefficient. Never the last stage (its logits choose the first token, once per row)."""
        spec = self.spec
        sources = self._sources[mb.rows]
        if not spec.share_prefix or not spec.steering or len(np.unique(sources)) == len(sources):
            return 0
        first = min(e.layer for e in spec.steering)
        return sum(1 for _, end in self._bounds[:-1] if end <= first)

    def _start(self, mb: _MicroBatch) -> None:
        ex, spec = self._ex, self.spec
        workers = [w for r in self._ranks for w in r]
        split, early = self._shared_columns(mb), self._shared_stages(mb)
        if not split and not early:
            mb.handles += [
                ex.call(w, "start", mb.index, mb.attention_mask, spec.positions, mb.coefficients) for w in workers
            ]
            self._submit(mb, mb.input_ids)
            return
        # Prompts repeated along the batch (one row per coefficient): what no edit can reach runs
        # once per distinct prompt, then the stages replicate their state. That is the columns
        # before the first steered one (causal attention: they cannot see the edit) on every
        # stage, and the rest of the prompt on the stages before the first steered layer.
        # Rows are prompt-major, so the sorted distinct prompts are also in order of appearance:
        # `base` holds each one's first row and `index` maps every row to its prompt's position.
        _, base, index = np.unique(self._sources[mb.rows], return_index=True, return_inverse=True)
        earlier, later = ([w for r in ranks for w in r] for ranks in (self._ranks[:early], self._ranks[early:]))
        shared = earlier + later if split else earlier
        mb.handles += [
            ex.call(w, "start", mb.index, mb.attention_mask[base], spec.positions, np.ones(len(base)), True)
            for w in shared
        ]
        if split:
            self._submit(mb, mb.input_ids[base, :split])
            mb.handles += [ex.call(w, "expand", mb.index, index, mb.coefficients) for w in later]
        else:
            mb.handles += [
                ex.call(w, "start", mb.index, mb.attention_mask, spec.positions, mb.coefficients) for w in later
            ]
        self._submit(mb, mb.input_ids[:, split:], early, base, index)
        mb.handles += [ex.call(w, "expand", mb.index, index, mb.coefficients) for w in earlier]

    def _generate(self, todo: list[_MicroBatch], store: LensStore, prompt_texts) -> dict[int, list]:
        spec = self.spec
        queue, inflight, generated = list(todo), {}, {}
        bar = _progress(len(todo) * spec.max_new_tokens, "generate (tokens per row)", spec.progress)
        self._bar, self._stats = bar, _StageStats(self)
        while queue or inflight:
            try:
                self._advance(queue, inflight, generated, store, prompt_texts)
            except Exception as err:
                if not self._stage_lost(err):
                    raise
                if spec.tp_size > 1:
                    raise ClusterError(
                        f"a stage actor died and is not restarted (tp_size={spec.tp_size}: a tensor-parallel "
                        "group cannot re-form mid-run); finished micro-batches are in the store: run again "
                        "with resume=true"
                    ) from err
                self._recover(err, queue, inflight)
        bar.close()
        return generated

    def _advance(self, queue, inflight, generated, store, prompt_texts) -> None:
        """Fill the pipeline, then take one step's result from whichever micro-batch is ready."""
        spec, ex, bar = self.spec, self._ex, self._bar
        while queue and len(inflight) < spec.micro_batches_in_flight:
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
        self._inject_stage_fault(mb)
        if mb.steps < spec.max_new_tokens and not out["finished"].all():
            self._submit(mb, mb.last)
            return
        bar.update(spec.max_new_tokens - mb.steps)
        mb.counted = spec.max_new_tokens
        mb.handles += [ex.call(w, "finish", mb.index, mb.last) for r in self._ranks for w in r]
        chunks = [c for h in mb.handles for c in (ex.get(h) or [])]
        generated.update(self._write(mb, chunks, store, prompt_texts))
        del inflight[mb.index]
        log.info(
            "batch %d written: rows %d-%d, %d steps%s",
            mb.index, mb.rows.start, mb.rows.stop - 1, mb.steps, self._stats.text(),
        )  # fmt: skip

    def _stage_lost(self, err: Exception) -> bool:
        """A stage actor died, or restarted and lost its state (Ray actors only)."""
        if self._ex.name != "ray":
            return False
        from ray.exceptions import RayActorError

        return isinstance(err, RayActorError | LostStateError)

    def _recover(self, err: Exception, queue: list, inflight: dict) -> None:
        """Wait for every stage to answer again (Ray restarts a dead actor, which reloads its
        weights), set them up, and re-run the micro-batches that were in flight from their
        first step: finished micro-batches are in the store and are not touched."""
        spec, ex = self.spec, self._ex
        self.restarts += 1
        reason = str(err).strip().splitlines()[0][:200]
        log.warning("stage failure %d of at most %d: %s", self.restarts, spec.max_restarts, reason)
        print(f"[distlens] a stage failed ({reason}); re-running {len(inflight)} micro-batch(es)", file=sys.stderr)
        if self.restarts > spec.max_restarts:
            raise ClusterError(
                f"stages failed {self.restarts} times (cluster.max_restarts={spec.max_restarts}); "
                "finished micro-batches are in the store: run again with resume=true"
            ) from err
        deadline = time.monotonic() + spec.restart_timeout_s
        for worker, stage_spec in zip(self._workers, self._specs):
            while True:
                try:
                    ex.get(ex.call(worker, "rejoin", stage_spec))
                    break
                except Exception as again:
                    if not self._stage_lost(again):
                        raise
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"stage {stage_spec.stage} did not come back within {spec.restart_timeout_s:.0f}s"
                        ) from again
                    time.sleep(0.2)
        self._setup()
        self._stats.pending = None
        for mb in sorted(inflight.values(), key=lambda m: m.index, reverse=True):
            self._bar.update(-mb.counted)
            mb.steps, mb.counted, mb.generated, mb.scores, mb.handles, mb.last = 0, 0, [], [], [], None
            queue.insert(0, mb)
        inflight.clear()

    def _inject_stage_fault(self, mb: _MicroBatch) -> None:
        fault = self._faults.get("kill_stage")
        if not fault or fault.get("done") or (mb.index, mb.steps) != (fault["batch"], fault["step"]):
            return
        fault["done"] = True
        worker = self._ranks[fault["stage"]][0]
        pid = self._ex.get(self._ex.call(worker, "info"))["pid"]
        log.warning(
            "fault injection: SIGKILL stage %d (pid %d) at batch %d step %d", fault["stage"], pid, *(mb.index, mb.steps)
        )
        os.kill(pid, signal.SIGKILL)

    def _inject_driver_fault(self, store: LensStore, mb: _MicroBatch, data, texts) -> None:
        """Write the batch, killing or interrupting this process where the fault says."""
        kill, interrupt = self._faults.get("kill_driver"), self._faults.get("interrupt_driver")
        if kill and self._writes + 1 == kill["after_batches"] and kill.get("mid_write"):
            store.write_batch(mb.index, mb.rows, data, texts, mark_done=False)
            os.kill(os.getpid(), signal.SIGKILL)
        store.write_batch(mb.index, mb.rows, data, texts)
        self._writes += 1
        if kill and self._writes == kill["after_batches"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if interrupt and self._writes == interrupt["after_batches"]:
            os.kill(os.getpid(), signal.SIGINT)

    def _write(self, mb: _MicroBatch, chunks, store: LensStore, prompt_texts) -> dict[int, list]:
        """Lay one micro-batch out by row position (left pads removed) and write it whole."""
        spec = self.spec
        gen = np.stack(mb.generated, axis=1)  # [batch, steps]
        batch, prompt_cols = mb.input_ids.shape
        pad = (mb.attention_mask == 0).sum(1)
        eos = np.isin(gen, spec.sampling.eos_token_ids)
        gen_len = np.where(eos.any(1), eos.argmax(1) + 1, gen.shape[1])
        length = prompt_cols - pad + gen_len
        cols = np.concatenate([mb.input_ids, gen], axis=1)
        layout = store.attrs["layout"]
        n_pos, layers = layout["n_positions"], layout["layers"]
        tokens = np.full((batch, n_pos), -1, np.int32)
        for i in range(batch):
            tokens[i, : length[i]] = cols[i, pad[i] : pad[i] + length[i]]
        data = {
            "tokens": tokens,
            "lengths": length.astype(np.int32),
            "prompt_lengths": (prompt_cols - pad).astype(np.int32),
            "coefficient": mb.coefficients,
        }
        if mb.scores:
            scores = np.full((batch, spec.max_new_tokens, len(spec.score_ids)), np.nan, np.float32)
            steps = np.stack(mb.scores, axis=1)  # [batch, steps, choice]
            for i in range(batch):  # a row's scores end where its generation ended
                scores[i, : gen_len[i]] = steps[i, : gen_len[i]]
            data["scores"] = scores
        template = {}
        for c in chunks:
            for name, arr in c.arrays.items():
                if name not in template:
                    shape = (batch, len(layers), arr.shape[2], n_pos) + arr.shape[4:]
                    template[name] = np.full(shape, LENS_FIELDS.get(name, 0), arr.dtype)
        for c in chunks:
            l0 = layers.index(c.layers[0])
            for i in range(batch):
                # lens of row i exists at row positions [0, length - 1): the last token has no target
                a, b = max(c.col_start, pad[i]), min(c.col_end, pad[i] + length[i] - 1)
                if a >= b:
                    continue
                for name, arr in c.arrays.items():
                    template[name][i, l0 : l0 + len(c.layers), :, a - pad[i] : b - pad[i]] = arr[
                        i, :, :, a - c.col_start : b - c.col_start
                    ]
        data.update(template)
        if "topk_ids" in template:
            data["lens_mask"] = (template["topk_ids"][:, :, :, :, 0] >= 0).any(axis=(1, 2))
        texts = {"generated_text": [""] * batch, "prompt_text": [""] * batch}  # no tokenizer: empty, but written
        tok = self._tokenizer()
        if tok is not None:
            texts["generated_text"] = [tok.decode(gen[i, : gen_len[i]], skip_special_tokens=True) for i in range(batch)]
            texts["prompt_text"] = (
                [prompt_texts[r] for r in self._sources[mb.rows]]
                if prompt_texts
                else [tok.decode(cols[i, pad[i] : prompt_cols]) for i in range(batch)]
            )
        if self._faults:
            self._inject_driver_fault(store, mb, data, texts)
        else:
            store.write_batch(mb.index, mb.rows, data, texts)
        return {mb.rows.start + i: gen[i, : gen_len[i]].tolist() for i in range(batch)}

    def _tokenizer(self):
        if not hasattr(self, "_tok"):
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.spec.model_path)
            except Exception:  # tiny test checkpoints may carry no tokenizer
                self._tok = None
        return self._tok


class _StageStats:
    """Per-stage throughput for the progress bar and the run log: every few seconds each stage
    is asked (without waiting) for its busy time and tokens processed."""

    def __init__(self, coordinator: Coordinator, every_s: float = 2.0):
        self.c, self.every_s = coordinator, every_s
        self.last_poll, self.pending, self.rates = 0.0, None, {}

    def tick(self) -> None:
        ex = self.c._ex
        if self.pending is not None and ex.ready(self.pending):
            for stats in (ex.get(h) for h in self.pending):
                if stats["busy_s"] > 0:
                    self.rates[stats["stage"]] = stats["tokens"] / stats["busy_s"]
            self.pending = None
            bar = self.c._bar
            if self.rates and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(self.text().strip(" ,;"), refresh=False)
            elif self.rates and hasattr(bar, "set_description"):  # Ray's tqdm (coordinator in an actor)
                bar.set_description("generate (tokens per row)" + self.text())
        if self.pending is None and time.monotonic() - self.last_poll > self.every_s:
            self.last_poll = time.monotonic()
            self.pending = [ex.call(ranks[0], "stats") for ranks in self.c._ranks]

    def text(self) -> str:
        if not self.rates:
            return ""
        return "; stage tokens/s " + " ".join(f"s{k}={v:.0f}" for k, v in sorted(self.rates.items()))
