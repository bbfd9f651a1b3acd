"""Continuous batching: rows that end at different steps (EOS, stop strings, their own
max_new_tokens) leave their micro-batch at once and waiting rows take their slots. Each row must
equal, row by row, the unsliced HF model generating that row alone (tokens, every layer's hidden
state, the lens), computed here with the test's own greedy loop and hooks; sampled rows must
equal the same run with micro_batch_size=1 (each row its own generator)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from actors.run_spec import RowStop
from actors.sampling import SamplingSpec
from actors.store import LensStore
from reference import HookedModel, assert_kl_to_final_matches_hf, assert_stores_equal, run_lens
from tiny_models import final_norm

# Nine prompts of 1 to 9 tokens: more rows than the 2 x 2 slots in flight, so slots are refilled.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43, 44, 45, 46, 47, 48],
    [50, 51, 52, 53], [60, 61, 62, 63, 64, 65], [70], [80, 81, 82, 83, 84],
]  # fmt: skip
MAX_NEW = 8
# Per-row edits (vector, layer, site, positions, coefficient); rows without edits share the run.
ROW_EDITS = [
    (), ((0, 1, "resid_post", "all", 1.5),), (), ((1, 2, "attn_in", "generated", -2.0),), (),
    ((0, 1, "resid_post", 2, 1.0), (1, 3, "mlp_in", "prompt", 0.5)), (), ((1, 0, "resid_pre", "last", 2.0),), (),
]  # fmt: skip
TABLE = 0.4 * torch.randn(2, 64, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def llama_with_tokenizer(tiny_checkpoints, tmp_path_factory):
    """The tiny Llama with a word-level tokenizer of its 256 ids (`<i>`), so stop strings decode."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("cb") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], path)
    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(256)}, unk_token="<0>"))
    words.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stage_pool(ray_cluster):
    from actors.executor import RayExecutor

    pool = RayExecutor(cpus_per_stage=1, persistent=True)
    yield pool
    pool.close()


def _plan(hooked, tokenizer, steered: bool):
    """Each row's edits, and stop conditions chosen from the rows' free greedy runs so rows end at
    different steps: an EOS id that row 0 emits at its 4th step, stop strings completed at
    rows 2 (one token) and 4 (two tokens), budgets of 1, 3 and 5 for rows 5, 7 and 8."""
    edits = [e if steered else () for e in ROW_EDITS]
    free = [hooked.alone(p, e)[0][len(p) :] for p, e in zip(PROMPTS, edits)]
    eos = free[0][3]
    stops = [RowStop() for _ in PROMPTS]
    stops[2] = RowStop(stop=(f"<{free[2][1]}>",))
    stops[4] = RowStop(stop=(f"<{free[4][2]}> <{free[4][3]}>", "<never>"))
    for row, budget in ((5, 1), (7, 3), (8, 5)):
        stops[row] = RowStop(max_new_tokens=budget)
    return edits, eos, stops


def _rows(edits):
    from actors.steering import RowEdit

    return tuple((i, tuple(RowEdit(*e) for e in row)) for i, row in enumerate(edits))


def _run(path, store, edits, eos, stops, **kw):
    steering = dict(vectors=TABLE.numpy(), rows=_rows(edits)) if any(edits) else {}
    settings = dict(
        prompts=PROMPTS, stops=stops, num_stages=2, micro_batch_size=2, micro_batches_in_flight=2,
        max_new_tokens=MAX_NEW, sampling=SamplingSpec(eos_token_ids=(eos,), pad_token_id=0), batching="continuous",
    )  # fmt: skip
    return run_lens(path, store, **{**settings, **steering, **kw})


LENS = ("topk_ids", "topk_logprobs", "target_logprob", "entropy", "kl_to_final")


