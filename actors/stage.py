"""The stage worker: one contiguous slice of decoder layers, wrapped by DeepSpeed inference,
that captures its own layers' activations and runs the lens on them where they live.

A plain class: the `local` executor calls it in-process; the `ray` executor wraps it with
`ray.remote` where it is created. Only small things leave it: hidden states for the next
stage, sampled token ids (last stage), and compact lens chunks; never full-vocabulary logits.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.adapters import get_path
from actors.lens import LogitLens
from actors.run_spec import CaptureSettings
from actors.sampling import SamplingSpec, choose_tokens
from actors.steering import edit_terms
from actors.vocabulary import LENS_FIELDS, MODEL_DTYPES, SITES

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


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
    reports: bool = True  # return lens chunks (StageGroup sets it: rank 0 of each stage reports)
    tune: object = None  # a tuned_lens.TuneSpec: train this stage's translators on the lens windows

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass
class LensChunk:
    """Lens results of one micro-batch, one stage, columns `[col_start, col_end)` of the
    micro-batch's left-padded layout. Arrays are `[batch, stage_layers, component, n, ...]`."""

    micro_batch: int
    stage: int
    layers: tuple[int, ...]
    col_start: int
    col_end: int
    arrays: dict[str, np.ndarray]


@dataclass
class _BatchState:
    cache: object
    attention_mask: torch.Tensor  # [batch, cols fed so far]
    prompt_mask: torch.Tensor  # [batch, prompt_cols]
    next_position: torch.Tensor  # [batch]
    pad: torch.Tensor  # [batch] left pads
    prompt_cols: int
    positions: object  # "all" | "prompt" | "generated" | tuple of row positions
    tokens: list = field(default_factory=list)  # [batch, n] int64 pieces, fed so far
    pending: dict = field(default_factory=dict)  # (layer, comp) -> [hidden [batch, n, d], ...]
    pending_start: int = 0
    finals: list = field(default_factory=list)  # [batch, n, d] final-normed states from pending_start on
    cols: int = 0
    finished: torch.Tensor | None = None
    generator: torch.Generator | None = None
    terms: dict = field(default_factory=dict)  # (layer, site) -> [(positions, [batch, d_model])], see edit_terms
    shared: bool = False  # a shared prefix: no lens flush and no sampling until `expand`


def _wanted(state: _BatchState, start: int, end: int, sel=None) -> torch.Tensor:
    """[batch, end - start] bool: real tokens at the selected positions (default: the
    micro-batch's capture positions)."""
    cols = torch.arange(start, end)[None, :]
    row_pos = cols - state.pad[:, None]
    real = row_pos >= 0
    sel = state.positions if sel is None else sel
    if sel == "all":
        return real
    if sel == "prompt":
        return real & (cols < state.prompt_cols)
    if sel == "generated":
        return real & (cols >= state.prompt_cols)
    if sel == "last":
        return real & (cols == state.prompt_cols - 1)
    return real & torch.isin(row_pos, torch.tensor(sel, dtype=torch.long))


def _edit_mask(state: _BatchState, start: int, end: int, positions) -> torch.Tensor:
    """[batch, end - start] bool: where a steering edit with `positions` applies."""
    if isinstance(positions, int):
        cols = torch.arange(start, end)[None, :]
        return (cols - state.pad[:, None]) >= positions
    if positions == "all":
        return torch.ones(len(state.pad), end - start, dtype=torch.bool)
    return _wanted(state, start, end, positions)


