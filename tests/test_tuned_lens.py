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
from reference import lens_reference, run_lens
from tiny_models import load_reference

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
            lens = lens_reference(model, tuned)  # final norm, head, the family's soft-cap
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


@pytest.mark.parametrize("executor, family", [("local", "llama"), ("ray", "llama"), ("local", "gemma2")])
def test_translators_trained_on_stages_equal_a_plain_torch_loop(executor, family, tiny_checkpoints, tmp_path, request):
    """Gemma 2: the final logit soft-cap is in the lens and in the gradient through it."""
    if executor == "ray":
        request.getfixturevalue("ray_cluster")  # this test process's cluster (conftest.py)
    path = tiny_checkpoints[family]
    model = load_reference(path)
    for p in model.parameters():
        p.requires_grad_(False)
    prompts = _sequences(model.config.vocab_size, STEPS * BATCH)
    _, store = _train(path, tmp_path, "train", prompts, executor=executor)
    weight, bias, losses = _reference(model, prompts)
    ours_w, ours_b = _stage_files(tmp_path / "ck", STEPS)  # stage 0: layers 0-1; stage 1: layer 2
    assert ours_w.shape == weight.shape  # the last layer has no translator (its lens is the final one)
    # AdamW divides each update by the root of its second moment, so fp32 noise in a near-zero
    # gradient (sums in another order on the stages) moves a weight by up to ~1e-5 in 4 steps:
    # the bound is 1% of one step's learning rate (3e-3), far below what a wrong loss, schedule
    # or soft-cap moves it.
    torch.testing.assert_close(ours_w, weight, atol=3e-5, rtol=0)
    torch.testing.assert_close(ours_b, bias, atol=3e-5, rtol=0)
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


def _tune_args(model, text, tmp_path, run: str, *extra: str) -> list[str]:
    return [
        "pipelines.tune", f"model.name={model}", "cluster=inprocess", f"data.paths=[{text}]", "data.tokens=8",
        "train.steps=6", "train.batch=2", "train.save_every=2", "train.warmup=1", f"storage.root={tmp_path}",
        f"storage.run={run}", "data.heldout_fraction=0.25", *extra,
    ]  # fmt: skip


def _heldout_reference(model, translators, heldout: list[list[int]]) -> dict:
    """Per layer over the held-out sequences, computed here from the unsliced HF model: mean
    KL(final || lens) and top-1 agreement with the final distribution, logit and tuned lens."""
    from reference import lens_reference

    n_layers = model.config.num_hidden_layers
    sums = {k: np.zeros(n_layers) for k in ("logit_kl", "tuned_kl", "logit_top1", "tuned_top1")}
    count = 0
    with torch.no_grad():
        for seq in heldout:
            out = model(torch.tensor([seq]), output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0], normed=True)
            for layer in range(n_layers):
                h, last = out.hidden_states[layer + 1][0], layer == n_layers - 1
                for lens, state in (("logit", h), ("tuned", h if last else translators(h, layer))):
                    logp = lens_reference(model, state, normed=last)
                    sums[f"{lens}_kl"][layer] += float((final.exp() * (final - logp)).sum(-1).sum())
                    sums[f"{lens}_top1"][layer] += float((logp.argmax(-1) == final.argmax(-1)).sum())
            count += len(seq)
    return {k: v / count for k, v in sums.items()}