def _assert_row_equals_hf(store, row, hooked, tokens, hidden):
    """The stored row against HF alone: tokens, each layer's resid_post and its lens (top-k
    log-probs, target log-prob, entropy, KL to the final layer; top-k ids where tie-free)."""
    model = hooked.model
    arrays = {name: store.group[name][row] for name in LENS}  # [layer, component, position, ...]
    assert store.tokens(row).tolist() == tokens, row
    n = len(tokens) - 1
    acts = torch.from_numpy(store.activations(row))[:, 0, :n]  # [layer, position, d]
    final = torch.log_softmax(model.lm_head(final_norm(model)(hidden[len(hidden) - 1][:n])), -1)
    target = torch.tensor(tokens[1:])
    for layer in range(len(hidden)):
        where = f"row {row} layer {layer}"
        torch.testing.assert_close(
            acts[layer], hidden[layer][:n], atol=1e-5, rtol=0, msg=lambda m, w=where: f"{w}: {m}"
        )
        lp = torch.log_softmax(model.lm_head(final_norm(model)(hidden[layer][:n])), -1)
        top = lp.topk(arrays["topk_ids"].shape[-1], dim=-1)
        expected = {
            "topk_logprobs": top.values,
            "target_logprob": lp.gather(1, target[:, None])[:, 0],
            "entropy": -(lp.exp() * lp).sum(-1),
            "kl_to_final": (final.exp() * (final - lp)).sum(-1),
        }
        for name, value in expected.items():
            ours = torch.from_numpy(np.asarray(arrays[name][layer, 0, :n]))
            torch.testing.assert_close(ours, value, atol=1e-4, rtol=0, msg=lambda m, w=f"{where} {name}": f"{w}: {m}")
        gaps = top.values[:, :-1] - top.values[:, 1:]
        tie_free = (gaps.min(-1).values > 1e-4).numpy()
        ids = arrays["topk_ids"][layer, 0, :n]
        np.testing.assert_array_equal(ids[tie_free], top.indices.numpy()[tie_free], err_msg=where)


@pytest.mark.parametrize(("executor", "steered"), [("local", False), ("local", True), ("ray", False), ("ray", True)])
def test_rows_ending_at_different_steps_equal_hf_generating_each_alone(
    executor, steered, llama_with_tokenizer, tmp_path, request
):
    path = llama_with_tokenizer
    hooked = HookedModel(path, TABLE)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    edits, eos, stops = _plan(hooked, tok, steered)
    pool = {"executor": "ray", "executor_pool": request.getfixturevalue("stage_pool")} if executor == "ray" else {}
    summary, store = _run(path, tmp_path / "c.zarr", edits, eos, stops, **pool)
    lengths = []
    for row, prompt in enumerate(PROMPTS):
        s = stops[row]
        tokens, hidden = hooked.alone(prompt, edits[row], s.max_new_tokens or MAX_NEW, eos, s.stop or (), tok)
        _assert_row_equals_hf(store, row, hooked, tokens, hidden)
        lengths.append(len(tokens) - len(prompt))
        assert store["generated_text"][row] == tok.decode(tokens[len(prompt) :], skip_special_tokens=True)
    assert len(set(lengths)) >= 4, lengths  # rows really end at different steps
    assert lengths[2] == 2 and lengths[4] == 4 and lengths[5] == 1 and lengths[7] == 3
    # Every computed row-step was a live row's: slots never carry a finished row.
    assert summary["row_steps"] == summary["useful_row_steps"] == sum(lengths)
    assert summary["batching"] == "continuous"


def test_continuous_store_equals_static_store_and_wastes_no_row_steps(llama_with_tokenizer, tmp_path):
    """The old static path (kept for benchmarks) honours the same per-row stops and writes the
    same store; it computes finished rows' slots, continuous batching does not."""
    path = llama_with_tokenizer
    from transformers import AutoTokenizer

    edits, eos, stops = _plan(HookedModel(path, TABLE), AutoTokenizer.from_pretrained(path), True)
    cont_summary, cont = _run(path, tmp_path / "c.zarr", edits, eos, stops)
    static_summary, static = _run(path, tmp_path / "s.zarr", edits, eos, stops, batching="static")
    assert_stores_equal(cont, static)
    assert cont_summary["row_steps"] == cont_summary["useful_row_steps"]
    assert static_summary["row_steps"] > static_summary["useful_row_steps"] == cont_summary["useful_row_steps"]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sampled_rows_equal_the_same_run_one_row_at_a_time(executor, llama_with_tokenizer, tmp_path, request):
    """Each row samples from its own generator (run seed + row index): batch-mates and slot
    refills never move its draws, so micro_batch_size=2 equals micro_batch_size=1 row by row."""
    path = llama_with_tokenizer
    from transformers import AutoTokenizer

    edits, eos, stops = _plan(HookedModel(path, TABLE), AutoTokenizer.from_pretrained(path), True)
    sampling = SamplingSpec(temperature=1.0, top_p=0.95, seed=3, eos_token_ids=(eos,), pad_token_id=0)
    pool = {"executor": "ray", "executor_pool": request.getfixturevalue("stage_pool")} if executor == "ray" else {}
    _, batched = _run(path, tmp_path / "b.zarr", edits, eos, stops, sampling=sampling, **pool)
    _, alone = _run(path, tmp_path / "a.zarr", edits, eos, stops, sampling=sampling, micro_batch_size=1)
    _, greedy = _run(path, tmp_path / "g.zarr", edits, eos, stops)
    assert (batched["tokens"] != greedy["tokens"]).any()  # it did sample
    for name in ("tokens", "lengths", "topk_ids", "generated_text"):
        np.testing.assert_array_equal(batched[name], alone[name], err_msg=name)
    for name in ("topk_logprobs", "entropy", "kl_to_final", "activations"):
        np.testing.assert_allclose(batched[name], alone[name], atol=1e-5, rtol=0, equal_nan=True, err_msg=name)


