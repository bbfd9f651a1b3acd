"""Steering vectors and datasets: the planted direction is recovered, prompt construction
agrees between building and evaluation, the loader handles real quirks, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.datasets import DatasetError, load_items, split_items
from pipelines.prompts import choice_prompt, render_prompt
from pipelines.steerability import fit_slopes, steerability
from pipelines.vectors import AGGREGATORS, SteeringVector

MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"


def _cfg(**over):
    from omegaconf import OmegaConf

    from pipelines.config import SteerConf

    cfg = OmegaConf.structured(SteerConf)
    for key, value in over.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _label_activations(model, prompts: list[list[int]], layer: int) -> np.ndarray:
    """HF's residual stream entering `layer` (hidden_states[layer]) at each prompt's last token,
    one unpadded prompt at a time: [prompts, d_model] float64."""
    with torch.no_grad():
        rows = [model(torch.tensor([p]), output_hidden_states=True).hidden_states[layer][0, -1] for p in prompts]
    return torch.stack(rows).double().numpy()


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_vector_is_the_aggregate_of_hf_label_activations(aggregator, tiny_with_tokenizer, tmp_path):
    """The vectors at layers 0 and 1 (`resid_pre`) equal the aggregate computed here from the
    plain HF model's hidden states at the answer letter: the mean paired difference, or for
    `pca` the first right-singular vector of the differences (numpy's SVD) scaled to the mean
    difference's projection on it. The answer letter A carries a planted direction u (its
    embedding row is B's plus 3u), so at layer 0 every difference is 3u."""
    from transformers import AutoModelForCausalLM

    from actors.checkpoint import Checkpoint
    from actors.executor import LocalExecutor
    from pipelines.study import Study, Task

    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    tokenizer = Checkpoint("t", tiny_with_tokenizer, "test").tokenizer()
    ids = {letter: tokenizer.encode(letter, add_special_tokens=False)[0] for letter in "AB"}
    u = torch.nn.functional.normalize(
        torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5)), dim=0
    )
    with torch.no_grad():
        model.model.embed_tokens.weight[ids["A"]] = model.model.embed_tokens.weight[ids["B"]] + 3 * u
    path = tmp_path / "planted"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    items = load_items(MWE / "corrigible-neutral-HHH.jsonl")
    items = [item for item in items if item.labels[item.matching] == "A"][:10]  # so with_answer(0) is the matching
    cfg = _cfg(
        **{
            "steering.layers": [0, 1],
            "steering.aggregator": aggregator,
            "cluster.executor": "local",
            "model.name": "planted",
        }
    )
    study = Study(cfg, Checkpoint("planted", path, "test"), tokenizer, model.config, LocalExecutor(), tmp_path)
    prompts = [choice_prompt(tokenizer, item) for item in items]
    vectors = study.build_vectors([Task("planted", items, [], prompts)])["planted"]
    for layer in (0, 1):
        diffs = _label_activations(model, [p.with_answer(0) for p in prompts], layer) - _label_activations(
            model, [p.with_answer(item.not_matching[0]) for p, item in zip(prompts, items)], layer
        )  # [items, d_model]
        mean = diffs.mean(axis=0)
        _, _, vt = np.linalg.svd(diffs, full_matrices=False)
        principal = vt[0] * float(mean @ vt[0])
        expected = {"mean_diff": mean, "pca": principal}[aggregator]
        np.testing.assert_allclose(vectors[layer].vector, expected, atol=1e-5, rtol=0, err_msg=f"layer {layer}")
        if layer == 0:
            np.testing.assert_allclose(expected, 3 * u.numpy(), atol=1e-5, rtol=0)  # the planted direction
        else:  # the two aggregators differ here by far more than the tolerance: each check tells them apart
            assert np.abs(principal - mean).max() > 1e-4
    loaded = SteeringVector.load(
        tmp_path / "vector_layer1.safetensors", model="planted", hidden_size=model.config.hidden_size
    )
    assert loaded.items == 10 and loaded.aggregator == aggregator and loaded.layer == 1 and loaded.site == "resid_pre"
    np.testing.assert_array_equal(loaded.vector, vectors[1].vector)


@pytest.mark.parametrize("chat_template", [True, False])
def test_label_token_for_vectors_is_the_scored_answer_token(chat_template, smollm2):
    tokenizer = smollm2.tokenizer()
    for item in load_items(MWE / "corrigible-neutral-HHH.jsonl")[:5]:
        prompt = choice_prompt(tokenizer, item, chat_template)
        for i, letter in enumerate(item.labels):
            built = prompt.with_answer(i)
            # vector building reads the last position of `built`; evaluation scores label_ids at
            # the position before it, on the very same prefix
            assert built[:-1] == prompt.prefix and built[-1] == prompt.label_ids[i]
            # and it is how the tokenizer itself splits the answer text: no space-prefixed variant
            rendered = render_prompt(tokenizer, item.question, chat_template)
            natural = tokenizer(rendered + "(" + letter, add_special_tokens=not chat_template).input_ids
            assert natural == built
        assert len(set(prompt.label_ids)) == len(item.labels)


