"""Process-group set-up for a tensor-parallel stage: one torch.distributed world per stage.

DeepSpeed's CPU shared-memory all-reduce kernel (`deepspeed_shm_comm`) segfaulted inside Ray
actors here (in `symmetric_naive_all_reduce`, on the first forward). DeepSpeed builds that
kernel only when `deepspeed.ops.__compatible_ops__` marks it compatible, and that dict is
cached and meant to be edited, so marking it incompatible before `init_distributed` is the
narrow switch: DeepSpeed then falls back to `torch.distributed.all_reduce` (gloo on CPU).
"""

from __future__ import annotations

import socket

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
