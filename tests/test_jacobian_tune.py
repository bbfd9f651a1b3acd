"""`python -m pipelines.tune lens=jacobian` run as a user runs it, on a 2-layer random Llama with
SmolLM2's tokenizer: the fit's file and `fit_sequences.jsonl` record what was fitted, and its
matrices equal autograd on the unsliced HF model over those sequences; `evaluate=true` (right after
a fit, and on a fit already in the run folder beside a tuned lens) reports per-layer held-out
KL(final || lens) and top-1 agreement equal to the HF model's hidden states moved and decoded
here; bad input is one line, exit 2, no traceback and no lens written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from driver import run_driver
from test_jacobian_fit import _reference as autograd_sums
from test_jacobian_lens import _random_translators, jacobian_file

from actors.jacobian_lens import ESTIMATOR, FILE_NAME, JacobianFit, load_fit, read_meta, save_fit
from reference import lens_reference
from tiny_models import load_reference

TOKENS, SKIP, SEQUENCES = 12, 3, 4


def _tune(model, tmp_path, run: str, *extra: str):
    """`pipelines.tune lens=jacobian` on 2 in-process stages over a text file of 16 paragraphs."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the keeper lit lamp {i} and watched the sea." for i in range(16)))
    args = [
        "pipelines.tune", "lens=jacobian", f"model.name={model}", "cluster=inprocess", "cluster.num_stages=2",
        f"data.paths=[{text}]", f"data.tokens={TOKENS}", "data.heldout_fraction=0.25", f"jacobian.skip={SKIP}",
        "jacobian.block=16", f"jacobian.sequences={SEQUENCES}", "jacobian.batch=2", "jacobian.save_every=1",
        f"storage.root={tmp_path}", f"storage.run={run}", "progress=false", *extra,
    ]  # fmt: skip
    return run_driver(*args, cwd=tmp_path)


def heldout_sequences(model_dir, out) -> list[list[int]]:
    """The run's held-out documents (heldout.json) as token ids, each document followed by EOS,
    cut into TOKENS-token sequences (at most data.heldout_sequences, 64)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for doc in json.loads((out / "heldout.json").read_text()):
        ids += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return [ids[i : i + TOKENS] for i in range(0, len(ids) - TOKENS + 1, TOKENS)][:64]


def heldout_reference(model, seqs: list[list[int]], lenses: dict) -> dict:
    """Per layer over every position of `seqs`, from the unsliced HF model: the mean of
    KL(final || lens) and the fraction of positions whose lens top-1 is the final distribution's.
    `lenses` {name: move(h [n, d], layer)}: the state the model's own final norm and head decode
    at every layer but the last, whose lens is the final distribution itself."""
    n_layers = model.config.num_hidden_layers
    sums = {f"{name}_{what}": np.zeros(n_layers) for name in lenses for what in ("kl", "top1")}
    count = 0
    with torch.no_grad():
        for seq in seqs:
            out = model(torch.tensor([seq]), output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0], normed=True)  # HF's last state is normed
            for layer in range(n_layers):
                h, last = out.hidden_states[layer + 1][0], layer == n_layers - 1
                for name, move in lenses.items():
                    logp = lens_reference(model, h if last else move(h, layer), normed=last)
                    sums[f"{name}_kl"][layer] += float((final.exp() * (final - logp)).sum(-1).sum())
                    sums[f"{name}_top1"][layer] += float((logp.argmax(-1) == final.argmax(-1)).sum())
            count += len(seq)
    return {key: value / count for key, value in sums.items()}


def assert_table_equals_reference(out, model_dir, lenses: dict) -> dict:
    """eval.json of the run folder `out` against `heldout_reference` on its held-out split."""
    table = json.loads((out / "eval.json").read_text())
    seqs = heldout_sequences(model_dir, out)
    assert table["lenses"] == list(lenses) and table["layers"] == [0, 1]
    assert table["positions"] == len(seqs) * TOKENS > 0
    for key, values in heldout_reference(load_reference(model_dir), seqs, lenses).items():
        np.testing.assert_allclose(table[key], values, atol=1e-4, rtol=0, err_msg=key)
    md = (out / "eval.md").read_text()
    assert " | ".join(f"{lens} KL" for lens in lenses) in md and "| 0 |" in md
    assert (out / "eval.png").stat().st_size > 0
    return table


def test_tune_driver_fits_the_jacobian_lens_on_the_sequences_it_records_then_evaluates_it(
    tiny_with_tokenizer, tmp_path
):
    """A real fit on 2 stages: the file's metadata names the model, layers, d_model, sequences,
    tokens, skip and estimator; fit_sequences.jsonl holds the 4 training sequences fitted on, and
    the matrices equal autograd on the unsliced HF model over exactly those; `evaluate=true` then
    reports the logit and Jacobian lenses (no tuned lens given) equal to HF's states here."""
    model = str(tiny_with_tokenizer)
    done = _tune(model, tmp_path, "f", "evaluate=true")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tune" / "f"
    meta = read_meta(out / FILE_NAME)
    assert {k: meta[k] for k in ("model", "layers", "d_model", "sequences", "tokens", "skip", "estimator")} == {
        "model": model, "layers": [0, 1], "d_model": 32, "sequences": SEQUENCES, "tokens": SEQUENCES * TOKENS,
        "skip": SKIP, "estimator": ESTIMATOR,
    }  # fmt: skip
    fitted = [json.loads(line) for line in (out / "fit_sequences.jsonl").read_text().splitlines()]
    assert len(fitted) == SEQUENCES and all(len(s) == TOKENS for s in fitted)
    assert len({tuple(s) for s in fitted}) == SEQUENCES
    hf = load_reference(tiny_with_tokenizer)
    for p in hf.parameters():
        p.requires_grad_(False)
    fit, expected = load_fit(out / FILE_NAME), autograd_sums(hf, fitted, skip=SKIP)
    assert fit.positions == SEQUENCES * (TOKENS - SKIP)
    for layer, sums in expected.items():
        torch.testing.assert_close(fit.sums[layer].double(), sums, atol=1e-5 * float(sums.abs().max()), rtol=0)
    matrices = fit.matrices()
    assert not torch.allclose(matrices[0], torch.eye(32), atol=1e-2)  # layer 0: a real transport
    table = assert_table_equals_reference(
        out, tiny_with_tokenizer, {"logit": lambda h, layer: h, "jacobian": lambda h, layer: h @ matrices[layer].T}
    )
    assert table["jacobian_kl"][0] != table["logit_kl"][0]
    assert table["jacobian_kl"][1] == table["logit_kl"][1] == pytest.approx(0, abs=1e-5)  # J = I: the final layer


