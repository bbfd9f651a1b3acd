"""Independent references computed with plain, unsliced Hugging Face models."""

from __future__ import annotations

import numpy as np
import torch

from actors.coordinator import Coordinator
from actors.run_spec import RunSpec
from actors.sampling import SamplingSpec
from actors.store import LensStore

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    cols = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), cols), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, cols - len(p) :] = torch.tensor(p)
        mask[i, cols - len(p) :] = 1
    return ids, mask


def hf_generate(model, prompts, max_new_tokens: int, eos: int | None = None):
    """Greedy `model.generate` on the left-padded batch, with every step's hidden states."""
    ids, mask = left_pad(prompts)
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        output_hidden_states=True,
        return_dict_in_generate=True,
    ), ids.shape[1] - mask.sum(1)


def hf_hidden_by_row(generated, pad: torch.Tensor, row: int, layer: int) -> torch.Tensor:
    """Hidden states `[position, d_model]` of one row (pads dropped) at HF's `hidden_states[layer]`."""
    steps = [step[layer][row] for step in generated.hidden_states]
    return torch.cat(steps, dim=0)[int(pad[row]) :]


# Where run_lens's flat keyword arguments go in a RunSpec (group, field).
_GROUPS = {
    "model_path": ("model", "path"), "dtype": ("model", "dtype"),
    "store_path": ("storage", "path"), "existing": ("storage", "existing"),
    "shard_batches": ("storage", "shard_batches"),
    **{k: ("cluster", k) for k in (
        "executor", "num_stages", "tp_size", "device", "cpus_per_stage", "gpus_per_stage", "micro_batch_size",
        "micro_batches_in_flight", "placement_timeout_s", "max_restarts", "restart_timeout_s", "placement",
    )},
    **{k: ("capture", k) for k in (
        "layers", "components", "positions", "k", "activations", "kl_to_final", "lenses", "tuned_lens",
        "jacobian_lens",
    )},
    "lens_window": ("capture", "window"),
    "max_new_tokens": ("generation", "max_new_tokens"), "sampling": ("generation", "sampling"),
    "batching": ("generation", "batching"), "stop": ("generation", "stop"),
    "steering": ("steering", "edits"),
    **{k: ("steering", k) for k in ("coefficients", "vectors", "rows", "score_ids", "share_prefix")},
}  # fmt: skip


def run_spec(**flat) -> RunSpec:
    """A RunSpec from flat keywords (`num_stages=2, k=7, ...`), as the tests write them."""
    from actors import run_spec as rs

    kinds = {"model": rs.ModelSettings, "storage": rs.StorageSettings, "cluster": rs.ClusterSettings,
             "capture": rs.CaptureSettings, "generation": rs.GenerationSettings, "steering": rs.SteeringSettings}  # fmt: skip
    groups, top = {}, {}
    for key, value in flat.items():
        if key in _GROUPS:
            group, field = _GROUPS[key]
            groups.setdefault(group, {})[field] = value
        else:
            top[key] = value
    return RunSpec(**{name: kinds[name](**fields) for name, fields in groups.items()}, **top)


def run_lens(path, store_path, **overrides) -> tuple[dict, LensStore]:
    spec = dict(
        model_path=str(path),
        store_path=str(store_path),
        max_new_tokens=6,
        micro_batch_size=len(PROMPTS),
        activations="float32",
        sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0),
        lens_window=4,
        progress=False,
    )
    spec.update(overrides)
    prompts = spec.pop("prompts", PROMPTS)
    stops = spec.pop("stops", None)  # [prompt] a RowStop each (its own max_new_tokens and stop strings)
    executor = spec.pop("executor_pool", None)
    spec = run_spec(**spec)
    # The coordinator in this process, as every driver runs it (pipelines/session.py); its stages
    # in-process, Ray actors of the spec's cluster, or actors from a pool.
    summary = Coordinator(spec, executor).run(prompts, stops=stops)
    return summary, LensStore.open(store_path)