def test_sliding_window_family_equals_hf_alone(tiny_checkpoints, tmp_path):
    """Gemma 2 (local layers of window 4, soft-capped logits): a lane keeps every column and the
    mask applies the window, so rows spliced at any column equal HF alone; and its KL to the
    final layer equals the HF model's."""
    path = tiny_checkpoints["gemma2"]
    hooked = HookedModel(path, TABLE)
    model = hooked.model
    eos = hooked.alone(PROMPTS[0])[0][len(PROMPTS[0]) + 2]
    stops = [RowStop(max_new_tokens=b) for b in (8, 2, 6, 1, 8, 3, 5, 7, 4)]
    summary, store = _run(path, tmp_path / "g.zarr", [()] * len(PROMPTS), eos, stops)
    for row, prompt in enumerate(PROMPTS):
        tokens, hidden = hooked.alone(prompt, (), stops[row].max_new_tokens, eos)
        assert store.tokens(row).tolist() == tokens, row
        acts = torch.from_numpy(store.activations(row))[:, 0]
        n = len(tokens) - 1
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(acts[layer, :n], hidden[layer][:n], atol=1e-5, rtol=0)
    assert assert_kl_to_final_matches_hf(model, store) > 0
    assert summary["row_steps"] == summary["useful_row_steps"]


def test_bad_batching_settings_are_refused(llama_with_tokenizer, tiny_checkpoints, tmp_path):
    from actors.run_spec import SettingError

    with pytest.raises(SettingError, match=r"generation.batching='sideways' is not valid"):
        _run(llama_with_tokenizer, tmp_path / "a.zarr", [()] * len(PROMPTS), 2, None, batching="sideways")
    with pytest.raises(SettingError, match=r"generation.stop: stop strings need a tokenizer"):
        _run(tiny_checkpoints["llama"], tmp_path / "b.zarr", [()] * len(PROMPTS), 2, None, stop=("<5>",))
    with pytest.raises(SettingError, match=r"max_new_tokens=0 is out of range"):
        _run(llama_with_tokenizer, tmp_path / "c.zarr", [()] * len(PROMPTS), 2, [RowStop(max_new_tokens=0)] * 9)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_tensor_parallel_lanes_equal_one_rank(llama_with_tokenizer, tmp_path, ray_cluster):
    """tp_size=2 (two Ray ranks, AutoTP, a vocab-sharded lens head): the ranks evict, prefill
    and splice the same rows in step; tokens equal tp_size=1's, floats to fp32 noise."""
    path = llama_with_tokenizer
    from transformers import AutoTokenizer

    edits, eos, stops = _plan(HookedModel(path, TABLE), AutoTokenizer.from_pretrained(path), True)
    _, tp1 = _run(path, tmp_path / "tp1.zarr", edits, eos, stops, num_stages=1)
    summary, tp2 = _run(path, tmp_path / "tp2.zarr", edits, eos, stops, num_stages=1, tp_size=2, executor="ray")
    assert len(summary["stage_info"]) == 2
    for name in ("tokens", "lengths", "lens_mask"):
        np.testing.assert_array_equal(tp2[name], tp1[name], err_msg=name)
    for name in ("topk_logprobs", "entropy", "target_logprob", "kl_to_final", "activations"):
        np.testing.assert_allclose(tp2[name], tp1[name], atol=1e-5, rtol=1e-5, equal_nan=True, err_msg=name)


