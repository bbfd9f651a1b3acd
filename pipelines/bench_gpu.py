"""`python -m pipelines.bench_gpu --out DIR`: the GPU path of the benchmarks, with no Ray and no
network. Architecture-faithful random-weight models (weight values do not change speed) are
built from configs, saved as safetensors, and measured in this one process:

- Hugging Face `generate` with its KV cache (the speed of light);
- distlens's in-process executor with and without every layer's lens (k=10);
- the paper's baseline (`bench_worker.baseline_steps`: no KV cache, every layer projected over
  the full vocabulary at every step, softmaxes kept), with and without its lens, at
  `--baseline-tokens` (it grows quadratically) — and its like-for-like agreement with distlens
  on those positions.

Peak memory is torch's allocator peak per measurement on a GPU (the process's peak RSS on a
CPU, where `--device cpu --shapes tiny` is the smoke run CI keeps working). Capture memory is
a system's peak with capture less its peak without, at the baseline's T (on a GPU only)."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

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
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Meter:
    """Peak memory of one measurement: the CUDA allocator's peak, or this process's peak RSS."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from pipelines.bench_worker import RssSampler

            self._rss = RssSampler().__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t0
        if self.device == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self._rss.__exit__(*exc)
            self.peak_gib = self._rss.peak / 2**30


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


def free(device: str) -> None:
    from actors import lens

    lens._SCRATCH.clear()  # the lens's reused logits buffer: no measurement may start holding it
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def load(path: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # exactly T tokens, no EOS stop
    return model


@torch.no_grad()
def hf_generate(path: Path, prompt, t: int, device: str, dtype) -> dict:
    model = load(path, device, dtype)
    ids = torch.tensor([prompt], device=device)
    model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
    with Meter(device) as m:
        model.generate(ids, max_new_tokens=t, do_sample=False)
    del model
    free(device)
    return {"T": t, "tokens_per_s": t / m.wall, "peak_gib": m.peak_gib}


@torch.no_grad()
def paper_baseline(path: Path, prompt, t: int, device: str, dtype, capture: bool) -> dict:
    from pipelines.bench_worker import baseline_steps, top1_of

    model = load(path, device, dtype)
    ids = torch.tensor([prompt], device=device)
    baseline_steps(model, ids, 2, capture)  # warm-up
    with Meter(device) as m:
        out_ids, trajectory = baseline_steps(model, ids, t, capture)
    row = {"T": t, "tokens_per_s": t / m.wall, "peak_gib": m.peak_gib}
    if capture:
        row.update(tokens=out_ids[0].tolist(), **top1_of(trajectory))
    del model, trajectory
    free(device)
    return row


def distlens(path: Path, prompt, t: int, device: str, dtype, capture: bool, scratch: Path) -> dict:
    from actors.coordinator import Coordinator, RunSpec
    from actors.sampling import SamplingSpec
    from actors.store import LensStore

    def spec(name, tokens):
        return RunSpec(
            model_path=str(path), store_path=str(scratch / name), num_stages=1, executor="local",
            dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype], device=device,
            layers=None if capture else (), k=10, lens_window=64, max_new_tokens=tokens,
            sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0), micro_batch_size=1, progress=False,
            existing="overwrite",
        )  # fmt: skip

    Coordinator(spec("warm.zarr", 8)).run([prompt])  # warm-up (kernels, allocator)
    free(device)  # the warm-up's stage weights must be gone before the peak is measured
    with Meter(device) as m:
        summary = Coordinator(spec("run.zarr", t)).run([prompt])
    row = {"T": t, "tokens_per_s": summary["tokens_per_s"], "peak_gib": m.peak_gib}
    if capture:
        from pipelines.bench_worker import lens_figures, store_figures

        store = LensStore.open(scratch / "run.zarr")
        row.update(lens_figures(summary["stage_info"], summary["generate_s"], True), **store_figures(store))
        top1 = store["topk_ids"][0, :, 0, : t + len(prompt) - 1, 0]
        row.update(
            tokens=store.tokens(0).tolist(), top1=top1.tolist(),
            top1_logprob=store["topk_logprobs"][0, :, 0, : top1.shape[1], 0].tolist(),
        )  # fmt: skip
    free(device)
    return row


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--baseline-tokens", type=int, default=64, help="T of the paper's baseline (0: skip it)")
    parser.add_argument("--shapes", nargs="+", default=["qwen3-4b-shaped", "llama-3.1-8b-shaped"], choices=SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; valid here: --device cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens, "baseline_tokens": args.baseline_tokens,
        "rows": [], "ratios": {},
    }  # fmt: skip
    prompt = list(range(1000, 1032))  # 32 prompt tokens (every shape's vocabulary holds them)
    tb = args.baseline_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes:
            t0 = time.perf_counter()
            path, weights = build(shape, tmp, device, dtype)
            print(f"{shape}: built and saved in {time.perf_counter() - t0:.0f} s ({weights:.2f} GiB)", flush=True)
            systems = [
                ("hf_generate", hf_generate, (args.tokens, device, dtype)),
                ("distlens_inprocess_capture", distlens, (args.tokens, device, dtype, True, tmp)),
                ("distlens_inprocess_nocapture", distlens, (args.tokens, device, dtype, False, tmp)),
            ]
            if tb:
                systems += [
                    (f"distlens_inprocess_capture_T{tb}", distlens, (tb, device, dtype, True, tmp)),
                    (f"distlens_inprocess_nocapture_T{tb}", distlens, (tb, device, dtype, False, tmp)),
                    ("paper_baseline", paper_baseline, (tb, device, dtype, True)),
                    ("paper_baseline_nocapture", paper_baseline, (tb, device, dtype, False)),
                ]
            rows = []
            for system, fn, extra in systems:
                try:
                    row = {"shape": shape, "system": system, **fn(path, prompt, *extra)}
                except Exception as err:  # recorded, not hidden
                    row = {"shape": shape, "system": system, "error": f"{type(err).__name__}: {err}"[:400]}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "top1", "top1_logprob")}))
            by = {r["system"]: r for r in rows}
            base, ours = by.get("paper_baseline", {}), by.get(f"distlens_inprocess_capture_T{tb}", {})
            if "top1" in base and "top1" in ours:
                from pipelines.bench_worker import agreement

                checked = {"same_tokens": ours["tokens"][: len(base["tokens"])] == base["tokens"]}
                checked.update(agreement(ours, base, len(prompt)))
                base.update(checked)
                print(f"{shape}: baseline vs distlens lens: {json.dumps(checked)}")
            results["ratios"][shape] = ratios(rows, tb, device)
            print(f"{shape}: {json.dumps(results['ratios'][shape])}", flush=True)
            for r in rows:  # trajectories were for the check; the file keeps the figures
                for key in ("tokens", "top1", "top1_logprob"):
                    r.pop(key, None)
            results["rows"] += rows
            (out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
