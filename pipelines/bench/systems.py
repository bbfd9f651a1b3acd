"""One runner per measured system, shared by the CPU suite (each run in a fresh process by
`worker`) and the GPU path (in its own process): Hugging Face `generate`, the paper's naive
baseline, distlens, and the exact lens's own floor.

A runner takes a job (a dict: `model_path`, `prompt` token ids, `prompts` per batch, `T` tokens
to generate, the system's options; `device`, `dtype` and `warmup` where the GPU path sets them)
and returns its figures: `tokens_per_s`, `wall_s`, peak memory (`Meter.figures`) and the
system's own (lens share, bytes per row, a lens fingerprint for the like-for-like checks)."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.bench.meter import Meter

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_hf(job: dict):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[job.get("dtype", "float32")]
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=dtype).to(job.get("device", "cpu")).eval()
    model.generation_config.eos_token_id = None  # every system generates exactly T tokens, no EOS stop
    return model


def prompt_ids(job: dict) -> torch.Tensor:
    """[prompts, prompt_len]: the job's prompt repeated once per prompt of the batch."""
    return torch.tensor([job["prompt"]] * job.get("prompts", 1), device=job.get("device", "cpu"))


def free(device: str) -> None:
    """What one measurement leaves behind, released before the next (in one process)."""
    from actors.lens import release_scratch

    release_scratch()  # the lens's reused logits buffer: no measurement may start holding it
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def hf_generate(job: dict) -> dict:
    """The engine's speed of light: HF generate with its KV cache, nothing captured."""
    model, ids = load_hf(job), prompt_ids(job)
    mask = torch.ones_like(ids)
    if job.get("warmup"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with Meter(job.get("device", "cpu")) as m:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=job["T"], do_sample=False)
    new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens_per_s": new / m.wall, "wall_s": m.wall, **m.figures(capture=True)}


@torch.no_grad()
def baseline_steps(model, ids: torch.Tensor, steps: int, capture: bool = True, lens_times: list | None = None):
    """The paper's naive loop: every new token re-runs the full prefix with no KV cache; with
    `capture`, every layer's output at the new position goes through norm + lm_head over the
    full vocabulary and the full softmaxes are kept (on the model's device). Returns the grown
    ids and the kept softmaxes, one [prompts, layers, vocab] per step (left as the loop keeps
    them: stacking them would be the harness's copy, not the baseline's memory). `lens_times`
    (CPU only: nothing is synchronised) gets each step's lens seconds."""
    norm, head = model.model.norm, model.lm_head
    kept = []
    for _ in range(steps):
        out = model(ids, output_hidden_states=True, use_cache=False)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
        if not capture:  # the same loop without the lens: its memory is the reference
            continue
        started = time.perf_counter()
        layers = out.hidden_states[1:]
        # HF's last entry is already normalised: project it directly.
        probs = [torch.softmax(head(norm(h[:, -1])), -1) for h in layers[:-1]]
        probs.append(torch.softmax(head(layers[-1][:, -1]), -1))
        kept.append(torch.stack(probs, 1))  # [prompts, layers, vocab], kept for the trajectory
        if lens_times is not None:
            lens_times.append(time.perf_counter() - started)
    return ids, kept


def top1_of(kept: list[torch.Tensor]) -> dict:
    """The first prompt's top-1 ids and log-probs [layers, steps] from the kept softmaxes."""
    best = [probs[0].max(-1) for probs in kept]  # per step: (values, ids) over [layers, vocab]
    top1 = torch.stack([b.indices for b in best], 1)
    p = torch.stack([b.values for b in best], 1)
    return {"top1": top1.cpu().tolist(), "top1_logprob": torch.log(p.float()).cpu().tolist()}


def paper_baseline(job: dict) -> dict:
    """The paper's naive baseline, as its original code did it (`baseline_steps`); with
    `no_capture`, the same loop without the lens."""
    device = job.get("device", "cpu")
    model, ids = load_hf(job), prompt_ids(job)
    capture = not job.get("no_capture")
    if job.get("warmup"):
        baseline_steps(model, ids, 2, capture)
    lens_times = [] if device == "cpu" else None
    with Meter(device) as m:
        ids, kept = baseline_steps(model, ids, job["T"], capture, lens_times)
    out = {"tokens_per_s": job["T"] * ids.shape[0] / m.wall, "wall_s": m.wall, **m.figures(capture)}
    if capture:
        out.update(tokens=ids[0].tolist(), **top1_of(kept))
        if lens_times is not None:
            out["lens_share"] = sum(lens_times) / m.wall
    return out


