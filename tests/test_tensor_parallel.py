"""Tensor parallelism inside a stage: AutoTP-sharded layers and a vocab-sharded lens head,
two ranks on gloo, against tp_size=1 and the unsliced model."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference import PROMPTS, assert_kl_to_final_matches_hf, hf_generate, hf_hidden_by_row, run_lens, run_spec
from tiny_models import FAMILIES, load_reference


def test_shm_allreduce_kernel_is_switched_off():
    from actors.distributed import disable_shm_allreduce

    # `deepspeed.comm.torch` as an attribute is the torch package; the module is this one.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    disable_shm_allreduce()
    assert comm_torch.build_shm_op() is None


def _sharded_lens_worker(rank: int, port: int, hidden, targets, weight, k, final, out):
    from actors.lens import LogitLens

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    norm = torch.nn.RMSNorm(weight.shape[1])
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = weight
    summary = LogitLens(norm, head, tp_rank=rank, tp_size=2).summarise(hidden, targets, k, final, per=3)
    if rank == 0:
        out.update({name: value.clone() for name, value in vars(summary).items()})
    dist.destroy_process_group()


def test_vocab_sharded_lens_merge_is_exact():
    from actors.distributed import free_port
    from actors.lens import LogitLens

    torch.manual_seed(0)
    vocab, d, n, k = 1001, 16, 9, 5  # an odd vocabulary: shards of 501 and 500
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    final = torch.randn(n // 3, d)  # final-normed states: 3 positions, each shared by 3 rows
    targets = torch.randint(0, vocab, (n,))
    targets[0] = 1000  # in the second shard
    norm = torch.nn.RMSNorm(d)
    head = torch.nn.Linear(d, vocab, bias=False)
    head.weight.data = weight
    full = LogitLens(norm, head).summarise(hidden, targets, k, final, per=3)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_lens_worker, args=(free_port(), hidden, targets, weight, k, final, out), nprocs=2)
        merged = dict(out)
    lp = torch.log_softmax(norm(hidden) @ weight.T, -1)
    torch.testing.assert_close(full.topk_logprobs, lp.topk(k).values)
    final_lp = torch.log_softmax(final @ weight.T, -1).repeat_interleave(3, dim=0)
    torch.testing.assert_close(full.kl_to_final, (final_lp.exp() * (final_lp - lp)).sum(-1), atol=1e-5, rtol=0)
    for name, value in vars(full).items():
        torch.testing.assert_close(merged[name], value, atol=1e-5, rtol=0, msg=name)


def _assert_tp_store_equal(tp2, tp1) -> None:
    """Tokens exactly; floats to fp32 noise relative to their scale (sharded sums add in another
    order); top-k ids exactly, except where two neighbouring log-probs tie to fp32 noise and
    swap places."""
    np.testing.assert_array_equal(tp2["tokens"], tp1["tokens"])
    np.testing.assert_array_equal(tp2["lens_mask"], tp1["lens_mask"])
    for name in ("topk_logprobs", "entropy", "target_logprob", "kl_to_final", "activations"):
        np.testing.assert_allclose(tp2[name], tp1[name], atol=1e-5, rtol=1e-5, equal_nan=True, err_msg=name)
    ids1, ids2, lp = tp1["topk_ids"], tp2["topk_ids"], tp1["topk_logprobs"]
    gap = np.minimum(
        np.abs(np.diff(lp, axis=-1, prepend=np.inf)), np.abs(np.diff(lp, axis=-1, append=-np.inf))
    )  # distance to the nearest neighbouring slot
    assert (gap[ids1 != ids2] < 1e-5).all()
    assert (np.abs(tp2["target_rank"].astype(int) - tp1["target_rank"]) <= 1).all()


@pytest.fixture(scope="module")
def tp_pool(ray_cluster):
    """Two stages of two tensor-parallel ranks, made by llama's run (the first) and reused by every
    family's: each rank keeps its process group and loads the next model's slice."""
    from actors.executor import RayExecutor

    pool = RayExecutor(cpus_per_stage=1, persistent=True)
    yield pool
    pool.close()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_tp2_equals_tp1_and_unsliced(family, tp_pool, tiny_checkpoints, tmp_path):
    """Every component captured, two micro-batches; llama on 2 stages (4 ranks), the others on 1
    (the pool's first two ranks, loading another family's weights in the same process group)."""
    path = tiny_checkpoints[family]
    num_stages = 2 if family == "llama" else 1
    model = load_reference(path)
    comps = ("resid_post", "attn_out", "mlp_out", "attn_in", "mlp_in")
    common = dict(num_stages=num_stages, components=comps, micro_batch_size=2)
    _, tp1 = run_lens(path, tmp_path / "tp1.zarr", **common)
    summary, tp2 = run_lens(path, tmp_path / "tp2.zarr", tp_size=2, executor="ray", executor_pool=tp_pool, **common)
    assert len(summary["stage_info"]) == 2 * num_stages
    assert [info["tp_rank"] for info in summary["stage_info"]] == [0, 1] * num_stages
    _assert_tp_store_equal(tp2, tp1)
    if family in ("llama", "gemma2"):  # the vocab-sharded KL merge against the unsliced model
        assert assert_kl_to_final_matches_hf(model, tp2) > 0
    generated, pad = hf_generate(model, PROMPTS, 6)
    for row in range(len(PROMPTS)):
        assert tp2.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(tp2.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for layer in range(model.config.num_hidden_layers - 1):
            torch.testing.assert_close(
                acts[layer, :n], hf_hidden_by_row(generated, pad, row, layer + 1)[:n], atol=1e-5, rtol=1e-5
            )


def test_a_pooled_rank_takes_another_model_only_in_the_same_tensor_parallel_place(tiny_checkpoints):
    """A rank's process group is fixed: another model's slice in the same (stage, rank, tp_size)
    place is taken; any other place, or leaving the group (tp_size 1), is refused."""
    from dataclasses import replace

    from actors.stage import StageSpec, StageWorker

    spec = StageSpec(0, 1, 0, 2, str(tiny_checkpoints["llama"]), tp_rank=1, tp_size=2)
    worker = StageWorker(spec)
    worker.configure(replace(spec, model_path=str(tiny_checkpoints["qwen3"])))
    assert worker.spec.model_path == str(tiny_checkpoints["qwen3"])
    for other in (replace(spec, tp_rank=0), replace(spec, stage=1), replace(spec, tp_rank=0, tp_size=1)):
        with pytest.raises(ValueError, match=r"cannot take place .*: its process group is fixed"):
            worker.configure(other)


def test_tensor_parallel_is_refused_for_a_family_autotp_cannot_shard(tiny_checkpoints, tmp_path):
    from actors.coordinator import Coordinator

    spec = run_spec(
        model_path=str(tiny_checkpoints["gpt2"]), store_path=str(tmp_path / "s.zarr"), tp_size=2, executor="ray"
    )
    with pytest.raises(ValueError) as err:  # refused in this process, before any stage starts
        Coordinator(spec).run(PROMPTS)
    assert "tensor parallelism is not available for model family 'gpt2'" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "s.zarr").exists()
