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
from actors.sampling import SamplingSpec, choose_tokens

COMPONENTS = ("resid_post", "attn_out", "mlp_out", "resid_mid")
# Lens fields and the value marking "not captured" in each.
LENS_FIELDS = {"topk_ids": -1, "topk_logprobs": np.nan, "entropy": np.nan, "target_logprob": np.nan, "target_rank": -1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]  # global layer indices to capture (all stages see the same tuple)
    components: tuple[str, ...] = ("resid_post",)
    k: int = 10
    window: int = 64  # positions buffered before one batched lens pass
    activations: str | None = None  # None, or the dtype raw activations are stored in


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
    capture: CaptureSpec = field(default_factory=lambda: CaptureSpec(layers=()))
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

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
    attention_mask: torch.Tensor  # [batch, cols]
    next_position: torch.Tensor  # [batch]
    pad: torch.Tensor  # [batch] left pads
    prompt_cols: int
    positions: object  # "all" | "prompt" | "generated" | tuple of row positions
    tokens: list = field(default_factory=list)  # [batch, n] int64 pieces, fed so far
    pending: dict = field(default_factory=dict)  # (layer, comp) -> [hidden [batch, n, d], ...]
    pending_start: int = 0
    cols: int = 0
    finished: torch.Tensor | None = None
    generator: torch.Generator | None = None


def _wanted(state: _BatchState, start: int, end: int) -> torch.Tensor:
    """[batch, end - start] bool: real tokens at the selected positions."""
    cols = torch.arange(start, end)[None, :]
    row_pos = cols - state.pad[:, None]
    real = row_pos >= 0
    sel = state.positions
    if sel == "all":
        return real
    if sel == "prompt":
        return real & (cols < state.prompt_cols)
    if sel == "generated":
        return real & (cols >= state.prompt_cols)
    return real & torch.isin(row_pos, torch.tensor(sel, dtype=torch.long))


