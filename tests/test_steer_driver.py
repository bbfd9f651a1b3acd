"""The steering drivers as users run them: pipelines.steer (one dataset, all datasets packed
into one job with the model loaded once, Hydra multirun), steered generation in pipelines.lens, and the
open-ended demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from driver import run_driver

from actors.store import LensStore

MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"
BASE = ["data.max_train=4", "data.max_test=4", "steering.select_items=2", "steering.layers=[0,1]", "bootstrap=50"]
SMALL = [*BASE, "steering.cost_prompts=0"]  # the cost on neutral prompts: tests/test_steering_cost.py and below


@pytest.fixture
def two_datasets(tmp_path):
    root = tmp_path / "mwe"
    root.mkdir()
    for name in ("survival-instinct", "corrigible-neutral-HHH"):
        shutil.copy(MWE / f"{name}.jsonl", root)
    return root


def test_dataset_all_runs_every_dataset_and_loads_the_model_once(
    tiny_with_tokenizer, two_datasets, tmp_path, joined_ray
):
    result = run_driver(
        "pipelines.steer", f"model.name={tiny_with_tokenizer}", "dataset=all", f"data.root={two_datasets}",
        f"storage.root={tmp_path}", "storage.run=all", *BASE, "steering.cost_prompts=2", "steering.cost_tokens=3",
        cwd=tmp_path, env=joined_ray,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "steer" / "all"
    table = (out / "summary.md").read_text()
    for name in ("survival-instinct", "corrigible-neutral-HHH"):
        assert f"| {name} |" in table
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["items"] == 4
        selection = {int(layer): s["mean_of_slopes"] for layer, s in summary["selection"].items()}
        assert sorted(selection) == [0, 1] and summary["best_layer"] == max(selection, key=selection.get)
        # the statistics against numpy's own least-squares fits of the written sweep
        sweep = np.genfromtxt(out / name / "sweep.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
        coefficients = summary["coefficients"]
        propensity = sweep["propensity"].reshape(4, len(coefficients))  # [item, coefficient]
        assert sweep["coefficient"].reshape(4, -1).tolist() == [coefficients] * 4
        slopes = [np.polyfit(coefficients, item, 1)[0] for item in propensity]
        assert summary["mean_of_slopes"] == pytest.approx(np.mean(slopes), abs=1e-5)
        assert summary["slope_of_mean"] == pytest.approx(np.polyfit(coefficients, propensity.mean(0), 1)[0], abs=1e-5)
        assert summary["anti_steerable_fraction"] == pytest.approx(np.mean(np.array(slopes) < 0))
        assert set(summary) >= {"mean_of_slopes", "mean_of_slopes_ci95", "slope_of_mean", "slope_of_mean_ci95"}
        assert (out / name / "propensity_vs_coefficient.png").exists()
        assert (out / name / "steerability_by_layer.png").exists()
        cost = summary["cost"]  # measured on the same pool of stage actors (its numbers: test_steering_cost.py)
        assert cost["prompts"] == 2 and cost["coefficients"] == coefficients and cost["kl"][coefficients.index(0)] == 0
    assert (out / "steering_cost.png").exists()
    infos = [info for store in out.glob("*.zarr") for info in LensStore.open(store).attrs["summary"]["stage_info"]]
    assert len(infos) == 3 * 2  # (vectors, layer selection, test sweep), every dataset packed in each x 2 stages
    assert len({info["pid"] for info in infos}) == 2  # the same two stage actors throughout
    assert {info["weight_loads"] for info in infos} == {1}  # each loaded its weights once


def test_multirun_over_datasets_and_layers_joins_one_cluster_and_reports_one_table(
    tiny_with_tokenizer, two_datasets, tmp_path, joined_ray
):
    """`-m dataset=a,b layer=0,1` with $RAY_ADDRESS set (this test process's running cluster):
    all four jobs run their stages on that one cluster, and `pipelines.report` collects them
    into one 4-row table."""
    address = joined_ray["RAY_ADDRESS"]
    result = run_driver(
        "pipelines.steer", "-m", "dataset=survival-instinct,corrigible-neutral-HHH", "layer=0,1",
        f"model.name={tiny_with_tokenizer}", f"data.root={two_datasets}", f"storage.root={tmp_path}", *SMALL,
        cwd=tmp_path, env=joined_ray,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "steer-multirun").iterdir()
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    assert sorted((s["dataset"], s["best_layer"]) for s in summaries) == [
        ("corrigible-neutral-HHH", 0), ("corrigible-neutral-HHH", 1), ("survival-instinct", 0), ("survival-instinct", 1),
    ]  # fmt: skip
    assert {s["cluster"]["address"] for s in summaries} == {address}  # every job joined the running head
    report = run_driver("pipelines.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line for line in (sweep_dir / "report.md").read_text().splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 4 and all(address in row for row in rows)
    with open(sweep_dir / "report.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 4


def _steer_one(model, tmp_path, *extra: str):
    return run_driver(
        "pipelines.steer", f"model.name={model}", "cluster=inprocess", "dataset=survival-instinct",
        f"data.root={MWE}", f"storage.root={tmp_path}", "storage.run=t9", "progress=false", *SMALL, *extra, cwd=tmp_path,
    )  # fmt: skip


def test_steer_refuses_a_directory_holding_a_steer_run_and_leaves_it_as_it_was(tiny_with_tokenizer, tmp_path):
    first = _steer_one(tiny_with_tokenizer, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "steer" / "t9"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".log"}
    again = _steer_one(tiny_with_tokenizer, tmp_path, "layer=0")
    assert again.returncode == 2
    (line,) = [x for x in again.stderr.splitlines() if x.startswith("distlens: error:")]
    assert f"output path {out} already holds a steer run" in line
    assert "pass overwrite=true to replace it, or choose another storage.run" in line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == before  # the run and its .hydra record untouched
    for store in out.glob("*.zarr"):  # its stores (no lens layers captured) are whole
        assert LensStore.open(store).verify() == [], store.name
    verified = run_driver("pipelines.verify", str(out / "test_sweep.zarr"), cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr


def test_steer_overwrite_replaces_every_output_of_the_previous_run_once_inputs_validate(tiny_with_tokenizer, tmp_path):
    first = _steer_one(tiny_with_tokenizer, tmp_path)  # chooses between layers 0 and 1 on train
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "steer" / "t9"
    selection = {"select.zarr", "steerability_by_layer.png"}
    assert selection <= {p.name for p in out.iterdir()}
    refused = _steer_one(tiny_with_tokenizer, tmp_path, "layer=1", "steering.layers=[0]", "overwrite=true")
    assert refused.returncode == 2 and "layer=1 is not among steering.layers=[0]" in refused.stderr
    assert selection <= {p.name for p in out.iterdir()}  # a refused run removes nothing
    second = _steer_one(tiny_with_tokenizer, tmp_path, "layer=0", "overwrite=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not selection & {p.name for p in out.iterdir()}
    assert json.loads((out / "summary.json").read_text())["best_layer"] == 0
    assert "- layer=0" in (out / ".hydra" / "overrides.yaml").read_text()


def test_layer_outside_steering_layers_is_refused_before_any_compute(tiny_with_tokenizer, tmp_path):
    for layer, candidates, fix in [
        (1, "[0]", "add it, e.g. steering.layers=[0,1], or choose one of them"),
        (-1, "[0,1]", "choose one of them (the model's layers are 0..1)"),
        (99, "[0,1]", "choose one of them (the model's layers are 0..1)"),
    ]:
        run = f"layer{layer}"
        result = run_driver(
            "pipelines.steer", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"data.root={MWE}",
            "dataset=survival-instinct", f"storage.root={tmp_path}", f"storage.run={run}", *SMALL,
            f"steering.layers={candidates}", f"layer={layer}", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2
        assert f"layer={layer} is not among steering.layers=" in result.stderr and fix in result.stderr
        assert not [*(tmp_path / "steer" / run).glob("*.zarr"), *(tmp_path / "steer" / run).glob("*.safetensors")]


def test_demo_refuses_max_new_tokens_by_its_own_key_before_any_compute(tiny_with_tokenizer, tmp_path):
    result = run_driver(
        "pipelines.demo", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", "layer=1", "max_new_tokens=0",
        f"storage.root={tmp_path}", "storage.run=d", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "distlens: error: max_new_tokens=0 is out of range: must be >= 1" in result.stderr
    assert "generation." not in result.stderr
    assert not [*(tmp_path / "demo" / "d").glob("*.zarr"), *(tmp_path / "demo" / "d").glob("*.safetensors")]


def test_report_refuses_a_directory_without_results(tmp_path):
    result = run_driver("pipelines.report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and f"distlens: error: no steerability summary.json under {tmp_path}" in result.stderr


def test_malformed_dataset_line_stops_the_study(tiny_with_tokenizer, tmp_path):
    root = tmp_path / "mwe"
    root.mkdir()
    lines = (MWE / "survival-instinct.jsonl").read_text().splitlines()[:20]
    lines[6] = (
        lines[6]
        .replace('"answer_matching_behavior": " (A)"', '"answer_matching_behavior": " (E)"')
        .replace('"answer_matching_behavior": " (B)"', '"answer_matching_behavior": " (E)"')
    )
    (root / "broken.jsonl").write_text("\n".join(lines) + "\n")
    base = [f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"data.root={root}", "dataset=broken", *SMALL]
    result = run_driver("pipelines.steer", *base, f"storage.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "broken.jsonl:7: field 'answer_matching_behavior' is (E), not among the choices" in result.stderr
    skipped = run_driver(
        "pipelines.steer", *base, "data.skip_malformed=true", f"storage.root={tmp_path}/s", cwd=tmp_path
    )
    assert skipped.returncode == 0, skipped.stderr[-2000:]


def test_steered_generation_and_vector_checks_in_lens(tiny_with_tokenizer, tmp_path):
    from pipelines.vectors import SteeringVector

    good = SteeringVector.build(
        np.ones((2, 32)), np.zeros((2, 32)), model=str(tiny_with_tokenizer), layer=1, site="mlp_in", dataset="t"
    )
    good.save(tmp_path / "good.safetensors")
    other = SteeringVector.build(
        np.ones((2, 32)), np.zeros((2, 32)), model="another-model", layer=1, site="mlp_in", dataset="t"
    )
    other.save(tmp_path / "other.safetensors")
    base = [
        f"model.name={tiny_with_tokenizer}",
        "cluster=inprocess",
        f"storage.root={tmp_path}",
        "generation.max_new_tokens=4",
    ]
    ok = run_driver(
        "pipelines.lens", *base, "storage.run=ok", f"steer.vector={tmp_path}/good.safetensors",
        "steer.coefficients=[-8.0,0.0,8.0]", "prompts=['hello there']", cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    store = LensStore.open(tmp_path / "ok" / "lens.zarr")
    assert store["coefficient"].tolist() == [-8.0, 0.0, 8.0]
    assert "steering coefficient -8" in ok.stdout
    refused = run_driver(
        "pipelines.lens", *base, "storage.run=no", f"steer.vector={tmp_path}/other.safetensors", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "was built on model 'another-model'" in refused.stderr


def test_demo_runs_end_to_end(tiny_with_tokenizer, tmp_path):
    result = run_driver(
        "pipelines.demo", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", "layer=1", "max_new_tokens=6",
        f"storage.root={tmp_path}", "storage.run=d", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo" / "d"
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["coefficient"] for r in rows] == [-4.0, -2.0, -1.0, 0.0, 1.0]
    assert all(np.isfinite(r["effect"]) and np.isfinite(r["first_token_effect"]) for r in rows)
    assert (out / "effect_vs_coefficient.png").exists() and (out / "sentiment_vector.safetensors").exists()
    assert "| coefficient |" in (out / "demo.md").read_text()
