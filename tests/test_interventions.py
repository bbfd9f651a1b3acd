"""Interventions as row edits (actors/interventions.py, run by actors/tracing.py): scale, zero and
mean ablation, patches from stored values and from another row (aligned from the start and from
the end; the source in the same micro-batch and in an earlier one), beside a steering addition at
the same hook. Each row's next-token log-probs equal the unsliced HF model run on that row alone,
hooked here by the test's own code with the same intervention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.interventions import Intervention, KLReference, KLTo, PatchSource
from actors.steering import VectorEdit
from actors.tracing import InterventionRunner, check_sites
from tiny_models import decoder_layers, load_reference

SCORE_IDS = (5, 9, 17, 200)


def _module(block, site):
    return {"attn_out": block.self_attn, "mlp_out": block.mlp}.get(site, block)


class Reference:
    """The unsliced model; `run(prompt, edits, sources)` applies one row's edits at its own
    positions 0..n-1 with hooks written here, and returns (last-position log-probs, each
    (layer, site)'s activation as it flows on)."""

    def __init__(self, path):
        self.model = load_reference(path)
        self.layers = decoder_layers(self.model)

    def run(self, prompt, edits=(), sources=None):
        n, hooks, seen = len(prompt), [], {}

        def where(positions):
            p = torch.arange(n)
            if isinstance(positions, tuple):
                return torch.isin(p, torch.tensor(positions))
            if isinstance(positions, int):
                return p >= positions
            return {"all": p >= 0, "prompt": p >= 0, "last": p == n - 1}[positions]

        def edit(h, layer, site):  # h: [1, n, d]
            h = h.clone()
            for e in edits:
                if getattr(e, "layer", None) != layer or e.site != site or getattr(e, "source", None) is not None:
                    continue
                m = where(e.positions)
                if isinstance(e, VectorEdit):
                    h[0, m] += e.coefficient * torch.tensor(e.values)
                elif e.op == "scale":
                    h[0, m] *= e.coefficient
                elif e.op == "ablate":
                    h[0, m] = 0.0 if e.values is None else torch.tensor(e.values)
                else:
                    h[0, m] = torch.tensor(e.values)[torch.arange(n)[m]]
            seen[(layer, site)] = h[0].clone()
            for e in edits:
                if getattr(e, "layer", None) == layer and e.site == site and getattr(e, "source", None) is not None:
                    src = sources[e.source][(layer, site)]
                    m = where(e.positions)
                    shift = 0 if e.align == "start" else len(src) - n
                    h[0, m] = src[torch.arange(n)[m] + shift]
            return h

        for layer, block in enumerate(self.layers):
            for site in ("resid_post", "attn_out", "mlp_out"):

                def post(mod, args, out, layer=layer, site=site):
                    if isinstance(out, tuple):
                        return (edit(out[0], layer, site), *out[1:])
                    return edit(out, layer, site)

                hooks.append(_module(block, site).register_forward_hook(post))

            def pre(mod, args, kwargs, layer=layer):
                if args:
                    return (edit(args[0], layer, "resid_pre"), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], layer, "resid_pre")}

            hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt])).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        return logits.log_softmax(-1), seen


def _rows(d: int, seed: int = 0):
    """11 rows of 3..8 tokens: every kind of edit, two sources (one listed late)."""
    rng = np.random.default_rng(seed)
    lengths = [7, 5, 6, 4, 7, 6, 5, 5, 6, 6, 7]
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in lengths]
    v = rng.standard_normal(d).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32)
    stored = rng.standard_normal((7, d)).astype(np.float32)
    edits = [
        (PatchSource(10),),
        (Intervention("patch", 1, "resid_post", "all", source=11),),  # its source shares micro-batch 0
        (Intervention("ablate", 2, "mlp_out", (1, 3)),),
        (Intervention("ablate", 0, "attn_out", "prompt", values=mean),),
        (Intervention("patch", 2, "resid_post", 2, values=stored),),
        (Intervention("patch", 1, "resid_post", (0, 2, 4), source=10),),  # sources in an earlier micro-batch
        (Intervention("patch", 3, "attn_out", "last", source=10, align="end"),),
        (Intervention("patch", 0, "mlp_out", "all", source=11, align="end"),),
        (PatchSource(11),),  # listed late: the runner puts it first
        (Intervention("scale", 3, "resid_pre", 4, coefficient=-2.0),),
        (
            Intervention("scale", 1, "resid_post", "all", coefficient=0.5),
            VectorEdit(v, 1, "resid_post", "last", coefficient=1.5),  # steering after the row's own edits
        ),
    ]
    return prompts, edits


def _sites(edits):
    return sorted({(e.layer, e.site) for row in edits for e in row if not isinstance(e, PatchSource)})


