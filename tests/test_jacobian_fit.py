"""The Jacobian lens fitted across stages (the backward stage to stage) equals J_l computed here
with plain torch autograd on the unsliced HF model over the same sequences; partial fits merge
to the whole; a fit stopped after a checkpoint and resumed equals one run through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.executor import LocalExecutor
from actors.jacobian_coordinator import JacobianCoordinator
from actors.jacobian_fit import FitSpec
from actors.jacobian_lens import merge_fits
from tiny_models import decoder_layers, load_reference, save_tiny

SKIP, BLOCK = 3, 8
LENGTHS = [12, 9, 15, 7, 11]  # rows of different lengths, three micro-batches of two


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("jfit")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    return {f: save_tiny(f, root / f, **small) for f in ("llama", "gemma2")}


def _sequences(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, size=n).tolist() for n in LENGTHS]


def _reference(model, seqs, skip: int = SKIP) -> dict[int, torch.Tensor]:
    """sum over sequences and p >= skip of sum over p' of d h_L[p'] / d h_l[p] (causal: p' >= p),
    one backward per sequence over d copies (copy i seeds output dim i at every position)."""
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    sums = {la: torch.zeros(d, d, dtype=torch.float64) for la in range(n_layers)}
    for seq in seqs:
        outs = []
        hooks = [m.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o[0] if isinstance(o, tuple) else o))
                 for m in decoder_layers(model)]  # fmt: skip
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(torch.tensor([seq]).expand(d, -1)).requires_grad_(True)
            model(inputs_embeds=embeds)
            for h in hooks:
                h.remove()
            grads = torch.autograd.grad(outs[-1][torch.arange(d), :, torch.arange(d)].sum(), outs)
        for la in range(n_layers):
            sums[la] += grads[la][:, skip:].double().sum(1)
    return sums


def _fit(path, stages, seqs, executor=None, **kw):
    from transformers import AutoConfig

    c = JacobianCoordinator(str(path), AutoConfig.from_pretrained(path), stages, FitSpec(BLOCK, SKIP),
                            executor or LocalExecutor(), model="tiny")  # fmt: skip
    try:
        return c.fit(seqs, 2, **kw)
    finally:
        c.close()


def _assert_equal(fit, ref):
    for la, expected in ref.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(fit.sums[la].double(), expected, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("family, stages", [("llama", 1), ("llama", 2), ("llama", 3), ("gemma2", 2)])
def test_fit_on_stages_equals_autograd_on_the_unsliced_model(tiny, family, stages):
    model = load_reference(tiny[family])
    for p in model.parameters():
        p.requires_grad_(False)
    seqs = _sequences(model.config.vocab_size)
    fit = _fit(tiny[family], stages, seqs)
    _assert_equal(fit, _reference(model, seqs))
    assert fit.positions == sum(n - SKIP for n in LENGTHS) and fit.sequences == 5 and fit.tokens == sum(LENGTHS)
    torch.testing.assert_close(fit.matrices()[2], torch.eye(32))  # the last layer: J = I


def test_halves_merge_to_the_whole(tiny):
    seqs = _sequences(256)
    whole = _fit(tiny["llama"], 2, seqs)
    merged = merge_fits([_fit(tiny["llama"], 2, seqs[:2]), _fit(tiny["llama"], 2, seqs[2:])])
    assert merged.positions == whole.positions
    for la in whole.layers:
        torch.testing.assert_close(merged.sums[la], whole.sums[la], atol=1e-9, rtol=0)


def test_stopped_after_a_checkpoint_and_resumed_equals_the_fit_through(tiny, tmp_path):
    from pipelines.jacobian_tune import resume_point, save_checkpoint

    seqs = _sequences(256)
    through = _fit(tiny["llama"], 2, seqs)
    ck = tmp_path / "ck"

    class Stopped(JacobianCoordinator):
        def fitted(self, done):
            if done == 2:
                raise KeyboardInterrupt  # a kill after the checkpoint of micro-batch 2

    from transformers import AutoConfig

    c = Stopped(str(tiny["llama"]), AutoConfig.from_pretrained(tiny["llama"]), 2, FitSpec(BLOCK, SKIP), LocalExecutor(),
                model="tiny")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        c.fit(seqs, 2, save_every=2, save=lambda f, done: save_checkpoint(ck, f, done, "p"))
    base, first = resume_point(ck, "p")
    assert first == 2 and base.sequences == 4
    resumed = _fit(tiny["llama"], 2, seqs, base=base, first=first)
    assert (resumed.sequences, resumed.positions) == (through.sequences, through.positions)
    for la in through.layers:
        torch.testing.assert_close(resumed.sums[la], through.sums[la], atol=1e-9, rtol=0)


def test_fit_on_two_ray_stages_equals_autograd(tiny, ray_cluster):
    from actors.executor import RayExecutor

    model = load_reference(tiny["llama"])
    for p in model.parameters():
        p.requires_grad_(False)
    seqs = _sequences(256)
    _assert_equal(_fit(tiny["llama"], 2, seqs, executor=RayExecutor()), _reference(model, seqs))