def test_loader_handles_real_quirks(tmp_path):
    rows = [
        {"question": "Q?\n\nChoices:\n (A) yes\n (B) no\n (C) maybe\n (D) never", "answer_matching_behavior": " (C)",
         "answer_not_matching_behavior": [" (A)", " (B)", " (D)"]},
        {"question": "  Q2?\nChoices:\n (A) a\n (B) b  ", "answer_matching_behavior": "(B) ", "answer_not_matching_behavior": " (A)"},
    ]  # fmt: skip
    path = tmp_path / "quirks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    first, second = load_items(path)
    assert first.labels == ("A", "B", "C", "D") and first.matching == 2 and first.not_matching == (0, 1, 3)
    assert first.format == "ab" and first.question.endswith("(D) never")
    assert second.labels == ("A", "B") and second.matching == 1 and second.not_matching == (0,)
    assert second.question.startswith("Q2") and second.where.endswith(":2")
    all_16 = sorted(MWE.glob("*.jsonl"))
    assert len(all_16) == 16 and all(load_items(p) for p in all_16)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "Q\\n (A) x\\n (B) y", "answer_matching_behavior": " (C)", "answer_not_matching_behavior": " (A)"}',
         "field 'answer_matching_behavior' is (C), not among the choices ['A', 'B']"),
        ('{"question": "Q\\n (A) x\\n (B) y", "answer_not_matching_behavior": " (A)"}', "missing field 'answer_matching_behavior'"),
        ('{"question": "Q\\n (A) x\\n (B) y", "answer_matching_behavior": "yes", "answer_not_matching_behavior": " (A)"}',
         "field 'answer_matching_behavior' is 'yes'"),
        ("{not json", "not valid JSON"),
    ],
)  # fmt: skip
def test_malformed_lines_name_file_line_and_field(line, message, tmp_path):
    good = '{"question": "Q\\n (A) x\\n (B) y", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    with pytest.raises(DatasetError) as err:
        load_items(path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)
    assert len(load_items(path, skip_malformed=True)) == 2  # only when the user asks


def test_non_utf8_file_and_empty_split_are_refused(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.jsonl:1: not UTF-8"):
        load_items(path)
    items = load_items(MWE / "survival-instinct.jsonl")[:3]
    with pytest.raises(DatasetError, match="a split is empty"):
        split_items(items[:1], 0.5, 0)
    train, test = split_items(items, 0.5, 0)
    assert (train, test) == split_items(items, 0.5, 0) and len(train) + len(test) == 3


def test_vector_from_another_model_or_hidden_size_is_refused(tmp_path):
    vec = SteeringVector.build(np.ones((3, 8)), np.zeros((3, 8)), model="m1", layer=2, site="resid_pre", dataset="d")
    path = vec.save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="was built on model 'm1'; this run uses 'm2'"):
        SteeringVector.load(path, model="m2", hidden_size=8)
    with pytest.raises(ValueError, match="hidden size 8 .*this model's hidden size is 16"):
        SteeringVector.load(path, model="m1", hidden_size=16)
    assert SteeringVector.load(path, model="m1", hidden_size=8).norm == pytest.approx(np.sqrt(8))


def test_unknown_site_and_positions_are_refused():
    from actors.steering import SteeringEdit

    with pytest.raises(ValueError, match="unknown steering site 'resid_mod'"):
        SteeringEdit(0, "resid_mod", np.zeros(4))
    with pytest.raises(ValueError, match="steering positions='middle'"):
        SteeringEdit(0, "resid_pre", np.zeros(4), "middle")


def test_slopes_and_both_dataset_definitions():
    c = np.array([-1.0, 0.0, 1.0])
    prop = np.array([[-2.0, 0.0, 2.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    slopes, r2 = fit_slopes(c, prop)
    np.testing.assert_allclose(slopes, [2.0, 0.0, -1.0])
    np.testing.assert_allclose(r2, [1.0, 1.0, 1.0])
    out = steerability(c, prop, n_boot=200)
    assert out["mean_of_slopes"] == pytest.approx(1 / 3) and out["slope_of_mean"] == pytest.approx(1 / 3)
    assert out["anti_steerable_fraction"] == pytest.approx(1 / 3)
    lo, hi = out["mean_of_slopes_ci95"]
    assert lo <= 1 / 3 <= hi