def lens_reference(model, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """log_softmax of the model's own head on a hidden state (final-normed here unless `normed`),
    with the family's final logit soft-cap where it has one (Gemma)."""
    from tiny_models import final_norm

    logits = model.lm_head(hidden if normed else final_norm(model)(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, -1)


def assert_kl_to_final_matches_hf(model, store: LensStore, atol: float = 1e-4) -> int:
    """Every captured layer's `kl_to_final` (resid_post) at every lens position of every row
    against KL(final || lens) computed here: the unsliced HF model run on the row's tokens, its
    own logits as the final distribution, its `hidden_states[layer + 1]` through its head as the
    lens (the last one is already normed: KL 0). Returns the number of values checked."""
    comp = list(store.group["component"][:]).index("resid_post")
    n_layers = model.config.num_hidden_layers
    checked = 0
    for row in range(store["lengths"].shape[0]):
        tokens = torch.tensor(store.tokens(row).tolist())[None]
        n = tokens.shape[1] - 1
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
            final = lens_reference(model, out.hidden_states[-1][0, :n], normed=True)
            for li, layer in enumerate(store.layers):
                lens = lens_reference(model, out.hidden_states[layer + 1][0, :n], normed=layer == n_layers - 1)
                expected = (final.exp() * (final - lens)).sum(-1)
                ours = torch.from_numpy(store["kl_to_final"][row, li, comp, :n])
                where = f"row {row} layer {layer}"
                torch.testing.assert_close(ours, expected, atol=atol, rtol=0, msg=lambda m, w=where: f"{w}: {m}")
                checked += n
    return checked


# The store attrs that determine its numbers, compared by `assert_stores_equal`: the schema, the
# layout (shapes, chunks, layers, lenses), the fingerprint of the determining config, the steering
# kinds and whether it is complete; of the nested records, what names the model, the tuned and
# Jacobian lenses and the config parts the fingerprint hashes (pipelines/lens.py). Left out, since
# equal runs differ there: the run summary (timings, pids, paths, stage info), `stages` (the
# placement), the Ray cluster, package versions and the git commit, and every path (model, tuned
# and Jacobian lens, storage).
DETERMINING_ATTRS = ("schema_version", "layout", "fingerprint", "edit_kinds", "complete")
DETERMINING_PARTS = {
    "model": ("name", "revision"),
    "tuned_lens": ("model", "revision", "tokens_seen"),
    "jacobian_lens": ("model", "revision", "sequences", "tokens", "positions", "skip"),
    "config": ("model", "capture", "generation", "prompts", "steer"),
}


def determining_attrs(store: LensStore) -> dict:
    """What of `store.attrs` determines its numbers (see DETERMINING_ATTRS)."""
    attrs = store.attrs
    out = {name: attrs.get(name) for name in DETERMINING_ATTRS}
    for record, parts in DETERMINING_PARTS.items():
        value = attrs.get(record)
        out[record] = None if value is None else {part: value.get(part) for part in parts}
    return out


def assert_stores_equal(a: LensStore, b: LensStore, atol: float = 1e-5) -> None:
    """Both stores hold the same arrays (names, shapes, dtypes, array attrs) and every one is
    equal: integers, booleans and texts exactly; floats to fp32 noise (processes with other
    thread counts sum in another order: seen up to 5e-7 relative on values near 20), NaN where
    the other has NaN. And the attrs that determine the numbers agree (`determining_attrs`)."""
    names_a, names_b = sorted(a.group.array_keys()), sorted(b.group.array_keys())
    assert names_a == names_b, (
        f"the stores hold different arrays: only in {a.path}: {sorted(set(names_a) - set(names_b))}, "
        f"only in {b.path}: {sorted(set(names_b) - set(names_a))}"
    )
    for name in names_a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name}: {x.dtype} {x.shape} against {y.dtype} {y.shape}"
        assert dict(a.group[name].attrs) == dict(b.group[name].attrs), f"{name}: array attrs differ"
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, atol=atol, rtol=1e-6, equal_nan=True, err_msg=name)
        else:  # integers, booleans, and the texts (prompt_text, generated_text)
            np.testing.assert_array_equal(x, y, err_msg=name)
    da, db = determining_attrs(a), determining_attrs(b)
    differ = {k: (da[k], db[k]) for k in da if da[k] != db[k]}
    assert not differ, f"attrs that determine the numbers differ ({a.path} against {b.path}): {differ}"


class HookedModel:
    """The unsliced HF model with the test's own hooks: each (layer, site) of the edits adds the
    current row's `c * v` where its positions apply (positions of the whole sequence), and every
    decoder layer's output is recorded after the edits (resid_post). An edit is (vector, layer,
    site, positions, coefficient); its vector an index into `table` [n, d] or the values."""

    def __init__(self, path, table=None):
        from tiny_models import decoder_layers, load_reference

        self.model, self.table = load_reference(path), table
        self.edits, self.prompt_len, self.captured = (), 0, {}
        layers = decoder_layers(self.model)
        for layer, block in enumerate(layers):
            block.register_forward_pre_hook(self._pre(layer), with_kwargs=True)
            for name, site in (("input_layernorm", "attn_in"), ("post_attention_layernorm", "mlp_in")):
                if hasattr(block, name):  # the Llama family's norms (the edits here are Llama's)
                    getattr(block, name).register_forward_hook(lambda m, a, out, i=layer, s=site: self._add(out, i, s))
            block.register_forward_hook(lambda m, a, out, i=layer: self._record(self._add(out, i, "resid_post"), i))

    def _pre(self, layer):
        def pre(module, args, kwargs):
            if args:
                return (self._add(args[0], layer, "resid_pre"), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._add(kwargs["hidden_states"], layer, "resid_pre")}

        return pre

    def _add(self, hidden, layer, site):  # hidden: [1, n, d]
        p = torch.arange(hidden.shape[1])
        n = self.prompt_len
        for v, e_layer, e_site, positions, c in self.edits:
            if (e_layer, e_site) != (layer, site):
                continue
            if isinstance(positions, int):
                where = p >= positions
            else:
                where = {"all": p >= 0, "prompt": p < n, "generated": p >= n, "last": p == n - 1}[positions]
            vector = self.table[v] if isinstance(v, int) else torch.as_tensor(np.asarray(v, np.float32))
            hidden = hidden + c * where[None, :, None].float() * vector
        return hidden

    def _record(self, out, layer):
        self.captured[layer] = out[0] if isinstance(out, tuple) else out
        return out

    @torch.no_grad()
    def alone(self, prompt, edits=(), budget=8, eos=None, stop=(), tokenizer=None):
        """Greedy generation of one row by full forwards (no cache, no batch-mates), ending as the
        run does: EOS (kept), its budget, or a stop string in the decoded text (the completing
        token kept). Returns (tokens, {layer: hidden [positions, d]})."""
        self.edits, self.prompt_len = edits, len(prompt)
        seq = list(prompt)
        for _ in range(budget):
            seq.append(int(self.model(torch.tensor([seq])).logits[0, -1].argmax()))
            text = tokenizer.decode(seq[len(prompt) :]) if stop else ""
            if seq[-1] == eos or any(s in text for s in stop):
                break
        self.model(torch.tensor([seq]))
        return seq, {layer: h[0] for layer, h in self.captured.items()}
