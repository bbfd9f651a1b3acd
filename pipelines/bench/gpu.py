"""`python -m pipelines.bench.gpu --out DIR`: the GPU path of the benchmark, with no Ray and no
network. Architecture-faithful random-weight models (weight values do not change speed) are
built from public configs, saved as safetensors, and measured in this one process by the
suite's own runners (`systems`), each after a warm-up:

- Hugging Face `generate` with its KV cache (the speed of light);
- distlens's in-process executor with and without every layer's lens (k=10);
- the paper's baseline (no KV cache, every layer projected over the full vocabulary at every
  step, softmaxes kept), with and without its lens, at `--baseline-tokens` (it grows
  quadratically), and its like-for-like agreement with distlens on those positions.

Peak memory is torch's allocator peak per measurement on a GPU (the process's peak RSS on a
CPU, where `--device cpu --shapes tiny` is the smoke run CI keeps working). Capture memory is
a system's peak with capture less its peak without, at the baseline's T (on a GPU only).
Writes `bench_gpu.json`."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipelines.bench.agreement import agreement
from pipelines.bench.systems import DTYPES, distlens, free, hf_generate, paper_baseline

SHAPES = {  # public configs of the released models, and a tiny one for the CPU smoke run
    "qwen3-4b-shaped": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "llama-3.1-8b-shaped": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512),
}  # fmt: skip
KEPT = ("lens_s", "lens_share", "bytes_per_row", "compression", "lens_layers", "lens_components")
TRAJECTORY = ("tokens", "top1", "top1_logprob")  # for the like-for-like check; not written


def build(shape: str, root: Path, device: str, dtype: torch.dtype) -> tuple[Path, float]:
    """Saves a random-weight model of `shape`; returns its path and its weights' GiB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    path = root / shape
    model.save_pretrained(path)
    del model
    free(device)
    return path, weights


def measured(runner, job: dict) -> dict:
    """One runner's row: T, tokens/s, peak GiB (the allocator's on a GPU, RSS on a CPU), its
    lens figures and the trajectory for the agreement check."""
    got = runner(job)
    free(job["device"])
    peak = got["peak_gpu"] if "peak_gpu" in got else got["peak_rss"]
    row = {"T": job["T"], "tokens_per_s": got["tokens_per_s"], "peak_gib": peak / 2**30}
    return row | {key: got[key] for key in (*KEPT, *TRAJECTORY) if key in got}


def ratios(rows: list[dict], baseline_t: int, device: str) -> dict:
    """distlens (capture) against the baseline at the baseline's T; capture memory as in the CPU
    table (each system's peak with capture less its peak without), on a GPU only (a CPU
    process's RSS here is mostly the runtime's own)."""
    by = {r["system"]: r for r in rows if "error" not in r}
    ours, base = by.get(f"distlens_inprocess_capture_T{baseline_t}"), by.get("paper_baseline")
    if not ours or not base:
        return {}
    out = {"T": baseline_t, "throughput_vs_baseline": ours["tokens_per_s"] / base["tokens_per_s"]}
    ours_off, base_off = by.get(f"distlens_inprocess_nocapture_T{baseline_t}"), by.get("paper_baseline_nocapture")
    if device == "cuda" and ours_off and base_off:
        ours_capture = ours["peak_gib"] - ours_off["peak_gib"]
        base_capture = base["peak_gib"] - base_off["peak_gib"]
        out["capture_gib"] = {"distlens": ours_capture, "paper_baseline": base_capture}
        if ours_capture > 0:
            out["capture_memory_lower_by"] = base_capture / ours_capture
    return out


def measure_shape(
    results: dict, shape: str, batch: int, path: Path, prompt: list, args, device: str, dtype: str, tmp: Path
) -> None:
    """Every system on one saved model at one batch size; appends its rows and ratios to `results`."""
    tb = args.baseline_tokens
    base = {"model_path": str(path), "prompt": prompt, "prompts": batch, "device": device, "dtype": dtype,
            "warmup": True, "scratch": str(tmp), "executor": "local", "stages": 1}  # fmt: skip
    systems = [
        ("hf_generate", hf_generate, {"T": args.tokens}),
        ("distlens_inprocess_capture", distlens, {"T": args.tokens}),
        ("distlens_inprocess_nocapture", distlens, {"T": args.tokens, "no_capture": True}),
    ]
    if tb:
        systems += [
            (f"distlens_inprocess_capture_T{tb}", distlens, {"T": tb}),
            (f"distlens_inprocess_nocapture_T{tb}", distlens, {"T": tb, "no_capture": True}),
            ("paper_baseline", paper_baseline, {"T": tb}),
            ("paper_baseline_nocapture", paper_baseline, {"T": tb, "no_capture": True}),
        ]
    rows = []
    for system, runner, job in systems:
        try:
            row = {"shape": shape, "batch": batch, "system": system, **measured(runner, {**base, **job})}
        except Exception as err:  # recorded, not hidden
            free(device)
            row = {"shape": shape, "batch": batch, "system": system, "error": f"{type(err).__name__}: {err}"[:400]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in TRAJECTORY}))
    by = {r["system"]: r for r in rows}
    base_row, ours = by.get("paper_baseline", {}), by.get(f"distlens_inprocess_capture_T{tb}", {})
    if "top1" in base_row and "top1" in ours:
        checked = {"same_tokens": ours["tokens"][: len(base_row["tokens"])] == base_row["tokens"]}
        checked.update(agreement(ours, base_row, len(prompt)))
        base_row.update(checked)
        print(f"{shape} batch {batch}: baseline vs distlens lens: {json.dumps(checked)}")
    results["ratios"][f"{shape}@batch{batch}"] = ratios(rows, tb, device)
    print(f"{shape} batch {batch}: {json.dumps(results['ratios'][f'{shape}@batch{batch}'])}", flush=True)
    for r in rows:  # trajectories were for the check; the file keeps the figures
        for key in TRAJECTORY:
            r.pop(key, None)
    results["rows"] += rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--baseline-tokens", type=int, default=64, help="T of the paper's baseline (0: skip it)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1], help="prompts per batch, one pass each")
    parser.add_argument("--shapes", nargs="+", default=["qwen3-4b-shaped", "llama-3.1-8b-shaped"], choices=SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args()
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches {args.batches}: each batch size must be at least 1")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; valid here: --device cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "dtype": dtype, "tokens": args.tokens, "baseline_tokens": args.baseline_tokens, "batches": args.batches, "rows": [], "ratios": {},
    }  # fmt: skip
    prompt = list(range(1000, 1032))  # 32 prompt tokens (every shape's vocabulary holds them)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes:
            t0 = time.perf_counter()
            path, weights = build(shape, tmp, device, DTYPES[dtype])
            print(f"{shape}: built and saved in {time.perf_counter() - t0:.0f} s ({weights:.2f} GiB)", flush=True)
            for batch in args.batches:
                measure_shape(results, shape, batch, path, prompt, args, device, dtype, tmp)
                (out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
