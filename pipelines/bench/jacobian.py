"""The Jacobian-lens fitting workload: distlens's fitter (actors/jacobian_coordinator.py, as
`pipelines.tune lens=jacobian` runs it) on 2 Ray stage actors against the same estimator in plain
torch on the unsliced HF model in one process, on the same sequences, block size and skip, one
sequence per micro-batch in both. Sequences/s and output dimensions/s (sequences x d_model /
wall) each, and how far apart the two fits are (plain torch is the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.bench.meter import Meter

STAGES = 2


def jacobian_sequences(job: dict) -> list[list[int]]:
    """`sequences` sequences of `tokens` ids, from the text the tune workload trains on."""
    from pipelines.bench.tune import question_sequences

    return question_sequences(job["model"], job.get("data_root"), job["tokens"], job["sequences"], "jacobian")


def plain_jacobian_sums(model, seqs: list[list[int]], block: int, skip: int) -> dict[int, torch.Tensor]:
    """Per layer l, float64 [d_model, d_model] (row i: output dimension i): the sum over sequences
    and source positions p >= skip of sum over p' >= p of d h_L[p'] / d h_l[p]. Per sequence, one
    forward in the graph; per block of output dimensions, one backward carrying the block's
    one-hot cotangents at every position of h_L as a batch (number b: output dimension lo + b),
    reading the gradient at every layer's output: the algorithm distlens's stages run, in one
    process. `model`: a HF causal LM whose decoder is `model.model`."""
    decoder = model.model
    layers, d = decoder.layers, model.config.hidden_size
    sums = {la: torch.zeros(d, d, dtype=torch.float64) for la in range(len(layers))}
    for seq in seqs:
        outs: list[torch.Tensor] = []  # each layer's resid_post: [1, T, d]

        def record(module, args, out, outs=outs):
            outs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [layer.register_forward_hook(record) for layer in layers]
        try:
            with torch.enable_grad():
                embeds = decoder.embed_tokens(torch.tensor([seq])).requires_grad_(True)
                decoder(inputs_embeds=embeds, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        for lo in range(0, d, block):
            seed = torch.zeros(block, *outs[-1].shape)
            seed[torch.arange(block), 0, :, lo + torch.arange(block)] = 1.0
            grads = ()
            if len(outs) > 1:
                grads = torch.autograd.grad(outs[-1], outs[:-1], seed, retain_graph=True, is_grads_batched=True)
            for la, grad in enumerate([*grads, seed]):  # the last layer's: the seed itself (J = I)
                sums[la][lo : lo + block] += grad[:, 0, skip:].double().sum(1)
    return sums


def figures(job: dict, seqs: list[list[int]], fit, wall: float, memory: dict, system: str) -> dict:
    """A fit's figures; the fit itself (float64 sums) goes to a file in the job's scratch folder."""
    from actors.jacobian_lens import save_fit

    path = save_fit(Path(job["scratch"]) / f"{system}.safetensors", fit, {"block": job["block"]}, torch.float64)
    n = len(seqs)
    return {
        "sequences_per_s": n / wall, "output_dims_per_s": n * fit.d_model / wall, "wall_s": wall, **memory,
        "sequences": seqs, "fit_file": str(path), "positions": fit.positions,
    }  # fmt: skip


def jacobian_plain(job: dict) -> dict:
    """Plain torch: `plain_jacobian_sums` on the unsliced model, timed after loading."""
    from transformers import AutoModelForCausalLM

    from actors.jacobian_lens import JacobianFit

    seqs = jacobian_sequences(job)
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with Meter("cpu") as m:
        sums = plain_jacobian_sums(model, seqs, job["block"], job["skip"])
    fit = JacobianFit(
        model=job["model"], d_model=model.config.hidden_size, skip=job["skip"], sums=sums,
        positions=sum(max(0, len(s) - job["skip"]) for s in seqs), sequences=len(seqs), tokens=sum(map(len, seqs)),
    )  # fmt: skip
    return figures(job, seqs, fit, m.wall, {"peak_rss": m.peak, "largest_process_rss": m.peak}, "jacobian_plain")


def jacobian_distlens(job: dict) -> dict:
    """distlens: the JacobianCoordinator over `stages` Ray stage actors, timed after the stages
    have loaded their layers; peak RSS of the driver and every stage process."""
    import ray

    from actors.checkpoint import resolve_checkpoint
    from actors.executor import RayExecutor
    from actors.jacobian_coordinator import JacobianCoordinator
    from actors.jacobian_fit import FitSpec
    from pipelines.bench.systems import start_ray

    seqs = jacobian_sequences(job)
    start_ray(job["stages"])
    try:
        coordinator = JacobianCoordinator(
            job["model_path"], resolve_checkpoint(job["model_path"]).config(), job["stages"],
            FitSpec(job["block"], job["skip"]), RayExecutor(max_restarts=0), model=job["model"],
        )  # fmt: skip
        try:
            with Meter("cpu") as m:
                fit = coordinator.fit(seqs, 1)
            stage_peaks = [info["peak_rss_bytes"] for info in coordinator.stages.info()]
        finally:
            coordinator.close()
    finally:
        ray.shutdown()
    memory = {"peak_rss": m.peak + sum(stage_peaks), "largest_process_rss": max([m.peak, *stage_peaks])}
    return figures(job, seqs, fit, m.wall, memory, "jacobian_distlens")


def fit_difference(ours: str, reference: str) -> float:
    """max over layers of max |J_ours - J_reference| / max |J_reference|."""
    from actors.jacobian_lens import load_fit

    a, b = load_fit(ours, where="jacobian workload"), load_fit(reference, where="jacobian workload")
    worst = 0.0
    for la, ref in b.sums.items():
        ref = ref.double() / b.positions
        worst = max(worst, float((a.sums[la].double() / a.positions - ref).abs().max() / ref.abs().max()))
    return worst


def jacobian_rows(cfg, bench) -> list[dict]:
    """Fit throughput of distlens's stages against plain torch, on the same sequences; the rows
    go to `bench`'s list, with the ratio and the fits' difference on distlens's."""
    job = dict(model=cfg.model.name, data_root=cfg.data_root, sequences=cfg.jacobian_sequences,
               tokens=cfg.jacobian_tokens, block=cfg.jacobian_block, skip=cfg.jacobian_skip)  # fmt: skip
    n = cfg.jacobian_sequences
    what = f"{n} sequences of {cfg.jacobian_tokens} tokens, block {cfg.jacobian_block}, skip {cfg.jacobian_skip}"
    plain, plain_run = bench("jacobian_plain_torch", "jacobian", n, repeats=1, system="jacobian_plain", **job)
    ours, ours_run = bench(f"jacobian_distlens_ray_{STAGES}stage", "jacobian", n, repeats=1,
                           system="jacobian_distlens", executor="ray", stages=STAGES, **job)  # fmt: skip
    for r in (plain, ours):
        if "sequences_per_s" in r:
            r["note"] = f"{what}; {r['sequences_per_s']:.3f} sequences/s, {r['output_dims_per_s']:.0f} output dims/s"
    if "error" not in plain_run and "error" not in ours_run:
        ours.update(
            vs_plain_torch=ours_run["sequences_per_s"] / plain_run["sequences_per_s"],
            max_rel_difference=fit_difference(ours_run["fit_file"], plain_run["fit_file"]), fitted=what,
        )  # fmt: skip
        ours["note"] += f"; fit differs from plain torch's by {ours['max_rel_difference']:.1e} of its scale"
    return []
