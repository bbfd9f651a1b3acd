"""The real default model, SmolLM2-135M-Instruct: the README's main job as a newcomer runs it
(no arguments, 2 Ray stage actors), and the lens against Hugging Face's own logits."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from actors.store import LensStore
from pipelines.heatmap import token_label, top1_labels
from reference import run_lens


def test_main_job_writes_store_heatmaps_and_prints_generated_text(main_job):
    result, run_dir = main_job
    store = LensStore.open(run_dir / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert store.attrs["model"]["name"] == "smollm2-135m-instruct"
    summary = store.attrs["summary"]
    assert len(summary["stages"]) == 2  # two stage actors, in two processes
    assert len({info["pid"] for info in summary["stage_info"]}) == 2
    assert store.layers == list(range(30))
    for i in range(3):
        assert (run_dir / f"heatmap_prompt{i}.png").stat().st_size > 10_000
        text = str(store.group["generated_text"][i])
        assert text and f"generated: {text!r}" in result.stdout
    assert "store:" in result.stdout and "heatmap:" in result.stdout
    assert "17 times 3" in str(store.group["prompt_text"][2])


def test_reader_top1_table_is_what_the_heatmap_shows(main_job, smollm2):
    _, run_dir = main_job
    store = LensStore.open(run_dir / "lens.zarr")
    tokenizer = smollm2.tokenizer()
    ids, probs = store.top1_table(1)
    n = int(store["lengths"][1]) - 1
    np.testing.assert_array_equal(ids, store["topk_ids"][1, :, 0, :n, 0])
    shown_ids, shown_probs, labels, _, first = top1_labels(store, 1, tokenizer, max_positions=32)
    np.testing.assert_array_equal(shown_ids, ids[:, first:])
    for li in range(shown_ids.shape[0]):
        assert labels[li] == [token_label(tokenizer, t) for t in ids[li, first:]]
    assert any(label.strip() for row in labels for label in row)
    assert (shown_probs > 0).all() and (shown_probs <= 1).all()
    ds = xr.open_zarr(run_dir / "lens.zarr")
    assert ds["topk_ids"].dims == ("prompt", "layer", "component", "position", "k")
    assert int(ds["topk_ids"].isel(prompt=1, layer=29, component=0, position=n - 1, k=0)) == ids[29, n - 1]


def test_smollm2_lens_equals_hf_logits_and_generate(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipelines.prompts import encode_prompt

    tokenizer = smollm2.tokenizer()
    prompt = encode_prompt(tokenizer, "Name a colour.")
    _, store = run_lens(
        smollm2.path, tmp_path / "s.zarr", prompts=[prompt], num_stages=3, max_new_tokens=5, activations=None
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    tokens = store.tokens(0)
    assert tokens.tolist() == expected[0].tolist()
    with torch.no_grad():
        out = model(torch.tensor([tokens.tolist()]), output_hidden_states=True)
    n = len(tokens) - 1
    logprobs = torch.log_softmax(out.logits[0, :n].float(), -1)
    top = logprobs.topk(10)
    torch.testing.assert_close(torch.from_numpy(store["topk_logprobs"][0, 29, 0, :n]), top.values, atol=2e-4, rtol=0)
    assert (store["topk_ids"][0, 29, 0, :n, 0] == top.indices[:, 0].numpy()).all()
    with torch.no_grad():  # a middle layer, through the model's own norm and head
        mid = torch.log_softmax(model.lm_head(model.model.norm(out.hidden_states[15][0, :n])).float(), -1)
    torch.testing.assert_close(
        torch.from_numpy(store["topk_logprobs"][0, 14, 0, :n]), mid.topk(10).values, atol=2e-4, rtol=0
    )
