"""The stage worker: one contiguous slice of decoder layers, wrapped by DeepSpeed inference,
that captures its own layers' activations and runs the lens on them where they live (actors/lens_window.py).

A plain class: the `local` executor calls it in-process; the `ray` executor wraps it with
`ray.remote` where it is created. Only small things leave it: hidden states for the next
stage, sampled token ids (last stage), and compact lens chunks; never full-vocabulary logits.
"""

from __future__ import annotations

import actors.libraries  # noqa: F401  first: torch & co. imported with the collector paused, then frozen

# isort: split
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from actors import interventions
from actors.jacobian_fit import JacobianStage
from actors.lane import LaneStage
from actors.lens import LogitLens
from actors.lens_window import LensChunk, LensWindow, WindowBuffer
from actors.run_spec import CaptureSettings
from actors.sampling import SamplingSpec, choose_tokens
from actors.stage_hooks import HookedStage
from actors.vocabulary import MODEL_DTYPES

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}
TIMELINE_STEPS = 1024  # steps a stage logs: enough to see the pipeline fill; a corpus run does not grow it


class LostStateError(RuntimeError):
    """A call for a micro-batch this worker holds no state for: the process restarted (or was
    never set up) since the micro-batch started. The coordinator re-runs the micro-batch."""


@dataclass(frozen=True)
class StageSpec:
    stage: int
    num_stages: int
    start: int
    end: int
    model_path: str
    dtype: str = "float32"
    device: str = "cpu"
    tp_rank: int = 0
    tp_size: int = 1
    # The run's capture settings as a stage reads them (`stage_capture`): `layers` the global
    # indices to capture (every stage sees the same tuple), `tuned_lens` only when it is recorded.
    capture: CaptureSettings = field(default_factory=lambda: CaptureSettings(layers=()))
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    vectors: np.ndarray | None = None  # [n_vectors, d_model] the run's steering table, sent once
    steered: tuple[tuple[int, str], ...] = ()  # every (layer, site) some row edits; a stage hooks its own
    score_ids: tuple[int, ...] = ()  # last stage: report these tokens' logits at every step
    sequence_scores: bool = False  # last stage: each position's next-token log-prob and KL to a reference row
    reports: bool = True  # return lens chunks (StageGroup sets it: rank 0 of each stage reports)
    tune: object = None  # a tuned_lens.TuneSpec: train this stage's translators on the lens windows
    jacobian: object = None  # a jacobian_fit.FitSpec: fit this stage's layers' Jacobian-lens sums

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass
class _BatchState:
    cache: object
    attention_mask: torch.Tensor  # [batch, cols fed so far]
    prompt_mask: torch.Tensor  # [batch, prompt_cols]
    next_position: torch.Tensor  # [batch]
    pad: torch.Tensor  # [batch] left pads
    prompt_cols: int
    positions: object  # "all" | "prompt" | "generated" | tuple of row positions
    buffer: WindowBuffer = field(default_factory=WindowBuffer)  # tokens and captured states for the lens
    cols: int = 0
    finished: torch.Tensor | None = None
    generator: torch.Generator | None = None
    terms: dict = field(default_factory=dict)  # (layer, site) -> [(positions, [batch, d_model])], see edit_terms
    do: dict = field(default_factory=dict)  # (layer, site) -> [(row, Intervention)], see actors/interventions.py
    sources: dict = field(default_factory=dict)  # row -> the patch-source key it carries
    compare: dict = field(default_factory=dict)  # row -> its KLReference or KLTo (last stage's readout)
    shared: bool = False  # a shared prefix: no lens flush and no sampling until `expand`

    def advance(self, new: int, device) -> torch.Tensor:
        """Extend the attention mask by `new` columns; returns their position ids [batch, new]."""
        if self.cols < self.prompt_cols:  # prompt columns (in one piece or several): HF's
            # generate positions, where left pads don't count
            if self.cols + new > self.prompt_cols:
                raise ValueError(f"step feeds {new} columns past the prompt's {self.prompt_cols - self.cols} left")
            mask = self.prompt_mask
            self.attention_mask = mask[:, : self.cols + new]
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, self.cols : self.cols + new]
        else:
            ones = torch.ones(self.attention_mask.shape[0], new, dtype=torch.long, device=device)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
            position_ids = self.next_position[:, None] + torch.arange(new, device=device)[None, :]
        self.next_position = position_ids[:, -1] + 1
        return position_ids

    def select(self, idx: torch.Tensor, dev_idx: torch.Tensor, prefix_finals: list) -> None:
        """Row i becomes row `idx[i]` (`dev_idx` on the stage's device): its KV cache, masks,
        pads and lens buffer (see `WindowBuffer.select`)."""
        self.cache.batch_select_indices(dev_idx)
        self.attention_mask = self.attention_mask[dev_idx]
        self.prompt_mask = self.prompt_mask[dev_idx]
        self.next_position = self.next_position[dev_idx]
        self.pad = self.pad[idx]
        self.buffer.select(idx, dev_idx, prefix_finals)
        if self.finished is not None:
            self.finished = self.finished[idx]


