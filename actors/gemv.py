"""Decoding-step matrix-vector products on the CPU, spread over torch's threads, bitwise equal.

At one to four rows (a decoding step at small batch) the BLAS computes `x @ weight.T` on one
core, so a step is bound by one core's memory bandwidth: every weight matrix is read once per
step. `gemv_split` cuts the output features into equal blocks, one per thread, and runs them as
one batched matmul, which torch hands to its own threads. Each output is still the dot product
the plain call computes by the same BLAS kernel, so the result is bitwise `F.linear`'s, on two
conditions found by testing: blocks at least MIN_BLOCK features wide and a multiple of 16
(narrower blocks get another kernel and can round differently), and rows laid out with unit
stride. Because a BLAS may still pick kernels by shape, each (shape, rows, threads) is checked
once per process on its first call against `F.linear`, and never split again if it differs.
Its effect end to end is in the README's benchmark table (`distlens_local_*` against
`hf_generate`, which does not split).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_ROWS = 4  # at more rows the BLAS runs a GEMM over all threads itself
MIN_BLOCK = 64  # output features per block, at least (and a multiple of 16)
_CHECKED: dict[tuple, bool] = {}  # (d_out, d_in, rows, threads) -> split equals F.linear


def split_parts(n_out: int) -> int:
    """Equal blocks of output features, one per thread at most, each at least MIN_BLOCK wide
    and a multiple of 16; 1 where no such split exists."""
    return _split_parts(n_out, torch.get_num_threads())


@functools.cache
def _split_parts(n_out: int, threads: int) -> int:  # asked twice per product on the decoding path
    for parts in range(threads, 1, -1):
        block, rest = divmod(n_out, parts)
        if not rest and block >= MIN_BLOCK and block % 16 == 0:
            return parts
    return 1


def splittable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x: [rows, d_in]."""
    return (
        x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= SPLIT_ROWS
        and x.dtype == weight.dtype == torch.float32 and x.stride(-1) == 1 and x.stride(0) >= x.shape[1]
        and weight.is_contiguous() and split_parts(weight.shape[0]) > 1
    )  # fmt: skip


def gemv_split(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for x [n, d_in] (n <= SPLIT_ROWS), weight [d_out, d_in]: [n, d_out]."""
    d_out, d_in = weight.shape
    parts = split_parts(d_out)
    blocks = weight.view(parts, d_out // parts, d_in).transpose(1, 2)  # [parts, d_in, d_out / parts]
    out = torch.bmm(x.expand(parts, *x.shape), blocks)  # [parts, n, d_out / parts]
    return out.permute(1, 0, 2).reshape(x.shape[0], d_out)


def linear_no_bias(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for x [rows, d_in], split over threads where that is bitwise equal."""
    if not splittable(x, weight):
        return F.linear(x, weight)
    key = (*weight.shape, x.shape[0], torch.get_num_threads())
    ok = _CHECKED.get(key)
    if ok is None:  # first call of this shape here: split only if it equals the plain call
        plain = F.linear(x, weight)
        ok = _CHECKED[key] = torch.equal(gemv_split(x, weight), plain)
        return plain
    return gemv_split(x, weight) if ok else F.linear(x, weight)


class SplitLinear(nn.Linear):
    """An `nn.Linear` whose bias-free few-row calls go through `linear_no_bias`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and x.dim() >= 2:
            return linear_no_bias(x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
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
