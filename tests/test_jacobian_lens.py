"""The Jacobian lens read in every run: `capture.lenses=[logit, jacobian]` with a J-lens file
adds `jacobian_*` arrays equal to `lm_head(final_norm(J_l h))` computed here from the unsliced
HF model's hidden states (two micro-batches, rows of different lengths, two stages, two
families), the last layer's exactly the logit lens's; the store verifies, the notebook API and
the viewer's lens selector offer it, and bad files are refused in one line
(`pipelines.tune lens=jacobian evaluate=true`'s table: tests/test_jacobian_tune.py).
The J-lens files are built here from matrices drawn here (actors/jacobian_lens.py), so these
tests do not depend on the fitter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_viewer import browser  # noqa: F401  (test_viewer's Chromium fixture, reused here)

from actors.jacobian_lens import FILE_NAME, JacobianFit, save_fit
from reference import assert_stores_equal, lens_reference, run_lens
from tiny_models import load_reference

FIELDS = ("topk_ids", "topk_logprobs", "entropy", "target_logprob", "target_rank", "kl_to_final")
LENS_RUN = dict(num_stages=2, micro_batch_size=2, max_new_tokens=4, k=5, lens_window=3, activations=None)


def jacobian_file(path, n_layers: int, d: int, model: str = "", scale: float = 0.7, seed: int = 5) -> dict:
    """A J-lens file of every layer, the last one's too (a random matrix there: the reader must
    not use it), J_l = I + scale * N(0, 1/d), held as a sum over 3 positions as a fit holds it.
    Returns {layer: J_l} as the file's readers see them (sum / positions)."""
    g = torch.Generator().manual_seed(seed)
    matrices = {la: torch.eye(d) + scale * torch.randn(d, d, generator=g) / math.sqrt(d) for la in range(n_layers)}
    fit = JacobianFit(model=model, d_model=d, skip=0, sums={la: 3 * j for la, j in matrices.items()}, positions=3,
                      sequences=1, tokens=4)  # fmt: skip
    save_fit(path, fit)
    return fit.matrices()


def check_against_hf(model, store, matrices: dict, lens: str = "jacobian") -> int:
    """Every `<lens>_*` field (resid_post) at every lens position of every row against the
    unsliced HF model's hidden states moved by J_l here and decoded by its own head; the last
    layer untouched (J = I; HF's last hidden state is already final-normed). Returns values checked."""
    n_layers, comp = model.config.num_hidden_layers, store.components.index("resid_post")
    k, checked = store[f"{lens}_topk_ids"].shape[-1], 0
    for row in range(store["lengths"].shape[0]):
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        n = tokens.shape[1] - 1
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0, :n], normed=True)
            for li, layer in enumerate(store.layers):
                h, last = out.hidden_states[layer + 1][0, :n], layer == n_layers - 1
                logp = lens_reference(model, h if last else h @ matrices[layer].T, normed=last)
                top = logp.topk(k, dim=-1)
                want = {
                    "kl_to_final": (final.exp() * (final - logp)).sum(-1),
                    "entropy": -(logp.exp() * logp).sum(-1),
                    "target_logprob": logp.gather(1, tokens[0, 1:, None])[:, 0],
                    "topk_logprobs": top.values,
                    "target_rank": (logp > logp.gather(1, tokens[0, 1:, None])).sum(-1),
                }
                for name, value in want.items():
                    ours = torch.from_numpy(store[f"{lens}_{name}"][row, li, comp, :n])
                    where = f"row {row} layer {layer} {name}"
                    torch.testing.assert_close(ours.to(value.dtype), value, atol=1e-4, rtol=0, msg=lambda m, w=where: f"{w}: {m}")  # fmt: skip
                assert torch.equal(torch.from_numpy(store[f"{lens}_topk_ids"][row, li, comp, :n]).long(), top.indices)
                checked += n
    return checked


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_jacobian_arrays_equal_j_moved_hf_states_and_the_logit_lens_at_the_last_layer(
    family, tiny_checkpoints, tmp_path
):
    """Two stages, three rows of different lengths in two micro-batches, resid_post and attn_out:
    jacobian_* equal lm_head(final_norm(J_l h)) from HF's states; the logit lens's arrays are
    those of a run without it; attn_out has no Jacobian lens; the last layer's equal the logit
    lens's exactly (its matrix in the file is not read)."""
    path = tiny_checkpoints[family]
    model = load_reference(path)
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    matrices = jacobian_file(tmp_path / FILE_NAME, n_layers, d)
    components = ("resid_post", "attn_out")
    _, plain = run_lens(path, tmp_path / "plain.zarr", components=components, **LENS_RUN)
    _, store = run_lens(
        path, tmp_path / "j.zarr", components=components, lenses=("logit", "jacobian"),
        jacobian_lens=str(tmp_path / FILE_NAME), **LENS_RUN,
    )  # fmt: skip
    assert store.lenses == ["logit", "jacobian"] and store.verify() == []
    assert len(store["batch_done"]) == 2 and len(set(store["lengths"].tolist())) == 3
    for name in FIELDS:
        np.testing.assert_array_equal(store[name], plain[name])  # the logit lens is untouched
    assert np.isnan(store["jacobian_entropy"][:, :, 1]).all() and (store["jacobian_topk_ids"][:, :, 1] == -1).all()
    assert check_against_hf(model, store, matrices) > 40
    for name in FIELDS:  # J = I at the last layer: the logit lens, bit for bit
        np.testing.assert_array_equal(store[f"jacobian_{name}"][:, -1, 0], store[name][:, -1, 0])
    # J_l moved what the lens reads below the last layer
    assert np.nanmax(np.abs(store["jacobian_entropy"][:, :-1, 0] - store["entropy"][:, :-1, 0])) > 0.1


