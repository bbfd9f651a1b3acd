"""One stage's part of the Jacobian-lens fit (actors/jacobian_lens.py has the estimator): for a
block of output dimensions, a backward through this stage's own layers only. The last stage
seeds a one-hot cotangent at every real position of h_L for each output dimension of the block;
every stage reads the gradient at each of its layers' outputs (row-summed Jacobian rows, summed
over source positions p >= skip, in float64) and hands the cotangent at its input back to the
previous stage. Nothing but hidden-sized tensors ever leaves a stage.

Rows are right-padded (the coordinator pads them): with causal attention a real position never
sees a pad, and the cotangents are zero at pads, so pads add nothing anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FitSpec:
    """How a stage fits: `block` output dimensions per backward (the backward carries `block`
    cotangents at once, so its memory grows with it), source positions from `skip` on."""

    block: int
    skip: int = 16


@dataclass
class _Rows:
    x: torch.Tensor  # this stage's input: ids [n, T] (first stage) or hidden [n, T, d] (a leaf needing its gradient)
    lengths: torch.Tensor  # [n] real tokens per row (each row's first `length` columns)
    out: torch.Tensor  # this stage's output [n, T, d], in the graph
    outs: list[torch.Tensor]  # each layer's resid_post [n, T, d], in the graph (the last is `out`)


class StageJacobian:
    """Layers `[start, end)` of `model` (an actors.slicing.StageModel), their Jacobian-lens sums
    `sums` {layer: float64 [d_model, d_model]}, row i being output dimension i.

    A micro-batch's forward runs once, in the graph, when its rows come; every block of output
    dimensions is then one backward through that graph carrying the block's cotangents as a batch
    (`is_grads_batched`: the forward is not repeated per block or per output dimension). The
    graph is kept until the micro-batch is dropped."""

    CALLS = ("rows", "block", "take", "drop")  # what StageWorker.jacobian dispatches

    def __init__(self, model, spec: FitSpec, start: int, end: int, first: bool, last: bool, device):
        self.model, self.spec = model, spec
        self.start, self.end, self.first, self.last = start, end, first, last
        self.device = device
        self.d_model = model.config.hidden_size
        for p in model.parameters():  # gradients reach activations only
            p.requires_grad_(False)
        self.sums = {la: self._zeros() for la in range(start, end)}
        self._rows: dict = {}

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.d_model, self.d_model, dtype=torch.float64, device=self.device)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This stage's layers on the rows: (output, each layer's resid_post), in the graph."""
        n, cols = x.shape[:2]
        position_ids = torch.arange(cols, device=self.device).expand(n, cols)
        mask = torch.ones(n, cols, dtype=torch.long, device=self.device)  # causal alone: pads sit after
        outs: list[torch.Tensor] = []

        def record(module, args, out):
            outs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [layer.register_forward_hook(record) for layer in self.model.layers]
        if self.first:  # the graph starts at the embedding's output (the weights need no gradient)
            hooks.append(self.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        try:
            with torch.enable_grad():
                out = self.model(x, attention_mask=mask, position_ids=position_ids, cache=None)
        finally:
            for hook in hooks:
                hook.remove()
        return out, outs

    def rows(self, key, x, lengths) -> torch.Tensor | None:
        """Take micro-batch `key`: `x` ids [n, T] (first stage) or the previous stage's output
        [n, T, d]; `lengths` [n]. Runs its forward in the graph; returns this stage's output (the
        next stage's input), none on the last stage."""
        x = torch.as_tensor(x).to(self.device)
        if not self.first:
            x = x.to(next(self.model.parameters()).dtype).detach().requires_grad_(True)
        out, outs = self._forward(x)
        self._rows[key] = _Rows(x, torch.as_tensor(lengths, dtype=torch.long), out, outs)
        return None if self.last else out.detach().cpu()

    def _seed(self, rows: _Rows, lo: int) -> torch.Tensor:
        """The cotangents at h_L [block, n, T, d]: number b is one-hot at dimension lo + b at every
        real position."""
        n, cols = rows.x.shape[:2]
        out, block = rows.out, self.spec.block
        real = (torch.arange(cols)[None, :] < rows.lengths[:, None]).to(out.dtype).to(out.device)  # [n, T]
        seed = torch.zeros(block, n, cols, self.d_model, dtype=out.dtype, device=out.device)
        seed[torch.arange(block), :, :, lo + torch.arange(block)] = real
        return seed

    def block(self, key, lo: int, cotangent=None) -> torch.Tensor | None:
        """Output dimensions `[lo, lo + block)` for micro-batch `key`: `cotangent` the gradients at
        this stage's output [block * n, T, d] (block-major; the last stage seeds its own). Adds
        each layer's rows `lo..` and returns the gradients at this stage's input, in the same
        layout (none on the first stage)."""
        rows = self._rows[key]
        out, block = rows.out, self.spec.block
        if self.last:
            grad_out = self._seed(rows, lo)
        else:
            grad_out = torch.as_tensor(cotangent).to(out).reshape(block, *out.shape)
        inputs = rows.outs[:-1] + ([] if self.first else [rows.x])  # the last layer's output is `out` itself
        grads = []
        if inputs:
            grads = list(torch.autograd.grad(out, inputs, grad_out, retain_graph=True, is_grads_batched=True))
        self._add(rows, lo, grads[: len(rows.outs) - 1] + [grad_out])
        return None if self.first else grads[-1].detach().reshape(block * out.shape[0], *out.shape[1:]).cpu()

    def _add(self, rows: _Rows, lo: int, grads: list[torch.Tensor]) -> None:
        """sums[l][lo + b] += sum over rows and real positions p >= skip of grad[b] at h_l[p]."""
        n, cols = rows.x.shape[:2]
        pos = torch.arange(cols)[None, :]
        keep = ((pos >= self.spec.skip) & (pos < rows.lengths[:, None])).float().to(self.device)  # [n, T]
        for layer, grad in zip(range(self.start, self.end), grads):
            g = grad.detach().float()  # [block, n, T, d]
            # one micro-batch's sum in float32 (a matmul's accumulation), the running sum in float64
            self.sums[layer][lo : lo + g.shape[0]] += torch.einsum("bntd,nt->bd", g, keep).double()

    def drop(self, key) -> None:
        """Forget micro-batch `key` (its blocks are done)."""
        self._rows.pop(key, None)  # and with it the graph

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
