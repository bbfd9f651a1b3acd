"""One stage's part of the Jacobian-lens fit (actors/jacobian_lens.py has the estimator): for a
block of output dimensions, a backward through this stage's own layers only. The last stage
seeds a one-hot cotangent at every real position of h_L for each output dimension of the block;
every stage reads the gradient at each of its layers' outputs (row-summed Jacobian rows, summed
over source positions p >= skip, in float64) and hands the cotangent at its input back to the
previous stage. Nothing but hidden-sized tensors ever leaves a stage.

Rows are right-padded (the coordinator pads them): with causal attention a real position never
sees a pad, and the cotangents are zero at pads, so pads add nothing anywhere."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FitSpec:
    """How a stage fits: `block` output dimensions per backward (the graph holds `block` copies
    of the micro-batch: memory grows with it), source positions from `skip` on."""

    block: int
    skip: int = 16


@dataclass
class _Rows:
    x: torch.Tensor  # this stage's input: ids [n, T] (first stage) or hidden [n, T, d]
    lengths: torch.Tensor  # [n] real tokens per row (each row's first `length` columns)


class StageJacobian:
    """Layers `[start, end)` of `model` (an actors.slicing.StageModel), their Jacobian-lens sums
    `sums` {layer: float64 [d_model, d_model]}, row i being output dimension i."""

    CALLS = ("rows", "prepare", "block", "take", "drop")  # what StageWorker.jacobian dispatches

    def __init__(self, model, spec: FitSpec, start: int, end: int, first: bool, last: bool, device):
        self.model, self.spec = model, spec
        self.start, self.end, self.first, self.last = start, end, first, last
        self.device = device
        self.d_model = model.config.hidden_size
        for p in model.parameters():  # gradients reach activations only
            p.requires_grad_(False)
        self.sums = {la: self._zeros() for la in range(start, end)}
        self._rows: dict = {}
        self._graphs: dict = {}  # micro-batch -> (input, output, layer outputs): the next block's forward, made ahead
        self.busy_s, self.blocks = 0.0, 0

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.d_model, self.d_model, dtype=torch.float64, device=self.device)

    def _forward(self, x: torch.Tensor, copies: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This stage's layers on `copies` copies of the rows (copy-major): (output, each layer's
        resid_post), in the graph."""
        n, cols = x.shape[:2]
        position_ids = torch.arange(cols, device=self.device).expand(n * copies, cols)
        mask = torch.ones(n * copies, cols, dtype=torch.long, device=self.device)  # causal alone: pads sit after
        outs: list[torch.Tensor] = []

        def record(module, args, out):
            outs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [layer.register_forward_hook(record) for layer in self.model.layers]
        if self.first:  # the graph starts at the embedding's output (the weights need no gradient)
            hooks.append(self.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        try:
            reps = (copies,) + (1,) * (x.dim() - 1)
            out = self.model(x.repeat(*reps), attention_mask=mask, position_ids=position_ids, cache=None)
        finally:
            for hook in hooks:
                hook.remove()
        return out, outs

    def rows(self, key, x, lengths) -> torch.Tensor | None:
        """Take micro-batch `key`: `x` ids [n, T] (first stage) or the previous stage's output
        [n, T, d]; `lengths` [n]. Returns this stage's output (the next stage's input), none on
        the last stage."""
        x = torch.as_tensor(x).to(self.device)
        if not self.first:
            x = x.to(next(self.model.parameters()).dtype)
        self._rows[key] = _Rows(x, torch.as_tensor(lengths, dtype=torch.long))
        if self.last:
            return None
        with torch.no_grad():
            out, _ = self._forward(x, 1)
        return out.cpu()

    def _seed(self, rows: _Rows, lo: int, like: torch.Tensor) -> torch.Tensor:
        """The cotangent at h_L: copy b is one-hot at dimension lo + b at every real position."""
        n, cols = rows.x.shape[:2]
        block = like.shape[0] // n
        real = (torch.arange(cols)[None, :] < rows.lengths[:, None]).to(like.dtype).to(like.device)  # [n, T]
        seed = torch.zeros(block, n, cols, self.d_model, dtype=like.dtype, device=like.device)
        seed[torch.arange(block), :, :, lo + torch.arange(block)] = real
        return seed.reshape(like.shape)

    def _graph(self, rows: _Rows) -> tuple:
        """The forward of `block` copies of the rows, in the graph: (input, output, layer outputs)."""
        block = self.spec.block
        with torch.enable_grad():
            if self.first:  # ids: the copies are made inside, no gradient at the input
                x, copies = rows.x, block
            else:
                x, copies = rows.x.repeat(block, 1, 1).requires_grad_(True), 1
            out, outs = self._forward(x, copies)
        return x, out, outs

    def prepare(self, key) -> None:
        """The forward of micro-batch `key`'s next block, made now: a stage before the last runs it
        while it waits for that block's cotangent (the coordinator sends it ahead of the block)."""
        started = time.perf_counter()
        self._graphs[key] = self._graph(self._rows[key])
        self.busy_s += time.perf_counter() - started

    def block(self, key, lo: int, cotangent=None) -> torch.Tensor | None:
        """Output dimensions `[lo, lo + block)` for micro-batch `key`: `cotangent` the gradient at
        this stage's output [block * n, T, d] (copy-major; the last stage seeds its own). Adds
        each layer's rows `lo..` and returns the gradient at this stage's input (none on the first).
        Its forward is the one `prepare` made, if it was sent (every block's is alike: copies of
        the same rows; only the cotangent differs)."""
        started = time.perf_counter()
        rows = self._rows[key]
        x, out, outs = self._graphs.pop(key, None) or self._graph(rows)
        with torch.enable_grad():
            grad_out = self._seed(rows, lo, out) if self.last else torch.as_tensor(cotangent).to(out)
            inputs = outs[:-1] + ([] if self.first else [x])  # the last layer's output is `out` itself
            grads = list(torch.autograd.grad(out, inputs, grad_out)) if inputs else []
        self._add(rows, lo, grads[: len(outs) - 1] + [grad_out])
        self.busy_s += time.perf_counter() - started
        self.blocks += 1
        return None if self.first else grads[-1].detach().cpu()

    def _add(self, rows: _Rows, lo: int, grads: list[torch.Tensor]) -> None:
        """sums[l][lo + b] += sum over rows and real positions p >= skip of grad[b] at h_l[p]."""
        n, cols = rows.x.shape[:2]
        pos = torch.arange(cols)[None, :]
        keep = ((pos >= self.spec.skip) & (pos < rows.lengths[:, None])).float().to(self.device)  # [n, T]
        for layer, grad in zip(range(self.start, self.end), grads):
            g = grad.detach().reshape(-1, n, cols, self.d_model).float()  # [block, n, T, d]
            # one micro-batch's sum in float32 (a matmul's accumulation), the running sum in float64
            self.sums[layer][lo : lo + g.shape[0]] += torch.einsum("bntd,nt->bd", g, keep).double()

    def drop(self, key) -> None:
        """Forget micro-batch `key` (its blocks are done)."""
        self._rows.pop(key, None)
        self._graphs.pop(key, None)

    def take(self) -> dict[int, torch.Tensor]:
        """The sums so far, handed over and reset to zero (the coordinator adds them up)."""
        sums = {la: s.cpu() for la, s in self.sums.items()}
        self.sums = {la: self._zeros() for la in self.sums}
        return sums


class JacobianStage:
    """The Jacobian-lens call of `StageWorker` (mixed in): it provides `spec`, `model`, `device`."""

    def jacobian(self, call: str, *args):
        """One of the fit's calls on this stage's layers (`StageJacobian.CALLS`), its fitter
        made on the first (the spec's `jacobian` says how it fits)."""
        spec = self.spec
        if call not in StageJacobian.CALLS or spec.jacobian is None:
            raise ValueError(f"jacobian call {call!r}: choose one of {StageJacobian.CALLS} on a stage set up to fit")
        if self._jacobian is None:
            first = spec.stage == 0
            self._jacobian = StageJacobian(
                self.model, spec.jacobian, spec.start, spec.end, first, spec.is_last, self.device
            )
        return getattr(self._jacobian, call)(*args)
