"""The Jacobian lens read in every run: `capture.lenses=[logit, jacobian]` with a J-lens file
adds `jacobian_*` arrays equal to `lm_head(final_norm(J_l h))` computed here from the unsliced
HF model's hidden states (two micro-batches, rows of different lengths, two stages, two
families), the last layer's exactly the logit lens's; the store verifies, the notebook API and
the viewer's lens selector offer it, bad files are refused in one line, and
`pipelines.tune lens=jacobian evaluate=true`'s table equals a plain-torch KL and top-1 here.
The J-lens files are built here from matrices drawn here (actors/jacobian_lens.py), so these
tests do not depend on the fitter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

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


def check_against_hf(model, store, matrices: dict, lens: str = "jacobian", k: int = 5) -> int:
    """Every `<lens>_*` field (resid_post) at every lens position of every row against the
    unsliced HF model's hidden states moved by J_l here and decoded by its own head; the last
    layer untouched (J = I; HF's last hidden state is already final-normed). Returns values checked."""
    n_layers, comp = model.config.num_hidden_layers, store.components.index("resid_post")
    checked = 0
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
