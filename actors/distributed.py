"""Process-group set-up for a tensor-parallel stage (one torch.distributed world per stage), and
the per-family repairs some layers need once AutoTP has split them.

DeepSpeed's CPU shared-memory all-reduce kernel (`deepspeed_shm_comm`) segfaulted inside Ray
actors here (in `symmetric_naive_all_reduce`, on the first forward). DeepSpeed builds that
kernel only when `deepspeed.ops.__compatible_ops__` marks it compatible, and that dict is
cached and meant to be edited, so marking it incompatible before `init_distributed` is the
narrow switch: DeepSpeed then falls back to `torch.distributed.all_reduce` (gloo on CPU).
"""

from __future__ import annotations

import copy
import socket

import torch
import torch.distributed as dist

from actors.adapters import get_path

SHM_KERNEL = "deepspeed_shm_comm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disable_shm_allreduce() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_KERNEL] = False


def init_stage_group(init_method: str, rank: int, world_size: int, backend: str) -> None:
    """Join this stage's tensor-parallel world (all ranks of one stage, nothing else)."""
    import deepspeed

    if backend == "gloo":
        disable_shm_allreduce()
    deepspeed.init_distributed(
        dist_backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        auto_mpi_discovery=False,
        verbose=False,
    )


class ShardedRMSNorm(torch.nn.Module):
    """An RMSNorm over a feature axis that AutoTP split across the stage's ranks (OLMo-2's
    q_norm/k_norm normalise all heads' projections together): each rank keeps its slice of the
    weight, and the sum of squares is all-reduced so the mean is over the full width. Computed
    in float32 like `Olmo2RMSNorm`."""

    def __init__(self, norm: torch.nn.Module, local: int):
        super().__init__()
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([local]))
        sizes = [int(s) for s in sizes]
        if sum(sizes) != norm.weight.shape[0]:
            raise ValueError(f"sharded widths {sizes} do not add up to the norm's {norm.weight.shape[0]} features")
        start = sum(sizes[: dist.get_rank()])
        self.weight = torch.nn.Parameter(norm.weight.data[start : start + local].clone(), requires_grad=False)
        self.full = sum(sizes)
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., local features]
        dtype = x.dtype
        x = x.to(torch.float32)
        squares = x.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares)
        x = x * torch.rsqrt(squares / self.full + self.variance_epsilon)
        return (self.weight * x).to(dtype)


def adapt_to_tensor_parallel(stage, adapter) -> None:
    """What AutoTP leaves inconsistent in some families, per the adapter row: attention that
    reads its head counts from the config (Phi-3 splits its fused qkv output by
    `config.num_attention_heads`), and norms over a split projection (OLMo-2's q/k norms)."""
    for layer in stage.layers:
        if adapter.tp_local_heads:
            attn = get_path(layer, adapter.tp_local_heads)
            local = copy.copy(attn.config)
            local.num_key_value_heads = attn.num_key_value_heads  # AutoTP already set this rank's count
            q_rows = attn.qkv_proj.weight.shape[0] - 2 * attn.num_key_value_heads * attn.head_dim
            local.num_attention_heads = q_rows // attn.head_dim
            attn.config = local
        for norm_path, proj_path in adapter.tp_sharded_norms:
            parent, _, name = norm_path.rpartition(".")
            owner = get_path(layer, parent)
            local = get_path(layer, proj_path).weight.shape[0]  # this rank's output features
            setattr(owner, name, ShardedRMSNorm(getattr(owner, name), local))
