"""Tensor parallelism inside a stage: AutoTP-sharded layers and a vocab-sharded lens head,
two ranks on gloo, against tp_size=1 and the unsliced model."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference import PROMPTS, assert_stores_equal, hf_generate, hf_hidden_by_row, run_lens
from tiny_models import load_reference


def test_shm_allreduce_kernel_is_switched_off():
    from actors.distributed import disable_shm_allreduce

    # `deepspeed.comm.torch` as an attribute is the torch package; the module is this one.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    disable_shm_allreduce()
    assert comm_torch.build_shm_op() is None


def _sharded_lens_worker(rank: int, port: int, hidden, targets, weight, k, out):
    from actors.lens import LogitLens

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    norm = torch.nn.RMSNorm(weight.shape[1])
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = weight
    summary = LogitLens(norm, head, tp_rank=rank, tp_size=2).summarise(hidden, targets, k)
    if rank == 0:
        out.update({name: value.clone() for name, value in vars(summary).items()})
    dist.destroy_process_group()


def test_vocab_sharded_lens_merge_is_exact():
    from actors.distributed import free_port
    from actors.lens import LogitLens

    torch.manual_seed(0)
    vocab, d, n, k = 1001, 16, 9, 5  # an odd vocabulary: shards of 501 and 500
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    targets = torch.randint(0, vocab, (n,))
    targets[0] = 1000  # in the second shard
    norm = torch.nn.RMSNorm(d)
    head = torch.nn.Linear(d, vocab, bias=False)
    head.weight.data = weight
    full = LogitLens(norm, head).summarise(hidden, targets, k)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_lens_worker, args=(free_port(), hidden, targets, weight, k, out), nprocs=2)
        merged = dict(out)
    lp = torch.log_softmax(norm(hidden) @ weight.T, -1)
    torch.testing.assert_close(full.topk_logprobs, lp.topk(k).values)
    for name, value in vars(full).items():
        torch.testing.assert_close(merged[name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family,num_stages", [("llama", 2), ("qwen3", 1)])
def test_tp2_equals_tp1_and_unsliced(family, num_stages, ray_cluster, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[family]
    _, tp1 = run_lens(path, tmp_path / "tp1.zarr", num_stages=num_stages)
    summary, tp2 = run_lens(path, tmp_path / "tp2.zarr", num_stages=num_stages, tp_size=2, executor="ray")
    assert len(summary["stage_info"]) == 2 * num_stages
    assert_stores_equal(tp2, tp1)
    model = load_reference(path)
    generated, pad = hf_generate(model, PROMPTS, 6)
    for row in range(len(PROMPTS)):
        acts = torch.from_numpy(tp2.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for layer in range(model.config.num_hidden_layers - 1):
            torch.testing.assert_close(
                acts[layer, :n], hf_hidden_by_row(generated, pad, row, layer + 1)[:n], atol=1e-5, rtol=0
            )