def test_tune_driver_trains_evaluates_and_survives_a_kill(tiny_with_tokenizer, tmp_path):
    """`pipelines.tune` on a text file: translators of every layer but the last in one
    safetensors file with its metadata, checked when loaded; `evaluate=true` reports per-layer
    held-out KL and top-1 agreement equal to the unsliced HF model's with the translators
    applied here; a lens run records both lenses and draws both heatmaps. A driver killed
    (SIGKILL) after 3 steps and resumed gives the uninterrupted run's translators; a second
    run into the same directory is refused unless resumed."""
    import json
    from pathlib import Path

    from driver import run_driver

    from actors.store import LensStore
    from actors.tuned_lens import load_translators

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the keeper lit lamp {i} and watched the sea." for i in range(40)))
    model = str(tiny_with_tokenizer)
    first = run_driver(*_tune_args(model, text, tmp_path, "t"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "tune" / "t"
    translators, meta = load_translators(out / "translators.safetensors", model, 32, 2)
    assert translators.layers == (0,) and meta["tokens_seen"] == 6 * 2 * 8 and translators.weight.abs().max() > 0
    assert (out / "loss.png").stat().st_size > 0
    again = run_driver(*_tune_args(model, text, tmp_path, "t"), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a tuned-lens run: pass resume=true" in again.stderr

    evaluated = run_driver(*_tune_args(model, text, tmp_path, "t", "evaluate=true"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = json.loads((out / "eval.json").read_text())
    heldout = json.loads((out / "sequences.json").read_text())["heldout"][:64]
    expected = _heldout_reference(load_reference(tiny_with_tokenizer), translators, heldout)
    assert table["positions"] == sum(len(s) for s in heldout)
    for key, values in expected.items():
        np.testing.assert_allclose(table[key], values, atol=1e-4, rtol=0, err_msg=key)
    assert table["tuned_kl"][0] != table["logit_kl"][0] and (out / "eval.png").stat().st_size > 0
    assert "| 0 |" in (out / "eval.md").read_text()

    lens = run_driver(
        "pipelines.lens", f"model.name={model}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=l",
        "capture.lenses=[logit,tuned]", f"capture.tuned_lens={out / 'translators.safetensors'}",
        "generation.max_new_tokens=3", "plot.max_prompts=1", cwd=tmp_path,
    )  # fmt: skip
    assert lens.returncode == 0, lens.stderr[-3000:]
    store = LensStore.open(tmp_path / "l" / "lens.zarr")
    assert store.lenses == ["logit", "tuned"] and store.verify() == []
    assert store.attrs["tuned_lens"]["tokens_seen"] == 96 and (tmp_path / "l" / "heatmap_prompt0_tuned.png").is_file()

    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    fault = json.dumps({"kill_driver": {"after_batches": 3}})
    killed = run_driver(wrapper, fault, *_tune_args(model, text, tmp_path, "k"), cwd=tmp_path, script=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "tune" / "k" / "translators.safetensors").exists()
    resumed = run_driver(*_tune_args(model, text, tmp_path, "k", "resume=true"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, _ = load_translators(tmp_path / "tune" / "k" / "translators.safetensors", model, 32, 2)
    torch.testing.assert_close(again.weight, translators.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(again.bias, translators.bias, atol=1e-6, rtol=0)


def test_default_corpus_is_questions_and_the_models_continuations(tiny_with_tokenizer, tmp_path):
    """With no data.paths: the shared datasets' questions as chat prompts, each followed by the
    model's own sampled continuation; held-out documents are whole documents."""
    import json
    from pathlib import Path

    from driver import run_driver
    from transformers import AutoTokenizer

    from actors.store import LensStore
    from pipelines.prompts import render_prompt

    args = [
        "pipelines.tune", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", "data.max_documents=12",
        "data.continuation_tokens=5", "data.tokens=16", "train.steps=2", "train.batch=2", "train.warmup=0",
        f"storage.root={tmp_path}", "storage.run=c", "data.heldout_fraction=0.25",
    ]  # fmt: skip
    result = run_driver(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tune" / "c"
    docs = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    questions = {
        json.loads(line)["question"]
        for f in sorted((Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mwe").glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    }
    store = LensStore.open(out / "corpus.zarr")
    assert len(docs) == 12 == store["source"].shape[0]
    for row, source in enumerate(store["source"].tolist()):
        generated = str(store.group["generated_text"][row])
        assert generated and docs[source].endswith(generated)
        prompt = docs[source][: len(docs[source]) - len(generated)]
        question = next(q for q in questions if render_prompt(tokenizer, q) == prompt)  # a dataset question
        assert question
    heldout = json.loads((out / "heldout.json").read_text())
    assert len(heldout) == 3 and all(doc in docs for doc in heldout)


def _random_translators(path, model, scale: float):
    """Translators for every layer but the last: A ~ scale * N(0, 1/d), b ~ scale * N(0, 1)."""
    from actors.tuned_lens import Translators, save_translators

    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    translators = Translators(tuple(range(n_layers - 1)), d)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        translators.weight.copy_(scale * torch.randn(n_layers - 1, d, d, generator=g) / math.sqrt(d))
        translators.bias.copy_(scale * torch.randn(n_layers - 1, d, generator=g))
    save_translators(path, translators, {"model": "tiny"})
    return translators


LENS_RUN = dict(num_stages=2, micro_batch_size=2, max_new_tokens=4, k=5, lens_window=3, activations=None)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_tuned_lens_capture_equals_translated_hf_states(executor, tiny_checkpoints, tmp_path, request):
    """`capture.lenses=[logit, tuned]`: every tuned_* field at every lens position of rows of
    different lengths in two micro-batches equals the unsliced HF model's states translated
    here (h + A h + b, the last layer untranslated) and decoded through its own head; the
    logit lens's arrays are unchanged beside them and a component without translators
    (attn_out) has none."""
    from reference import lens_reference

    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    path = tiny_checkpoints["llama"]
    model = load_reference(path)
    translators = _random_translators(tmp_path / "t.safetensors", model, scale=0.5)
    components = ("resid_post", "attn_out")
    _, plain = run_lens(path, tmp_path / "plain.zarr", components=components, executor=executor, **LENS_RUN)
    _, store = run_lens(
        path, tmp_path / "both.zarr", components=components, executor=executor, lenses=("logit", "tuned"),
        tuned_lens=str(tmp_path / "t.safetensors"), **LENS_RUN,
    )  # fmt: skip
    assert store.lenses == ["logit", "tuned"] and plain.lenses == ["logit"] and not store.verify()
    for name in ("topk_ids", "topk_logprobs", "entropy", "target_logprob", "target_rank", "kl_to_final"):
        np.testing.assert_array_equal(store[name], plain[name])  # the logit lens is untouched
    assert np.isnan(store["tuned_entropy"][:, :, 1]).all() and (store["tuned_topk_ids"][:, :, 1] == -1).all()
    n_layers = model.config.num_hidden_layers
    checked = 0
    for row in range(3):
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        n = tokens.shape[1] - 1
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0, :n], normed=True)
            for layer in range(n_layers):
                h = out.hidden_states[layer + 1][0, :n]
                last = layer == n_layers - 1
                tuned = lens_reference(model, h if last else translators(h, layer), normed=last)
                kl = (final.exp() * (final - tuned)).sum(-1)
                top = tuned.topk(5, dim=-1)
                target = tuned.gather(1, tokens[0, 1:, None])[:, 0]
                entropy = -(tuned.exp() * tuned).sum(-1)

                def ours(name, layer=layer, n=n, row=row):
                    return torch.from_numpy(store[f"tuned_{name}"][row, layer, 0, :n])

                torch.testing.assert_close(ours("kl_to_final"), kl, atol=1e-4, rtol=0)
                torch.testing.assert_close(ours("entropy"), entropy, atol=1e-4, rtol=0)
                torch.testing.assert_close(ours("target_logprob"), target, atol=1e-4, rtol=0)
                torch.testing.assert_close(ours("topk_logprobs"), top.values, atol=1e-4, rtol=0)
                assert torch.equal(ours("topk_ids").long(), top.indices)
                checked += n
    assert checked > 40
    # the translators change what the lens reads: not the logit lens again
    assert np.nanmax(np.abs(store["tuned_entropy"][:, :-1, 0] - store["entropy"][:, :-1, 0])) > 0.1


def test_zero_translators_are_the_logit_lens_exactly(tiny_checkpoints, tmp_path):
    """An untrained tuned lens (A = 0, b = 0) reads exactly what the logit lens reads."""
    from actors.tuned_lens import Translators, save_translators

    path = tiny_checkpoints["gemma2"]
    model = load_reference(path)
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    save_translators(tmp_path / "zero.safetensors", Translators(tuple(range(n_layers - 1)), d), {"model": "tiny"})
    _, store = run_lens(
        path, tmp_path / "s.zarr", lenses=("logit", "tuned"), tuned_lens=str(tmp_path / "zero.safetensors"),
        components=("resid_post",), num_stages=3, micro_batch_size=2, max_new_tokens=3, k=4, lens_window=2,
        activations=None,
    )  # fmt: skip
    for name in ("topk_ids", "topk_logprobs", "entropy", "target_logprob", "target_rank", "kl_to_final"):
        np.testing.assert_array_equal(store[f"tuned_{name}"], store[name])
    assert (store["topk_ids"] >= 0).any()
