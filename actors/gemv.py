"""Decoding-step matrix-vector products on the CPU, spread over torch's threads, bitwise equal.

At one to four rows (a decoding step at small batch) the BLAS computes `x @ weight.T` on one
core, so a step is bound by one core's memory bandwidth: every weight matrix is read once per
step. `gemv_split` cuts the output features into equal blocks, one per thread, and runs them as
one batched matmul, which torch hands to its own threads. Each output is still the dot product
the plain call computes, by the same BLAS kernel, so the result is bitwise equal to
`F.linear` (tests/test_staged_equals_unsliced.py checks it): greedy decoding and every lens
value stay exactly the unsplit model's. Its effect end to end is in the README's benchmark
table (`distlens_local_*` against `hf_generate`, which does not split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_ROWS = 4  # at more rows the BLAS runs a GEMM over all threads itself


def split_parts(n_out: int) -> int:
    """Equal blocks of output features, one per thread at most (a ragged last block would be a
    smaller BLAS call whose sums can round differently); 1 where no such split exists."""
    return next(p for p in range(torch.get_num_threads(), 0, -1) if n_out % p == 0)


def splittable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        x.device.type == "cpu" and 0 < rows <= SPLIT_ROWS and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous() and split_parts(weight.shape[0]) > 1
    )  # fmt: skip


def gemv_split(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for x [n, d_in] (n <= SPLIT_ROWS), weight [d_out, d_in]: [n, d_out]."""
    d_out, d_in = weight.shape
    parts = split_parts(d_out)
    blocks = weight.view(parts, d_out // parts, d_in).transpose(1, 2)  # [parts, d_in, d_out / parts]
    out = torch.bmm(x.expand(parts, *x.shape), blocks)  # [parts, n, d_out / parts]
    return out.permute(1, 0, 2).reshape(x.shape[0], d_out)


class SplitLinear(nn.Linear):
    """An `nn.Linear` without bias whose few-row calls go through `gemv_split`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and splittable(x, self.weight):
            return gemv_split(x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def split_linears(module: nn.Module) -> int:
    """Turns every bias-free `nn.Linear` (exactly that class) under `module` into a
    `SplitLinear` in place (parameters, hooks and names unchanged); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.bias is None:
            m.__class__ = SplitLinear
            n += 1
    return n
