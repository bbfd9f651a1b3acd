"""The corpus workload: a ragged corpus (the shared datasets' questions, interleaved) generated
greedily with EOS on at one batch size by distlens's continuous and static batching, each with
and without capture, and by HF `generate` batched at the same size (left padding, rows in corpus
order); every system once per round in a fresh process, the order rotating by one each round,
and each ratio taken within a round."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.bench.capture import order, ratios, spread
from pipelines.bench.meter import Meter
from pipelines.config import ConfigError

OURS = dict(system="distlens_corpus", executor="local", stages=2)
SYSTEMS = {
    "distlens_continuous": {**OURS, "batching": "continuous"},
    "distlens_continuous_nocapture": {**OURS, "batching": "continuous", "no_capture": True},
    "distlens_static": {**OURS, "batching": "static"},
    "distlens_static_nocapture": {**OURS, "batching": "static", "no_capture": True},
    "hf_generate_batched": {"system": "hf_generate_corpus"},
}
HF = "hf_generate_batched"
STATIC_OF = {"distlens_continuous": "distlens_static", "distlens_continuous_nocapture": "distlens_static_nocapture"}


def build_corpus(root: Path, n: int, path: Path) -> int:
    """The corpus at `path` (JSONL rows {"prompt", "dataset", "row"}): the `question` fields of
    the datasets in `root` (`*.jsonl`, by name), one from each in turn, read in place line by
    line, until `n` rows. Returns the rows written; fewer than `n` available is refused."""
    with contextlib.ExitStack() as stack:
        files = {f.stem: stack.enter_context(open(f)) for f in sorted(root.glob("*.jsonl"))}
        seen = dict.fromkeys(files, 0)
        rows = []
        while files and len(rows) < n:
            for name, f in list(files.items()):
                line = f.readline()
                if not line:
                    del files[name]
                    continue
                question = json.loads(line).get("question") if line.strip() else None
                seen[name] += 1
                if isinstance(question, str) and len(rows) < n:
                    rows.append({"prompt": question, "dataset": name, "row": seen[name] - 1})
    if len(rows) < n:
        raise ConfigError(
            f"corpus_prompts={n} is out of range: the datasets in {root} hold {len(rows)} questions; "
            "give fewer, or set data_root to a directory of more"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def tokenizer_and_ends(job: dict):
    """The model's tokenizer, its end-of-sequence ids (the job's `eos_token_ids` where it gives
    them) and its padding id."""
    from transformers import AutoConfig, AutoTokenizer

    from pipelines.prompts import special_ids

    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    eos, pad = special_ids(tokenizer, AutoConfig.from_pretrained(job["model_path"]))
    return tokenizer, tuple(job.get("eos_token_ids", eos)), pad


def distlens_corpus(job: dict) -> dict:
    """distlens on the job's `corpus` (read as a lens run reads `corpus.path`), `micro_batch_size`
    rows per micro-batch (one in flight: in one process the stages take turns), `batching`
    continuous or static, every layer's resid_post lens (none with `no_capture`), EOS on."""
    from actors.coordinator import Coordinator
    from actors.store import LensStore
    from pipelines.bench.systems import run_spec
    from pipelines.config import CorpusConf
    from pipelines.corpus import read_corpus
    from pipelines.prompts import encode_prompt

    tokenizer, eos, pad = tokenizer_and_ends(job)
    given = read_corpus(CorpusConf(path=job["corpus"]), lambda text: encode_prompt(tokenizer, text))
    spec = run_spec(job, job["micro_batch_size"], job["T"])
    g = spec.generation
    spec = replace(
        spec, corpus=given.rows,
        generation=replace(g, sampling=replace(g.sampling, eos_token_ids=eos, pad_token_id=pad), batching=job["batching"]),
    )  # fmt: skip
    with Meter() as m:
        summary = Coordinator(spec).run(given.token_ids, given.texts, stops=given.rows.stops())
    store = LensStore.open(spec.storage.path)
    starts, ends = store["prompt_lengths"], store["lengths"]
    generated = [store.tokens(i)[starts[i] : ends[i]].tolist() for i in range(len(given.token_ids))]
    return figures(generated, summary["generate_s"], m, summary)


