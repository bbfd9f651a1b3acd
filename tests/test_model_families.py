"""Every supported family's components and steering sites against the unsliced Hugging Face
model hooked by this file's own code, a site a family lacks refused, and each family run
from a local directory through the lens and steer drivers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from driver import run_driver

from actors.steering import SteeringEdit
from actors.vocabulary import STEERING_SITES
from reference import PROMPTS, hf_generate, hf_hidden_by_row, run_lens
from tiny_models import FAMILIES, decoder_layers, load_reference, save_tiny

# Read off each family's transformers 5.24 decoder layer, independently of actors/adapters.py:
# (attention, MLP, attention's input norm or None, MLP's input norm or None, post-norms or None).
LAYOUT = {
    "gpt2": ("attn", "mlp", "ln_1", "ln_2", None),
    "gpt_neox": ("attention", "mlp", "input_layernorm", "post_attention_layernorm", None),
    "gemma2": ("self_attn", "mlp", "input_layernorm", "pre_feedforward_layernorm",
               ("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma3_text": ("self_attn", "mlp", "input_layernorm", "pre_feedforward_layernorm",
                    ("post_attention_layernorm", "post_feedforward_layernorm")),
    "olmo2": ("self_attn", "mlp", None, None, ("post_attention_layernorm", "post_feedforward_layernorm")),
}  # fmt: skip
PRE_NORM = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", None)
COMPONENTS = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


def _layout(model):
    return LAYOUT.get(model.config.model_type, PRE_NORM)


def _parallel(model) -> bool:
    return bool(getattr(model.config, "use_parallel_residual", False))


def _first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _record(model) -> tuple[dict, list]:
    """Hooks that record every component of every layer, as this test defines them: attn_out and
    mlp_out are what each block adds to the residual stream (after a post-norm, if any)."""
    seen, hooks = {}, []
    attn, mlp, _, _, post = _layout(model)

    def keep(key):
        return lambda m, a, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

    def keep_input(key):
        return lambda m, args, kwargs: seen.__setitem__(key, _first_input(args, kwargs))

    for i, layer in enumerate(decoder_layers(model)):
        hooks += [
            layer.register_forward_pre_hook(keep_input((i, "resid_pre")), with_kwargs=True),
            layer.register_forward_hook(keep((i, "resid_post"))),
            getattr(layer, attn).register_forward_pre_hook(keep_input((i, "attn_in")), with_kwargs=True),
            getattr(layer, mlp).register_forward_pre_hook(keep_input((i, "mlp_in")), with_kwargs=True),
            getattr(layer, post[0] if post else attn).register_forward_hook(keep((i, "attn_out"))),
            getattr(layer, post[1] if post else mlp).register_forward_hook(keep((i, "mlp_out"))),
        ]
    return seen, hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_every_component_equals_hooked_hf_model(family, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[family]
    model = load_reference(path)
    comps = tuple(c for c in COMPONENTS if not (c == "resid_mid" and _parallel(model)))
    _, store = run_lens(path, tmp_path / "s.zarr", num_stages=2, micro_batch_size=2, components=comps)
    seen, hooks = _record(model)
    try:
        for row in range(len(PROMPTS)):
            tokens = torch.tensor(store.tokens(row).tolist())[None]
            with torch.no_grad():
                model(tokens)
            acts = torch.from_numpy(store.activations(row))  # [layer, component, position, d]
            n = tokens.shape[1] - 1
            for i in range(model.config.num_hidden_layers):
                expected = {c: seen[(i, c)][0] for c in COMPONENTS if c != "resid_mid"}
                # the reference's own bookkeeping: the blocks' contributions add up to the layer's output
                added = expected["resid_pre"] + expected["attn_out"] + expected["mlp_out"]
                torch.testing.assert_close(added, expected["resid_post"], atol=1e-5, rtol=0)
                if not _parallel(model):
                    expected["resid_mid"] = expected["resid_pre"] + expected["attn_out"]
                for ci, comp in enumerate(comps):
                    torch.testing.assert_close(  # fp32 noise grows with the random norms' gains
                        acts[i, ci, :n],
                        expected[comp][:n],
                        atol=1e-5,
                        rtol=1e-5,
                        msg=lambda m, at=f"{family} layer {i} {comp}": f"{at}: {m}",
                    )
    finally:
        for h in hooks:
            h.remove()


def _hook_edit(model, layer: int, site: str, add: torch.Tensor):
    """The edit as this test defines each site: the residual stream before/after the layer, or
    the normed input of attention / the MLP (the norm's output; the block's input where the
    family has no input norm)."""
    block = decoder_layers(model)[layer]
    attn, mlp, attn_norm, mlp_norm, _ = _layout(model)
    if site == "resid_post":
        return block.register_forward_hook(lambda m, a, out: out + add)
    if site == "resid_pre":
        target = block
    else:
        norm = attn_norm if site == "attn_in" else mlp_norm
        if norm is not None:
            return getattr(block, norm).register_forward_hook(lambda m, a, out: out + add)
        target = getattr(block, attn if site == "attn_in" else mlp)

    def pre(m, args, kwargs):
        if args:
            return (args[0] + add, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + add}

    return target.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_steering_site_equals_hooked_hf_model(family, tiny_checkpoints, tmp_path):
    """Edits at layers 1 and 3 (two stages), two micro-batches: tokens and every layer's hidden
    state equal the unsliced model with the same edits as plain hooks."""
    path = tiny_checkpoints[family]
    plain, _ = hf_generate(load_reference(path), PROMPTS, 4)
    for site in STEERING_SITES:
        # A fresh model per site: HF installs its hidden-state recorders on the first generate,
        # and they must run after the edit hooks to record the edited residual stream.
        model = load_reference(path)
        d = model.config.hidden_size
        vectors = {1: torch.randn(d, generator=torch.Generator().manual_seed(1)),
                   3: torch.randn(d, generator=torch.Generator().manual_seed(3))}  # fmt: skip
        hooks = [_hook_edit(model, layer, site, 2.0 * v) for layer, v in vectors.items()]
        try:
            generated, pad = hf_generate(model, PROMPTS, 4)
        finally:
            for h in hooks:
                h.remove()
        assert not torch.equal(plain.sequences, generated.sequences), site  # the edit changes generation
        edits = tuple(SteeringEdit(layer, site, v.numpy(), "all", 2.0) for layer, v in vectors.items())
        _, store = run_lens(
            path, tmp_path / f"{site}.zarr", num_stages=2, micro_batch_size=2, max_new_tokens=4, steering=edits
        )
        for row in range(len(PROMPTS)):
            assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist(), site
            acts = torch.from_numpy(store.activations(row))[:, 0]
            n = acts.shape[1] - 1
            for layer in range(model.config.num_hidden_layers - 1):
                ref = hf_hidden_by_row(generated, pad, row, layer + 1)[:n]
                torch.testing.assert_close(
                    acts[layer, :n], ref, atol=1e-5, rtol=0, msg=lambda m, at=f"{site} layer {layer}": f"{at}: {m}"
                )


def test_a_site_the_family_lacks_is_refused_naming_the_family_and_its_sites(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError) as err:
        run_lens(tiny_checkpoints["gpt_neox"], tmp_path / "s.zarr", components=("resid_post", "resid_mid"))
    message = str(err.value)
    assert "resid_mid" in message and "'gpt_neox'" in message and "'mlp_in'" in message
    assert "\n" not in message
    assert not (tmp_path / "s.zarr").exists()  # refused before any store exists


# -- the drivers, as a user runs them on a local checkpoint ---------------------------------
MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smollm2) -> dict[str, Path]:
    """One 2-layer checkpoint per family that shares SmolLM2's tokenizer and chat template."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = smollm2.tokenizer()
    dirs = {}
    for family in FAMILIES:
        small = dict(vocab_size=49152, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
        path = save_tiny(family, root / family, **small)
        tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs


def test_every_family_runs_through_the_lens_driver(family_dirs, tmp_path):
    """One Hydra multirun job per family (one process: imports once), each a complete store whose
    greedy tokens are the unsliced model's argmax at every generated position."""
    from actors.store import LensStore

    result = run_driver(
        "pipelines.lens", "-m", f"model.name={','.join(str(p) for p in family_dirs.values())}", "model=hf",
        "model.dtype=float32", "cluster=inprocess", "generation.max_new_tokens=4", "prompts=[Hello there,Why?]", "plot.max_prompts=0",
        f"storage.root={tmp_path}", "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stores = sorted((tmp_path / "sweep").glob("*/lens.zarr"))
    assert len(stores) == len(FAMILIES)
    seen = set()
    for path in stores:
        store = LensStore.open(path)
        assert store.attrs["complete"]
        family = Path(store.attrs["model"]["name"]).name
        seen.add(family)
        model = load_reference(family_dirs[family])
        for row in range(2):
            tokens = torch.tensor(store.tokens(row).tolist())[None]
            prompt = int(store["prompt_lengths"][row])
            with torch.no_grad():
                logits = model(tokens).logits[0]
            np.testing.assert_array_equal(
                logits[prompt - 1 : -1].argmax(-1).numpy(), tokens[0, prompt:].numpy(), err_msg=family
            )
    assert seen == set(FAMILIES)


def test_every_family_runs_through_the_steer_driver(family_dirs, tmp_path):
    import json

    data = tmp_path / "mwe"
    data.mkdir()
    shutil.copy(MWE / "survival-instinct.jsonl", data)
    result = run_driver(
        "pipelines.steer", "-m", f"model.name={','.join(str(p) for p in family_dirs.values())}", "model=hf",
        "model.dtype=float32", "cluster=inprocess", "dataset=survival-instinct", f"data.root={data}",
        "data.max_train=3", "data.max_test=3", "steering.select_items=2", "steering.layers=[0,1]", "bootstrap=20",
        "progress=false", "steering.cost_prompts=0", f"storage.root={tmp_path}", "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert len(summaries) == len(FAMILIES)
    for summary in summaries:
        assert summary["items"] == 3 and summary["best_layer"] in (0, 1)
        assert np.isfinite(summary["slope_of_mean"])
