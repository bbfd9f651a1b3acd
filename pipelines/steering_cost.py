"""What steering costs, beside how much it steers: for each steering vector and coefficient, on
neutral prompts, the mean KL(unsteered || steered) of the next-token distribution and the steered
model's perplexity on the unsteered model's own greedy continuations.

Both run on the study's stages (actors/tracing.py): the continuations come from greedy passes of
the unsteered rows; then one batched pass teacher-forces every (vector, coefficient, prompt) row
on prompt + continuation, its steering an `add` intervention at the vector's (layer, site) over
the study's positions (counted on the neutral prompt: `generated` are the continuation's). The last
stage compares each steered row's next-token distributions with its unsteered row's (KLReference,
KLTo), so no distribution leaves it. Both measures pool the positions that predict a continuation
token: KL is their mean, perplexity exp of their mean negative log-likelihood.

Neutral prompts: `steering.cost_corpus` (a text or JSONL file), else the shared datasets'
questions (the tuned lens's default corpus), a seeded shuffle, each rendered as the study renders
its prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError


def neutral_prompts(cfg, tokenizer) -> list[list[int]]:
    """`steering.cost_prompts` prompts' token ids."""
    from pipelines.datasets import dataset_root, documents
    from pipelines.prompts import encode_prompt

    s = cfg.steering
    if s.cost_corpus:
        texts = documents([s.cost_corpus], "steering.cost_corpus")
    else:
        files = sorted(dataset_root(None).glob("*.jsonl"))  # the shared datasets, whatever data.root is
        if not files:
            raise ConfigError("steering.cost_corpus is not set and the dataset root holds no .jsonl: give a file")
        texts = documents([str(f) for f in files], "steering.cost_corpus")
    random.Random(cfg.data.seed).shuffle(texts)
    return [encode_prompt(tokenizer, t, cfg.chat_template) for t in texts[: s.cost_prompts]]


def greedy(runner, prompts: list[list[int]], n_tokens: int, eos: tuple) -> list[list[int]]:
    """Each prompt's unsteered greedy continuation of up to `n_tokens` (ending at an EOS, kept)."""
    out = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(n_tokens):
        got = runner.run_rows([prompts[i] + out[i] for i in live], [()] * len(live))
        for i, token in zip(live, got.next_token.tolist()):
            out[i].append(int(token))
        live = [i for i in live if out[i][-1] not in eos]
        if not live:
            break
    return out


def _positions(positions, n: int):
    """The study's steering positions on a neutral prompt of `n` tokens + its continuation."""
    if isinstance(positions, int):
        return positions
    return {"all": "all", "prompt": tuple(range(n)), "generated": n, "last": (n - 1,)}[positions]


def steering_costs(runner, prompts, continuations, vectors: dict, coefficients, positions) -> dict:
    """{name: {"coefficients", "kl", "perplexity"}} for each SteeringVector of `vectors`."""
    from actors.interventions import Intervention, KLReference, KLTo

    rows, edits, cells = [], [], []
    for k, (p, c) in enumerate(zip(prompts, continuations)):
        rows.append(p + c)
        edits.append((KLReference(k),))
    for name, vec in vectors.items():
        for coefficient in coefficients:
            for k, (p, c) in enumerate(zip(prompts, continuations)):
                add = Intervention(
                    "add", vec.layer, vec.site, _positions(positions, len(p)), float(coefficient),
                    values=np.asarray(vec.vector, np.float32),
                )  # fmt: skip
                rows.append(p + c)
                edits.append((add, KLTo(k)))
                cells.append((name, float(coefficient), k))
    got = runner.run_rows(rows, edits)

    def scored(r: int, k: int):  # the positions that predict continuation tokens
        first = len(prompts[k]) - 1
        return got.token_logprob[r][first : first + len(continuations[k])], got.kl[r][
            first : first + len(continuations[k])
        ]

    unsteered_nll = -np.concatenate([scored(k, k)[0] for k in range(len(prompts))])
    pooled: dict = {}
    for r, (name, coefficient, k) in enumerate(cells, start=len(prompts)):
        lp, kl = scored(r, k)
        entry = pooled.setdefault((name, coefficient), ([], []))
        entry[0].append(-lp)
        entry[1].append(kl)
    out = {}
    for name, vec in vectors.items():
        kls, ppls = [], []
        for coefficient in coefficients:
            nll, kl = (np.concatenate(x) for x in pooled[(name, float(coefficient))])
            kls.append(float(kl.mean()))
            ppls.append(float(np.exp(nll.mean())))
        out[name] = {
            "coefficients": [float(c) for c in coefficients], "kl": kls, "perplexity": ppls,
            "unsteered_perplexity": float(np.exp(unsteered_nll.mean())), "layer": int(vec.layer), "site": vec.site,
            "prompts": len(prompts), "continuation_tokens": int(sum(len(c) for c in continuations)),
        }  # fmt: skip
    return out


def cost_table(result: dict) -> list[dict]:
    """A dataset's steerability beside its side effects, one row per coefficient."""
    cost = result["cost"]
    return [
        {"coefficient": c, "mean_propensity": m, "kl": kl, "perplexity": ppl}
        for c, m, kl, ppl in zip(cost["coefficients"], result["mean_propensity"], cost["kl"], cost["perplexity"])
    ]


def record(out_dir: Path, prompts, continuations) -> None:
    """steering_cost.json: the neutral prompts and continuations the costs were measured on."""
    body = {"prompts": prompts, "continuations": continuations}
    (out_dir / "steering_cost.json").write_text(json.dumps(body))


def plot_costs(results: list[dict], path: Path) -> Path:
    """Steering effect (mean propensity minus the unsteered one) against KL, one line per
    dataset, each point a coefficient (labelled with its sign); perplexity (log scale) beside it."""
    from pipelines.plots import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        table = cost_table(result)
        base = next((row["mean_propensity"] for row in table if row["coefficient"] == 0), table[0]["mean_propensity"])
        x = [row["kl"] for row in table]
        ax.plot(x, [row["mean_propensity"] - base for row in table], marker="o", label=result["dataset"])
        for row, xi in zip(table, x):
            ax.annotate(f"{row['coefficient']:+g}", (xi, row["mean_propensity"] - base), fontsize=7)
        bx.plot([row["coefficient"] for row in table], [row["perplexity"] for row in table], marker="o",
                label=result["dataset"])  # fmt: skip
    ax.set_xlabel("mean KL(unsteered || steered), next token, neutral prompts")
    ax.set_ylabel("steering effect: mean propensity - unsteered")
    ax.axhline(0, color="grey", lw=0.8)
    bx.set_xlabel("coefficient")
    bx.set_ylabel("perplexity of the unsteered greedy continuation")
    bx.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("steerability vs side effect", fontsize=9)
    bx.set_title("what steering costs: perplexity", fontsize=9)
    return save_figure(fig, path)
