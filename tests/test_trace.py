"""`python -m pipelines.trace`: every cell of a causal trace equals a separate run of the unsliced
HF model, its corrupted prompt patched at that one (site, layer, position) with the clean run's
activation, both computed here with the test's own hooks. Three pairs of two lengths, three sites,
3 stages, micro-batches of 16 rows; a resumed trace (on 2 Ray stage actors) recomputes only the
pair it lacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from conftest import made_once
from driver import run_driver

from tiny_models import decoder_layers, load_reference, save_tiny

PAIRS = [
    {"clean": "The cat sat on the", "corrupt": "The dog sat on the", "target": " mat", "foil": " floor"},
    {
        "clean": "The Eiffel Tower is located in the city of",
        "corrupt": "The Colosseum is located in the city of",
        "target": " Paris",
        "foil": " Rome",
    },
    {"clean": "Paris is the capital of", "corrupt": "Rome is the capital of", "target": " France"},
]
SITES = ("resid_post", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, smollm2):
    """A 4-layer random Llama with SmolLM2's tokenizer and vocabulary."""

    def make(folder):
        path = folder / "llama"
        save_tiny("llama", path, seed=3, vocab_size=49152, hidden_size=32, intermediate_size=64)
        smollm2.tokenizer().save_pretrained(path)

    return made_once(tmp_path_factory, "tiny4_tok", make) / "llama"


def _hf_cells(path, pair_ids, target, foil):
    """[site, layer, position] target and foil log-probs of the corrupted prompt patched at each
    cell alone, and the clean and corrupted runs' (target, foil) log-probs."""
    model = load_reference(path)
    layers = decoder_layers(model)
    state = {"patch": None, "seen": {}}

    def hook(layer, site):
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            state["seen"][(layer, site)] = h[0].clone()
            if state["patch"] is not None and state["patch"][0] == (layer, site):
                h = h.clone()
                h[0, state["patch"][1]] = state["patch"][2]
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return out

        return post

    for i, block in enumerate(layers):
        block.register_forward_hook(hook(i, "resid_post"))
        block.self_attn.register_forward_hook(hook(i, "attn_out"))
        block.mlp.register_forward_hook(hook(i, "mlp_out"))

    def lp(ids):
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        return float(out[target]), None if foil is None else float(out[foil])

    clean_ids, corrupt_ids = pair_ids
    clean = lp(clean_ids)
    clean_seen = dict(state["seen"])
    corrupt = lp(corrupt_ids)
    n = len(corrupt_ids)
    cells = np.full((2, len(SITES), len(layers), n), np.nan, np.float32)
    for s, site in enumerate(SITES):
        for layer in range(len(layers)):
            for p in range(n):
                state["patch"] = ((layer, site), p, clean_seen[(layer, site)][p])
                cells[0, s, layer, p], f = lp(corrupt_ids)
                cells[1, s, layer, p] = np.nan if f is None else f
    state["patch"] = None
    return cells, clean, corrupt


def test_every_trace_cell_equals_a_separately_patched_hf_run(tiny4, tmp_path, joined_ray):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "trace"
    args = [f"model.name={tiny4}", f"pairs={pairs}", f"trace.sites=[{','.join(SITES)}]", f"hydra.run.dir={out}"]
    first = run_driver(
        "pipelines.trace",
        *args,
        "cluster=inprocess",
        "cluster.num_stages=3",
        "cluster.micro_batch_size=16",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    g = zarr.open_group(str(out / "trace.zarr"), mode="r")
    assert g.attrs["complete"] and g["done"][:].all()
    assert g.attrs["summary"]["cells"] == len(SITES) * 4 * (5 + 10 + 5)
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tiny4)

    def check(i):
        p = PAIRS[i]
        ids = (tok(p["clean"]).input_ids, tok(p["corrupt"]).input_ids)
        target = tok(p["target"], add_special_tokens=False).input_ids[0]
        foil = tok(p["foil"], add_special_tokens=False).input_ids[0] if "foil" in p else None
        cells, clean, corrupt = _hf_cells(tiny4, ids, target, foil)
        n = len(ids[1])
        assert list(g["corrupt_tokens"][i, :n]) == ids[1] and (g["corrupt_tokens"][i, n:] == -1).all()
        assert list(g["clean_tokens"][i, :n]) == ids[0] and g["target_token"][i] == target
        assert g["prompt_length"][i] == n
        np.testing.assert_allclose(g["target_logprob"][i, :, :, :n], cells[0], atol=2e-5)
        assert np.isnan(g["target_logprob"][i, :, :, n:]).all()
        np.testing.assert_allclose([g["clean_logprob"][i], g["corrupt_logprob"][i]], [clean[0], corrupt[0]], atol=2e-5)
        recovery = (cells[0] - corrupt[0]) / (clean[0] - corrupt[0])
        np.testing.assert_allclose(g["recovery"][i, :, :, :n], recovery, rtol=1e-3, atol=1e-3)
        if foil is None:
            assert np.isnan(g["logit_diff"][i]).all()
        else:
            np.testing.assert_allclose(g["logit_diff"][i, :, :, :n], cells[0] - cells[1], atol=4e-5)
            np.testing.assert_allclose(g["clean_logit_diff"][i], clean[0] - clean[1], atol=4e-5)
        # the last layer's resid_post at the last position is the clean run's output exactly
        assert abs(g["recovery"][i, 0, -1, n - 1] - 1) < 1e-3
        return g["target_logprob"][i]

    for i in range(len(PAIRS)):
        check(i)
    assert (out / "trace.html").exists() and (out / "trace_mean.png").exists() and (out / "trace_pair1.png").exists()
    assert "Colosseum" in (out / "trace.html").read_text()
    (out / "trace.html").unlink()
    viewed = run_driver("pipelines", "view", str(out / "trace.zarr"), cwd=tmp_path)  # written again
    assert viewed.returncode == 0 and "Colosseum" in (out / "trace.html").read_text(), viewed.stderr[-2000:]

    # from a notebook: the same trace of one pair as an xarray Dataset (the driver's numbers)
    import distlens

    ds = distlens.trace(PAIRS[:1], tmp_path / "nb", model=str(tiny4), cluster="inprocess", sites=SITES)
    assert ds.recovery.dims == ("pair", "site", "layer", "position") and list(ds.site.values) == list(SITES)
    np.testing.assert_allclose(ds.target_logprob.values[0], g["target_logprob"][0, :, :, :5], atol=1e-5)

    # an interrupted trace: pair 1 not in yet; resume recomputes it only, on Ray stage actors
    kept = g["target_logprob"][0]
    w = zarr.open_group(str(out / "trace.zarr"), mode="r+")
    w["done"][1] = False
    w["target_logprob"][1] = np.nan
    w.attrs["complete"] = False
    refused = run_driver("pipelines.trace", *args, "cluster=inprocess", cwd=tmp_path)
    assert refused.returncode == 2 and "resume=true" in refused.stderr.splitlines()[-1]
    resumed = run_driver("pipelines.trace", *args, "resume=true", cwd=tmp_path, env=joined_ray)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    g = zarr.open_group(str(out / "trace.zarr"), mode="r")
    assert g.attrs["complete"] and g.attrs["summary"]["pairs_run"] == 1
    np.testing.assert_array_equal(g["target_logprob"][0], kept)
    check(1)
