"""Steering inside the stages: each site against a hooked unsliced HF model, and a coefficient
sweep as one batched pass."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from actors.steering import SteeringEdit
from actors.vocabulary import STEERING_SITES
from reference import PROMPTS, assert_stores_equal, hf_generate, hf_hidden_by_row, left_pad, run_lens
from tiny_models import final_norm, load_reference


def _hook_hf(model, layer: int, site: str, vector: torch.Tensor, coefficient: float):
    """The same edit with a plain forward hook on the plain HF model."""
    block = model.model.layers[layer]
    add = coefficient * vector
    if site == "resid_pre":
        return block.register_forward_pre_hook(lambda m, args: (args[0] + add, *args[1:]))
    module = {"resid_post": block, "attn_in": block.input_layernorm, "mlp_in": block.post_attention_layernorm}[site]
    return module.register_forward_hook(lambda m, a, out: out + add)


@pytest.mark.parametrize("site", STEERING_SITES)
def test_steered_pipeline_equals_hooked_hf_model(site, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    model = load_reference(path)
    torch.manual_seed(1)
    vectors = {1: torch.randn(64), 3: torch.randn(64)}  # two layers at once, on different stages
    coefficient = 1.5
    hooks = [_hook_hf(model, layer, site, v, coefficient) for layer, v in vectors.items()]
    generated, pad = hf_generate(model, PROMPTS, 5)
    for h in hooks:
        h.remove()
    plain, _ = hf_generate(model, PROMPTS, 5)
    assert not torch.equal(plain.sequences, generated.sequences)  # the edit changes generation
    edits = tuple(SteeringEdit(layer, site, v.numpy(), "all", coefficient) for layer, v in vectors.items())
    _, store = run_lens(path, tmp_path / "s.zarr", num_stages=2, max_new_tokens=5, steering=edits)
    for row in range(len(PROMPTS)):
        assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for layer in range(3):
            ref = hf_hidden_by_row(generated, pad, row, layer + 1)[:n]
            torch.testing.assert_close(acts[layer, :n], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", STEERING_SITES)
def test_an_edit_at_the_last_layer_equals_the_hooked_hf_models_logits(site, tiny_checkpoints, tmp_path):
    """An edit at layer n-1, the last stage's last layer (resid_post: right before the final
    norm and the head), two stages, micro-batches of 2 rows (7 and 3 tokens left-padded, then 5):
    the generated tokens are HF's hooked `generate`, and teacher-forced on the store's tokens the
    hooked HF model's logits are the stored scores (logits of score_ids at each generated step),
    its log-softmax the last layer's lens (k = vocab: the whole distribution) and its last
    hidden state the stored last-layer state, final-normed."""
    path = tiny_checkpoints["llama"]
    model = load_reference(path)  # fresh: the edit hook must run before HF's hidden-state recorders
    last, vocab = model.config.num_hidden_layers - 1, model.config.vocab_size
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))
    coefficient, new, score_ids = 1.5, 5, [40, 41, 97]
    _, store = run_lens(
        path, tmp_path / "s.zarr", num_stages=2, micro_batch_size=2, max_new_tokens=new, k=vocab,
        score_ids=tuple(score_ids), steering=(SteeringEdit(last, site, vector.numpy(), "all", coefficient),),
    )  # fmt: skip
    assert store.layers[-1] == last
    hook = _hook_hf(model, last, site, vector, coefficient)
    try:
        generated, pad = hf_generate(model, PROMPTS, new)
        steered = []
        for row in range(len(PROMPTS)):
            assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist(), row
            tokens = torch.as_tensor(store.tokens(row).tolist())[None]
            n = tokens.shape[1] - 1
            with torch.no_grad():
                out = model(tokens, output_hidden_states=True)
            logits = out.logits[0, :n].float()
            steered.append(logits)
            close = dict(atol=1e-4, rtol=0, msg=lambda m, r=row: f"row {r}: {m}")
            start = len(PROMPTS[row]) - 1  # step 0 scores the last prompt position
            torch.testing.assert_close(torch.from_numpy(store["scores"][row]), logits[start:, score_ids], **close)
            ids = torch.from_numpy(store["topk_ids"][row, last, 0, :n]).long()
            lp = torch.log_softmax(logits, -1).gather(1, ids)
            torch.testing.assert_close(torch.from_numpy(store["topk_logprobs"][row, last, 0, :n]), lp, **close)
            acts = torch.from_numpy(store.activations(row))[last, 0, :n]
            with torch.no_grad():
                normed = final_norm(model)(acts)
            torch.testing.assert_close(normed, out.hidden_states[-1][0, :n], atol=1e-5, rtol=0)
    finally:
        hook.remove()
    for row, logits in enumerate(steered):  # the edit moves the logits far past the tolerance
        with torch.no_grad():
            plain = model(torch.as_tensor(store.tokens(row).tolist())[None]).logits[0, : len(logits)]
        assert (plain - logits).abs().max() > 1e-1, row


def test_two_edits_at_one_site_add_up_like_two_hooks(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    model = load_reference(path)
    torch.manual_seed(2)
    v1, v2 = torch.randn(64), torch.randn(64)
    hooks = [_hook_hf(model, 2, "attn_in", v, c) for v, c in ((v1, 1.0), (v2, -2.0))]
    generated, pad = hf_generate(model, PROMPTS, 4)
    for h in hooks:
        h.remove()
    edits = (SteeringEdit(2, "attn_in", v1.numpy(), "all", 1.0), SteeringEdit(2, "attn_in", v2.numpy(), "all", -2.0))
    _, store = run_lens(path, tmp_path / "s.zarr", max_new_tokens=4, steering=edits)
    for row in range(len(PROMPTS)):
        assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = acts.shape[1] - 1
        torch.testing.assert_close(acts[2, :n], hf_hidden_by_row(generated, pad, row, 3)[:n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", STEERING_SITES)
def test_steered_bfloat16_pipeline_equals_hooked_bfloat16_hf_model(site, tiny_checkpoints, tmp_path):
    """In bfloat16 the edit (float32 multipliers) is cast to the model's dtype, as a hook adding a
    bfloat16 vector does; teacher-forced on the pipeline's own tokens, every layer agrees."""
    path = tiny_checkpoints["qwen3"]
    model = load_reference(path).to(torch.bfloat16)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(5))
    edit = (SteeringEdit(1, site, vector.numpy(), "all", 2.0),)
    _, store = run_lens(path, tmp_path / "s.zarr", max_new_tokens=4, dtype="bfloat16", steering=edit)
    _, plain = run_lens(path, tmp_path / "p.zarr", max_new_tokens=4, dtype="bfloat16")
    hook = _hook_hf(model, 1, site, vector.to(torch.bfloat16), 2.0)
    try:
        for row in range(len(PROMPTS)):
            tokens = torch.as_tensor(store.tokens(row))[None]
            with torch.no_grad():
                hidden = model(tokens, output_hidden_states=True).hidden_states
            acts = torch.from_numpy(store.activations(row))[:, 0]
            n = tokens.shape[1] - 1
            for layer in range(3):
                ours, ref = acts[layer, :n], hidden[layer + 1][0, :n].float()
                torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.02)
            unsteered = torch.from_numpy(plain.activations(row))[2, 0, : min(n, 3)]
            assert (unsteered - acts[2, : min(n, 3)]).abs().max() > 0.5  # the edit is far above the tolerance
    finally:
        hook.remove()