def _node_id() -> str | None:
    ray = sys.modules.get("ray")  # a process that never imported Ray (the in-process executor's) runs on no Ray node
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


class StageWorker(HookedStage, LaneStage, JacobianStage):
    """Holds layers `[spec.start, spec.end)` and runs prefill/decode steps for micro-batches
    (static ones here; continuous batching's lanes in actors/lane.py)."""

    def __init__(self, spec: StageSpec):
        self.configure(spec)

    def configure(self, spec: StageSpec) -> None:
        """Take a (new) stage spec. A pooled worker keeps its loaded weights when the slice is
        unchanged (only hooks for capture and steering are rebuilt by `setup`), and otherwise
        loads the new slice: another run or split without a new process."""
        old = getattr(self, "spec", None)
        if old is not None and tp_place(old) != tp_place(spec):
            raise ValueError(
                f"a pooled worker in tensor-parallel place {tp_place(old)} (stage, rank, size) cannot take place "
                f"{tp_place(spec)}: its process group is fixed; create fresh workers"
            )
        same_slice = old is not None and hasattr(self, "engine") and _slice_key(old) == _slice_key(spec)
        self._loaded = same_slice
        self.spec = spec
        self.forward_calls = 0
        self.timeline: list[tuple[int, float, float]] = []  # (micro-batch, start, end): the first steps
        self._states: dict[int, _BatchState] = {}
        self._lanes: dict = {}  # continuous batching: lane -> actors.lane._Lane
        self.busy_s, self.tokens = 0.0, 0  # forward time and token columns x rows processed
        self.lens_s = 0.0  # time in the lens (the windows' projections and their summaries)
        self._jacobian = None  # the Jacobian-lens fitter (JacobianStage), made by its first call

    def stats(self) -> dict:
        """Cheap counters for the coordinator's progress bar (per-stage throughput)."""
        stats = {"stage": self.spec.stage, "busy_s": self.busy_s, "tokens": self.tokens}
        trainer = getattr(getattr(self, "window", None), "trainer", None)
        if trainer is not None and trainer.last_loss is not None:  # training: the last step's mean KL
            stats.update(step=trainer.step, loss=trainer.last_loss)
        return stats

    def rejoin(self, spec: StageSpec) -> int:
        """After a stage failure: take `spec` again before `setup`. A survivor keeps its weights
        and counters; a restarted process (fresh from its constructor) or a new slice loads.
        Returns this process's pid."""
        if hasattr(self, "engine") and _slice_key(self.spec) == _slice_key(spec):
            self.spec = spec
        else:
            self.configure(spec)
        return os.getpid()

    def _state(self, mb: int) -> _BatchState:
        try:
            return self._states[mb]
        except KeyError:
            raise LostStateError(
                f"stage {self.spec.stage} (pid {os.getpid()}) holds no state for micro-batch {mb}: "
                "it restarted since the micro-batch began"
            ) from None

    # -- set-up ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """(ip, free port) of this process: rank 0's is the stage group's rendezvous."""
        import ray

        from actors.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, init_method: str | None = None) -> dict:
        """Join the stage's TP group (if any), load this stage's weights, wrap with DeepSpeed."""
        spec = self.spec
        if not self._loaded:
            self._load(init_method)
            self._loaded = True
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []
        self._capture: dict | None = None
        self._step: tuple | None = None  # (state, first column, new columns) while a step runs
        self._steered = [(layer, site) for layer, site in spec.steered if spec.start <= layer < spec.end]
        self._vectors = None
        if self._steered and spec.vectors is not None:  # a server's rows carry their vectors (VectorEdit)
            table = torch.tensor(np.array(spec.vectors, np.float32))
            if table.ndim != 2 or table.shape[1] != self.config.hidden_size:
                raise ValueError(
                    f"steering vectors have shape {tuple(table.shape)}; this model needs [n, {self.config.hidden_size}]"
                )
            self._vectors = table.to(self.device)
        self._install_hooks()
        self._patch_sources: dict = {}  # (source key, layer, site) -> [prompt length, d], see interventions
        self._kl_refs: dict = {}  # KL reference key -> {position: log-probs [vocab]} (last stage)
        self._states: dict[int, _BatchState] = {}
        self._lanes = {}
        self.window = LensWindow(spec, self.lens, self.config, self.device)  # the tuned lens and its training too
        return self.info()

    def _load(self, init_method: str | None) -> None:
        import deepspeed
        from transformers import AutoConfig

        from actors.slicing import build_stage

        spec = self.spec
        self.loads = getattr(self, "loads", 0) + 1
        self.device = torch.device(spec.device)
        if spec.tp_size > 1 and not torch.distributed.is_initialized():  # a pooled rank is in its group already
            from actors.distributed import init_stage_group

            backend = "nccl" if self.device.type == "cuda" else "gloo"
            init_stage_group(init_method, spec.tp_rank, spec.tp_size, backend)
        dtype = DTYPES[spec.dtype]
        model, norm, lm_head = build_stage(
            spec.model_path, AutoConfig.from_pretrained(spec.model_path), spec.start, spec.end, dtype, self.device
        )
        self.config = model.config
        self.engine = deepspeed.init_inference(
            model,
            dtype=dtype,
            tensor_parallel={"tp_size": spec.tp_size},
            replace_with_kernel_inject=False,
        )
        self.model = self.engine.module
        if spec.tp_size > 1:
            from actors.distributed import adapt_to_tensor_parallel

            adapt_to_tensor_parallel(self.model, self.model.adapter)
        if self.device.type == "cpu":  # decoding steps' matrix-vector products on every thread
            from actors.gemv import split_linears

            split_linears(self.model)
        softcap = self.model.adapter.softcap(self.config)
        self.lens = LogitLens(norm, lm_head, spec.tp_rank, spec.tp_size, softcap=softcap)

    def info(self) -> dict:
        """What this worker holds and has done; before `setup` (nothing loaded yet) params are 0."""
        loaded = [m for m in (getattr(self, "model", None), getattr(self, "lens", None)) if m is not None]
        n_params = sum(p.numel() for m in loaded for p in m.parameters())
        return {
            "stage": self.spec.stage,
            "tp_rank": self.spec.tp_rank,
            "layers": (self.spec.start, self.spec.end),
            "pid": os.getpid(),
            "node_id": _node_id(),  # the Ray node this worker runs on (None outside Ray)
            "device": str(getattr(self, "device", self.spec.device)),
            "params": n_params,
            "forward_calls": self.forward_calls,
            "tokens": self.tokens,  # rows x columns this stage has run
            "busy_s": self.busy_s,  # forward time
            "lens_s": self.lens_s,  # lens time
            "weight_loads": getattr(self, "loads", 0),  # times this process loaded a slice (pooled runs reuse it)
            "timeline": list(self.timeline),
            # ru_maxrss is KiB on Linux: this process's peak resident memory so far.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    # -- micro-batch lifecycle --------------------------------------------------------------
    def start(self, mb: int, attention_mask: np.ndarray, positions="all", edits=None, shared=False) -> None:
        """Open micro-batch `mb`; attention_mask: [batch, prompt_cols] (left-padded prompts);
        edits: [batch] each row's RowEdits (default none).
        shared: these rows are a shared prefix that `expand` will replicate (see there)."""
        from transformers import DynamicCache

        mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        state = _BatchState(
            cache=DynamicCache(config=self.config),
            attention_mask=mask[:, :0].to(self.device),
            prompt_mask=mask.to(self.device),
            next_position=torch.zeros(mask.shape[0], dtype=torch.long, device=self.device),
            pad=(mask == 0).sum(-1),
            prompt_cols=mask.shape[1],
            positions=positions if isinstance(positions, str) else tuple(positions),
        )
        self._take_edits(state, edits, mask.shape[0])
        if self.spec.is_last:
            state.finished = torch.zeros(mask.shape[0], dtype=torch.bool)
            state.generator = torch.Generator().manual_seed(self.spec.sampling.seed * 1_000_003 + mb)
        state.shared = bool(shared)
        self._states[mb] = state

    def expand(self, mb: int, index, edits, prefix=None) -> None:
        """Replicate a shared prefix: row i of the micro-batch becomes prefix row `index[i]`,
        with its KV cache, buffered activations and tokens, and takes the steering edits
        `edits[i]`. Rows of one prompt whose edits start at column c compute columns < c once
        (causal attention: they cannot see the edit) and only the rest once per row. `prefix`:
        the last stage's output for the shared columns (their final-normed states)."""
        state = self._state(mb)
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        state.select(idx, idx.to(self.device), self.window.finals_of(prefix))
        self._take_edits(state, edits, len(idx))
        state.shared = False

    @torch.no_grad()
    def step(self, mb: int, tokens, upstream=None, upstream_rows=None):
        """Feed new columns of micro-batch `mb`.

        tokens: [batch, new] ids of the new columns (every stage gets them: they are the lens
        targets of earlier columns); upstream: the previous stage's hidden [batch, new, d_model];
        upstream_rows: [batch] the upstream row each row takes, when the previous stage ran a
        shared prefix with fewer rows (see `expand`).
        Returns `(forward_out, lens_chunks)`: forward_out is hidden for the next stage, or on
        the last stage `{"tokens": [batch], "finished": [batch]}`.
        """
        state = self._state(mb)
        state.buffer.finals += self.window.finals_of(tokens)
        tokens = _as_columns(tokens)
        new = tokens.shape[1]
        position_ids = state.advance(new, self.device)
        x = (
            tokens.to(self.device)
            if self.spec.stage == 0
            else torch.as_tensor(upstream).to(self.device, self.lens.weight.dtype)
        )
        if upstream_rows is not None:
            x = x[torch.as_tensor(np.asarray(upstream_rows), dtype=torch.long, device=x.device)]
        first = state.cols
        hidden, captured = self._forward(mb, state, first, x, state.attention_mask, position_ids, state.cache)
        self.window.hold(state.buffer, captured, tokens)
        state.cols += new
        chunks = [] if state.shared else self._flush(mb, state, force=False)
        if not self.spec.reports:  # every TP rank computes the merged lens; one sends it
            chunks = []
        if not self.spec.is_last:
            return hidden.cpu() if self.device.type != "cpu" else hidden, chunks
        final = {}
        if self.window.wants_finals:  # every stage's KL to the final layer: d_model floats per position
            final["final"] = self.lens.norm(hidden).cpu()
        if self.spec.sequence_scores:  # a few floats per position (actors/interventions.py)
            logits = lambda: self.lens.full_logits(hidden)  # noqa: E731  (only for micro-batches that compare)
            final.update(interventions.sequence_scores(logits, tokens, state, first, state.compare, self._kl_refs))
        if state.shared:  # a prefix's last column is not the prompt's: nothing to sample yet
            return final, chunks
        return _next_tokens(self.lens, hidden, state, self.spec, final), chunks

    def _forward(self, mb: int, view, start: int, x, attention_mask, position_ids, cache) -> tuple:
        """One forward of columns `[start, start + new)`; `view` is what the hooks' edit masks
        read (a micro-batch's state, or a lane's `_View`). Returns `(hidden, captured)`."""
        self._capture = {}
        self._step = (view, start, x.shape[1])
        started = time.time()
        try:
            hidden = self.engine(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        finally:
            self._step = None
        if self.device.type == "cuda":  # the forward's kernels, not only their launch, in busy_s
            torch.cuda.synchronize(self.device)
        finished = time.time()
        if len(self.timeline) < TIMELINE_STEPS:
            self.timeline.append((mb, started, finished))
        self.busy_s += finished - started
        self.tokens += int(x.shape[0] * x.shape[1])
        captured, self._capture = self._capture, None
        self.forward_calls += 1
        return hidden, captured

    @torch.no_grad()
    def finish(self, mb: int, last_tokens) -> list[LensChunk]:
        """Close micro-batch `mb`: `last_tokens` [batch, 1] are the targets of the final column."""
        state = self._state(mb)
        del self._states[mb]
        state.buffer.finals += self.window.finals_of(last_tokens)
        state.buffer.tokens.append(_as_columns(last_tokens))
        chunks = self._flush(mb, state, force=True)
        return chunks if self.spec.reports else []

    def _flush(self, mb: int, state: _BatchState, force: bool) -> list[LensChunk]:
        started = time.time()
        chunks = self.window.flush(mb, state, force)
        if chunks:  # time in the lens: the windows' projections and their summaries
            self.lens_s += time.time() - started
        return chunks


def _next_tokens(lens: LogitLens, hidden: torch.Tensor, state: _BatchState, spec: StageSpec, final: dict) -> dict:
    """The last stage's step output: each row's next token from the last column's logits
    (the pad id once a row has finished), which rows have finished, `final` and the logits of
    `spec.score_ids`."""
    logits = lens.full_logits(hidden[:, -1])  # [batch, vocab]: stays on this stage
    chosen = choose_tokens(logits, spec.sampling, state.generator).cpu()
    sampling = spec.sampling
    chosen = torch.where(state.finished, torch.full_like(chosen, sampling.pad_token_id), chosen)
    state.finished = state.finished | torch.isin(chosen, torch.tensor(sampling.eos_token_ids, dtype=torch.long))
    out = {"tokens": chosen.numpy(), "finished": state.finished.numpy().copy(), **final}
    if spec.score_ids:  # a few chosen logits (e.g. answer letters), never the vocabulary
        out["scores"] = logits[:, list(spec.score_ids)].float().cpu().numpy()
        out["score_logz"] = torch.logsumexp(logits.float(), dim=-1).cpu().numpy()  # log-probs = scores - logz
    return out


def tp_place(spec: StageSpec) -> tuple:
    """Where a rank sits in its stage's tensor-parallel world; tp_size 1 sits in none."""
    return (spec.stage, spec.tp_rank, spec.tp_size) if spec.tp_size > 1 else (None, 0, 1)


def _slice_key(spec: StageSpec) -> tuple:
    return (spec.model_path, spec.start, spec.end, spec.dtype, spec.device, spec.tp_rank, spec.tp_size)


def _as_columns(tokens) -> torch.Tensor:
    """New token columns [batch, new], from an id array or the last stage's step output (which
    lets the executor hand that output straight to the first stage without looking at it)."""
    if isinstance(tokens, dict):
        return torch.tensor(np.asarray(tokens["tokens"]), dtype=torch.long)[:, None]
    return torch.tensor(np.asarray(tokens), dtype=torch.long)