@torch.no_grad()
def lens_floor(job: dict) -> dict:
    """What the exact all-layer lens alone costs on this machine: distlens's own lens
    (`LogitLens.summarise`, the model's real norm and unembedding) over one window of every
    layer (64 positions x L layers), per (position, layer) row; and the bare fp32 GEMM rate.
    Nothing that computes an exact lens can beat L x this per position."""
    from actors.lens import LogitLens

    model = load_hf(job)
    layers = model.config.num_hidden_layers
    lens = LogitLens(model.model.norm, model.lm_head)
    rows = 64 * layers
    hidden = torch.randn(rows, model.config.hidden_size) * 4
    targets = torch.randint(0, model.config.vocab_size, (rows,))
    lens.summarise(hidden, targets, 10)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lens.summarise(hidden, targets, 10)
        times.append(time.perf_counter() - t0)
    weight = model.lm_head.weight
    block = hidden[:256]
    block @ weight.T
    t0 = time.perf_counter()
    for _ in range(3):
        block @ weight.T
    gemm = (time.perf_counter() - t0) / 3
    return {
        "lens_ms_per_row": float(np.median(times)) / rows * 1e3, "layers": layers, "wall_s": float(np.median(times)),
        "gemm_gflops": 2 * 256 * weight.shape[0] * weight.shape[1] / gemm / 1e9,
    }  # fmt: skip


def start_ray(stages: int) -> None:
    """A Ray cluster of this process's own for `stages` stage actors (one CPU each) and the driver."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(
        address="local",  # a cluster of its own, never one `ray start` left up
        num_cpus=max(2, stages + 1),
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}},
        log_to_driver=False,
    )


def distlens(job: dict) -> dict:
    """distlens: the staged pipeline (`executor`, `stages`), every layer's `resid_post` lens
    (or the job's `layers` and `components`; none with `no_capture`) at k=10, with its KL to the
    final layer unless `kl_to_final` is false, written to Zarr;
    with a `vector`, steered at `steer_layer` for each of the job's `coefficients`."""
    from actors.coordinator import Coordinator
    from actors.store import LensStore

    device = job.get("device", "cpu")
    if job["executor"] == "ray":
        start_ray(job["stages"])
    prompts = job.get("prompt_list") or [job["prompt"]] * job.get("prompts", 1)
    if job.get("warmup"):  # kernels and allocator; its stages' weights are gone before the measured run
        Coordinator(run_spec(job, len(prompts), 8)).run(prompts)
        free(device)
    spec = run_spec(job, len(prompts), job["T"])
    with Meter(device) as m:
        summary = Coordinator(spec).run(prompts)
    store_path = Path(spec.storage.path)
    store = LensStore.open(store_path)
    stage_peaks = [info["peak_rss_bytes"] for info in summary["stage_info"]]
    in_process = job["executor"] == "local"
    if device == "cuda":
        memory = m.figures()
    elif in_process:
        memory = {"peak_rss": m.peak, "largest_process_rss": m.peak, "capture_rss": m.peak - m.start}
    else:  # the driver and every stage actor
        memory = {"peak_rss": m.peak + sum(stage_peaks), "largest_process_rss": max([m.peak, *stage_peaks]),
                  "capture_rss": None}  # fmt: skip
    out = {
        "tokens_per_s": summary["tokens_per_s"], "wall_s": summary["generate_s"], **memory,
        "forward_calls": [info["forward_calls"] for info in summary["stage_info"]],
        "positions": summary["positions"],
        "bytes_written": sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file()),
        **({} if job.get("no_capture") else lens_figures(summary["stage_info"], summary["generate_s"], in_process)),
        **store_figures(store),
    }  # fmt: skip
    if not job.get("no_capture"):
        top1 = store["topk_ids"][0, :, 0, : job["T"] + len(prompts[0]) - 1, 0]
        out["top1"] = top1.tolist()
        out["top1_logprob"] = store["topk_logprobs"][0, :, 0, : top1.shape[1], 0].tolist()
        out["last_top2_logprob"] = store["topk_logprobs"][0, -1, 0, : top1.shape[1], 1].tolist()
        out["tokens"] = store.tokens(0).tolist()
    if "scores" in store.group:
        out["scores"] = store["scores"][:, 0].tolist()  # [rows, choice] at the answer position
    return out


