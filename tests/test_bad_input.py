"""Bad input: a one-line error naming the value and what is valid, a non-zero exit, and no
store that looks complete."""

from __future__ import annotations

import pytest
from driver import run_driver

from actors.store import LensStore

LONG_PROMPT = "word " * 2100  # about 2,100 tokens against a context of 2,048


CASES = {
    "unknown_model": (["model.name=no-such-model"], "unknown model 'no-such-model'"),
    "layer_out_of_range": (["capture.layers=[7]"], "capture.layers contains 7, out of range: valid is 0..1"),
    "num_stages_above_layers": (["cluster.num_stages=3"], "cluster.num_stages=3 is out of range: valid is 1..2"),
    "empty_prompt_list": (["prompts=[]"], "prompts=[] is empty"),
    "blank_prompt": (["prompts=['  ']"], "prompts[0]='  ' is empty"),
    "prompt_longer_than_context": ([f"prompts=['{LONG_PROMPT}']"], "exceeds the model's context of 2048 positions"),
    "unknown_component": (
        ["capture.components=[resid_psot]"],
        "capture.components='resid_psot' is not valid: choose one of",
    ),
    "unknown_executor": (
        ["cluster.executor=mpi"],
        "cluster.executor='mpi' is not valid: choose one of ['local', 'ray']",
    ),
    "top_p_out_of_range": (["generation.top_p=0"], "generation.top_p=0.0 is out of range: must be in (0, 1]"),
    "fp16_on_cpu": (["model.dtype=float16"], "model.dtype='float16' is not valid on device cpu"),
    "tp_not_dividing_heads": (["cluster.executor=ray", "cluster.tp_size=3"], "cluster.tp_size=3 does not divide"),
    "resume_and_overwrite": (["resume=true", "overwrite=true"], "resume=true and overwrite=true contradict"),
    "resources_the_cluster_cannot_place": (
        ["cluster.executor=ray", "cluster.cpus_per_stage=64", "cluster.placement_timeout_s=2"],
        "the Ray cluster cannot place 2 stage ranks of {'CPU': 64.0} each within 2s",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_compute(case, tiny_with_tokenizer, tmp_path):
    overrides, message = CASES[case]
    base = [f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=r"]
    result = run_driver("pipelines.lens", *base, *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlens: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "r" / "lens.zarr").exists()


def test_unknown_config_key_is_refused(tiny_with_tokenizer, tmp_path):
    result = run_driver("pipelines.lens", f"model.name={tiny_with_tokenizer}", "capture.kk=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "kk" in result.stderr


def test_output_path_with_another_config_is_refused(tiny_with_tokenizer, tmp_path):
    base = [f"model.name={tiny_with_tokenizer}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=r"]
    first = run_driver("pipelines.lens", *base, "generation.max_new_tokens=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    store = tmp_path / "r" / "lens.zarr"
    before = LensStore.open(store)
    assert before.is_complete
    tokens = before["tokens"]
    second = run_driver("pipelines.lens", *base, "generation.max_new_tokens=4", cwd=tmp_path)
    assert second.returncode == 2
    assert "already holds a run with another config" in second.stderr
    assert (LensStore.open(store)["tokens"] == tokens).all()  # untouched
    # the same config resumes (nothing left to do); overwrite replaces
    again = run_driver("pipelines.lens", *base, "generation.max_new_tokens=3", "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    replaced = run_driver("pipelines.lens", *base, "generation.max_new_tokens=4", "overwrite=true", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert LensStore.open(store).is_complete
