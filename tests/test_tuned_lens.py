"""Tuned-lens translators trained where their layers live: each stage's optimizer steps equal a
single-process plain torch loop over the unsliced HF model (same batches, seed-free: every
translator starts at zero), and a run stopped after a checkpoint and resumed equals one that
was not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.tuned_lens import TuneSpec
from reference import run_lens
from tiny_models import final_norm, load_reference

T, BATCH, STEPS = 6, 3, 4
TUNE = dict(lr=3e-3, weight_decay=0.01, betas=(0.9, 0.99), warmup=1, schedule="linear", save_every=2)


def _sequences(vocab: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(4)
    return rng.integers(3, vocab, size=(n, T)).tolist()


def _train(path, tmp_path, name: str, prompts, executor="local", **tune):
    spec = TuneSpec(steps=STEPS, checkpoint_dir=str(tmp_path / "ck"), **{**TUNE, **tune})
    return run_lens(
        path, tmp_path / f"{name}.zarr", prompts=prompts, executor=executor, num_stages=2, micro_batch_size=BATCH,
        micro_batches_in_flight=2, max_new_tokens=1, components=("resid_post",), k=1, lens_window=T + 1,
        activations=None, tune=spec, max_restarts=0,
    )  # fmt: skip


def _reference(model, prompts) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The same training written out: translators for layers 0..L-2 at zero, AdamW, the lr
    warmed up over one step then decayed linearly; per step the sum over layers of the mean
    KL(final || lens(h + A h + b)) over the batch's positions. Returns (A, b, losses)."""
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    weight = torch.zeros(n_layers - 1, d, d, requires_grad=True)
    bias = torch.zeros(n_layers - 1, d, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=TUNE["lr"], betas=TUNE["betas"], weight_decay=TUNE["weight_decay"])
    losses = []
    for step in range(STEPS):
        factor = (step + 1) / 1 if step < 1 else max(0.0, 1 - (step - 1) / (STEPS - 1))
        for group in opt.param_groups:
            group["lr"] = TUNE["lr"] * factor
        batch = torch.tensor(prompts[step * BATCH : (step + 1) * BATCH])
        with torch.no_grad():
            out = model(batch, output_hidden_states=True)
        final = torch.log_softmax(out.logits.reshape(-1, out.logits.shape[-1]).float(), -1)
        opt.zero_grad()
        step_losses = []
        for layer in range(n_layers - 1):
            h = out.hidden_states[layer + 1].reshape(-1, d)
            tuned = h + h @ weight[layer].T + bias[layer]
            lens = torch.log_softmax(model.lm_head(final_norm(model)(tuned)).float(), -1)
            kl = (final.exp() * (final - lens)).sum(-1)
            kl.mean().backward()
            step_losses.append(kl.detach())
        opt.step()
        losses.append(step_losses)
    return weight.detach(), bias.detach(), losses


def _stage_files(ck, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    parts = [load_file(str(ck / f"stage{s}.step{step}.safetensors")) for s in (0, 1)]
    return torch.cat([p["weight"] for p in parts]), torch.cat([p["bias"] for p in parts])


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_translators_trained_on_stages_equal_a_plain_torch_loop(executor, tiny_checkpoints, tmp_path, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")  # started for this module, stopped after it
    path = tiny_checkpoints["llama"]
    model = load_reference(path)
    for p in model.parameters():
        p.requires_grad_(False)
    prompts = _sequences(model.config.vocab_size, STEPS * BATCH)
    _, store = _train(path, tmp_path, "train", prompts, executor=executor)
    weight, bias, losses = _reference(model, prompts)
    ours_w, ours_b = _stage_files(tmp_path / "ck", STEPS)  # stage 0: layers 0-1; stage 1: layer 2
    assert ours_w.shape == weight.shape  # the last layer has no translator (its lens is the final one)
    torch.testing.assert_close(ours_w, weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_b, bias, atol=1e-5, rtol=0)
    assert weight.abs().max() > 1e-3  # it moved
    # the store records each step's KL of the tuned lens before the update, per position
    kl = store["kl_to_final"][:, :, 0, :T]  # [row, layer, position]
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        for layer in range(3):
            np.testing.assert_allclose(kl[rows, layer].reshape(-1), losses[step][layer].numpy(), atol=1e-4)
    assert math.isclose(float(np.nanmean(kl[:BATCH, 0])), float(losses[0][0].mean()), abs_tol=1e-4)


def test_training_stopped_at_a_checkpoint_and_resumed_equals_training_through(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    prompts = _sequences(256, STEPS * BATCH)
    _train(path, tmp_path / "through", "all", prompts)
    _train(path, tmp_path / "parts", "first", prompts[: 2 * BATCH])  # stops after step 2 (checkpointed)
    _train(path, tmp_path / "parts", "rest", prompts[2 * BATCH :], resume_step=2)
    for a, b in zip(_stage_files(tmp_path / "through" / "ck", STEPS), _stage_files(tmp_path / "parts" / "ck", STEPS)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_tune_driver_trains_merges_and_resumes(tiny_with_tokenizer, tmp_path):
    """`pipelines.tune` on a text file: translators of every layer but the last in one
    safetensors file with its metadata, checked when loaded; a second run into the same
    directory is refused unless resumed, and a resumed finished run changes nothing."""
    import json

    from driver import run_driver

    from actors.tuned_lens import load_translators

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the keeper lit the lamp and watched the sea." for i in range(40)))
    args = [
        "pipelines.tune", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"data.paths=[{text}]",
        "data.tokens=8", "train.steps=4", "train.batch=2", "train.save_every=2", "train.warmup=1",
        f"storage.root={tmp_path}", "storage.run=t",
    ]  # fmt: skip
    first = run_driver(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "tune" / "t"
    translators, meta = load_translators(out / "translators.safetensors", str(tiny_with_tokenizer), 32, 2)
    assert translators.layers == (0,) and meta["tokens_seen"] == 4 * 2 * 8 and translators.weight.abs().max() > 0
    assert (out / "loss.png").stat().st_size > 0 and json.loads((out / "heldout.json").read_text())
    with pytest.raises(ValueError, match="hidden size 32; this model's is 64"):
        load_translators(out / "translators.safetensors", str(tiny_with_tokenizer), 64, 2)
    with pytest.raises(ValueError, match="was trained on model"):
        load_translators(out / "translators.safetensors", "another-model", 32, 2)
    again = run_driver(*args, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a tuned-lens run: pass resume=true" in again.stderr
    resumed = run_driver(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already trained: 4 steps" in resumed.stderr