class _PositionedEdit:
    """`h += coefficient * vector` on a plain HF model's left-padded `generate` batch, only where
    an edit with `positions` applies: column j of row r is that row's position j - pad[r], and
    the prompt fills columns < prompt_cols (all: every column; last: the last prompt column;
    generated: the columns after the prompt; an int i: row positions >= i). The hook counts the
    columns it has seen, so `reset` it before each `generate`."""

    def __init__(self, model, layer: int, site: str, vector: torch.Tensor, positions, pad: torch.Tensor):
        self.vector, self.positions, self.pad = vector, positions, pad
        self.coefficient, self.cols, self.prompt_cols = 0.0, 0, 0
        block = model.model.layers[layer]
        if site == "resid_pre":
            self.handle = block.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            module = {"resid_post": block, "attn_in": block.input_layernorm, "mlp_in": block.post_attention_layernorm}
            self.handle = module[site].register_forward_hook(lambda m, args, out: self._edit(out))

    def reset(self, coefficient: float, prompt_cols: int) -> None:
        self.coefficient, self.cols, self.prompt_cols = coefficient, 0, prompt_cols

    def _pre(self, module, args, kwargs):
        if args:
            return (self._edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._edit(kwargs["hidden_states"])}

    def _edit(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [batch, new, d_model]
        cols = torch.arange(self.cols, self.cols + hidden.shape[1])[None, :]  # [1, new]
        self.cols += hidden.shape[1]
        if isinstance(self.positions, int):
            where = (cols - self.pad[:, None]) >= self.positions
        else:
            where = {
                "all": torch.ones_like(cols, dtype=torch.bool),
                "last": cols == self.prompt_cols - 1,
                "prompt": cols < self.prompt_cols,
                "generated": cols >= self.prompt_cols,
            }[self.positions].expand(len(self.pad), -1)
        return hidden + self.coefficient * where[:, :, None].to(hidden.dtype) * self.vector


@pytest.mark.parametrize(
    ("positions", "site", "layer"), [("all", "resid_post", 1), ("last", "resid_pre", 2), (2, "attn_in", 1),
                                     ("generated", "mlp_in", 2)],
)  # fmt: skip
def test_each_coefficient_of_a_sweep_equals_a_hooked_hf_model_at_its_positions(
    positions, site, layer, tiny_checkpoints, tmp_path
):
    """Row p*M + j of a sweep (edit coefficient e, row multiplier c_j) must be prompt p generated
    by HF with `e * c_j * v` added at the edit's positions only: tokens and every layer's hidden
    state. Micro-batches of 4 rows mix prompts of 7 and 3 tokens (left padding) and share the
    unsteered prefix; the multipliers are asymmetric, so a flipped sign or a wrong scale differs."""
    path = tiny_checkpoints["llama"]
    vector = 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(7))
    edit_coefficient, coefficients, new = 1.5, (-2.0, 0.5, 3.0), 5
    _, store = run_lens(
        path, tmp_path / "sweep.zarr", num_stages=2, max_new_tokens=new, micro_batch_size=4, coefficients=coefficients,
        steering=(SteeringEdit(layer, site, vector.numpy(), positions, edit_coefficient),),
    )  # fmt: skip
    assert store["coefficient"].tolist() == list(coefficients) * len(PROMPTS)
    model = load_reference(path)  # fresh: the edit hook must run before HF's hidden-state recorders
    ids, mask = left_pad(PROMPTS)
    pad = ids.shape[1] - mask.sum(1)
    hook = _PositionedEdit(model, layer, site, vector, positions, pad)
    references = []
    for c in coefficients:
        hook.reset(edit_coefficient * c, ids.shape[1])
        references.append(hf_generate(model, PROMPTS, new)[0])
    hook.handle.remove()
    last_layer = [torch.cat([s[-1] for s in ref.hidden_states], dim=1) for ref in references]
    assert min((a - b).abs().max() for a, b in itertools.combinations(last_layer, 2)) > 1e-2  # c matters
    n_layers = model.config.num_hidden_layers
    for row in range(len(PROMPTS) * len(coefficients)):
        prompt, j = divmod(row, len(coefficients))
        generated = references[j]
        assert store.tokens(row).tolist() == generated.sequences[prompt, int(pad[prompt]) :].tolist(), (row, j)
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for i in range(n_layers):
            ours = final_norm(model)(acts[i, :n]) if i == n_layers - 1 else acts[i, :n]
            ref = hf_hidden_by_row(generated, pad, prompt, i + 1)[:n]
            torch.testing.assert_close(
                ours, ref, atol=1e-5, rtol=0, msg=lambda m, r=row, i=i: f"row {r} layer {i}: {m}"
            )