def _hook_input(module, transform):
    """Rewrite the tensor `module` reads: its first positional argument or `hidden_states=`."""

    def pre(m, args, kwargs):
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _hook_output(module, transform):
    """Rewrite the tensor `module` returns (the first element of a returned tuple)."""

    def post(m, args, out):
        return (transform(out[0]), *out[1:]) if isinstance(out, tuple) else transform(out)

    return module.register_forward_hook(post)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class StageWorker:
    """Holds layers `[spec.start, spec.end)` and runs prefill/decode steps for micro-batches."""

    def __init__(self, spec: StageSpec):
        self.configure(spec)

    def configure(self, spec: StageSpec) -> None:
        """Take a (new) stage spec. A pooled worker keeps its loaded weights when the slice is
        unchanged (only hooks for capture and steering are rebuilt by `setup`), and otherwise
        loads the new slice: another run or split without a new process."""
        old = getattr(self, "spec", None)
        if old is not None and spec.tp_size > 1:
            raise ValueError("a pooled worker cannot join a new tensor-parallel group; create fresh workers")
        same_slice = old is not None and hasattr(self, "engine") and _slice_key(old) == _slice_key(spec)
        self._loaded = same_slice
        self.spec = spec
        self.forward_calls = 0
        self.timeline: list[tuple[int, float, float]] = []  # (micro-batch, start, end) per step
        self._states: dict[int, _BatchState] = {}
        self.busy_s, self.tokens = 0.0, 0  # forward time and token columns x rows processed
        self.lens_s = 0.0  # time in the lens (the windows' projections and their summaries)

    def stats(self) -> dict:
        """Cheap counters for the coordinator's progress bar (per-stage throughput)."""
        stats = {"stage": self.spec.stage, "busy_s": self.busy_s, "tokens": self.tokens}
        trainer = getattr(self, "_trainer", None)
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
        if self._steered:
            table = torch.tensor(np.array(spec.vectors, np.float32))
            if table.ndim != 2 or table.shape[1] != self.config.hidden_size:
                raise ValueError(
                    f"steering vectors have shape {tuple(table.shape)}; this model needs [n, {self.config.hidden_size}]"
                )
            self._vectors = table.to(self.device)
        self._install_hooks()
        self._states: dict[int, _BatchState] = {}
        self._trainer = None
        self._tuned = None  # this stage's translators, when the run records the tuned lens
        if spec.capture.tuned_lens and spec.capture.lens:
            from actors.tuned_lens import load_translators

            mine = tuple(i for i in spec.capture.layers if spec.start <= i < spec.end)
            n = self.config.num_hidden_layers
            self._tuned, _ = load_translators(spec.capture.tuned_lens, "", self.config.hidden_size, n, only=mine)
            self._tuned.to(self.device)
        if spec.tune is not None:  # fresh, or from the checkpoint of spec.tune.resume_step
            from actors.tuned_lens import TranslatorTrainer

            last = self.config.num_hidden_layers - 1  # its lens is the final distribution: nothing to learn
            layers = tuple(i for i in spec.capture.layers if spec.start <= i < spec.end and i != last)
            self._trainer = TranslatorTrainer(
                spec.tune, self.lens, layers, self.config.hidden_size, spec.stage, self.device
            )
        return self.info()

    def _load(self, init_method: str | None) -> None:
        import deepspeed
        from transformers import AutoConfig

        from actors.slicing import build_stage

        spec = self.spec
        self.loads = getattr(self, "loads", 0) + 1
        self.device = torch.device(spec.device)
        if spec.tp_size > 1:
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

    def _install_hooks(self) -> None:
        """One hook per (layer, site) that is steered or captured: the edit first, so a capture
        at the same site records the steered activation that flows on. Where a site sits in a
        layer is the family's adapter row."""
        capture = self.spec.capture
        sites = self.model.adapter.sites_for(self.config)
        for offset, layer in enumerate(self.model.layers):
            index = self.spec.start + offset
            for site in SITES:
                steered = (index, site) in self._steered
                record = index in capture.layers and site in capture.components
                if not steered and not record:
                    continue
                path, which = sites[site]
                module = get_path(layer, path)
                hook = (_hook_input if which == "in" else _hook_output)(module, self._transform(index, site, record))
                self._hooks.append(hook)

    def _transform(self, layer: int, site: str, record: bool):
        def transform(hidden: torch.Tensor) -> torch.Tensor:  # hidden: [batch, new, d_model]
            if self._step is not None:
                state, start, new = self._step
                for positions, per_row in state.terms.get((layer, site), ()):
                    mask = _edit_mask(state, start, start + new, positions).to(hidden.device)
                    # the edit is float32 (coefficient x vector), cast to the model's dtype once added
                    hidden = hidden + (mask[:, :, None].float() * per_row[:, None, :]).to(hidden.dtype)
            if record and self._capture is not None:
                self._capture.setdefault((layer, site), []).append(hidden.detach())
            return hidden

        return transform

    @property
    def _wants_finals(self) -> bool:
        """Whether this run's lens needs the final layer's states (every stage of it does)."""
        c = self.spec.capture
        return bool(c.layers) and c.lens and c.kl_to_final

    def _translated(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """h + A_l h + b_l for a layer with a translator; h itself for one without (the last)."""
        return self._tuned(hidden, layer) if layer in self._tuned.layers else hidden

    def _finals_of(self, output) -> list:
        """The final-normed states [batch, n, d] in a last-stage output, on this device."""
        if not isinstance(output, dict) or output.get("final") is None or not self.captured_keys:
            return []
        return [torch.as_tensor(output["final"]).to(self.device, self.lens.weight.dtype)]

    @property
    def captured_keys(self) -> list[tuple[int, str]]:
        layers = [i for i in range(self.spec.start, self.spec.end) if i in self.spec.capture.layers]
        return [(i, c) for i in layers for c in self.spec.capture.components]

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
        state.terms = self._terms(edits, mask.shape[0])
        if self.spec.is_last:
            state.finished = torch.zeros(mask.shape[0], dtype=torch.bool)
            state.generator = torch.Generator().manual_seed(self.spec.sampling.seed * 1_000_003 + mb)
        state.shared = bool(shared)
        self._states[mb] = state

    def _terms(self, edits, rows: int) -> dict:
        if edits is None or self._vectors is None:
            return {}
        if len(edits) != rows:
            raise ValueError(f"edits are given for {len(edits)} rows; the micro-batch has {rows}")
        return edit_terms(edits, self._vectors, self._steered)

    def expand(self, mb: int, index, edits, prefix=None) -> None:
        """Replicate a shared prefix: row i of the micro-batch becomes prefix row `index[i]`,
        with its KV cache, buffered activations and tokens, and takes the steering edits
        `edits[i]`. Rows of one prompt whose edits start at column c compute columns < c once
        (causal attention: they cannot see the edit) and only the rest once per row. `prefix`:
        the last stage's output for the shared columns (their final-normed states)."""
        state = self._state(mb)
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        dev_idx = idx.to(self.device)
        state.cache.batch_select_indices(dev_idx)
        state.attention_mask = state.attention_mask[dev_idx]
        state.prompt_mask = state.prompt_mask[dev_idx]
        state.next_position = state.next_position[dev_idx]
        state.pad = state.pad[idx]
        state.tokens = [t[idx] for t in state.tokens]
        state.pending = {key: [h[dev_idx] for h in hs] for key, hs in state.pending.items()}
        state.finals = [f[dev_idx] for f in [*self._finals_of(prefix), *state.finals]]
        state.terms = self._terms(edits, len(idx))
        if state.finished is not None:
            state.finished = state.finished[idx]
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
        state.finals += self._finals_of(tokens)
        tokens = _as_columns(tokens)
        new = tokens.shape[1]
        if state.cols < state.prompt_cols:  # prompt columns (in one piece or several): HF's
            # generate positions, where left pads don't count
            if state.cols + new > state.prompt_cols:
                raise ValueError(f"step feeds {new} columns past the prompt's {state.prompt_cols - state.cols} left")
            mask = state.prompt_mask
            state.attention_mask = mask[:, : state.cols + new]
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, state.cols : state.cols + new]
        else:
            ones = torch.ones(state.attention_mask.shape[0], new, dtype=torch.long, device=self.device)
            state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
            position_ids = state.next_position[:, None] + torch.arange(new, device=self.device)[None, :]
        state.next_position = position_ids[:, -1] + 1
        x = (
            tokens.to(self.device)
            if self.spec.stage == 0
            else torch.as_tensor(upstream).to(self.device, self.lens.weight.dtype)
        )
        if upstream_rows is not None:
            x = x[torch.as_tensor(np.asarray(upstream_rows), dtype=torch.long, device=x.device)]
        self._capture = {}
        self._step = (state, state.cols, new)
        started = time.time()
        try:
            hidden = self.engine(x, attention_mask=state.attention_mask, position_ids=position_ids, cache=state.cache)
        finally:
            self._step = None
        if self.device.type == "cuda":  # the forward's kernels, not only their launch, in busy_s
            torch.cuda.synchronize(self.device)
        finished = time.time()
        self.timeline.append((mb, started, finished))
        self.busy_s += finished - started
        self.tokens += int(tokens.shape[0] * new)
        captured, self._capture = self._capture, None
        self.forward_calls += 1
        for key in self.captured_keys:
            state.pending.setdefault(key, []).extend(captured.get(key, []))
        state.tokens.append(tokens)
        state.cols += new
        chunks = [] if state.shared else self._flush(mb, state, force=False)
        if not self.spec.reports:  # every TP rank computes the merged lens; one sends it
            chunks = []
        if not self.spec.is_last:
            return hidden.cpu() if self.device.type != "cpu" else hidden, chunks
        final = {}
        if self._wants_finals:  # every stage's KL to the final layer: d_model floats per position
            final["final"] = self.lens.norm(hidden).cpu()
        if state.shared:  # a prefix's last column is not the prompt's: nothing to sample yet
            return final, chunks
        logits = self.lens.full_logits(hidden[:, -1])  # [batch, vocab]: stays on this stage
        chosen = choose_tokens(logits, self.spec.sampling, state.generator).cpu()
        sampling = self.spec.sampling
        chosen = torch.where(state.finished, torch.full_like(chosen, sampling.pad_token_id), chosen)
        state.finished = state.finished | torch.isin(chosen, torch.tensor(sampling.eos_token_ids, dtype=torch.long))
        out = {"tokens": chosen.numpy(), "finished": state.finished.numpy().copy(), **final}
        if self.spec.score_ids:  # a few chosen logits (e.g. answer letters), never the vocabulary
            out["scores"] = logits[:, list(self.spec.score_ids)].float().cpu().numpy()
        return out, chunks

    @torch.no_grad()
    def finish(self, mb: int, last_tokens) -> list[LensChunk]:
        """Close micro-batch `mb`: `last_tokens` [batch, 1] are the targets of the final column."""
        state = self._state(mb)
        del self._states[mb]
        state.finals += self._finals_of(last_tokens)
        state.tokens.append(_as_columns(last_tokens))
        chunks = self._flush(mb, state, force=True)
        return chunks if self.spec.reports else []

    def _flush(self, mb: int, state: _BatchState, force: bool) -> list[LensChunk]:
        """Run the lens over buffered columns whose next token is known, one window at a time."""
        known_end = sum(t.shape[1] for t in state.tokens) - 1  # columns < this have a target
        if not self.captured_keys:  # nothing captured on this stage (or in this run)
            return []
        if self._wants_finals:  # ... and the final layer's state
            known_end = min(known_end, state.pending_start + sum(f.shape[1] for f in state.finals))
        window = self.spec.capture.window
        chunks = []
        while state.pending_start < known_end and (force or known_end - state.pending_start >= window):
            end = min(known_end, state.pending_start + window)
            started = time.time()
            chunks.append(self._lens_chunk(mb, state, state.pending_start, end))
            self.lens_s += time.time() - started
            state.pending_start = end
        return chunks

    def _lens_chunk(self, mb: int, state: _BatchState, start: int, end: int) -> LensChunk:
        spec = self.spec.capture
        all_tokens = torch.cat(state.tokens, dim=1)  # [batch, cols (+1 at finish)]
        targets = all_tokens[:, start + 1 : end + 1]  # [batch, n]
        wanted = _wanted(state, start, end)  # [batch, n]
        flat_wanted = wanted.reshape(-1)
        batch, n = wanted.shape
        keys = self.captured_keys
        layers = tuple(dict.fromkeys(i for i, _ in keys))
        comps = spec.components
        shape = (batch, len(layers), len(comps), n)
        with_k = {"topk_ids", "topk_logprobs"}
        prefixes = ("", "tuned_") if self._tuned is not None else ("",)
        out = {
            prefix + name: np.full(
                shape + ((spec.k,) if name in with_k else ()), fill, np.float32 if fill != -1 else np.int32
            )
            for prefix in prefixes
            for name, fill in LENS_FIELDS.items()
        }
        if spec.activations:
            d = self.config.hidden_size
            out["activations"] = np.zeros(shape + (d,), _numpy_storage_dtype(spec.activations))
        rows = flat_wanted.nonzero()[:, 0]
        windows = {}
        for key in keys:
            buf = state.pending[key]
            hidden = torch.cat(buf, dim=1) if len(buf) > 1 else buf[0]  # [batch, pending, d]
            windows[key], rest = hidden[:, : end - start], hidden[:, end - start :]
            state.pending[key] = [rest] if rest.shape[1] else []
        final = None
        if self._wants_finals:
            held = torch.cat(state.finals, dim=1) if len(state.finals) > 1 else state.finals[0]
            final, rest = held[:, : end - start], held[:, end - start :]
            state.finals = [rest] if rest.shape[1] else []
        if self._trainer is not None and rows.numel():  # training: one optimizer step per window
            dev_rows = rows.to(self.device)
            d = final.shape[-1]
            hidden = {
                layer: windows[(layer, comp)].reshape(batch * n, d)[dev_rows]
                for layer, comp in keys
                if comp == "resid_post" and layer in self._trainer.translators.layers
            }
            losses = self._trainer.train(hidden, final.reshape(batch * n, d)[dev_rows])
            where = rows.numpy()
            for layer, kl in losses.items():  # the tuned lens's KL before the step, per position
                li, ci = layers.index(layer), comps.index("resid_post")
                dest = out["kl_to_final"][:, li, ci].reshape(batch * n)
                dest[where] = kl.cpu().numpy()
                out["kl_to_final"][:, li, ci] = dest.reshape(batch, n)
        elif rows.numel() and spec.lens:  # every TP rank sees the same rows, so all or none reach the collectives
            # One lens call over every captured (layer, component) of the window: the
            # unembedding GEMM runs over many rows at once instead of one window per layer.
            # Rows are position-major ([position, key]): a position's final distribution is
            # rebuilt once for all its layers and components.
            dev_rows = rows.to(self.device)
            d = windows[keys[0]].shape[-1]
            stacked = torch.stack([windows[key].reshape(batch * n, d)[dev_rows] for key in keys], dim=1).reshape(-1, d)
            flat_targets = targets.reshape(-1)[rows].to(self.device).repeat_interleave(len(keys))
            final_rows = None if final is None else final.reshape(batch * n, d)[dev_rows.to(final.device)]
            summary = self.lens.summarise(stacked, flat_targets, spec.k, final_rows, per=len(keys))
            _place(out, summary, keys, layers, comps, rows.numpy(), "")
            tuned = [key for key in keys if key[1] == "resid_post"] if self._tuned is not None else []
            if tuned:  # the tuned lens: the same summary of each translated resid_post state
                with torch.no_grad():
                    translated = torch.stack(
                        [self._translated(windows[key].reshape(batch * n, d)[dev_rows], key[0]) for key in tuned], dim=1
                    ).reshape(-1, d)
                flat_targets = flat_targets[: len(rows) * len(keys) : len(keys)].repeat_interleave(len(tuned))
                summary = self.lens.summarise(translated, flat_targets, spec.k, final_rows, per=len(tuned))
                _place(out, summary, tuned, layers, comps, rows.numpy(), "tuned_")
        if spec.activations:
            keep = wanted.to(self.device)[:, :, None]  # only the capture positions: the rest stays zero
            for (layer, comp), window_h in windows.items():
                kept = torch.where(keep, window_h, torch.zeros((), dtype=window_h.dtype, device=window_h.device))
                out["activations"][:, layers.index(layer), comps.index(comp)] = _to_storage(kept, spec.activations)
        return LensChunk(mb, self.spec.stage, layers, start, end, out)


