"""The tuned-lens training workload: translators trained on the pipeline's stages (two stages in
one process, one optimizer step per micro-batch) against a single-process plain torch loop
(the unsliced HF model's hidden states, autograd through the head) on the same sequences, same
steps and the same AdamW; tokens/s each, and the last step's per-layer KL of both (they train
the same thing, so the KLs agree)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def tune_sequences(job: dict) -> list[list[int]]:
    """`steps * batch` sequences of `tokens` ids (`question_sequences`)."""
    return question_sequences(job["model"], job.get("data_root"), job["tokens"], job["steps"] * job["batch"], "tune")


def question_sequences(model: str, data_root: str | None, tokens: int, need: int, workload: str) -> list[list[int]]:
    """`need` sequences of `tokens` ids: the shared datasets' questions, in file order, joined by
    the end-of-sequence id and cut (the text of the tune and jacobian workloads)."""
    from actors.checkpoint import resolve_checkpoint
    from pipelines.datasets import dataset_root
    from pipelines.prompts import special_ids
    from pipelines.tune import sequences

    checkpoint = resolve_checkpoint(model)
    tokenizer = checkpoint.tokenizer()
    eos, _ = special_ids(tokenizer, checkpoint.config())
    docs = []
    for path in sorted(dataset_root(data_root).glob("*.jsonl")):
        docs += [json.loads(line)["question"] for line in path.read_text().splitlines()[:50] if line.strip()]
    seqs = sequences(tokenizer, docs, tokens, eos[0] if eos else 0)
    if len(seqs) < need:
        raise ValueError(f"{workload} workload: {len(seqs)} sequences of {tokens} tokens, {need} needed")
    return seqs[:need]


def tune_distlens(job: dict) -> dict:
    """distlens: `stages` in-process stages train their layers' translators (constant lr)."""
    from actors.coordinator import Coordinator
    from actors.run_spec import (
        CaptureSettings,
        ClusterSettings,
        GenerationSettings,
        ModelSettings,
        RunSpec,
        StorageSettings,
    )
    from actors.sampling import SamplingSpec
    from actors.store import LensStore
    from actors.tuned_lens import TuneSpec
    from pipelines.bench.meter import Meter

    seqs = tune_sequences(job)
    scratch = Path(job["scratch"]) / "tune_distlens"
    tune = TuneSpec(steps=job["steps"], lr=job["lr"], warmup=0, schedule="constant", checkpoint_dir=str(scratch / "ck"))
    spec = RunSpec(
        model=ModelSettings(job["model_path"]),
        storage=StorageSettings(str(scratch / "train.zarr"), "overwrite"),
        cluster=ClusterSettings(executor="local", num_stages=job["stages"], micro_batch_size=job["batch"], max_restarts=0),
        capture=CaptureSettings(layers=None, components=("resid_post",), k=1, window=job["tokens"] + 1),
        generation=GenerationSettings(1, SamplingSpec(eos_token_ids=(), pad_token_id=0)),
        progress=False,
        tune=tune,
    )  # fmt: skip
    with Meter("cpu") as m:
        summary = Coordinator(spec).run(seqs)
    kl = LensStore.open(scratch / "train.zarr")["kl_to_final"][-job["batch"] :, :-1, 0, : job["tokens"]]
    tokens = len(seqs) * job["tokens"]
    return {
        "tokens_per_s": tokens / summary["generate_s"], "wall_s": summary["generate_s"], "peak_rss": m.peak,
        "last_step_kl": kl.mean(axis=(0, 2)).tolist(),
    }  # fmt: skip


def tune_plain(job: dict) -> dict:
    """The plain torch loop: one HF forward per batch (hidden states of every layer), then per
    layer h + A h + b through the final norm and head, KL(final || lens) by autograd, AdamW."""
    from transformers import AutoModelForCausalLM

    from pipelines.bench.meter import Meter

    seqs = tune_sequences(job)
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    weight = torch.zeros(n_layers - 1, d, d, requires_grad=True)
    bias = torch.zeros(n_layers - 1, d, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=job["lr"], weight_decay=0.0)
    norm, head = model.model.norm, model.lm_head
    batch = job["batch"]
    with Meter("cpu") as m:
        t0 = time.perf_counter()
        for step in range(job["steps"]):
            ids = torch.tensor(seqs[step * batch : (step + 1) * batch])
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            final = torch.log_softmax(out.logits.reshape(-1, out.logits.shape[-1]).float(), -1)
            opt.zero_grad()
            last = []
            for layer in range(n_layers - 1):
                h = out.hidden_states[layer + 1].reshape(-1, d)
                lens = torch.log_softmax(head(norm(h + h @ weight[layer].T + bias[layer])).float(), -1)
                kl = (final.exp() * (final - lens)).sum(-1)
                kl.mean().backward()
                last.append(float(kl.mean()))
            opt.step()
        wall = time.perf_counter() - t0
    tokens = len(seqs) * job["tokens"]
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "peak_rss": m.peak, "last_step_kl": last}


def tune_rows(cfg, bench) -> list[dict]:
    """Training tokens/s of distlens's stages against the plain loop, on the same sequences."""
    job = dict(model=cfg.model.name, data_root=cfg.data_root, steps=cfg.tune_steps, batch=cfg.tune_batch,
               tokens=cfg.tune_tokens, lr=1e-3)  # fmt: skip
    plain, plain_run = bench("tune_plain_torch", "tune", cfg.tune_steps, repeats=1, system="tune_plain", **job)
    ours, ours_run = bench("tune_distlens_2stage", "tune", cfg.tune_steps, repeats=1, system="tune_distlens",
                           stages=2, **job)  # fmt: skip
    if "error" not in plain_run and "error" not in ours_run:
        diff = max(abs(a - b) for a, b in zip(ours_run["last_step_kl"], plain_run["last_step_kl"]))
        ours.update(
            vs_plain_torch=ours_run["tokens_per_s"] / plain_run["tokens_per_s"], max_kl_difference=diff,
            tokens=cfg.tune_steps * cfg.tune_batch * cfg.tune_tokens,
        )  # fmt: skip
    return []