def test_evaluate_on_a_fit_already_in_the_run_folder_compares_three_lenses(tiny_with_tokenizer, tmp_path):
    """`evaluate=true` on a run folder that holds a jacobian_lens.safetensors (here one drawn in the
    test, its last layer's matrix random: never read) evaluates it without fitting, on the split
    `data.*` makes, beside `tuned_lens=<translators>`: logit, tuned and Jacobian lens per layer
    equal HF's states moved (J_l h; h + A h + b) and decoded here."""
    from actors.tuned_lens import load_translators

    model = str(tiny_with_tokenizer)
    out = tmp_path / "tune" / "e"
    out.mkdir(parents=True)
    matrices = jacobian_file(out / FILE_NAME, 2, 32, model=model)
    before = (out / FILE_NAME).read_bytes()
    _random_translators(tmp_path / "t.safetensors", 32, model)
    translators, _ = load_translators(tmp_path / "t.safetensors", model, 32, 2)
    done = _tune(model, tmp_path, "e", "evaluate=true", f"tuned_lens={tmp_path / 't.safetensors'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already fitted" in done.stderr and (out / FILE_NAME).read_bytes() == before
    assert not (out / "fit_sequences.jsonl").exists() and not (out / "checkpoints").exists()
    lenses = {
        "logit": lambda h, layer: h,
        "tuned": lambda h, layer: translators(h, layer),
        "jacobian": lambda h, layer: h @ matrices[layer].T,
    }
    table = assert_table_equals_reference(out, tiny_with_tokenizer, lenses)
    assert len({table[f"{lens}_kl"][0] for lens in lenses}) == 3  # three different lenses at layer 0


def _fit_file(tmp, name: str, model: str) -> str:
    fit = JacobianFit(model=model, d_model=32, skip=SKIP, sums={0: torch.eye(32), 1: torch.eye(32)}, positions=1)
    return str(save_fit(tmp / name, fit))


def _pickle(tmp) -> str:
    torch.save({"sum.0": torch.eye(32)}, tmp / "lens.pt")  # a pickle: never to be loaded
    return str(tmp / "lens.pt")


def _translators(tmp, model: str) -> str:
    _random_translators(tmp / "t.safetensors", 32, model)
    return str(tmp / "t.safetensors")


# name: (overrides, or a function of (tmp_path, model) giving them; what the one error line says)
BAD = {
    "block_not_dividing_d_model": (
        ["jacobian.block=5"],
        "jacobian.block=5 does not divide d_model=32: choose a divisor of 32",
    ),
    "tensor_parallel": (
        ["cluster.tp_size=2"],
        "cluster.tp_size=2: the Jacobian lens is fitted on tp_size=1 pipeline stages",
    ),
    "merge_a_missing_file": (
        lambda tmp, m: [f"merge=[{tmp / 'none.safetensors'}]"],
        "none.safetensors' does not exist: give a jacobian_lens.safetensors file",
    ),
    "merge_a_pickle": (
        lambda tmp, m: [f"merge=[{_pickle(tmp)}]"],
        "lens.pt' is not a safetensors file (SafetensorError); pickles are never loaded: give a",
    ),
    "merge_fits_of_two_models": (
        lambda tmp, m: [f"merge=[{_fit_file(tmp, 'a.safetensors', m)},{_fit_file(tmp, 'b.safetensors', 'other')}]"],
        "and 'other'; merge only fits of one model, hidden size, skip and layers",
    ),
    "tuned_lens_of_another_model": (
        lambda tmp, m: ["evaluate=true", f"tuned_lens={_translators(tmp, 'other')}"],
        "t.safetensors' was trained on model 'other'; this run uses",
    ),
    "tuned_lens_without_evaluate": (
        lambda tmp, m: [f"tuned_lens={_translators(tmp, m)}"],
        "is the tuned lens that lens=jacobian evaluate=true compares with: give both, or drop it",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_jacobian_tune_input_is_one_line_and_writes_no_lens(case, tiny_with_tokenizer, tmp_path):
    overrides, message = BAD[case]
    if callable(overrides):
        overrides = overrides(tmp_path, str(tiny_with_tokenizer))
    result = _tune(str(tiny_with_tokenizer), tmp_path, "r", *overrides)
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlens: error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.rglob(FILE_NAME)) and not list(tmp_path.rglob("*.zarr"))