# Rows with edits of their own: (prompt, ((vector, layer, site, positions, coefficient), ...)).
# Micro-batches of 3: the first repeats prompt 0 with edits from its last column at layers >= 2
# (shared prefix and shared first stage), the second mixes prompts and edits at every position,
# the third repeats prompt 2 with edits from position 1 and two edits at one hook.
ROW_EDITS = [
    (0, ()),
    (0, ((1, 2, "attn_in", "last", -2.0),)),
    (0, ((0, 3, "mlp_in", "generated", 0.5),)),
    (1, ((2, 3, "mlp_in", 2, 1.0), (0, 0, "resid_post", "generated", 0.5))),
    (1, ((1, 1, "resid_post", "prompt", 3.0),)),
    (2, ((0, 2, "resid_pre", "all", -1.0),)),
    (2, ((2, 1, "mlp_in", "last", 2.0), (1, 1, "mlp_in", "last", -1.0))),
    (2, ((2, 0, "resid_pre", 1, 1.0),)),
]


@pytest.mark.parametrize(
    ("executor", "share_prefix"), [("local", True), ("local", False), ("ray", True), ("ray", False)]
)
def test_rows_with_their_own_edits_equal_hf_hooked_with_each_rows_edits(
    executor, share_prefix, tiny_checkpoints, tmp_path, request
):
    """Every row runs its own vectors, layers, sites, positions and coefficients in shared
    micro-batches; each must equal its prompt generated alone by HF with only that row's edits
    hooked in: tokens and every layer's hidden state."""
    from actors.steering import RowEdit

    if executor == "ray":
        request.getfixturevalue("ray_cluster")  # this test process's cluster (conftest.py)
    path = tiny_checkpoints["llama"]
    table = 0.3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(11))
    rows = tuple((p, tuple(RowEdit(*e) for e in edits)) for p, edits in ROW_EDITS)
    new = 4
    summary, store = run_lens(
        path, tmp_path / "rows.zarr", executor=executor, num_stages=2, max_new_tokens=new, micro_batch_size=3,
        vectors=table.numpy(), rows=rows, share_prefix=share_prefix,
    )  # fmt: skip
    assert store["source"].tolist() == [p for p, _ in ROW_EDITS]
    model = load_reference(path)  # fresh: the edit hooks must run before HF's hidden-state recorders
    kinds = sorted({e[:4] for _, edits in ROW_EDITS for e in edits}, key=str)
    hooks = {k: _PositionedEdit(model, k[1], k[2], table[k[0]], k[3], torch.zeros(1, dtype=torch.long)) for k in kinds}
    n_layers = model.config.num_hidden_layers
    finals = []
    for row, (prompt, edits) in enumerate(ROW_EDITS):
        for kind, hook in hooks.items():  # this row's edits only: the others add 0
            hook.reset(sum(e[4] for e in edits if e[:4] == kind), len(PROMPTS[prompt]))
        generated, pad = hf_generate(model, [PROMPTS[prompt]], new)
        assert store.tokens(row).tolist() == generated.sequences[0].tolist(), row
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = acts.shape[1] - 1
        for i in range(n_layers):
            ours = final_norm(model)(acts[i, :n]) if i == n_layers - 1 else acts[i, :n]
            ref = hf_hidden_by_row(generated, pad, 0, i + 1)[:n]
            torch.testing.assert_close(
                ours, ref, atol=1e-5, rtol=0, msg=lambda m, r=row, i=i: f"row {r} layer {i}: {m}"
            )
        finals.append(acts[-1, : len(PROMPTS[prompt]) - 1])
    assert (finals[0] - finals[1]).abs().max() == 0  # an edit on the last prompt token leaves the rest alone
    assert (finals[5] - finals[6]).abs().max() > 1e-3  # rows of one prompt differ by their edits
    if share_prefix:
        tokens = [i["tokens"] for i in summary["stage_info"]]
        assert tokens[0] < tokens[1]  # the first stage ran prompt 0's shared columns once


