"""`python -m pipelines.patch`: rows from a JSONL file, their interventions given as a user writes
them (a patch from another row, a patch from the activations an earlier lens run stored, a mean
ablation from a .npy file, a scale), in micro-batches of 2; patch.json's log-probs equal the
unsliced HF model hooked here with the same interventions."""

from __future__ import annotations

import json

import numpy as np
import torch
from driver import run_driver

from actors.store import LensStore
from tiny_models import decoder_layers, load_reference


def test_patch_rows_equal_the_hooked_unsliced_model(tiny_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    path = tiny_with_tokenizer
    lens = run_driver(
        "pipelines.lens", f"model.name={path}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=lens",
        "prompts=['The cat sat on the']", "generation.chat_template=false", "generation.max_new_tokens=2",
        "capture.activations=float32", "capture.components=[resid_post,mlp_out]", cwd=tmp_path,
    )  # fmt: skip
    assert lens.returncode == 0, lens.stderr[-2000:]
    store = tmp_path / "lens" / "lens.zarr"
    opened = LensStore.open(store)
    stored = np.asarray(opened.activations(0), np.float32)  # [layer, component, position, d]
    mlp_out = stored[opened.layers.index(1), opened.components.index("mlp_out")]
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(32).astype(np.float32)
    np.save(tmp_path / "mean.npy", mean)
    rows = [
        {"prompt": "The cat sat on the"},
        {"prompt": "The dog sat on the", "edits": [{"op": "patch", "layer": 0, "site": "resid_post", "positions": [1], "source": 0}]},
        {"prompt": "A dog sat on a", "edits": [{"op": "patch", "layer": 1, "site": "mlp_out", "positions": "prompt",
                                                "values": {"store": str(store), "row": 0}}]},
        {"prompt": "My dog", "edits": [{"op": "ablate", "layer": 1, "site": "resid_post", "values": str(tmp_path / "mean.npy")},
                                       {"op": "scale", "layer": 0, "site": "mlp_out", "positions": "last", "coefficient": 3.0}],
         "targets": [" floor"]},
    ]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "patch"
    result = run_driver(
        "pipelines.patch", f"model.name={path}", f"rows={tmp_path / 'rows.jsonl'}", "targets=[' mat',' the']",
        "cluster=inprocess", "cluster.micro_batch_size=2", f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((out / "patch.json").read_text())["rows"]

    tok = AutoTokenizer.from_pretrained(path)
    model = load_reference(path)
    layers = decoder_layers(model)
    seen, todo = {}, {}

    def hook(layer, site):
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            seen[(layer, site)] = h[0].clone()
            for fn in todo.get((layer, site), []):
                h = fn(h.clone())
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return post

    for i, block in enumerate(layers):
        block.register_forward_hook(hook(i, "resid_post"))
        block.mlp.register_forward_hook(hook(i, "mlp_out"))

    def lp(text):
        with torch.no_grad():
            return model(torch.tensor([tok(text).input_ids])).logits[0, -1].log_softmax(-1)

    clean = lp(rows[0]["prompt"])
    source = seen[(0, "resid_post")]

    def set_at(positions, values):
        def fn(h):
            h[0, positions] = values
            return h

        return fn

    want = [clean]
    todo = {(0, "resid_post"): [set_at([1], source[1])]}
    want.append(lp(rows[1]["prompt"]))
    n = len(tok(rows[2]["prompt"]).input_ids)
    todo = {(1, "mlp_out"): [set_at(list(range(n)), torch.tensor(mlp_out[:n]))]}
    want.append(lp(rows[2]["prompt"]))
    n = len(tok(rows[3]["prompt"]).input_ids)
    todo = {
        (1, "resid_post"): [set_at(list(range(n)), torch.tensor(mean))],
        (0, "mlp_out"): [lambda h: torch.cat([h[:, :-1], 3.0 * h[:, -1:]], 1)],
    }
    want.append(lp(rows[3]["prompt"]))
    todo = {}
    for r, (row, ref) in enumerate(zip(got, want)):
        assert row["next_token"] == int(ref.argmax()), r
        targets = [" mat", " the"] + rows[r].get("targets", [])
        assert set(row["logprobs"]) == set(targets), row["logprobs"]
        for text in targets:
            t = tok(text, add_special_tokens=False).input_ids[0]
            assert abs(row["logprobs"][text] - float(ref[t])) < 2e-5, (r, text)
        if r:
            assert abs(row["logprobs"][" mat"] - float(lp(rows[r]["prompt"])[tok(" mat").input_ids[0]])) > 1e-4
