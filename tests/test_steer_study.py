"""Steering studies at dataset scale: several datasets (A/B, yes/no, explicit choices) packed
into shared micro-batches equal one dataset at a time, and the transfer matrix equals a hooked
Hugging Face model's propensities, cell by cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from driver import run_driver

from actors.store import LensStore

MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL = [
    "data.max_train=4",
    "data.max_test=4",
    "steering.select_items=3",
    "steering.layers=[0,1]",
    "bootstrap=50",
    "steering.coefficients=[-2.0,0.0,1.0,3.0]",
    "steering.select_coefficients=[-1.0,0.0,2.0]",
    "cluster=inprocess",
    "cluster.micro_batch_size=5",
    "progress=false",
    "steering.cost_prompts=0",
]  # fmt: skip  (the cost on neutral prompts: tests/test_steering_cost.py)


@pytest.fixture
def three_formats(tmp_path):
    """One dataset of each format: a shared A/B file and our own yes/no and choices fixtures."""
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(MWE / "corrigible-neutral-HHH.jsonl", root)
    shutil.copy(FIXTURES / "yes_no.jsonl", root)
    shutil.copy(FIXTURES / "choices.jsonl", root)
    return root


def _single(model, root: Path, name: str, out: Path) -> list[dict]:
    """`pipelines.steer dataset=<name>` with the same settings, composed by Hydra and run
    in-process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from pipelines.steer import run

    overrides = [f"model.name={model}", f"dataset={name}", f"data.root={root}", *SMALL]
    with initialize_config_dir(str(Path(__file__).resolve().parent.parent / "conf"), version_base=None):
        cfg = compose("steer", overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    out.mkdir(parents=True)
    return run(cfg, out)


def _hf_propensity(model, prompts, items, layer: int, vector: np.ndarray, coefficients) -> np.ndarray:
    """Propensity [items, coefficients] from the plain HF model, `c * vector` added to the
    residual stream entering `layer` (a pre-hook written here) at every position, one unpadded
    prompt at a time: logit(matching label) - logit(first non-matching label) at the answer."""
    v = torch.from_numpy(vector)
    out = np.empty((len(items), len(coefficients)))
    for j, c in enumerate(coefficients):
        hook = model.model.layers[layer].register_forward_pre_hook(lambda m, args, c=c: (args[0] + c * v, *args[1:]))
        try:
            with torch.no_grad():
                for i, (p, item) in enumerate(zip(prompts, items)):
                    logits = model(torch.tensor([p.prefix])).logits[0, -1].double()
                    ids = p.label_ids
                    out[i, j] = float(logits[ids[item.matching]] - logits[ids[item.not_matching[0]]])
        finally:
            hook.remove()
    return out


def test_packed_study_with_transfer_equals_datasets_one_at_a_time_and_a_hooked_hf_model(
    tiny_with_tokenizer, three_formats, tmp_path
):
    from transformers import AutoModelForCausalLM

    from actors.checkpoint import Checkpoint
    from pipelines.datasets import load_items
    from pipelines.prompts import choice_prompt
    from pipelines.vectors import SteeringVector

    result = run_driver(
        "pipelines.steer", f"model.name={tiny_with_tokenizer}", "dataset=all", "steering.transfer=true",
        f"data.root={three_formats}", f"storage.root={tmp_path}", "storage.run=packed", *SMALL, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "steer" / "packed"
    names = ["choices", "corrigible-neutral-HHH", "yes_no"]
    # three packed runs whatever the number of datasets, each run once through the two stages
    assert sorted(p.name for p in out.glob("*.zarr")) == ["label_activations.zarr", "select.zarr", "test_sweep.zarr"]
    for store in out.glob("*.zarr"):
        assert LensStore.open(store).verify() == [], store.name
    sweep = LensStore.open(out / "test_sweep.zarr")
    kinds = sweep.attrs["edit_kinds"]
    assert len({k[0] for k in kinds}) == 3  # three vectors in one run
    # 1. each dataset equals its own single-dataset run
    for name in names:
        packed = json.loads((out / name / "summary.json").read_text())
        (alone,) = _single(tiny_with_tokenizer, three_formats, name, tmp_path / "alone" / name)
        assert packed["best_layer"] == alone["best_layer"], name
        for key in ("mean_of_slopes", "slope_of_mean", "unsteered_matching_rate"):
            assert packed[key] == pytest.approx(alone[key], abs=1e-4), (name, key)
        for layer, sel in packed["selection"].items():
            assert sel["mean_of_slopes"] == pytest.approx(alone["selection"][layer]["mean_of_slopes"], abs=1e-4)
        a = np.genfromtxt(out / name / "sweep.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
        b = np.genfromtxt(
            tmp_path / "alone" / name / "sweep.csv", delimiter=",", names=True, dtype=None, encoding="utf-8"
        )
        np.testing.assert_allclose(a["propensity"], b["propensity"], atol=1e-4)
        assert packed["format"] == {"choices": "choices", "yes_no": "yes_no"}.get(name, "ab")
    # 2. the transfer matrix: every cell against the hooked HF model, the diagonal = each dataset's result
    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["datasets"] == names and len(transfer["cells"]) == 9
    assert (out / "transfer.png").stat().st_size > 0 and len((out / "transfer.csv").read_text().splitlines()) == 10
    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    tokenizer = Checkpoint("t", tiny_with_tokenizer, "test").tokenizer()
    coefficients = transfer["coefficients"]
    tested = {}
    for name in names:  # the test items as the sweep wrote them (file:line), rebuilt here
        lines = (three_formats / f"{name}.jsonl").read_text().splitlines()
        wheres = np.genfromtxt(out / name / "sweep.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
        numbers = list(dict.fromkeys(int(w.rsplit(":", 1)[1]) for w in wheres["where"]))
        by_line = {int(item.where.rsplit(":", 1)[1]): item for item in load_items(three_formats / f"{name}.jsonl")}
        assert all(n <= len(lines) for n in numbers)
        tested[name] = [by_line[n] for n in numbers]
    for cell in transfer["cells"]:
        source = json.loads((out / cell["source"] / "summary.json").read_text())
        assert cell["source_layer"] == source["best_layer"]
        vec = SteeringVector.load(out / cell["source"] / f"vector_layer{source['best_layer']}.safetensors")
        items = tested[cell["target"]]
        prompts = [choice_prompt(tokenizer, item) for item in items]
        prop = _hf_propensity(model, prompts, items, vec.layer, vec.vector, coefficients)
        slopes = [np.polyfit(coefficients, row, 1)[0] for row in prop]
        assert cell["mean_of_slopes"] == pytest.approx(np.mean(slopes), abs=1e-4), (cell["source"], cell["target"])
        assert cell["slope_of_mean"] == pytest.approx(np.polyfit(coefficients, prop.mean(0), 1)[0], abs=1e-4)
        assert cell["mean_of_slopes_lo"] <= cell["mean_of_slopes"] <= cell["mean_of_slopes_hi"]
        if cell["source"] == cell["target"]:
            target = json.loads((out / cell["target"] / "summary.json").read_text())
            assert cell["mean_of_slopes"] == pytest.approx(target["mean_of_slopes"], abs=1e-9)
    off = [c["mean_of_slopes"] for c in transfer["cells"] if c["source"] != c["target"]]
    assert np.ptp(off) > 1e-3  # the vectors differ in effect


def test_transfer_with_one_dataset_is_refused_in_one_line(tiny_with_tokenizer, tmp_path):
    result = run_driver(
        "pipelines.steer", f"model.name={tiny_with_tokenizer}", "dataset=yes_no", "steering.transfer=true",
        f"data.root={FIXTURES}", f"storage.root={tmp_path}", *SMALL, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("distlens: error:")]
    assert "steering.transfer=true needs at least 2 datasets" in line
    assert not (tmp_path / "steer").exists() or not list((tmp_path / "steer").rglob("*.zarr"))