def test_rows_of_only_the_first_prompts_store_those_rows_and_no_more(tiny_checkpoints, tmp_path):
    """`steering.rows` that run the first prompts in order but not every prompt (here prompts
    0 and 1 of 3, in micro-batches of 1 so that there are two): the store holds those two rows,
    complete, each HF's generation of its prompt alone; no rows at all are refused."""
    from actors.run_spec import SettingError

    path = tiny_checkpoints["llama"]
    rows = ((0, ()), (1, ()))
    summary, store = run_lens(path, tmp_path / "some.zarr", max_new_tokens=3, micro_batch_size=1, rows=rows)
    assert store.is_complete and store.verify() == [] and store["source"].tolist() == [0, 1]
    model = load_reference(path)
    for row in range(2):
        generated, _ = hf_generate(model, [PROMPTS[row]], 3)
        assert store.tokens(row).tolist() == generated.sequences[0].tolist(), row
    with pytest.raises(SettingError, match=r"prompts=\[\] is empty"):
        run_lens(path, tmp_path / "none.zarr", max_new_tokens=3, rows=())


def test_sweep_of_seven_coefficients_is_one_pass_equal_to_seven_passes(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["mistral"]
    v = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    coefficients = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    edit = (SteeringEdit(2, "mlp_in", v, "all", 1.0),)
    common = dict(max_new_tokens=1, score_ids=(40, 41), activations=None, num_stages=2, steering=edit)
    summary, swept = run_lens(
        path, tmp_path / "sweep.zarr", coefficients=coefficients, micro_batch_size=len(PROMPTS) * 7, **common
    )
    assert [info["forward_calls"] for info in summary["stage_info"]] == [1, 1]  # one pass through each stage
    propensity = swept["scores"][:, 0, 0] - swept["scores"][:, 0, 1]  # rows: prompt-major, coefficient-minor
    assert swept["coefficient"].tolist() == list(coefficients) * len(PROMPTS)
    for j, c in enumerate(coefficients):
        _, single = run_lens(path, tmp_path / f"c{j}.zarr", coefficients=(c,), **common)
        np.testing.assert_allclose(
            propensity[j :: len(coefficients)], single["scores"][:, 0, 0] - single["scores"][:, 0, 1], atol=1e-5
        )
    assert np.ptp(propensity[:7]) > 1e-3  # the coefficient matters


@pytest.mark.parametrize(("positions", "layer"), [("last", 1), (2, 1), ("generated", 1), ("all", 2), ("last", 2)])
def test_sweep_shares_the_unsteered_prefix_and_equals_the_unshared_sweep(positions, layer, tiny_checkpoints, tmp_path):
    """Edits that start at column c leave columns < c alike for every coefficient, and edits
    at layer L leave the stages before L alike: that work runs once per prompt and the stages
    replicate their caches and buffers. The store (lens on every layer, activations, generated
    tokens, scores) must equal the sweep computed row by row; micro-batches of 10 rows cut
    through a prompt's 7 coefficient rows. Two stages of the 4-layer model: layers 0-1, 2-3."""
    path = tiny_checkpoints["llama"]
    v = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    coefficients = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    common = dict(
        max_new_tokens=4, score_ids=(40, 41), num_stages=2, micro_batch_size=10, lens_window=2,
        steering=(SteeringEdit(layer, "resid_pre", v, positions, 2.0),), coefficients=coefficients,
    )  # fmt: skip
    shared_summary, shared = run_lens(path, tmp_path / "shared.zarr", **common)
    plain_summary, plain = run_lens(path, tmp_path / "plain.zarr", share_prefix=False, **common)
    assert shared_summary["stages"] == [[0, 2], [2, 4]]
    assert_stores_equal(shared, plain)
    np.testing.assert_allclose(shared["scores"], plain["scores"], atol=1e-5)
    assert shared["coefficient"].tolist() == plain["coefficient"].tolist()
    # prefix + rest of the prompt: one more call per micro-batch that repeats a prompt (the
    # third micro-batch holds one row, nothing to share); an edit at every position leaves no
    # prefix of columns, so no extra call
    sources = np.repeat(np.arange(len(PROMPTS)), len(coefficients))
    batches = sum(len(set(sources[i : i + 10])) < len(sources[i : i + 10]) for i in range(0, len(sources), 10))
    assert batches == 2
    calls = [i["forward_calls"] for i in shared_summary["stage_info"]]
    extra = 0 if positions == "all" else batches
    assert calls == [c + extra for c in (i["forward_calls"] for i in plain_summary["stage_info"])]
    # rows x columns each stage ran: the first stage runs the whole prompt once per prompt
    # when the edit is past it; columns before the edit run once per prompt on both
    ran, plain_ran = ([i["tokens"] for i in s["stage_info"]] for s in (shared_summary, plain_summary))
    assert plain_ran[0] == plain_ran[1]
    assert (ran[0] < ran[1]) == (layer == 2)
    assert (ran[1] < plain_ran[1]) == (positions != "all")
    propensity = shared["scores"][:7, :, 0] - shared["scores"][:7, :, 1]  # [coefficient, step]
    assert np.ptp(propensity, axis=0).max() > 1e-3  # the coefficient still matters