def run_spec(job: dict, prompts: int, tokens: int):
    """The coordinator's run settings for a distlens job: a fresh store under the job's scratch
    directory, one micro-batch holding every prompt (times every coefficient of a sweep)."""
    from actors.run_spec import (
        CaptureSettings,
        ClusterSettings,
        GenerationSettings,
        ModelSettings,
        RunSpec,
        SteeringSettings,
        StorageSettings,
    )  # fmt: skip
    from actors.sampling import SamplingSpec

    steering = ()
    if job.get("vector") is not None:
        from actors.steering import SteeringEdit

        where = job.get("steer_positions", "all")
        steering = (SteeringEdit(job["steer_layer"], "resid_pre", np.asarray(job["vector"], np.float32), where),)
    layers = () if job.get("no_capture") else (tuple(job["layers"]) if job.get("layers") else None)
    return RunSpec(
        model=ModelSettings(job["model_path"], job.get("dtype", "float32")),
        storage=StorageSettings(str(Path(tempfile.mkdtemp(dir=job.get("scratch"))) / "lens.zarr")),
        cluster=ClusterSettings(
            executor=job["executor"], num_stages=job["stages"], device=job.get("device", "cpu"),
            micro_batch_size=prompts * len(job.get("coefficients") or [1]), micro_batches_in_flight=1,
        ),
        capture=CaptureSettings(
            layers=layers, components=tuple(job.get("components", ["resid_post"])), k=10, window=job.get("window", 64),
            kl_to_final=job.get("kl_to_final", True),
        ),
        generation=GenerationSettings(tokens, SamplingSpec(eos_token_ids=(), pad_token_id=0)),
        steering=SteeringSettings(steering, job.get("coefficients"), tuple(job.get("score_ids", ()))),
        progress=False,
    )  # fmt: skip


def lens_figures(stage_info: list[dict], wall: float, in_process: bool) -> dict:
    """Time the stages spent in the lens. In one process (the local executor) stages run one
    after another, so the share is of the generation's wall time; Ray stages run side by side,
    so there it is the share of the stages' own compute (forward + lens, summed). One rank per
    stage counts: tensor-parallel ranks each run the same lens together."""
    ranks = [info for info in stage_info if info.get("tp_rank", 0) == 0]
    lens = sum(info.get("lens_s", 0.0) for info in ranks)
    compute = lens + sum(info.get("busy_s", 0.0) for info in ranks)
    return {"lens_s": lens, "lens_share": lens / max(wall if in_process else compute, 1e-9)}


def store_figures(store) -> dict:
    """Bytes on disk per (position x layer x component) row of the lens fields (their chunks,
    not their zarr.json metadata), and the codec's compression: the arrays' in-memory size
    (every position of the layout, the last one too, which has no lens) over those bytes.
    Nothing captured: no figures."""
    from actors.vocabulary import LENS_FIELDS

    names = [name for name in LENS_FIELDS if name in store.group]
    if not names or not store.group[names[0]].size:
        return {}
    _, layers, components, _ = store.group["entropy"].shape  # [prompts, layers, components, positions]
    rows = layers * components * int(np.asarray(store.group["lens_mask"][:]).sum())  # where a lens exists
    written = sum(
        f.stat().st_size
        for name in names
        for f in (store.path / name).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )
    logical = sum(store.group[name].nbytes for name in names)
    return {"bytes_per_row": written / rows, "compression": logical / written, "lens_layers": layers,
            "lens_components": components}  # fmt: skip


RUNNERS = {
    "hf_generate": hf_generate,
    "paper_baseline": paper_baseline,
    "lens_floor": lens_floor,
    "distlens": distlens,
}