class StageWorker:
    """Holds layers `[spec.start, spec.end)` and runs prefill/decode steps for micro-batches."""

    def __init__(self, spec: StageSpec):
        self.configure(spec)

    def configure(self, spec: StageSpec) -> None:
        """Take a (new) stage spec; `setup` then loads that slice. Lets a pooled worker serve
        another run or another split without a new process."""
        if getattr(self, "spec", None) is not None and spec.tp_size > 1:
            raise ValueError("a pooled worker cannot join a new tensor-parallel group; create fresh workers")
        self.spec = spec
        self.forward_calls = 0
        self.timeline: list[tuple[int, float, float]] = []  # (micro-batch, start, end) per step

    # -- set-up ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """(ip, free port) of this process: rank 0's is the stage group's rendezvous."""
        import ray

        from actors.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, init_method: str | None = None) -> dict:
        """Join the stage's TP group (if any), load this stage's weights, wrap with DeepSpeed."""
        import deepspeed
        from transformers import AutoConfig

        spec = self.spec
        self.device = torch.device(spec.device)
        if spec.tp_size > 1:
            from actors.distributed import init_stage_group

            backend = "nccl" if self.device.type == "cuda" else "gloo"
            init_stage_group(init_method, spec.tp_rank, spec.tp_size, backend)
        dtype = DTYPES[spec.dtype]
        from actors.slicing import build_stage

        self.config = AutoConfig.from_pretrained(spec.model_path)
        model, norm, lm_head = build_stage(spec.model_path, self.config, spec.start, spec.end, dtype, self.device)
        self.engine = deepspeed.init_inference(
            model,
            dtype=dtype,
            tensor_parallel={"tp_size": spec.tp_size},
            replace_with_kernel_inject=False,
        )
        self.model = self.engine.module
        self.lens = LogitLens(norm, lm_head, spec.tp_rank, spec.tp_size)
        self._capture: dict | None = None
        self._hooks = []
        self._install_capture_hooks()
        self._states: dict[int, _BatchState] = {}
        return self.info()

    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.model.parameters()) + sum(p.numel() for p in self.lens.parameters())
        return {
            "stage": self.spec.stage,
            "tp_rank": self.spec.tp_rank,
            "layers": (self.spec.start, self.spec.end),
            "pid": os.getpid(),
            "device": str(self.device),
            "params": n_params,
            "forward_calls": self.forward_calls,
            "timeline": list(self.timeline),
            # ru_maxrss is KiB on Linux: this process's peak resident memory so far.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def _install_capture_hooks(self) -> None:
        spec, adapter = self.spec.capture, self.model.adapter
        for offset, layer in enumerate(self.model.layers):
            index = self.spec.start + offset
            if index not in spec.layers:
                continue
            for comp in spec.components:
                record = self._recorder(index, comp)
                if comp == "resid_post":
                    self._hooks.append(layer.register_forward_hook(lambda m, a, out, r=record: r(out)))
                elif comp == "attn_out":
                    attn = get_path(layer, adapter.attn)
                    self._hooks.append(attn.register_forward_hook(lambda m, a, out, r=record: r(out[0])))
                elif comp == "mlp_out":
                    mlp = get_path(layer, adapter.mlp)
                    self._hooks.append(mlp.register_forward_hook(lambda m, a, out, r=record: r(out)))
                elif comp == "resid_mid":  # the residual entering the MLP norm = resid_pre + attn_out
                    norm = get_path(layer, adapter.mlp_norm)
                    self._hooks.append(norm.register_forward_pre_hook(lambda m, args, r=record: r(args[0])))

    def _recorder(self, layer: int, comp: str):
        def record(hidden: torch.Tensor) -> None:
            if self._capture is not None:
                self._capture.setdefault((layer, comp), []).append(hidden.detach())

        return record

    @property
    def captured_keys(self) -> list[tuple[int, str]]:
        layers = [i for i in range(self.spec.start, self.spec.end) if i in self.spec.capture.layers]
        return [(i, c) for i in layers for c in self.spec.capture.components]

    # -- micro-batch lifecycle --------------------------------------------------------------
    def start(self, mb: int, attention_mask: np.ndarray, positions="all") -> None:
        """Open micro-batch `mb`; attention_mask: [batch, prompt_cols] (left-padded prompts)."""
        from transformers import DynamicCache

        mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        state = _BatchState(
            cache=DynamicCache(config=self.config),
            attention_mask=mask.to(self.device),
            next_position=torch.zeros(mask.shape[0], dtype=torch.long, device=self.device),
            pad=(mask == 0).sum(-1),
            prompt_cols=mask.shape[1],
            positions=positions if isinstance(positions, str) else tuple(positions),
        )
        if self.spec.is_last:
            state.finished = torch.zeros(mask.shape[0], dtype=torch.bool)
            state.generator = torch.Generator().manual_seed(self.spec.sampling.seed * 1_000_003 + mb)
        self._states[mb] = state

    @torch.no_grad()
    def step(self, mb: int, tokens, upstream=None):
        """Feed new columns of micro-batch `mb`.

        tokens: [batch, new] ids of the new columns (every stage gets them: they are the lens
        targets of earlier columns); upstream: the previous stage's hidden [batch, new, d_model].
        Returns `(forward_out, lens_chunks)`: forward_out is hidden for the next stage, or on
        the last stage `{"tokens": [batch], "finished": [batch]}`.
        """
        state = self._states[mb]
        tokens = _as_columns(tokens)
        new = tokens.shape[1]
        if state.cols == 0:  # prefill: HF's generate positions (left pads don't count)
            mask = state.attention_mask
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
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
        self._capture = {}
        started = time.time()
        hidden = self.engine(x, attention_mask=state.attention_mask, position_ids=position_ids, cache=state.cache)
        self.timeline.append((mb, started, time.time()))
        captured, self._capture = self._capture, None
        self.forward_calls += 1
        for key in self.captured_keys:
            state.pending.setdefault(key, []).extend(captured.get(key, []))
        state.tokens.append(tokens)
        state.cols += new
        chunks = self._flush(mb, state, force=False)
        if self.spec.tp_rank:  # every TP rank holds the merged lens; only rank 0 reports it
            chunks = []
        if not self.spec.is_last:
            return hidden.cpu() if self.device.type != "cpu" else hidden, chunks
        logits = self.lens.full_logits(hidden[:, -1])  # [batch, vocab]: stays on this stage
        chosen = choose_tokens(logits, self.spec.sampling, state.generator).cpu()
        sampling = self.spec.sampling
        chosen = torch.where(state.finished, torch.full_like(chosen, sampling.pad_token_id), chosen)
        state.finished = state.finished | torch.isin(chosen, torch.tensor(sampling.eos_token_ids, dtype=torch.long))
        return {"tokens": chosen.numpy(), "finished": state.finished.numpy().copy()}, chunks

    @torch.no_grad()
    def finish(self, mb: int, last_tokens) -> list[LensChunk]:
        """Close micro-batch `mb`: `last_tokens` [batch, 1] are the targets of the final column."""
        state = self._states.pop(mb)
        state.tokens.append(_as_columns(last_tokens))
        chunks = self._flush(mb, state, force=True)
        return [] if self.spec.tp_rank else chunks

    def _flush(self, mb: int, state: _BatchState, force: bool) -> list[LensChunk]:
        """Run the lens over buffered columns whose next token is known, one window at a time."""
        known_end = sum(t.shape[1] for t in state.tokens) - 1  # columns < this have a target
        window = self.spec.capture.window
        chunks = []
        while state.pending_start < known_end and (force or known_end - state.pending_start >= window):
            end = min(known_end, state.pending_start + window)
            chunks.append(self._lens_chunk(mb, state, state.pending_start, end))
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
        out = {
            name: np.full(shape + ((spec.k,) if name in with_k else ()), fill, np.float32 if fill != -1 else np.int32)
            for name, fill in LENS_FIELDS.items()
        }
        if spec.activations:
            d = self.config.hidden_size
            out["activations"] = np.zeros(shape + (d,), _numpy_storage_dtype(spec.activations))
        rows = flat_wanted.nonzero()[:, 0]
        flat_targets = targets.reshape(-1)[rows].to(self.device)
        for li, layer in enumerate(layers):
            for ci, comp in enumerate(comps):
                buf = state.pending[(layer, comp)]
                hidden = torch.cat(buf, dim=1) if len(buf) > 1 else buf[0]  # [batch, pending, d]
                window_h = hidden[:, : end - start]
                rest = hidden[:, end - start :]
                state.pending[(layer, comp)] = [rest] if rest.shape[1] else []
                if rows.numel():  # every TP rank sees the same rows, so all or none reach the collectives
                    summary = self.lens.summarise(
                        window_h.reshape(batch * n, -1)[rows.to(self.device)], flat_targets, spec.k
                    )
                    for name, value in vars(summary).items():
                        dest = out[name][:, li, ci].reshape((batch * n,) + out[name].shape[4:])
                        dest[rows.numpy()] = value.cpu().numpy()
                        out[name][:, li, ci] = dest.reshape(out[name][:, li, ci].shape)
                if spec.activations:
                    out["activations"][:, li, ci] = _to_storage(window_h, spec.activations)
        return LensChunk(mb, self.spec.stage, layers, start, end, out)


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