def _place(out: dict, summary, keys, layers, comps, where: np.ndarray, prefix: str) -> None:
    """Scatter a position-major lens summary ([position, key] rows) into the chunk's arrays
    `out[prefix + field]` [batch, layer, component, n, ...] at flat positions `where`."""
    for name, value in vars(summary).items():
        if value is None:
            continue
        dest_all = out[prefix + name]
        tail = dest_all.shape[4:]
        value = value.cpu().numpy().reshape((len(where), len(keys)) + tail).swapaxes(0, 1)
        for j, (layer, comp) in enumerate(keys):
            li, ci = layers.index(layer), comps.index(comp)
            dest = dest_all[:, li, ci].reshape((-1,) + tail)
            dest[where] = value[j]
            dest_all[:, li, ci] = dest.reshape(dest_all[:, li, ci].shape)


def _slice_key(spec: StageSpec) -> tuple:
    return (spec.model_path, spec.start, spec.end, spec.dtype, spec.device, spec.tp_rank, spec.tp_size)


def _as_columns(tokens) -> torch.Tensor:
    """New token columns [batch, new], from an id array or the last stage's step output (which
    lets the executor hand that output straight to the first stage without looking at it)."""
    if isinstance(tokens, dict):
        return torch.tensor(np.asarray(tokens["tokens"]), dtype=torch.long)[:, None]
    return torch.tensor(np.asarray(tokens), dtype=torch.long)


def _numpy_storage_dtype(name: str):
    # numpy has no bfloat16: store its bit pattern as uint16 (the store records the dtype).
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[name]


def _to_storage(hidden: torch.Tensor, name: str) -> np.ndarray:
    cast = hidden.to(DTYPES[name]).cpu()
    return cast.view(torch.uint16).numpy() if name == "bfloat16" else cast.numpy()
