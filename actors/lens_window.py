"""The stage's lens window: a stage's captured activations are buffered per micro-batch until
the next token of each position is known, then run through the lens one window of positions
at a time (one batched lens call for every captured layer and component), and come back as
compact `LensChunk`s: top-k, entropies, target ranks, KL to the final layer, never logits.

The tuned and Jacobian lenses are the same summary of transformed resid_post states
(`h + A_l h + b_l`, `J_l h`), stored beside the logit lens's as `tuned_*` and `jacobian_*`.
A stage that trains tuned-lens translators (`spec.tune`) hands each window to its
`tuned_lens.TranslatorTrainer` instead, and records the translators' KL before the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from actors.lens import LogitLens
from actors.vocabulary import LENS_FIELDS

if TYPE_CHECKING:
    from actors.stage import StageSpec


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
class WindowBuffer:
    """What one micro-batch holds for the lens on one stage until its windows run."""

    tokens: list = field(default_factory=list)  # [batch, n] int64 pieces, fed so far
    pending: dict = field(default_factory=dict)  # (layer, comp) -> [hidden [batch, n, d], ...]
    start: int = 0  # the first column not yet through the lens
    finals: list = field(default_factory=list)  # [batch, n, d] final-normed states from `start` on

    def select(self, idx: torch.Tensor, dev_idx: torch.Tensor, prefix_finals: list) -> None:
        """Row i becomes row `idx[i]` (`dev_idx` the same on the stage's device); `prefix_finals`
        are final states of the shared columns, which come before those already held."""
        self.tokens = [t[idx] for t in self.tokens]
        self.pending = {key: [h[dev_idx] for h in hs] for key, hs in self.pending.items()}
        self.finals = [f[dev_idx] for f in [*prefix_finals, *self.finals]]


def capture_mask(state, start: int, end: int, sel=None) -> torch.Tensor:
    """[batch, end - start] bool: real tokens at the selected positions (default: the
    micro-batch's capture positions). `state`: a micro-batch's `pad` [batch] (left pads),
    `prompt_cols` and `positions`."""
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


class LensWindow:
    """The lens of one stage's captured `(layer, component)` cells (`keys`), by windows of
    `spec.capture.window` positions. Built at the stage's set-up, after its weights are loaded:
    reads the stage's translators (its J_l) when the run records the tuned (Jacobian) lens, and
    makes its translator trainer when the run trains them."""

    def __init__(self, spec: StageSpec, lens: LogitLens, config, device: torch.device):
        capture = spec.capture
        self.capture, self.stage, self.lens, self.device = capture, spec.stage, lens, device
        self.d_model = config.hidden_size
        layers = [i for i in range(spec.start, spec.end) if i in capture.layers]
        self.keys = [(i, c) for i in layers for c in capture.components]
        # Whether this run's lens needs the final layer's states (every stage of it does).
        self.wants_finals = bool(capture.layers) and capture.lens and capture.kl_to_final
        self.tuned = None  # this stage's translators, when the run records the tuned lens
        self.trainer = None
        # lens -> (its map (hidden [n, d], layer) -> the resid_post state the logit lens decodes,
        # the layers it moves); at the others (the last) it is the identity: the logit lens
        self.transports: dict = {}
        n_layers = config.num_hidden_layers
        mine = tuple(i for i in capture.layers if spec.start <= i < spec.end)
        if capture.tuned_lens and capture.lens:
            from actors.tuned_lens import load_translators

            self.tuned, _ = load_translators(capture.tuned_lens, "", self.d_model, n_layers, only=mine)
            self.tuned.to(device)
            self.transports["tuned"] = (self.tuned, set(self.tuned.layers))
        if capture.jacobian_lens and capture.lens:
            from actors.jacobian_reader import JacobianTransport

            jacobian = JacobianTransport.for_stage(capture.jacobian_lens, mine, n_layers, device)
            self.transports["jacobian"] = (jacobian, set(jacobian.matrices))
        if spec.tune is not None:  # fresh, or from the checkpoint of spec.tune.resume_step
            from actors.tuned_lens import TranslatorTrainer

            self.trainer = TranslatorTrainer.for_stage(spec, lens, n_layers, self.d_model, device)

    def finals_of(self, output) -> list:
        """The final-normed states [batch, n, d] in a last-stage output, on this device."""
        if not isinstance(output, dict) or output.get("final") is None or not self.keys:
            return []
        return [torch.as_tensor(output["final"]).to(self.device, self.lens.weight.dtype)]

    def hold(self, buffer: WindowBuffer, captured: dict, tokens: torch.Tensor) -> None:
        """Buffer a step's captured states ((layer, comp) -> [hidden, ...]) and its token columns."""
        for key in self.keys:
            buffer.pending.setdefault(key, []).extend(captured.get(key, []))
        buffer.tokens.append(tokens)

    def flush(self, mb: int, state, force: bool) -> list[LensChunk]:
        """Run the lens over buffered columns whose next token is known, one window at a time
        (`force`: the last, shorter one too). `state`: the micro-batch's `buffer` and layout."""
        buf = state.buffer
        known_end = sum(t.shape[1] for t in buf.tokens) - 1  # columns < this have a target
        if not self.keys:  # nothing captured on this stage (or in this run)
            return []
        if self.wants_finals:  # ... and the final layer's state
            known_end = min(known_end, buf.start + sum(f.shape[1] for f in buf.finals))
        window = self.capture.window
        chunks = []
        while buf.start < known_end and (force or known_end - buf.start >= window):
            end = min(known_end, buf.start + window)
            chunks.append(self._chunk(mb, state, buf.start, end))
            buf.start = end
        return chunks

    def _chunk(self, mb: int, state, start: int, end: int) -> LensChunk:
        cap, buf = self.capture, state.buffer
        all_tokens = torch.cat(buf.tokens, dim=1)  # [batch, cols (+1 at finish)]
        targets = all_tokens[:, start + 1 : end + 1]  # [batch, n]
        wanted = capture_mask(state, start, end)  # [batch, n]
        batch, n = wanted.shape
        layers = tuple(dict.fromkeys(i for i, _ in self.keys))
        out = self._empty((batch, len(layers), len(cap.components), n))
        rows = wanted.reshape(-1).nonzero()[:, 0]
        windows, final = self._take(buf, end - start)
        if self.trainer is not None and rows.numel():  # training: one optimizer step per window
            losses = self.trainer.train_window(windows, final, rows)
            self._place_kl(out, losses, layers, rows.numpy())
        elif rows.numel() and cap.lens:  # every TP rank sees the same rows, so all or none reach the collectives
            self._summarise(out, windows, targets, final, rows, layers)
        if cap.activations:
            keep = wanted.to(self.device)[:, :, None]  # only the capture positions: the rest stays zero
            for (layer, comp), window_h in windows.items():
                kept = torch.where(keep, window_h, torch.zeros((), dtype=window_h.dtype, device=window_h.device))
                out["activations"][:, layers.index(layer), cap.components.index(comp)] = _to_storage(
                    kept, cap.activations
                )
        return LensChunk(mb, self.stage, layers, start, end, out)

    def _empty(self, shape: tuple) -> dict[str, np.ndarray]:
        """The chunk's arrays [batch, layer, component, n, ...], each at its field's fill value."""
        cap = self.capture
        with_k = {"topk_ids", "topk_logprobs"}
        prefixes = ("", *(f"{lens}_" for lens in self.transports))
        out = {
            prefix + name: np.full(
                shape + ((cap.k,) if name in with_k else ()), fill, np.float32 if fill != -1 else np.int32
            )
            for prefix in prefixes
            for name, fill in LENS_FIELDS.items()
        }
        if cap.activations:
            out["activations"] = np.zeros(shape + (self.d_model,), _numpy_storage_dtype(cap.activations))
        return out

    def _take(self, buf: WindowBuffer, n: int) -> tuple[dict, torch.Tensor | None]:
        """The next `n` buffered columns of every key ([batch, n, d] each) and of the final
        states (None when the lens needs none), taken out of the buffer."""
        windows = {}
        for key in self.keys:
            held = buf.pending[key]
            hidden = torch.cat(held, dim=1) if len(held) > 1 else held[0]  # [batch, pending, d]
            windows[key], rest = hidden[:, :n], hidden[:, n:]
            buf.pending[key] = [rest] if rest.shape[1] else []
        final = None
        if self.wants_finals:
            held = torch.cat(buf.finals, dim=1) if len(buf.finals) > 1 else buf.finals[0]
            final, rest = held[:, :n], held[:, n:]
            buf.finals = [rest] if rest.shape[1] else []
        return windows, final

    def _place_kl(self, out: dict, losses: dict, layers: tuple, where: np.ndarray) -> None:
        """The tuned lens's KL before the training step ({layer: [rows]}) into `kl_to_final`."""
        batch, n = out["kl_to_final"].shape[0], out["kl_to_final"].shape[3]
        for layer, kl in losses.items():  # per position
            li, ci = layers.index(layer), self.capture.components.index("resid_post")
            dest = out["kl_to_final"][:, li, ci].reshape(batch * n)
            dest[where] = kl.cpu().numpy()
            out["kl_to_final"][:, li, ci] = dest.reshape(batch, n)

    def _summarise(self, out: dict, windows: dict, targets, final, rows, layers: tuple) -> None:
        """One lens call over every captured (layer, component) of the window: the unembedding
        GEMM runs over many rows at once instead of one window per layer. Rows are
        position-major ([position, key]): a position's final distribution is rebuilt once for
        all its layers and components. Then the same for each other lens's transformed
        resid_post states (the tuned lens's translated ones, the Jacobian lens's J_l h)."""
        keys, cap = self.keys, self.capture
        batch, n = targets.shape
        dev_rows = rows.to(self.device)
        d = windows[keys[0]].shape[-1]
        stacked = torch.stack([windows[key].reshape(batch * n, d)[dev_rows] for key in keys], dim=1).reshape(-1, d)
        flat_targets = targets.reshape(-1)[rows].to(self.device).repeat_interleave(len(keys))
        final_rows = None if final is None else final.reshape(batch * n, d)[dev_rows.to(final.device)]
        summary = self.lens.summarise(stacked, flat_targets, cap.k, final_rows, per=len(keys))
        _place(out, summary, keys, layers, cap.components, rows.numpy(), "")
        resid = [key for key in keys if key[1] == "resid_post"]
        same_targets = flat_targets[: len(rows) * len(keys) : len(keys)].repeat_interleave(len(resid))
        for lens, (transport, moves) in self.transports.items() if resid else ():
            hidden = [windows[key].reshape(batch * n, d)[dev_rows] for key in resid]
            with torch.no_grad():  # every resid_post row, as the logit lens's call has them: the same GEMM shapes
                moved = [transport(h, key[0]) if key[0] in moves else h for key, h in zip(resid, hidden)]
            states = torch.stack(moved, dim=1).reshape(-1, d)
            summary = self.lens.summarise(states, same_targets, cap.k, final_rows, per=len(resid))
            _place(out, summary, resid, layers, cap.components, rows.numpy(), f"{lens}_")
            for layer, comp in (key for key in resid if key[0] not in moves):  # the identity: the logit lens's values
                li, ci = layers.index(layer), cap.components.index(comp)
                for name in LENS_FIELDS:
                    out[f"{lens}_{name}"][:, li, ci] = out[name][:, li, ci]


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


def _numpy_storage_dtype(name: str):
    # numpy has no bfloat16: store its bit pattern as uint16 (the store records the dtype).
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[name]


def _to_storage(hidden: torch.Tensor, name: str) -> np.ndarray:
    cast = hidden.to(getattr(torch, name)).cpu()
    return cast.view(torch.uint16).numpy() if name == "bfloat16" else cast.numpy()