@torch.no_grad()
def hf_generate_corpus(job: dict) -> dict:
    """HF `generate` on the job's `corpus` (its rows' prompts, encoded as distlens encodes them),
    `micro_batch_size` rows at a time in corpus order, left-padded, greedy, stopping at EOS."""
    from pipelines.bench.systems import load_hf
    from pipelines.prompts import encode_prompt

    tokenizer, eos, pad = tokenizer_and_ends(job)
    with open(job["corpus"]) as f:
        prompts = [encode_prompt(tokenizer, json.loads(line)["prompt"]) for line in f if line.strip()]
    model, b = load_hf(job), job["micro_batch_size"]
    model.generation_config.eos_token_id = list(eos) or None
    model.generation_config.pad_token_id = pad
    batches = []
    for i in range(0, len(prompts), b):
        rows = prompts[i : i + b]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        batches.append((ids, mask))
    generated = []
    with Meter() as m:
        for ids, mask in batches:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=job["T"], do_sample=False)
            generated += [until_eos(row, eos) for row in out[:, ids.shape[1] :].tolist()]
    return figures(generated, m.wall, m)


def until_eos(row: list[int], eos) -> list[int]:
    """A row's generated ids up to and including its first end-of-sequence id (HF pads after it)."""
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0] + 1] if ends else row


def figures(generated: list[list[int]], wall: float, m: Meter, summary: dict | None = None) -> dict:
    """One run's figures over `wall` seconds of generation: rows/s, generated tokens/s, every
    row's generated ids; distlens's row-steps, useful row-steps and slot occupancy."""
    tokens = sum(map(len, generated))
    out = {"rows": len(generated), "generated_tokens": tokens, "wall_s": wall, "rows_per_s": len(generated) / wall,
           "tokens_per_s": tokens / wall, "peak_rss": m.peak, "generated": generated}  # fmt: skip
    for key in ("row_steps", "useful_row_steps", "slot_occupancy") if summary else ():
        out[key] = summary[key]
    return out


def corpus_rows(cfg, measure, row, out_dir: Path, keep=None) -> list[dict]:
    """The workload's rows: the corpus built in `out_dir` (`corpus_prompts` rows), each system
    measured once per round over `corpus_rounds` rounds in turn; `measure(job)` is one
    measurement (a fresh process), `row(label, workload, T, runs)` a table row, `keep(rows)` gets
    the rows so far after every measurement."""
    from pipelines.datasets import dataset_root

    path = out_dir / "corpus.jsonl"
    build_corpus(dataset_root(cfg.data_root), cfg.corpus_prompts, path)
    job = {"corpus": str(path), "T": cfg.corpus_max_new_tokens, "micro_batch_size": cfg.corpus_batch,
           "layers": list(cfg.corpus_layers or [])}  # fmt: skip
    runs = {label: [] for label in SYSTEMS}
    for i in range(cfg.corpus_rounds):
        for label in order(list(SYSTEMS), i):
            runs[label].append(measure({**job, **SYSTEMS[label]}))
            got = runs[label][-1]
            shown = got.get("error") or f"{got['rows_per_s']:.2f} rows/s, {got['tokens_per_s']:.2f} tokens/s"
            print(f"{'corpus':>12} T={job['T']:<5} {label:<30} round {i + 1}: {shown}", flush=True)
            if keep:
                keep(summarise(job, runs, row))
    return summarise(job, runs, row)


def summarise(job: dict, runs: dict[str, list[dict]], row) -> list[dict]:
    """The rows of the rounds measured so far: medians over rounds, and each distlens system's
    rows/s over HF generate's (and continuous over static's) in the same round."""
    rows = []
    for label in [x for x in runs if runs[x]]:
        r = row(label, "corpus", job["T"], runs[label], batch=job["micro_batch_size"])
        if label.startswith("distlens"):
            r.update(spread("vs_hf_generate", ratios(runs, label, HF, "rows_per_s")))
        if label in STATIC_OF:
            r.update(spread("vs_static", ratios(runs, label, STATIC_OF[label], "rows_per_s")))
        if "rows_per_s" in r:
            r["note"] = note(r)
        rows.append(r)
    return rows


def note(r: dict) -> str:
    out = f"{r['rows']:.0f} rows, {r['generated_tokens']:.0f} generated; {r['rows_per_s']:.2f} rows/s"
    if "slot_occupancy" in r:
        out += f"; row-steps {r['row_steps']:.0f} (useful {r['useful_row_steps']:.0f}), occupancy {r['slot_occupancy']:.2f}"
    for name, what in (("vs_static", "static"), ("vs_hf_generate", "HF generate")):
        if name in r:
            out += f"; {r[name]:.2f}x {what} ({r[f'{name}_min']:.2f}-{r[f'{name}_max']:.2f}, per round)"
    return out
