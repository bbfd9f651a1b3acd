"""The README's notebook session, word for word, in a fresh interpreter (as a notebook kernel
starts), and what it returns against Hugging Face's own model: the Dataset's tokens and token
strings, and the steering vector against hidden states of the unsliced model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import torch
from driver import REPO

from actors.store import LensStore


def readme_session() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From a notebook") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    assert code.startswith("import distlens\n")
    return code


def test_readme_notebook_session_runs_word_for_word(smollm2, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", readme_session()], cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")},  # the installed package
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    store = LensStore.open(tmp_path / "runs" / "notebook" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    generated = str(store.group["generated_text"][0])
    assert generated and generated in result.stdout
    assert (tmp_path / "runs" / "sweep" / "view.html").stat().st_size > 10_000
    assert str(tmp_path / "runs" / "sweep" / "view.html").endswith(result.stdout.strip().splitlines()[-1])

    import distlens

    # the Dataset: the store's arrays, and token strings as the tokenizer decodes the ids
    ds = distlens.open(tmp_path / "runs" / "notebook")
    tokenizer = smollm2.tokenizer()
    n = int(store.group["lengths"][0])
    ids = store.tokens(0)
    assert list(ds.token.values[0, :n]) == [tokenizer.decode([int(i)]) for i in ids]
    np.testing.assert_array_equal(ds.topk_ids.values, store["topk_ids"])
    top1 = distlens.top1(ds, prompt=0)
    assert top1.shape == (30, n - 1)
    assert top1.values[-1, -1] == tokenizer.decode([int(store["topk_ids"][0, -1, 0, n - 2, 0])])

    # the vector: the mean over pairs of the difference of resid_pre of layer 12 at the last
    # token, from the unsliced HF model's hidden states (hidden_states[12] is layer 12's input)
    from transformers import AutoModelForCausalLM

    from pipelines.vectors import SteeringVector

    vec = SteeringVector.load(tmp_path / "distlens_runs" / "vector" / "vector_layer12.safetensors")
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    code = readme_session()
    pos = ["I love this. It is wonderful.", "What a happy, sunny day!"]
    neg = ["I hate this. It is terrible.", "What a sad, miserable day!"]
    assert all(t in code for t in pos + neg)

    def last(text):
        with torch.no_grad():
            out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return out.hidden_states[12][0, -1].double().numpy()

    want = np.mean([last(p) - last(q) for p, q in zip(pos, neg)], axis=0)
    np.testing.assert_allclose(vec.vector, want, atol=1e-4)
    assert (vec.layer, vec.site, vec.items) == (12, "resid_pre", 2)

    swept = distlens.open(tmp_path / "runs" / "sweep")
    assert swept.coefficient.values.tolist() == [0, 4, 8]
    texts = swept.generated_text.values.tolist()
    assert texts[1] != texts[0] or texts[2] != texts[0]  # the vector moves the text