def _random_translators(path, d: int, model: str) -> None:
    from actors.tuned_lens import Translators, save_translators

    translators = Translators((0,), d)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        translators.weight.copy_(torch.randn(1, d, d, generator=g) / 4)
        translators.bias.copy_(torch.randn(1, d, generator=g))
    save_translators(path, translators, {"model": model})


@pytest.fixture(scope="module")
def three_lens_run(tmp_path_factory, tiny_with_tokenizer):
    """Two prompts of different lengths through the notebook API with all three lenses."""
    import distlens

    root, model = tmp_path_factory.mktemp("jlens"), str(tiny_with_tokenizer)
    matrices = jacobian_file(root / FILE_NAME, 2, 32, model=model)
    _random_translators(root / "tuned.safetensors", 32, model)
    ds = distlens.lens(
        ["The capital of France is", "Hi"], root / "run", model=model, cluster="inprocess", max_new_tokens=4,
        overrides=["cluster.micro_batch_size=1", "capture.lenses=[logit,tuned,jacobian]", "plot.max_prompts=0",
                   f"capture.tuned_lens={root / 'tuned.safetensors'}", f"capture.jacobian_lens={root / FILE_NAME}"],
    )  # fmt: skip
    return root, ds, matrices


def test_the_store_api_and_viewer_offer_the_jacobian_lens(three_lens_run, tiny_with_tokenizer, browser, tmp_path):  # noqa: F811
    """Beside the tuned lens: `distlens verify` passes, the store records which fit it read, the
    Dataset holds every jacobian_* array (equal to HF's states moved by J here) and
    `distlens.top1(lens="jacobian")` reads it; the viewer's lens selector shows the Jacobian
    lens's own arrays in Chromium, grid and tooltip."""
    from test_viewer import Page, as_array, check_tooltip, store_values
    from transformers import AutoTokenizer

    import distlens
    from actors.store import LensStore
    from pipelines import verify
    from pipelines.view import write_page

    root, ds, matrices = three_lens_run
    store = LensStore.open(root / "run" / "lens.zarr")
    assert store.lenses == ["logit", "tuned", "jacobian"] and verify.main([str(store.path)]) == 0
    assert store.attrs["jacobian_lens"]["positions"] == 3 and store.attrs["jacobian_lens"]["model"] == str(
        tiny_with_tokenizer
    )
    assert {f"jacobian_{name}" for name in FIELDS} <= set(ds.data_vars)
    assert check_against_hf(load_reference(tiny_with_tokenizer), store, matrices) > 10
    top = distlens.top1(ds, 0, lens="jacobian")  # [layer, position] token strings
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    ids = store["jacobian_topk_ids"][0, :, 0, : top.shape[1], 0]
    assert top.values.tolist() == [[tokenizer.decode([int(i)]) for i in layer] for layer in ids]
    assert not np.array_equal(ids, store["topk_ids"][0, :, 0, : top.shape[1], 0])  # layer 0 moved by J_0

    page = Page(browser, write_page(store.path, tmp_path / "j.html"))
    page.check_clean()
    options = page.page.eval_on_selector_all("#sel-lens option", "els => els.map(e => e.value)")
    assert options == ["logit", "tuned", "jacobian"]
    page.page.select_option("#sel-lens", "jacobian")
    row = 1
    page.page.select_option("#sel-source", value=str(row))
    grid = page.grid()
    assert grid["row"] == row
    assert grid["lens"] == "jacobian"
    np.testing.assert_allclose(as_array(grid), store_values(store, row, "resid_post", "probability", "jacobian"), atol=1e-6)  # fmt: skip
    assert not np.allclose(as_array(grid), store_values(store, row, "resid_post", "probability"), equal_nan=True)
    n = int(store.group["lengths"][row])
    check_tooltip(page.hover(0, n - 3), store, tokenizer, row, 0, "resid_post", n - 3, "jacobian")


def _fit_file(tmp, name: str, d: int, model: str, layers=(0, 1)) -> str:
    fit = JacobianFit(model=model, d_model=d, skip=0, sums={la: torch.eye(d) for la in layers}, positions=1)
    return str(save_fit(tmp / name, fit))


