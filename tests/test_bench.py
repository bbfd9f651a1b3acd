"""A smoke run of the benchmark harness (tiny model, one repeat): it keeps working. Speed is
never asserted here; the like-for-like checks are."""

from __future__ import annotations

import json
import re

import pytest
from driver import REPO, run_driver


def test_study_workload_packed_and_one_at_a_time_agree(tiny_with_tokenizer, tmp_path):
    """The study workload's runner, in this process: a packed study of two datasets is 3 runs,
    one at a time 6, over the same rows with the same slopes, and the HF forward reference
    timed over exactly the packed runs' rows."""
    from pipelines.bench.study import steer_study

    job = dict(
        model=str(tiny_with_tokenizer), datasets=["survival-instinct", "corrigible-neutral-HHH"], scratch=str(tmp_path),
        overrides=["data.max_train=3", "data.max_test=2", "steering.select_items=2", "steering.layers=[0,1]",
                   "cluster=inprocess", "cluster.micro_batch_size=4"],
    )  # fmt: skip
    packed, alone = steer_study({**job, "mode": "packed"}), steer_study({**job, "mode": "one_at_a_time"})
    assert (packed["runs"], alone["runs"]) == (3, 6) and packed["rows"] == alone["rows"] > 0
    for name, slope in packed["mean_of_slopes"].items():
        assert slope == pytest.approx(alone["mean_of_slopes"][name], abs=1e-4)
    assert packed["hf_forward_s"] > 0 and packed["padded_tokens"] >= packed["rows"]


def compose_bench(tmp_path, *overrides: str):
    """The bench driver's config as `python -m pipelines.bench <overrides>` composes it."""
    from hydra import compose, initialize_config_dir

    from pipelines.config import register

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return compose("bench", [*overrides, f"storage.root={tmp_path}", "storage.run=b"])