@pytest.mark.parametrize(
    ("family", "positions", "components"),
    [("gpt2", "all", ("resid_post", "attn_out")), ("qwen3_moe", "generated", ("resid_post", "mlp_out")),
     ("gemma3_text", (0, 2, 8), ("resid_mid", "attn_in")), ("olmo2", "last", ("resid_post",)),
     ("gpt_neox", "prompt", ("resid_post", "mlp_in"))],
)  # fmt: skip
def test_every_family_and_capture_choice_writes_the_static_store(
    family, positions, components, tiny_checkpoints, tmp_path
):
    """Learned positions (GPT-2), experts, local/global layers, parallel residuals, every
    capture-position kind and several components: continuous batching writes, array for array,
    the store of the static path (itself tested against HF), rows ending by EOS and budgets."""
    path = tiny_checkpoints[family]
    eos = HookedModel(path, TABLE).alone(PROMPTS[1])[0][len(PROMPTS[1]) + 1]
    stops = [RowStop(max_new_tokens=b) for b in (8, 2, 6, 1, 8, 3, 5, 7, 4)]
    kw = dict(positions=positions, components=components, kl_to_final=True)
    _, cont = _run(path, tmp_path / "c.zarr", [()] * len(PROMPTS), eos, stops, **kw)
    _, static = _run(path, tmp_path / "s.zarr", [()] * len(PROMPTS), eos, stops, batching="static", **kw)
    assert_stores_equal(cont, static)


def test_stage_actor_killed_mid_run_reruns_the_rows_in_flight(ray_cluster, llama_with_tokenizer, tmp_path):
    """SIGKILL stage 1's process once lane 1 has made 3 steps (rows have ended and been
    refilled by then): Ray restarts it, the rows in flight run again from their first step, and
    the store equals an uninterrupted run's, each store batch written once."""
    import os
    import signal
    from collections import Counter

    from actors.coordinator import Coordinator
    from reference import run_spec

    class KillStage(Coordinator):
        killed = None

        def stepped(self, lane, steps):
            if self.killed is None and (lane, steps) == (1, 3):
                self.killed = self.stages.pid(1)
                os.kill(self.killed, signal.SIGKILL)

    path = llama_with_tokenizer
    from transformers import AutoTokenizer

    edits, eos, stops = _plan(HookedModel(path, TABLE), AutoTokenizer.from_pretrained(path), False)
    _, reference = _run(path, tmp_path / "reference.zarr", edits, eos, stops)
    spec = run_spec(
        model_path=str(path), store_path=str(tmp_path / "killed.zarr"), executor="ray", max_restarts=2,
        num_stages=2, micro_batch_size=2, micro_batches_in_flight=2, max_new_tokens=MAX_NEW, batching="continuous",
        activations="float32", sampling=SamplingSpec(eos_token_ids=(eos,), pad_token_id=0), lens_window=4,
        progress=False,
    )  # fmt: skip
    coordinator = KillStage(spec)
    summary = coordinator.run(PROMPTS, stops=stops)
    assert coordinator.killed is not None and summary["stage_restarts"] == 1
    killed = LensStore.open(tmp_path / "killed.zarr")
    assert killed.is_complete and killed.verify() == []
    assert_stores_equal(killed, reference)
    done = Counter(r["batch"] for r in killed.write_log() if r["event"] == "done")
    assert sorted(done) == list(range(5)) and set(done.values()) == {1}
    # the progress count: rows that had ended but ran again after the kill are not counted twice
    written = [line for line in (tmp_path / "run.log").read_text().splitlines() if " written: rows " in line]
    assert f"; rows {len(PROMPTS)}/{len(PROMPTS)} done" in written[-1], written[-1]


def test_tuned_lens_and_scores_write_the_static_store(tiny_checkpoints, tmp_path):
    """The tuned lens (random translators; the static path's tuned arrays are tested against HF
    in test_tuned_lens.py) and per-step scores of chosen tokens, with rows ending at different
    steps: continuous batching writes the static path's store."""
    from actors.tuned_lens import Translators, save_translators

    path = tiny_checkpoints["llama"]
    translators = Translators((0, 1, 2), 64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        translators.weight.copy_(0.5 * torch.randn(3, 64, 64, generator=g) / 8)
        translators.bias.copy_(0.5 * torch.randn(3, 64, generator=g))
    save_translators(tmp_path / "t.safetensors", translators, {"model": "tiny"})
    eos = HookedModel(path, TABLE).alone(PROMPTS[0])[0][len(PROMPTS[0]) + 2]
    stops = [RowStop(max_new_tokens=b) for b in (8, 2, 6, 1, 8, 3, 5, 7, 4)]
    kw = dict(lenses=("logit", "tuned"), tuned_lens=str(tmp_path / "t.safetensors"), score_ids=(40, 41), k=4)
    _, cont = _run(path, tmp_path / "c.zarr", [()] * len(PROMPTS), eos, stops, **kw)
    _, static = _run(path, tmp_path / "s.zarr", [()] * len(PROMPTS), eos, stops, batching="static", **kw)
    assert_stores_equal(cont, static)
    assert (cont["tuned_topk_ids"] >= 0).any() and np.isfinite(cont["scores"]).any()