def _pickle(tmp, model: str) -> str:
    torch.save({"sum.0": torch.eye(32)}, tmp / "lens.pt")  # torch.save: a pickle, never to be loaded
    return str(tmp / "lens.pt")


def _translators_file(tmp, model: str) -> str:
    _random_translators(tmp / "t.safetensors", 32, model)
    return str(tmp / "t.safetensors")


JLENS = "capture.lenses=[logit,jacobian]"
BAD = {
    "missing_file": (lambda tmp, m: [JLENS, f"capture.jacobian_lens={tmp / 'none.safetensors'}"], "does not exist"),
    "another_model": (
        lambda tmp, m: [JLENS, f"capture.jacobian_lens={_fit_file(tmp, 'o.safetensors', 32, 'other-model')}"],
        "was fitted on model 'other-model'",
    ),
    "another_hidden_size": (
        lambda tmp, m: [JLENS, f"capture.jacobian_lens={_fit_file(tmp, 'h.safetensors', 7, m)}"],
        "has hidden size 7; this model's is 32",
    ),
    "a_pickle": (lambda tmp, m: [JLENS, f"capture.jacobian_lens={_pickle(tmp, m)}"], "pickles are never loaded"),
    "not_safetensors": (
        lambda tmp, m: [JLENS, f"capture.jacobian_lens={(tmp / 'x.txt').write_text('hi') and tmp / 'x.txt'}"],
        "is not a safetensors file",
    ),
    "a_translators_file": (
        lambda tmp, m: [JLENS, f"capture.jacobian_lens={_translators_file(tmp, m)}"],
        "is not a Jacobian lens file",
    ),
    "a_layer_not_fitted": (
        lambda tmp, m: [JLENS, f"capture.jacobian_lens={_fit_file(tmp, 'l.safetensors', 32, m, layers=(1,))}"],
        "holds layers [1], not [0]: capture only fitted layers",
    ),
    "jacobian_without_a_file": (
        lambda tmp, m: [JLENS],
        "capture.jacobian_lens=null: capture.lenses holds jacobian, so give a jacobian_lens.safetensors file",
    ),
    "a_file_without_the_lens": (
        lambda tmp, m: [f"capture.jacobian_lens={_fit_file(tmp, 'f.safetensors', 32, m)}"],
        "capture.jacobian_lens is set but capture.lenses lacks jacobian",
    ),
    "no_resid_post": (
        lambda tmp, m: [JLENS, "capture.components=[attn_out]", f"capture.jacobian_lens={_fit_file(tmp, 'r', 32, m)}"],
        "holds jacobian: J_l reads resid_post",
    ),
}


def test_bad_jacobian_lens_inputs_are_refused_in_one_line(tiny_with_tokenizer, tmp_path, capsys):
    """Each bad input, through `pipelines.lens`'s own run inside the drivers' refusal wrapper (in
    this process): exit code 2, one `distlens: error:` line naming the value, no store written."""
    from distlens.api import _compose
    from pipelines import lens_run, session

    model = str(tiny_with_tokenizer)
    for case, (overrides, message) in BAD.items():
        tmp = tmp_path / case
        tmp.mkdir()
        base = [f"model.name={model}", "cluster=inprocess", f"storage.root={tmp}", "storage.run=r"]
        cfg = _compose("lens", [*base, *overrides(tmp, model)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_, session.refusals():
            lens_run.run(cfg, tmp / "r")
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distlens: error:")]
        assert exit_.value.code == 2 and len(errors) == 1 and message in errors[0], (case, errors)
        assert not list(tmp.rglob("*.zarr")), case  # refused before any store is made


def test_each_stage_reads_only_its_own_layers_and_ray_stages_equal_local_ones(tiny_checkpoints, tmp_path, ray_cluster):
    """A stage's transport holds its captured layers' J_l only (not the last layer's, not
    another stage's); stage actors on Ray write the store the in-process stages write, and it
    equals HF's J-moved states."""
    from actors.jacobian_reader import JacobianTransport

    path = tiny_checkpoints["qwen3"]
    model = load_reference(path)
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    matrices = jacobian_file(tmp_path / FILE_NAME, n_layers, d, seed=9)
    second = JacobianTransport.for_stage(str(tmp_path / FILE_NAME), (2, 3), n_layers, "cpu")
    assert set(second.matrices) == {2} and torch.equal(second.matrices[2], matrices[2])
    kw = dict(components=("resid_post",), lenses=("logit", "jacobian"), jacobian_lens=str(tmp_path / FILE_NAME))
    _, local = run_lens(path, tmp_path / "local.zarr", **kw, **LENS_RUN)
    _, on_ray = run_lens(path, tmp_path / "ray.zarr", executor="ray", **kw, **LENS_RUN)
    assert_stores_equal(on_ray, local)
    assert check_against_hf(model, on_ray, matrices) > 40