@pytest.mark.parametrize(
    "family,executor", [("llama", "local"), ("qwen3", "local"), pytest.param("qwen3", "ray", id="qwen3-ray")]
)
def test_each_edit_kind_equals_the_hooked_unsliced_model(tiny_checkpoints, family, executor, request):
    from transformers import AutoConfig

    from actors.executor import LocalExecutor, RayExecutor

    path = tiny_checkpoints[family]
    config = AutoConfig.from_pretrained(path)
    prompts, edits = _rows(config.hidden_size)
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    runner = InterventionRunner(
        path, config, 2, RayExecutor() if executor == "ray" else LocalExecutor(), _sites(edits), SCORE_IDS,
        micro_batch=3,
    )  # fmt: skip
    try:
        got = runner.run_rows(prompts, edits)
    finally:
        runner.close()
    ref = Reference(path)
    sources = {10: ref.run(prompts[0])[1], 11: ref.run(prompts[8])[1]}
    changed = 0
    for r, (prompt, row) in enumerate(zip(prompts, edits)):
        want, _ = ref.run(prompt, row, sources)
        plain, _ = ref.run(prompt)
        lp = got.scores[r] - got.logz[r]
        np.testing.assert_allclose(lp, want[list(SCORE_IDS)].numpy(), atol=2e-5, err_msg=f"row {r}: {row}")
        assert got.next_token[r] == int(want.argmax()), f"row {r}"
        changed += not np.allclose(want.numpy(), plain.numpy(), atol=1e-3)
    assert changed == 9, "every row with an intervention changes its next-token distribution (the sources do not)"


def test_bad_interventions_are_refused_before_running(tiny_checkpoints):
    from transformers import AutoConfig

    from actors.executor import LocalExecutor

    path = tiny_checkpoints["llama"]
    config = AutoConfig.from_pretrained(path)
    runner = InterventionRunner(path, config, 2, LocalExecutor(), [(1, "resid_post")], SCORE_IDS)
    bad = [
        ([[3, 4, 5]], [(Intervention("patch", 1, "resid_post", source=4),)], "patch source 4 is out of range"),
        ([[3, 4, 5]], [(Intervention("scale", 7, "resid_post"),)], "layer 7 is out of range: 0..3"),
        ([[3, 4, 5]], [(Intervention("scale", 2, "resid_post"),)], "at layer 2 resid_post, where these stages have no"),
        (
            [[3, 4, 5]],
            [(Intervention("ablate", 1, "resid_post", values=np.zeros(8, np.float32)),)],
            "ablate values have shape [8]; this model's d_model is 64",
        ),
        (
            [[3, 4, 5, 6], [3, 4, 5]],
            [(PatchSource(0),), (Intervention("patch", 1, "resid_post", "all", source=0, align="end"),)],
            None,  # end-aligned from a longer source: fine
        ),
        (
            [[3, 4, 5], [3, 4, 5, 6]],
            [(PatchSource(0),), (Intervention("patch", 1, "resid_post", "all", source=0),)],
            "patch source 0 has 3 prompt positions; aligned from the start, this row",
        ),
    ]
    for prompts, edits, message in bad:
        if message is None:
            runner.run_rows(prompts, edits)
            continue
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            runner.run_rows(prompts, edits)
    with pytest.raises(ValueError, match=r"stored patch values are all zero at positions \[1\]"):
        stored = np.ones((3, 64), np.float32)
        stored[1] = 0  # a position the earlier run did not capture
        runner.run_rows([[3, 4, 5]], [(Intervention("patch", 1, "resid_post", "all", values=stored),)])
    with pytest.raises(ValueError, match="KL reference keys are carried by more than one row"):
        runner.run_rows([[3, 4], [3, 5]], [(KLReference(0),), (KLReference(0),)])
    with pytest.raises(ValueError, match="more than one KLReference/KLTo"):
        runner.run_rows([[3, 4], [3, 5]], [(KLReference(0),), (KLReference(1), KLTo(0))])
    with pytest.raises(ValueError, match="site 'resid_mid' is not available for model family 'gpt_neox'"):
        from transformers import GPTNeoXConfig

        check_sites(GPTNeoXConfig(num_hidden_layers=2, use_parallel_residual=True), [(0, "resid_mid")])
    with pytest.raises(ValueError, match="stored patch holds 2 positions"):
        runner.run_rows([[3, 4, 5]], [(Intervention("patch", 1, "resid_post", values=np.zeros((2, 64), np.float32)),)])
    for kwargs, message in [
        (dict(op="swap"), "op='swap'"),
        (dict(op="patch"), "give exactly one"),
        (dict(op="scale", source=1), "belongs to a patch"),
        (dict(op="ablate", values=np.zeros((2, 64))), r"expected \[d_model\]"),
        (dict(op="scale", positions=(1, -2)), "ints >= 0"),
        (dict(op="add"), "an add needs `values`"),
    ]:
        with pytest.raises(ValueError, match=message):
            Intervention(layer=1, site="resid_post", **kwargs)
    with pytest.raises(ValueError, match="reaches the MLP's input only"):
        Intervention("scale", 1, "resid_mid")
