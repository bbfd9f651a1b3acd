"""A smoke run of the benchmark harness (tiny model, one repeat): it keeps working. Speed is
never asserted here; the like-for-like checks are."""

from __future__ import annotations

import json

from driver import run_driver


def test_bench_smoke(tiny_with_tokenizer, tmp_path):
    result = run_driver(
        "pipelines.bench", f"model.name={tiny_with_tokenizer}", "sizes=[3]", "long_size=null", "baseline_max=3",
        "stages=[2]", "ray_stages=[]", "repeats=1", "sweep_coefficients=[3]", "sweep_items=2", "peers=[]",
        f"storage.root={tmp_path}", "storage.run=b", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "bench" / "b"
    listed = json.loads((out / "results.json").read_text())["rows"]
    rows = {r["system"]: r for r in listed}
    swept = {r["steer_positions"] for r in listed if r["system"] == "distlens_sweep_one_pass"}
    assert swept == {"last", "all"}  # label-position (shared prefix) and every position
    assert {"hf_generate", "distlens_local_2stage", "paper_baseline", "distlens_sweep_one_pass"} <= set(rows)
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    # the staged lens and the naive baseline see the same trajectory
    assert rows["distlens_local_2stage"]["top1_agreement"] == 1.0
    assert rows["distlens_local_2stage"]["max_logprob_diff"] < 1e-4
    assert rows["distlens_sweep_one_pass"]["cost_vs_unsteered_pass"] > 0
    for name in ("results.csv", "table.md", "throughput_vs_T.png", "memory_vs_T.png", "sweep_cost.png"):
        assert (out / name).exists()


def test_gpu_bench_path_runs_on_cpu(tmp_path):
    """The GPU script, on the CPU with a tiny random model: every system runs, the paper's
    baseline and distlens see the same trajectory, and the ratio is recorded."""
    result = run_driver(
        "pipelines.bench_gpu", "--out", str(tmp_path), "--device", "cpu", "--shapes", "tiny",
        "--tokens", "12", "--baseline-tokens", "6", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = {r["system"]: r for r in results["rows"]}
    assert set(rows) == {
        "hf_generate", "distlens_inprocess_capture", "distlens_inprocess_nocapture",
        "distlens_inprocess_capture_T6", "paper_baseline", "paper_baseline_nocapture",
    }  # fmt: skip
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    base = rows["paper_baseline"]
    assert base["same_tokens"] and base["top1_agreement"] == 1.0 and base["max_logprob_diff"] < 1e-4
    assert results["ratios"]["tiny"]["throughput_vs_baseline"] > 0
    assert results["device"] == "cpu" and results["dtype"] == "float32"
