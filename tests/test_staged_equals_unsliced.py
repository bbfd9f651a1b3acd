"""Staged pipelines against a plain unsliced Hugging Face model, in-process (`local`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import (
    PROMPTS,
    assert_kl_to_final_matches_hf,
    hf_generate,
    hf_hidden_by_row,
    left_pad,
    lens_reference,
    run_lens,
)
from tiny_models import FAMILIES, final_norm, load_reference

NEW = 6


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    out = {}
    for family, path in tiny_checkpoints.items():
        model = load_reference(path)
        generated, pad = hf_generate(model, PROMPTS, NEW)
        out[family] = (model, generated, pad)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_every_layer_hidden_state_equals_unsliced(family, num_stages, tiny_checkpoints, references, tmp_path):
    """Two micro-batches in flight: the first holds left-padded rows of 7 and 3 tokens."""
    model, generated, pad = references[family]
    summary, store = run_lens(tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=num_stages, micro_batch_size=2)
    assert len(summary["stages"]) == num_stages
    n_layers = model.config.num_hidden_layers
    for row in range(len(PROMPTS)):
        assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(store.activations(row))[:, 0]  # [layer, position, d]
        n = acts.shape[1] - 1  # the final token is never fed back
        for layer in range(n_layers):
            ref = hf_hidden_by_row(generated, pad, row, layer + 1)[:n]
            ours = acts[layer, :n]
            if layer == n_layers - 1:  # HF's last hidden state is already normalised
                ours = final_norm(model)(ours)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_row_micro_batches_three_in_flight_equal_generate(family, tiny_checkpoints, references, tmp_path):
    """Three micro-batches of one row each, all in the pipeline at once: each keeps its own KV
    cache, lens buffers and store rows, so every row's tokens and every layer's hidden state
    are HF's for that row."""
    model, generated, pad = references[family]
    summary, store = run_lens(
        tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=3, micro_batch_size=1, micro_batches_in_flight=3
    )
    for info in summary["stage_info"]:
        assert [mb for mb, _, _ in info["timeline"][:3]] == [0, 1, 2]  # all three entered before any went on
    n_layers = model.config.num_hidden_layers
    for row in range(len(PROMPTS)):
        assert store.tokens(row).tolist() == generated.sequences[row, int(pad[row]) :].tolist()
        acts = torch.from_numpy(store.activations(row))[:, 0]  # [layer, position, d]
        n = acts.shape[1] - 1
        for layer in range(n_layers):
            ours = final_norm(model)(acts[layer, :n]) if layer == n_layers - 1 else acts[layer, :n]
            torch.testing.assert_close(ours, hf_hidden_by_row(generated, pad, row, layer + 1)[:n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_greedy_decoding_equals_generate(family, tiny_checkpoints, references, tmp_path):
    _, generated, pad = references[family]
    _, store = run_lens(tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=2)
    for row in range(len(PROMPTS)):
        expected = generated.sequences[row, int(pad[row]) :].tolist()
        assert store.tokens(row).tolist() == expected


def _full_logprobs(model, store, row):
    tokens = torch.tensor(store.tokens(row).tolist())[None]
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    return torch.log_softmax(out.logits[0].float(), -1), out.hidden_states


_lens_reference = lens_reference


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_lens_equals_model_logits(family, tiny_checkpoints, references, tmp_path):
    model = references[family][0]
    _, store = run_lens(tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=3, k=model.config.vocab_size)
    last = store.layers.index(model.config.num_hidden_layers - 1)
    for row in range(len(PROMPTS)):
        logprobs, _ = _full_logprobs(model, store, row)
        n = int(store.group["lengths"][row]) - 1
        ids = torch.from_numpy(store["topk_ids"][row, last, 0, :n]).long()
        ours = torch.from_numpy(store["topk_logprobs"][row, last, 0, :n])
        # k = vocab: the lens's whole distribution, which must be the model's own
        torch.testing.assert_close(ours, logprobs[:n].gather(1, ids), atol=1e-4, rtol=0)
        assert sorted(ids[0].tolist()) == list(range(model.config.vocab_size))


@pytest.mark.parametrize(("family", "num_stages"), [("llama", 1), ("llama", 2), ("llama", 3), ("gemma2", 2)])
def test_kl_to_final_equals_kl_from_the_unsliced_model(family, num_stages, tiny_checkpoints, references, tmp_path):
    """The final-normed states flow back from the last stage to every stage; each stage's
    KL(final || lens) of its layers equals the test's own from HF logits and hidden states, at
    every position, rows of different lengths in two micro-batches (Gemma 2: soft-capped)."""
    model = references[family][0]
    _, store = run_lens(tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=num_stages, micro_batch_size=2)
    assert assert_kl_to_final_matches_hf(model, store) > 0
    kl = store["kl_to_final"][:, :, 0]
    assert np.nanmax(np.abs(kl[:, -1])) < 1e-4 and np.nanmin(kl[:, 0]) > 1e-3  # last layer 0; the first is not


def test_norm_applied_twice_would_be_caught(tiny_checkpoints, references):
    """Guard: with the tiny models' random norm weights, normalising the last hidden state a
    second time (or forgetting Gemma's soft-cap) moves the lens far past the tests' tolerance."""
    for family in FAMILIES:
        model = references[family][0]
        norm = final_norm(model)
        assert not torch.allclose(norm.weight, torch.ones_like(norm.weight)), family
        tokens = torch.tensor([PROMPTS[0]])
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
            own = torch.log_softmax(out.logits[0].float(), -1)
            pre_norm = out.hidden_states[-1][0]  # HF's last hidden state: already normalised
            twice = _lens_reference(model, pre_norm)
        assert (twice - own).abs().max() > 1e-2, family
        if getattr(model.config, "final_logit_softcapping", None):
            uncapped = torch.log_softmax(model.lm_head(pre_norm).float(), -1)
            assert (uncapped - own).abs().max() > 1e-2, family


@pytest.mark.parametrize("family", FAMILIES)
def test_middle_layer_topk_target_and_entropy_are_exact(family, tiny_checkpoints, references, tmp_path):
    model = references[family][0]
    k = 7
    _, store = run_lens(tiny_checkpoints[family], tmp_path / "s.zarr", num_stages=2, k=k)
    mid = 1
    for row in range(len(PROMPTS)):
        tokens = store.tokens(row)
        n = len(tokens) - 1
        _, hidden = _full_logprobs(model, store, row)
        with torch.no_grad():
            lp = _lens_reference(model, hidden[mid + 1][0, :n])
        top = lp.topk(k, dim=-1)
        ours_lp = torch.from_numpy(store["topk_logprobs"][row, mid, 0, :n])
        torch.testing.assert_close(ours_lp, top.values, atol=1e-4, rtol=0)  # not renormalised over k
        assert (store["topk_ids"][row, mid, 0, :n] == top.indices.numpy()).all()
        targets = torch.tensor(tokens[1:].tolist())
        target_lp = lp.gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(
            torch.from_numpy(store["target_logprob"][row, mid, 0, :n]), target_lp, atol=1e-4, rtol=0
        )
        rank = (lp > target_lp[:, None]).sum(-1)
        assert (store["target_rank"][row, mid, 0, :n] == rank.numpy()).all()
        entropy = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(torch.from_numpy(store["entropy"][row, mid, 0, :n]), entropy, atol=1e-4, rtol=0)
        # nothing is written past the last fed position
        assert np.isnan(store["target_logprob"][row, mid, 0, n:]).all()


def test_per_row_eos_stops_only_that_row(tiny_checkpoints, references, tmp_path):
    model, generated, pad = references["llama"]
    eos = int(generated.sequences[0, -4])  # a token row 0 generates and rows 1 and 2 never do
    expected, pad = hf_generate(model, PROMPTS, NEW, eos=eos)
    _, store = run_lens(
        tiny_checkpoints["llama"],
        tmp_path / "s.zarr",
        num_stages=2,
        sampling=__import__("actors.sampling", fromlist=["SamplingSpec"]).SamplingSpec(
            eos_token_ids=(eos,), pad_token_id=0
        ),
    )
    lengths = store["lengths"]
    for row in range(len(PROMPTS)):
        hf_row = expected.sequences[row, int(pad[row]) :].tolist()
        if eos in hf_row[len(PROMPTS[row]) :]:
            hf_row = hf_row[: len(PROMPTS[row]) + hf_row[len(PROMPTS[row]) :].index(eos) + 1]
        assert store.tokens(row).tolist() == hf_row
    produced = lengths - np.array([len(p) for p in PROMPTS])
    assert produced[0] < NEW and produced[1:].tolist() == [NEW, NEW]  # row 0 stopped early, the others ran on


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny_checkpoints, tmp_path):
    from actors.sampling import SamplingSpec

    path = tiny_checkpoints["mistral"]
    runs = {}
    for name, temp, top_p, seed, stages in [
        ("a", 1.0, 0.9, 3, 1),
        ("b", 1.0, 0.9, 3, 3),
        ("c", 1.0, 0.9, 4, 1),
        ("nucleus_of_one", 1.0, 1e-6, 3, 2),
        ("greedy", 0.0, 1.0, 0, 2),
    ]:
        sampling = SamplingSpec(temperature=temp, top_p=top_p, seed=seed, pad_token_id=0)
        _, runs[name] = run_lens(
            path, tmp_path / f"{name}.zarr", num_stages=stages, sampling=sampling, max_new_tokens=12
        )
    tokens = {k: v["tokens"] for k, v in runs.items()}
    assert (tokens["a"] == tokens["b"]).all()  # same seed, any stage split
    assert (tokens["a"] != tokens["c"]).any()  # another seed
    assert (tokens["a"] != tokens["greedy"]).any()
    assert (tokens["nucleus_of_one"] == tokens["greedy"]).all()


def test_position_subset_captures_only_those_positions(tiny_checkpoints, tmp_path):
    _, store = run_lens(tiny_checkpoints["llama"], tmp_path / "s.zarr", positions=(0, 2, 8), activations=None)
    mask = store["lens_mask"]
    for row in range(len(PROMPTS)):
        last = int(store["lengths"][row]) - 1  # the lens exists at positions < length - 1
        assert np.flatnonzero(mask[row]).tolist() == [p for p in (0, 2, 8) if p < last]
    assert mask[0, 8] and not mask[1, 8]  # row 1 is too short for position 8
    _, gen = run_lens(tiny_checkpoints["llama"], tmp_path / "g.zarr", positions="generated", activations=None)
    for row, p in enumerate(PROMPTS):
        n = int(gen["lengths"][row])
        assert np.flatnonzero(gen["lens_mask"][row]).tolist() == list(range(len(p), n - 1))


def _tie_free(lp: torch.Tensor, k: int, gap: float = 1e-4) -> torch.Tensor:
    """[position] True where the top k+1 log-probs are each more than `gap` apart: the top-k
    ids (and the argmax) cannot swap by float noise there."""
    top = lp.topk(k + 1, dim=-1).values
    return (top[:, :-1] - top[:, 1:]).min(-1).values > gap


def test_1500_positions_of_two_rows_equal_one_teacher_forced_hf_forward(tiny_checkpoints, references, tmp_path):
    """Two rows of 4 and 9 prompt tokens (left-padded in one micro-batch: two micro-batches of one
    row cost 2.5 times the CPU), 1,496 greedy tokens each (no EOS stop), two stages, the default
    lens window (64) and the store's 512-position chunks: every position of both rows, across
    every window and chunk boundary. One HF forward over each row's stored tokens: each generated
    token is the argmax of HF's logits before it, and the lens of layers 0, 1 and the last (every
    field) is the test's own lm_head(final_norm(h))."""
    from actors.run_spec import CaptureSettings
    from actors.store import StoreLayout

    model = references["llama"][0]
    window, chunk, k = CaptureSettings().window, StoreLayout(0, 0, (), (), 0, 0).position_chunk, 10
    assert (window, chunk) == (64, 512)
    prompts, new = [[5, 6, 7, 8], [12, 13, 14, 15, 16, 17, 18, 19, 20]], 1496
    summary, store = run_lens(
        tiny_checkpoints["llama"], tmp_path / "s.zarr", prompts=prompts, max_new_tokens=new, activations=None,
        lens_window=window, micro_batch_size=2, num_stages=2, k=k, layers=(0, 1, 3),
    )  # fmt: skip
    assert store["lengths"].tolist() == [1500, 1505] and summary["positions"] == 3005
    assert store.group["topk_ids"].chunks[3] == chunk and store["tokens"].shape[1] == 1505
    n_layers = model.config.num_hidden_layers
    assert store.layers == [0, 1, n_layers - 1]
    checked = 0
    for row, prompt in enumerate(prompts):
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        n = tokens.shape[1] - 1  # the lens exists at every position but the last
        assert np.flatnonzero(store["lens_mask"][row]).tolist() == list(range(n))
        assert (store["topk_ids"][row, :, 0, :n] >= 0).all() and np.isnan(store["entropy"][row, :, 0, n:]).all()
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
        logits = out.logits[0, :n].float()
        final = torch.log_softmax(logits, -1)
        # greedy: every generated token is HF's argmax at the position before it (near-ties aside)
        gen = slice(len(prompt) - 1, n)
        decided = _tie_free(final[gen], 1)
        assert decided.float().mean() > 0.99
        expected = logits[gen].argmax(-1)
        assert torch.equal(tokens[0, len(prompt) :][decided], expected[decided]), row
        targets = tokens[0, 1:]
        for li, layer in enumerate(store.layers):
            last = layer == n_layers - 1
            lp = lens_reference(model, out.hidden_states[layer + 1][0, :n], normed=last)  # HF's last is normed

            def ours(name, li=li, row=row, n=n):
                return torch.from_numpy(store[name][row, li, 0, :n])

            where = f"row {row} layer {layer}"
            top = lp.topk(k, dim=-1)
            close = dict(atol=1e-4, rtol=0, msg=lambda m, w=where: f"{w}: {m}")
            torch.testing.assert_close(ours("topk_logprobs"), top.values, **close)
            clear = _tie_free(lp, k)
            assert clear.float().mean() > 0.95, where
            assert torch.equal(ours("topk_ids").long()[clear], top.indices[clear]), where
            target = lp.gather(1, targets[:, None])[:, 0]
            torch.testing.assert_close(ours("target_logprob"), target, **close)
            torch.testing.assert_close(ours("entropy"), -(lp.exp() * lp).sum(-1), **close)
            torch.testing.assert_close(ours("kl_to_final"), (final.exp() * (final - lp)).sum(-1), **close)
            rank = (lp > target[:, None]).sum(-1)
            untied = ((lp - target[:, None]).abs() > 1e-4).sum(-1) == lp.shape[-1] - 1  # no other near the target
            assert untied.float().mean() > 0.95, where
            assert torch.equal(ours("target_rank").long()[untied], rank[untied]), where
            if last:  # the last layer's lens is the model's own distribution
                torch.testing.assert_close(ours("topk_logprobs"), final.topk(k, dim=-1).values, **close)
            checked += n
    assert checked == 3 * (1499 + 1504)


def test_left_pad_matches_reference_layout():
    ids, mask = left_pad([[1, 2], [3]])
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


@torch.no_grad()
@pytest.mark.parametrize("threads", [2, 4, 8, 16])
def test_split_matrix_vector_products_are_bitwise_the_plain_ones(threads, monkeypatch):
    """Decoding-step products are spread over threads as feature blocks (actors/gemv.py): every
    output must be exactly F.linear's, for SmolLM2's and tiny models' shapes, the unembedding (a
    vocabulary the threads divide and a prime one they don't) and a transposed-layout input."""
    from actors import gemv

    monkeypatch.setattr(gemv, "_CHECKED", {})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (49157, 576), (32, 64), (128, 64)]
        for d_out, d_in in shapes:
            lin = torch.nn.Linear(d_in, d_out, bias=False)
            gemv.split_linears(torch.nn.Sequential(lin))
            for shape in ((1, d_in), (2, d_in), (4, d_in), (1, 1, d_in), (1, 3, d_in), (5, d_in)):
                for _ in range(2):  # the first call of a shape is the check, the second the split
                    x = torch.randn(shape) * 3
                    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight)), (d_out, d_in, shape)
            x = torch.randn(d_in, 1).T  # [1, d_in] with unit row stride: not split
            assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
        if threads == 2:  # SmolLM2's shapes split here (and were found equal), narrow ones don't
            assert gemv._CHECKED[(576, 576, 1, 2)] and gemv._CHECKED[(49152, 576, 4, 2)]
            assert gemv.split_parts(32) == 1 and gemv.split_parts(49157) == 1
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def test_split_that_differs_is_never_used(monkeypatch):
    """The first call of a shape compares the split with F.linear; one that differs is dropped."""
    from actors import gemv

    monkeypatch.setattr(gemv, "_CHECKED", {})
    split = gemv.gemv_split
    monkeypatch.setattr(gemv, "gemv_split", lambda x, w: split(x, w) + 1e-6)
    lin = torch.nn.Linear(576, 1536, bias=False)
    gemv.split_linears(torch.nn.Sequential(lin))
    for _ in range(3):
        x = torch.randn(1, 576)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    assert gemv._CHECKED == ({(1536, 576, 1, torch.get_num_threads()): False} if gemv.split_parts(1536) > 1 else {})


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_on_the_cpu_split_their_bias_free_linears(family, tiny_checkpoints):
    from transformers import AutoConfig

    from actors.gemv import SplitLinear, split_linears
    from actors.slicing import build_stage

    path = tiny_checkpoints[family]
    config = AutoConfig.from_pretrained(path)
    stage, _, _ = build_stage(path, config, 0, config.num_hidden_layers, torch.float32, torch.device("cpu"))
    linears = [m for m in stage.modules() if type(m) is torch.nn.Linear]
    assert split_linears(stage) == sum(m.bias is None for m in linears)
    if family not in ("gpt2", "gpt_neox"):  # GPT-2's Conv1D and NeoX's biased linears are never split
        assert any(isinstance(m, SplitLinear) for m in stage.modules())
    assert all(isinstance(m, SplitLinear) == (m.bias is None) for m in linears)
