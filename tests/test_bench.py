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
