"""What steering costs (pipelines/steering_cost.py), as a steering study reports it: the neutral
prompts' continuations are the unsliced HF model's own greedy ones, and every coefficient's mean
KL(unsteered || steered) and perplexity equal those computed here from the HF model hooked with
the study's vector at its layer and site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from driver import run_driver

from tiny_models import decoder_layers, load_reference

MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"
SMALL = ["data.max_train=4", "data.max_test=4", "steering.layers=[0,1]", "layer=1", "bootstrap=20"]


def test_steering_cost_equals_kl_and_perplexity_of_the_hooked_model(tiny_with_tokenizer, tmp_path):
    from pipelines.vectors import SteeringVector

    result = run_driver(
        "pipelines.steer", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", "dataset=survival-instinct",
        f"data.root={MWE}", f"storage.root={tmp_path}", "storage.run=s", "steering.cost_prompts=3",
        "steering.cost_tokens=5", "steering.site=resid_post", "cluster.micro_batch_size=4", *SMALL, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "steer" / "s"
    [summary] = json.loads((out / "results.json").read_text())
    cost = summary["cost"]
    assert (cost["layer"], cost["site"]) == (1, "resid_post") and cost["prompts"] == 3
    assert [row["coefficient"] for row in summary["cost_table"]] == summary["coefficients"]
    assert (out / "steering_cost.png").stat().st_size > 10_000
    recorded = json.loads((out / "steering_cost.json").read_text())
    vector = SteeringVector.load(next(out.glob("vector_layer1*.safetensors"))).vector

    model = load_reference(tiny_with_tokenizer)
    block = decoder_layers(model)[1]
    add = {"c": 0.0}

    def steer(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + add["c"] * torch.tensor(vector)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    block.register_forward_hook(steer)

    def logprobs(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].log_softmax(-1)

    for prompt, continuation in zip(recorded["prompts"], recorded["continuations"]):
        seq = list(prompt)
        for _ in continuation:  # the unsteered model's greedy continuation, full forwards
            seq.append(int(logprobs(seq)[-1].argmax()))
        assert seq[len(prompt) :] == continuation
    kls, ppls = [], []
    for c in cost["coefficients"]:
        kl, nll = [], []
        for prompt, continuation in zip(recorded["prompts"], recorded["continuations"]):
            ids, first = prompt + continuation, len(prompt) - 1
            add["c"] = 0.0
            p = logprobs(ids)[first : first + len(continuation)]
            add["c"] = c
            q = logprobs(ids)[first : first + len(continuation)]
            kl += (p.exp() * (p - q)).sum(-1).tolist()
            nll += (-q[torch.arange(len(continuation)), torch.tensor(continuation)]).tolist()
        kls.append(np.mean(kl))
        ppls.append(float(np.exp(np.mean(nll))))
    np.testing.assert_allclose(cost["kl"], kls, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cost["perplexity"], ppls, rtol=1e-4)
    assert cost["kl"][summary["coefficients"].index(0.0)] == 0.0
    assert max(cost["kl"]) > 1e-3  # the vector moves the distribution
    np.testing.assert_allclose(cost["unsteered_perplexity"], ppls[summary["coefficients"].index(0.0)], rtol=1e-4)