def test_bench_driver_measures_in_fresh_processes_and_reports_again(tiny_with_tokenizer, tmp_path):
    """`python -m pipelines.bench` end to end, each measurement a fresh process: the long
    trajectory, whose memory figures need a process of their own; then the report again from
    results.json alone."""
    result = run_driver(
        "pipelines.bench", f"model.name={tiny_with_tokenizer}", "workloads=[long]", "long_size=42",
        "long_prompts=[1,2]", f"storage.root={tmp_path}",
        "storage.run=b", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "bench" / "b"
    listed = json.loads((out / "results.json").read_text())["rows"]
    assert not (out / "results.partial.json").exists()  # rows as measured, gone once results.json is whole
    assert all("error" not in r for r in listed), [r for r in listed if "error" in r]
    assert {r["workload"] for r in listed} == {"trajectory_42pos"}  # only the workload asked for
    table = (out / "table.md").read_text()
    # the long trajectory (39 prompt positions + 3): the baseline measured there, not extrapolated
    long = {r["system"]: r for r in listed if r["workload"] == "trajectory_42pos"}
    assert {"hf_generate", "distlens_local_2stage", "distlens_local_2stage_batch2", "paper_baseline"} <= set(long)
    assert not long["paper_baseline"].get("extrapolated") and long["paper_baseline"]["T"] == 3
    assert long["distlens_local_2stage"]["top1_agreement"] == 1.0
    assert long["distlens_local_2stage"]["max_logprob_diff"] < 1e-4
    assert long["distlens_local_2stage_batch2"]["positions"] == 2 * 42
    assert all(long[s]["capture_memory"] > 0 for s in ("paper_baseline", "distlens_local_2stage"))
    assert "(trajectory_42pos, T=3, the largest T it was measured at; 2 prompts in one batch" in table
    assert (out / "results.csv").exists()
    (out / "table.md").unlink()
    again = run_driver(
        "pipelines.bench", f"model.name={tiny_with_tokenizer}", "report_only=true", f"storage.root={tmp_path}",
        "storage.run=b", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "table.md").read_text() == table


def test_bench_suite_runs_every_other_workload(tiny_with_tokenizer, tmp_path, monkeypatch):
    """The suite's other workloads with each measurement in this process (the driver test
    above runs them in fresh processes; no figure asserted here needs one): the rows, the
    like-for-like checks against the paper's baseline, the lens figures, the report."""
    from pipelines.bench import suite, worker

    # a job and its figures cross a JSON boundary, as between processes
    monkeypatch.setattr(
        suite, "measure", lambda job, python=None: json.loads(json.dumps(worker.run_job(json.loads(json.dumps(job)))))
    )
    cfg = compose_bench(
        tmp_path, f"model.name={tiny_with_tokenizer}", "workloads=[lens_floor,trajectory,scaling,sweep,tune,capture]",
        "sizes=[3]", "baseline_max=3", "stages=[2]", "ray_stages=[]", "repeats=1", "sweep_coefficients=[2]",
        "sweep_items=2", "peers=[]", "scaling_size=3", "scaling_layers=[1]", "scaling_prompts=[2]",
        "tune_steps=2", "tune_batch=2", "tune_tokens=8", "capture_size=3", "capture_rounds=1",
    )  # fmt: skip
    out = tmp_path / "bench" / "b"
    listed = suite.run(cfg, out)
    assert listed == json.loads((out / "results.json").read_text())["rows"]
    assert all("error" not in r for r in listed), [r for r in listed if "error" in r]
    assert not (out / "results.partial.json").exists()
    tuned = next(r for r in listed if r["system"] == "tune_distlens_2stage")  # the same training as the plain loop
    assert tuned["vs_plain_torch"] > 0 and tuned["max_kl_difference"] < 1e-4 and tuned["tokens"] == 32
    assert "tuned-lens training tokens/s against a single-process plain torch loop" in (out / "table.md").read_text()
    rows = {r["system"]: r for r in listed if r["workload"] in ("trajectory", "sweep")}
    swept = {r["steer_positions"] for r in listed if r["system"] == "distlens_sweep_one_pass"}
    assert swept == {"last", "all"}  # label-position (shared prefix) and every position
    assert {"hf_generate", "distlens_local_2stage", "paper_baseline", "distlens_sweep_one_pass"} <= set(rows)
    # the staged lens and the naive baseline see the same trajectory
    assert rows["distlens_local_2stage"]["top1_agreement"] == 1.0
    assert rows["distlens_local_2stage"]["max_logprob_diff"] < 1e-4
    assert rows["distlens_sweep_one_pass"]["cost_vs_unsteered_pass"] > 0
    by_workload = {(r["workload"], r["system"], r["T"]): r for r in listed}
    assert by_workload["lens_floor", "lens_floor", 0]["lens_ms_per_row"] > 0
    traj = by_workload["trajectory", "distlens_local_2stage", 3]
    # one prompt here, so the positions of its one store row; the last has no next token, so no lens
    positions = traj["positions"]
    assert 0 < traj["lens_share"] < 1 and 0 < by_workload["trajectory", "paper_baseline", 3]["lens_share"] < 1
    # 10 ids + 10 log-probs + entropy, target log-prob, rank and KL to the final layer = 96 bytes
    # per row before the codec
    assert traj["bytes_per_row"] * traj["compression"] == pytest.approx(96 * positions / (positions - 1))
    layers = traj["lens_layers"]
    assert traj["lens_components"] == 1 and layers > 1
    comps = by_workload["trajectory_components", "distlens_local_2stage", 3]
    assert (comps["lens_layers"], comps["lens_components"]) == (layers, 3)  # resid_post, attn_out, mlp_out
    assert comps["positions"] == positions and comps["bytes_written"] > traj["bytes_written"]
    one_layer = by_workload["scaling_layers", "distlens_local_2stage", 1]
    assert one_layer["lens_layers"] == 1 and one_layer["tokens_per_s"] > 0
    for system in ("distlens_local_2stage", "distlens_local_2stage_nocapture", "hf_generate"):
        assert by_workload["scaling_prompts", system, 2]["tokens_per_s"] > 0, system
    assert by_workload["scaling_prompts", "distlens_local_2stage", 2]["positions"] == 2 * positions
    capture = {r["system"]: r for r in listed if r["workload"] == "capture"}
    assert set(capture) == {"hf_generate", "distlens_local_2stage", "distlens_local_2stage_kl_off"}  # no nnsight
    on, off = capture["distlens_local_2stage"], capture["distlens_local_2stage_kl_off"]
    # the same layout either way (96 bytes per row before the codec, kl_to_final among them), the
    # same greedy trajectory; without kl_to_final its chunks stay empty and are not written
    positions = on["positions"]
    for r in (on, off):
        assert r["bytes_per_row"] * r["compression"] == pytest.approx(96 * positions / (positions - 1))
    assert off["bytes_per_row"] < on["bytes_per_row"]
    for r in (on, off):  # the ratio is this run's own: against HF generate's figure in the same round
        assert r["vs_hf_generate_rounds"] == [r["tokens_per_s"] / capture["hf_generate"]["tokens_per_s"]]
    assert (
        "all-layer capture keeps >= 0.5x plain generation (capture, T=3, kl_to_final off;"
        in (out / "table.md").read_text()
    )
    for name in ("results.csv", "table.md", "throughput_vs_T.png", "memory_vs_T.png", "sweep_cost.png", "scaling.png"):
        assert (out / name).exists()


def test_jacobian_workload_fits_alike_on_ray_stages_and_in_plain_torch(tiny_with_tokenizer, tmp_path, monkeypatch):
    """The jacobian workload on a tiny model, each system in this process: rows for distlens's
    fitter on 2 Ray stages and for plain torch on the unsliced model, over the same sequences;
    the bench's plain-torch fit itself equals the autograd reference of tests/test_jacobian_fit.py,
    and the two systems' fits agree."""
    import ray
    import torch
    from test_jacobian_fit import _reference as autograd_sums

    from actors.jacobian_lens import load_fit
    from pipelines.bench import suite, worker
    from tiny_models import load_reference

    ray.shutdown()  # the workload starts a cluster of its own, as in its fresh process (conftest's ray_cluster may be up)
    runs = {}

    def measure(job, python=None):  # a job and its figures cross a JSON boundary, as between processes
        runs[job["system"]] = json.loads(json.dumps(worker.run_job(json.loads(json.dumps(job)))))
        return runs[job["system"]]

    monkeypatch.setattr(suite, "measure", measure)
    cfg = compose_bench(
        tmp_path, f"model.name={tiny_with_tokenizer}", "workloads=[jacobian]", "jacobian_sequences=2",
        "jacobian_tokens=8", "jacobian_block=8", "jacobian_skip=3",
    )  # fmt: skip
    out = tmp_path / "bench" / "b"
    rows = {r["system"]: r for r in suite.run(cfg, out)}
    assert set(rows) == {"jacobian_plain_torch", "jacobian_distlens_ray_2stage"}
    assert all("error" not in r for r in rows.values()), rows
    plain, ours = runs["jacobian_plain"], runs["jacobian_distlens"]
    assert plain["sequences"] == ours["sequences"] and [len(s) for s in plain["sequences"]] == [8, 8]
    model = load_reference(tiny_with_tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    reference, fitted = autograd_sums(model, plain["sequences"], skip=3), load_fit(plain["fit_file"])
    assert fitted.positions == 2 * (8 - 3) and fitted.layers == (0, 1)
    for la, expected in reference.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(fitted.sums[la].double(), expected, atol=1e-5 * scale, rtol=0)
    row = rows["jacobian_distlens_ray_2stage"]
    assert row["max_rel_difference"] < 1e-5 and row["vs_plain_torch"] > 0
    assert row["largest_process_rss"] > 0 and row["peak_rss"] >= row["largest_process_rss"]
    for r in rows.values():
        assert r["output_dims_per_s"] == pytest.approx(32 * r["sequences_per_s"]) and r["T"] == 2
    assert "| Jacobian-lens fit throughput >= 1x plain torch on the unsliced model" in (out / "table.md").read_text()


def test_capture_rounds_take_turns_and_ratios_stay_within_a_round():
    """The capture workload's schedule and arithmetic on made-up figures: every system once
    per round, the order rotating by one; each ratio is of two figures from the same round."""
    from types import SimpleNamespace

    from pipelines.bench.capture import capture_rows
    from pipelines.bench.suite import row

    names = ["hf_generate", "distlens_local_2stage", "distlens_local_2stage_kl_off", "nnsight"]
    speed = dict(zip(names, (20.0, 16.0, 18.0, 12.0)))
    ran = []  # (system, tokens/s) in the order measured

    def measure(job):  # the machine slows down as the run goes on: ratios across rounds would drift
        assert job["T"] == 5
        name = {"hf_generate": names[0], "nnsight": names[3]}.get(job["system"])
        name = name or (names[1] if job.get("kl_to_final", True) else names[2])
        ran.append((name, speed[name] / (1 + 0.1 * len(ran))))
        return {"tokens_per_s": ran[-1][1], "wall_s": 1.0}

    rows = {
        r["system"]: r
        for r in capture_rows(SimpleNamespace(peers=["nnsight"], capture_size=5, capture_rounds=3), measure, row)
    }
    assert [n for n, _ in ran] == names + names[1:] + names[:1] + names[2:] + names[:2]
    figures = {n: [tps for m, tps in ran if m == n] for n in names}  # round by round
    for n in names[1:3]:
        want = [a / b for a, b in zip(figures[n], figures["hf_generate"])]
        assert rows[n]["vs_hf_generate_rounds"] == pytest.approx(want)
        assert (rows[n]["vs_hf_generate_min"], rows[n]["vs_hf_generate_max"]) == pytest.approx((min(want), max(want)))
        assert rows[n]["vs_nnsight_rounds"] == pytest.approx([a / b for a, b in zip(figures[n], figures["nnsight"])])
        assert rows[n]["repeats"] == 3
    assert "vs_hf_generate" not in rows["hf_generate"]


def test_gpu_bench_path_runs_on_cpu(tmp_path, monkeypatch):
    """The GPU script, on the CPU with a tiny random model, in this process: every system
    runs, the paper's baseline and distlens see the same trajectory, and the ratio is recorded."""
    from pipelines.bench import gpu

    argv = ["--out", str(tmp_path), "--device", "cpu", "--shapes", "tiny", "--tokens", "6", "--baseline-tokens", "4",
            "--batches", "1", "2"]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["pipelines.bench.gpu", *argv])
    gpu.main()
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert results["device"] == "cpu" and results["dtype"] == "float32" and results["batches"] == [1, 2]
    for batch in (1, 2):
        rows = {r["system"]: r for r in results["rows"] if r["batch"] == batch}
        assert set(rows) == {
            "hf_generate", "distlens_inprocess_capture", "distlens_inprocess_nocapture",
            "distlens_inprocess_capture_T4", "distlens_inprocess_nocapture_T4", "paper_baseline",
            "paper_baseline_nocapture",
        }  # fmt: skip
        assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
        base = rows["paper_baseline"]
        assert base["same_tokens"] and base["top1_agreement"] == 1.0 and base["max_logprob_diff"] < 1e-4
        assert results["ratios"][f"tiny@batch{batch}"]["throughput_vs_baseline"] > 0
        capture = rows["distlens_inprocess_capture"]
        assert 0 < capture["lens_share"] < 1 and capture["bytes_per_row"] > 0 and capture["lens_layers"] > 1


def test_like_for_like_names_where_a_peer_parted_and_targets_take_its_fastest_agreeing_way():
    from pipelines.bench.agreement import like_for_like
    from pipelines.bench.targets import check

    ours = {
        "tokens": [5, 6, 7, 8], "top1": [[6, 7, 8], [6, 7, 9]], "top1_logprob": [[-1.0, -2.0, -3.0], [-0.1, -0.2, -0.3]],
        "last_top2_logprob": [-2.5, -0.2001, -1.0],
    }  # fmt: skip
    same = {**ours, "top1_logprob": [[-1.0, -2.0, -3.00005], [-0.1, -0.2, -0.3]]}
    assert like_for_like(same, ours)["like_for_like"] == "ok"
    off = {**ours, "top1_logprob": [[-1.0, -2.0, -3.01], [-0.1, -0.2, -0.3]]}
    assert like_for_like(off, ours)["like_for_like"] == "disagrees"
    parted = {**ours, "tokens": [5, 6, 9, 9]}  # parted at position 2, predicted at position 1
    verdict = like_for_like(parted, ours)["like_for_like"]
    assert verdict.startswith("disagrees: generated other tokens from position 2") and "gap there is 0.0001" in verdict

    def r(system, tps, agree=None):
        out = {"system": system, "workload": "trajectory", "T": 64, "tokens_per_s": tps}
        return {**out, "like_for_like": agree} if agree else out

    rows = [
        r("distlens_local_2stage", 10.0), r("hf_generate", 15.0), r("transformer_lens", 30.0, "disagrees"),
        r("transformer_lens_nocache", 4.0, "ok"), r("transformer_lens_hf_generate", 8.0, "ok"),
    ]  # fmt: skip
    lines = check(rows)
    assert any("faster than transformer_lens_hf_generate (T=64; like for like: ok) | 1.25x | met" in x for x in lines)
    assert not any("| faster than transformer_lens " in x for x in lines)  # the disagreeing way is not the yardstick


@pytest.mark.parametrize(
    "override, message",
    [
        ("scaling_layers=[3]", "scaling_layers=3 is out of range: layers captured must be 1..2"),
        ("sizes=[]", "sizes=[] is empty"),
        ("sweep_positions=[middle]", "sweep_positions='middle' is not valid: choose one of ['last', 'all']"),
        ("long_size=2", "long_size=2 is out of range: positions must exceed the prompt's"),
        ("workloads=[plots]", "workloads='plots' is not valid: choose one of ['lens_floor', 'long', 'trajectory',"),
        ("workloads=[corpus] corpus_batch=0", "corpus_batch=0 is out of range: must be >= 1"),
        ("workloads=[corpus] corpus_layers=[2]", "corpus_layers=2 is out of range: layers are 0..1"),
        ("workloads=[corpus] data_root=/nonexistent", "workloads=[corpus]: /nonexistent holds no *.jsonl datasets"),
        ("workloads=[jacobian] jacobian_block=5", "jacobian_block=5 does not divide d_model=32: choose a divisor"),
        ("workloads=[jacobian] jacobian_skip=32", "jacobian_skip=32 leaves no source position in sequences of"),
        (
            "data_root=/nonexistent scaling_layers=[1]",
            "sweep_dataset='corrigible-neutral-HHH': /nonexistent/corrigible-neutral-HHH.jsonl",
        ),
    ],
)
def test_bench_refuses_bad_settings_before_measuring(tiny_with_tokenizer, tmp_path, override, message):
    """The settings checks, in this process (the driver test below prints one as one line)."""
    from pipelines.bench.suite import run
    from pipelines.config import ConfigError

    cfg = compose_bench(tmp_path, f"model.name={tiny_with_tokenizer}", *override.split())
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(cfg, tmp_path / "bench" / "b")
    assert not (tmp_path / "bench" / "b" / "results.json").exists()  # nothing measured, nothing written


def test_bench_driver_refuses_bad_settings_in_one_line(tiny_with_tokenizer, tmp_path):
    result = run_driver(
        "pipelines.bench", f"model.name={tiny_with_tokenizer}", "sizes=[]", f"storage.root={tmp_path}", "storage.run=b",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlens: error:")]
    assert len(errors) == 1 and "sizes=[] is empty" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "bench" / "b" / "results.json").exists()


def test_kept_cpu_results_rebuild_the_kept_table():
    """The measured run kept in the package (results.json of `storage.run=readme8`) gives, read by
    today's report and targets, the very table kept beside it: an old results.json still reads."""
    from pathlib import Path

    from pipelines.bench import report, targets

    kept = Path(report.__file__).with_name("results")
    rows = json.loads((kept / "bench_cpu.json").read_text())["rows"]
    rebuilt = "\n".join([*report.table(rows), "", *targets.check(rows)]) + "\n"
    assert rebuilt == (kept / "bench_cpu_table.md").read_text()


def test_bench_modules_read_no_private_name_of_another_module():
    """No module of the benchmark imports, or reads off an imported module, a name starting with `_`."""
    import ast
    from pathlib import Path

    import pipelines.bench

    found = []
    for path in Path(pipelines.bench.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [
                    f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")
                ]
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
        found += [
            f"{path.name}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
            and node.attr.startswith("_") and not node.attr.startswith("__")
        ]  # fmt: skip
    assert not found, found


def test_corpus_workload_rows_come_from_its_runs_and_hf_generate_agrees(tiny_with_tokenizer, tmp_path, monkeypatch):
    """The corpus workload in this process on a tiny model: 5 rows of the shared datasets'
    questions in micro-batches of 2, ending at different steps (EOS set to tokens the rows
    generate). Every figure of a row is its run's (rows/s = rows / wall), every ratio two runs'
    of the same round, and HF generate batched with left padding (the reference) generates the
    very tokens each distlens system does, row by row."""
    from pipelines.bench import corpus_workload, suite, worker
    from pipelines.datasets import dataset_root

    corpus, t = tmp_path / "probe.jsonl", 6
    corpus_workload.build_corpus(dataset_root(None), 5, corpus)
    probe = dict(model_path=str(tiny_with_tokenizer), corpus=str(corpus), T=t, micro_batch_size=2, eos_token_ids=[])
    free = corpus_workload.hf_generate_corpus(probe)["generated"]  # no EOS: every row T tokens
    eos = [free[0][2], free[1][4]]  # row 0 ends by step 3, row 1 by step 5; the others where they meet one
    runs, layers = {}, {}

    def measure(job, python=None):  # a job and its figures cross a JSON boundary, as between processes
        layers[job["system"], job.get("batching"), job.get("no_capture", False)] = job.get("layers")
        got = json.loads(json.dumps(worker.run_job(json.loads(json.dumps({**job, "eos_token_ids": eos})))))
        label = max((k for k, v in corpus_workload.SYSTEMS.items() if v.items() <= job.items()),
                    key=lambda k: len(corpus_workload.SYSTEMS[k]))  # fmt: skip
        runs[label] = got
        return got

    monkeypatch.setattr(suite, "measure", measure)
    cfg = compose_bench(
        tmp_path, f"model.name={tiny_with_tokenizer}", "workloads=[corpus]", "corpus_prompts=5",
        f"corpus_max_new_tokens={t}", "corpus_batch=2", "corpus_rounds=1", "corpus_layers=[1]",
    )  # fmt: skip
    out = tmp_path / "bench" / "b"
    listed = suite.run(cfg, out)
    assert {k: v for k, v in layers.items() if k[0] == "distlens_corpus"} == {
        ("distlens_corpus", b, nc): [1] for b in ("continuous", "static") for nc in (False, True)
    }  # the capture systems read the chosen layer (the no-capture ones read none, whatever the job says)
    written = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in written] == [json.loads(x)["prompt"] for x in corpus.read_text().splitlines()]
    assert len({r["dataset"] for r in written}) == 5  # one question from each dataset in turn
    rows = {r["system"]: r for r in listed}
    assert set(rows) == set(corpus_workload.SYSTEMS) and all("error" not in r for r in listed), listed
    reference = runs["hf_generate_batched"]["generated"]
    want = [g[: next((i + 1 for i, x in enumerate(g) if x in eos), t)] for g in free]  # each row to its first EOS
    assert reference == want and len({len(g) for g in want}) > 1
    for label, got in runs.items():
        assert got["generated"] == reference, label  # the same greedy tokens, row by row
        r = rows[label]
        assert (r["rows"], r["generated_tokens"]) == (5, sum(map(len, reference)))
        assert r["rows_per_s"] == pytest.approx(5 / got["wall_s"]) and r["batch"] == 2
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / got["wall_s"])
    for label, static in corpus_workload.STATIC_OF.items():
        assert rows[label]["vs_static_rounds"] == [runs[label]["rows_per_s"] / runs[static]["rows_per_s"]]
        # continuous: a row leaves its slot once it ends; static: a micro-batch runs to its longest row
        assert rows[label]["row_steps"] == rows[label]["useful_row_steps"] == rows[label]["generated_tokens"]
        padded = sum(len(pair) * max(map(len, pair)) for pair in (want[0:2], want[2:4], want[4:]))
        assert (
            rows[static]["row_steps"] == padded and rows[static]["useful_row_steps"] == rows[label]["generated_tokens"]
        )
    for label in rows.keys() - {"hf_generate_batched"}:
        assert rows[label]["vs_hf_generate_rounds"] == [
            runs[label]["rows_per_s"] / runs["hf_generate_batched"]["rows_per_s"]
        ]
    table = (out / "table.md").read_text()
    assert "| continuous batching >= 1.3x static micro-batches, capture on (corpus, 5 rows, T<=6, batch 2;" in table
    assert "| continuous batching >= 1x HF generate batched, no capture (corpus, 5 rows" in table
