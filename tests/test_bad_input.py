"""Bad input: a one-line error naming the value and what is valid, a non-zero exit, and no
store that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from driver import run_driver, run_here

from actors.store import LensStore

LONG_PROMPT = "word " * 2100  # about 2,100 tokens against a context of 2,048


def _vector(tmp_path, hidden: int, model: str) -> str:
    from pipelines.vectors import SteeringVector

    path = tmp_path / "vector.safetensors"
    SteeringVector(
        np.ones(hidden, np.float32), model=model, hidden_size=hidden, layer=0, site="resid_pre", dataset="d",
        items=1, aggregator="mean_diff", normalised=False, norm=1.0,
    ).save(path)  # fmt: skip
    return str(path)


def _translators(tmp_path, hidden: int, model: str) -> str:
    from actors.tuned_lens import Translators, save_translators

    return str(save_translators(tmp_path / "lens.safetensors", Translators((0,), hidden), {"model": model}))


def _dataset(tmp_path, content: bytes) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    return str(path)


GOOD_LINE = (
    b'{"question": "Pick one.\\n\\nChoices:\\n (A) yes\\n (B) no", '
    b'"answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}\n'
)
MALFORMED = GOOD_LINE * 4 + b"{not json\n" + GOOD_LINE * 4  # line 5
NON_UTF8 = GOOD_LINE * 4 + b"\xff\xfe" + GOOD_LINE * 4


def _foreign_store(tmp_path) -> list[str]:
    from actors.store import StoreLayout

    layout = StoreLayout(n_prompts=1, n_positions=4, layers=(0, 1), components=("resid_post",), k=2, batch_rows=1)
    LensStore.create(tmp_path / "r" / "lens.zarr", layout, {"fingerprint": "another-run"})
    return []


def _tiny_opt(tmp_path) -> list[str]:
    from transformers import OPTConfig, OPTForCausalLM

    path = tmp_path / "opt"
    config = OPTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, ffn_dim=32, vocab_size=64,
                       max_position_embeddings=64, word_embed_proj_dim=16)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(path)
    return [f"model.name={path}"]


def _under_a_file(tmp_path, _model) -> list[str]:
    (tmp_path / "a-file").write_text("not a directory")
    return [f"storage.root={tmp_path / 'a-file' / 'runs'}"]


def _pairs(tmp_path, corrupt: str, target: str) -> list[str]:
    path = tmp_path / "pairs.jsonl"
    pair = {"clean": "The cat sat on the", "corrupt": corrupt, "target": target}
    path.write_text(json.dumps(pair) + "\n")
    return [f"pairs={path}"]


def _patch_rows(tmp_path, edit: dict, values=None) -> list[str]:
    if values is not None:
        np.save(tmp_path / "v.npy", values)
        edit = {**edit, "values": str(tmp_path / "v.npy")}
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "The cat sat on the"}, {"prompt": "The dog sat on the", "edits": [edit]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"rows={path}", "targets=[' mat']"]


LENS, STEER, SERVE = "pipelines.lens", "pipelines.steer", "pipelines.serve"
TRACE, PATCH = "pipelines.trace", "pipelines.patch"
# name: (driver, overrides or a function of (tmp_path, model dir) giving them, message); all exit with 2
CASES = {
    # storage that cannot be written: refused before Hydra opens its log there and before Ray starts
    "unwritable_storage_root": (LENS, ["storage.root=/proc/nope"], "storage.root='/proc/nope' cannot be written"),
    "storage_root_under_a_file": (STEER, _under_a_file, "/a-file/runs' cannot be written (Not a directory)"),
    # invalid Hydra overrides
    "unknown_config_key": (LENS, ["capture.kk=3"], "unknown config key 'capture.kk': valid keys of capture are"),
    "unknown_config_group_option": (
        LENS,
        ["cluster=slurm"],
        "cluster='slurm' is not a config of group cluster: choose one of",
    ),
    "unknown_executor": (LENS, ["cluster.executor=mpi"], "cluster.executor='mpi' is not valid: choose one of"),
    "unknown_component": (
        LENS,
        ["capture.components=[resid_psot]"],
        "capture.components='resid_psot' is not valid: choose one of",
    ),
    "top_p_out_of_range": (LENS, ["generation.top_p=0"], "generation.top_p=0.0 is out of range: must be in (0, 1]"),
    "fp16_on_cpu": (LENS, ["model.dtype=float16"], "model.dtype='float16' is not valid on device cpu"),
    "resume_and_overwrite": (LENS, ["resume=true", "overwrite=true"], "resume=true and overwrite=true contradict"),
    "negative_max_restarts": (
        LENS,
        ["cluster.max_restarts=-1"],
        "cluster.max_restarts=-1 is out of range: must be >= 0",
    ),
    "repeated_component": (
        LENS,
        ["capture.components=[resid_post,attn_out,resid_post]"],
        "capture.components lists 'resid_post' more than once",
    ),
    "negative_steer_positions": (LENS, ["steer.positions=-1"], "steer.positions=-1 is negative"),
    "layers_not_a_list": (LENS, ["capture.layers=5"], "capture.layers=5 is not a list"),
    "empty_capture_positions": (LENS, ["capture.positions=[]"], "capture.positions=[] is empty"),
    "capture_position_past_the_run": (LENS, ["capture.positions=[1000]"], "capture.positions contains 1000"),
    "k_above_the_vocabulary": (LENS, ["capture.k=100000"], "capture.k=100000 is out of range: valid is 1.."),
    "negative_cpus_per_stage": (LENS, ["cluster.cpus_per_stage=-1"], "cluster.cpus_per_stage=-1.0 is out of range"),
    "empty_steer_coefficients": (LENS, ["steer.coefficients=[]"], "steer.coefficients=[] is empty"),
    "revision_of_a_local_model": (LENS, ["model.revision=v9"], "model.revision='v9' applies to Hugging Face ids only"),
    "unreachable_ray_address": (
        LENS,
        ["cluster.executor=ray", "cluster.address=127.0.0.1:9"],
        "no Ray cluster answers at 127.0.0.1:9",
    ),
    "empty_prompt_list": (LENS, ["prompts=[]"], "prompts=[] is empty"),
    "blank_prompt": (LENS, ["prompts=['  ']"], "prompts[0]='  ' is empty"),
    # unknown model or adapter; layers, stages, tp_size out of range
    "unknown_model": (LENS, ["model.name=no-such-model"], "unknown model 'no-such-model'"),
    "unsupported_model_family": (
        LENS,
        lambda tmp, _: _tiny_opt(tmp),
        "unsupported model family model_type='opt': supported families are",
    ),
    "layer_out_of_range": (LENS, ["capture.layers=[7]"], "capture.layers contains 7, out of range: valid is 0..1"),
    "num_stages_above_layers": (LENS, ["cluster.num_stages=3"], "cluster.num_stages=3 is out of range: valid is 1..2"),
    "tp_not_dividing_heads": (LENS, ["cluster.executor=ray", "cluster.tp_size=3"], "cluster.tp_size=3 does not divide"),
    "prompt_longer_than_context": (
        LENS,
        [f"prompts=['{LONG_PROMPT}']"],
        "exceeds the model's context of 2048 positions",
    ),
    # resources the cluster cannot place
    "resources_the_cluster_cannot_place": (
        LENS,
        ["cluster.executor=ray", "cluster.cpus_per_stage=64", "cluster.placement_timeout_s=2"],
        "the Ray cluster cannot place 2 stage ranks of {'CPU': 64.0} each within 2s",
    ),
    # malformed or non-UTF-8 dataset files
    "malformed_dataset_line": (
        STEER,
        lambda tmp, _: [f"dataset={_dataset(tmp, MALFORMED)}"],
        "bad.jsonl:5: not valid JSON",
    ),
    "non_utf8_dataset": (STEER, lambda tmp, _: [f"dataset={_dataset(tmp, NON_UTF8)}"], "not UTF-8"),
    "steering_layer_out_of_range": (
        STEER,
        ["steering.layers=[0,7]"],
        "steering.layers contains 7, out of range: valid is 0..1",
    ),
    "unknown_steering_site": (
        STEER,
        ["steering.site=resid_mid"],
        "steering.site='resid_mid' is not valid: choose one of",
    ),
    "negative_steering_positions": (STEER, ["steering.positions=-1"], "steering.positions=-1 is negative"),
    "unknown_dataset": (STEER, ["dataset=no-such-set"], "unknown dataset 'no-such-set'"),
    "too_few_test_items": (STEER, ["data.max_test=0"], "data.max_test=0 is out of range: must be >= 2"),
    # steering vectors of the wrong shape or from another model
    "steering_vector_wrong_hidden_size": (
        LENS,
        lambda tmp, model: [f"steer.vector={_vector(tmp, 7, str(model))}"],
        "has hidden size 7",
    ),
    "steering_vector_not_safetensors": (
        LENS,
        lambda tmp, _: [f"steer.vector={_dataset(tmp, GOOD_LINE)}"],
        "is not a steering-vector .safetensors file",
    ),
    "steering_vector_a_directory": (LENS, lambda tmp, _: [f"steer.vector={tmp}"], "is a directory"),
    "steering_vector_of_another_model": (
        LENS,
        lambda tmp, _: [f"steer.vector={_vector(tmp, 32, 'other-model')}"],
        "was built on model 'other-model'",
    ),
    # tuned-lens translators for another hidden size or model, or none at all
    "tuned_lens_wrong_hidden_size": (
        LENS,
        lambda tmp, model: ["capture.lenses=[logit,tuned]", f"capture.tuned_lens={_translators(tmp, 7, str(model))}"],
        "has hidden size 7; this model's is 32",
    ),
    "tuned_lens_of_another_model": (
        LENS,
        lambda tmp, _: ["capture.lenses=[logit,tuned]", f"capture.tuned_lens={_translators(tmp, 32, 'other-model')}"],
        "was trained on model 'other-model'",
    ),
    "tuned_lens_without_a_file": (
        LENS,
        ["capture.lenses=[logit,tuned]"],
        "capture.tuned_lens=null: capture.lenses holds tuned, so give a translators file",
    ),
    "unknown_lens": (LENS, ["capture.lenses=[logit,tunde]"], "capture.lenses contains 'tunde', which is not valid"),
    # distlens serve: its own settings and the vectors it registers, refused before Ray starts
    "serve_port_out_of_range": (SERVE, ["serve.port=70000"], "serve.port=70000 is out of range: valid is 1..65535"),
    "serve_vector_of_another_model": (
        SERVE,
        lambda tmp, _: [f"serve.vectors=['{_vector(tmp, 32, 'other-model')}']"],
        "was built on model 'other-model'",
    ),
    "serve_vectors_folder_without_a_study": (
        SERVE,
        lambda tmp, _: [f"serve.vectors=['{tmp}']"],
        "holds no steering study",
    ),
    # causal traces and interventions: the pairs and rows, refused before the stages load
    "trace_pair_of_two_lengths": (
        TRACE,
        lambda tmp, _: _pairs(tmp, "The Colosseum sat on the", " mat"),
        "clean has 5 tokens, corrupt 7: a trace restores each position from the clean run into the corrupted "
        "one and needs prompts of equal token length",
    ),
    "trace_target_of_several_tokens": (
        TRACE,
        lambda tmp, _: _pairs(tmp, "The dog sat on the", " Colosseum"),
        "field 'target'=' Colosseum' is 3 tokens, not one",
    ),
    "patch_source_out_of_range": (
        PATCH,
        lambda tmp, _: _patch_rows(tmp, {"op": "patch", "layer": 1, "site": "resid_post", "source": 5}),
        "edits[0]: patch source=5 is out of range: rows are 0..1",
    ),
    "patch_stored_values_of_the_wrong_shape": (
        PATCH,
        lambda tmp, _: _patch_rows(tmp, {"op": "patch", "layer": 1, "site": "resid_post"}, np.zeros((5, 31))),
        "values have shape [5, 31]; patch needs [positions, d_model] with d_model=32",
    ),
    # an output path holding another run's store
    "output_path_holds_another_run": (
        LENS,
        lambda tmp, _: _foreign_store(tmp),
        "already holds a run with another config",
    ),
}
STEER_BASE = ["data.max_train=4", "data.max_test=4", "steering.select_items=2", "steering.layers=[0,1]", "bootstrap=50"]


# Cases run as a process of their own: where Ray is started or joined (the rest run the driver's
# `__main__` in the test's process, tests/driver.py `run_here`: the same code, from the command
# line to the exit code, without a process start per case)
# (and the serve cases: its `__main__` sets the process's SIGTERM handler)
IN_A_PROCESS = {"unreachable_ray_address", "tp_not_dividing_heads"} | {c for c in CASES if CASES[c][0] == SERVE}
JOIN_RAY = {"resources_the_cluster_cannot_place"}  # a process of its own that joins the test process's cluster


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_compute(case, tiny_with_tokenizer, tmp_path, request):
    driver, overrides, message = CASES[case]
    if callable(overrides):
        overrides = overrides(tmp_path, tiny_with_tokenizer)
    base = [f"model.name={tiny_with_tokenizer}", "cluster=inprocess"]
    base += [f"storage.root={tmp_path}", "storage.run=r"] if driver not in (SERVE, TRACE, PATCH) else []
    if driver == STEER:
        base += STEER_BASE
    before = {p for p in tmp_path.rglob("*.zarr")}
    if case in JOIN_RAY:
        result = run_driver(driver, *base, *overrides, cwd=tmp_path, env=request.getfixturevalue("joined_ray"))
    else:
        result = (run_driver if case in IN_A_PROCESS else run_here)(driver, *base, *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlens: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert {p for p in tmp_path.rglob("*.zarr")} == before  # no store written (an existing one untouched)


def test_output_path_with_another_config_is_refused(tiny_with_tokenizer, tmp_path, joined_ray):
    base = [f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=r"]
    first = run_driver("pipelines.lens", *base, "generation.max_new_tokens=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    store = tmp_path / "r" / "lens.zarr"
    before = LensStore.open(store)
    assert before.is_complete
    tokens = before["tokens"]
    record = (tmp_path / "r" / ".hydra" / "config.yaml").read_text()
    assert "max_new_tokens: 3" in record
    second = run_here("pipelines.lens", *base, "generation.max_new_tokens=4", cwd=tmp_path)  # refused: no compute
    assert second.returncode == 2
    assert "already holds a run with another config" in second.stderr
    assert (LensStore.open(store)["tokens"] == tokens).all()  # untouched, and so is its config record
    assert (tmp_path / "r" / ".hydra" / "config.yaml").read_text() == record
    other = run_here("pipelines.lens", *base, "generation.max_new_tokens=4", "resume=true", cwd=tmp_path)
    assert other.returncode == 2
    assert "another config (generation.max_new_tokens 3 -> 4): resume continues the same config only" in other.stderr
    # an overwrite that cannot start puts the store it would replace back, with its write log
    log = (tmp_path / "r" / "lens.zarr.writes.jsonl").read_text()
    unplaceable = ["cluster.executor=ray", "cluster.cpus_per_stage=64", "cluster.placement_timeout_s=2"]
    failed = run_driver("pipelines.lens", *base, "overwrite=true", *unplaceable, cwd=tmp_path, env=joined_ray)
    assert failed.returncode == 2 and "cannot place" in failed.stderr
    assert LensStore.open(store).is_complete and (LensStore.open(store)["tokens"] == tokens).all()
    assert (tmp_path / "r" / "lens.zarr.writes.jsonl").read_text() == log
    run_log = (tmp_path / "r" / "run.log").read_text().splitlines()
    assert "the replaced store is back" in run_log[-2] and "stopped: ClusterError" in run_log[-1]
    # the same config resumes (nothing left to do); overwrite replaces
    again = run_driver("pipelines.lens", *base, "generation.max_new_tokens=3", "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    replaced = run_driver(
        "pipelines.lens", *base, "generation.max_new_tokens=4", "overwrite=true", "prompts=[hello]", cwd=tmp_path
    )
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert LensStore.open(store).is_complete
    assert "max_new_tokens: 4" in (tmp_path / "r" / ".hydra" / "config.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "r").glob("heatmap_*.png")) == ["heatmap_prompt0.png"]
    assert "complete:" in (tmp_path / "r" / "run.log").read_text().splitlines()[-1]


def test_hf_model_group_needs_a_model_name(tmp_path):
    result = run_driver("pipelines.lens", "model=hf", "cluster=inprocess", f"storage.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "distlens: error: model.name is not set" in result.stderr


def test_relative_storage_root_inside_a_ray_job_working_dir_is_refused(tmp_path):
    """`ray job submit --working-dir .` runs the driver in Ray's temporary copy of the directory:
    a relative storage.root would write the results where Ray deletes them."""
    from pipelines.config import ConfigError, _check_storage_root

    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    with pytest.raises(ConfigError, match="storage.root='outputs' is relative, and this job runs in Ray's temporary"):
        _check_storage_root("outputs", job_dir)
    _check_storage_root(str(tmp_path / "out"), job_dir)  # absolute: fine
    _check_storage_root("outputs", tmp_path)  # relative outside a job: fine
