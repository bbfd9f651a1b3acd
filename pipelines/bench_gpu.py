"""`python -m pipelines.bench_gpu --out DIR`: the GPU path of the benchmarks, with no Ray and no
network. Architecture-faithful random-weight models (weight values do not change speed) are
built from configs, saved as bf16 safetensors, and measured in this one process: Hugging Face
`generate` with its KV cache (the speed of light), and distlens's in-process executor with and
without every layer's lens (k=10). Peak GPU memory is torch's allocator peak per measurement."""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # public configs of the released models
    "qwen3-4b-shaped": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "llama-3.1-8b-shaped": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
}  # fmt: skip


def build(shape: str, root: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = root / shape
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


@torch.no_grad()
def hf_generate(path: Path, prompt, t: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=t, do_sample=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"tokens_per_s": t / wall, "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def distlens(path: Path, prompt, t: int, capture: bool, scratch: Path) -> dict:
    from actors.coordinator import Coordinator, RunSpec
    from actors.sampling import SamplingSpec

    def spec(name, tokens):
        return RunSpec(
            model_path=str(path), store_path=str(scratch / name), num_stages=1, executor="local", dtype="bfloat16",
            device="cuda", layers=None if capture else (), k=10, lens_window=64, max_new_tokens=tokens,
            sampling=SamplingSpec(pad_token_id=0), micro_batch_size=1, progress=False, existing="overwrite",
        )  # fmt: skip

    Coordinator(spec("warm.zarr", 8)).run([prompt])  # warm-up (CUDA kernels, allocator)
    gc.collect()  # the warm-up's stage weights must be gone before the peak is measured
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    summary = Coordinator(spec("run.zarr", t)).run([prompt])
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    return {"tokens_per_s": summary["tokens_per_s"], "gpu_peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens, "rows": []}
    prompt = list(range(1000, 1032))  # 32 prompt tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes:
            t0 = time.perf_counter()
            path = build(shape, tmp)
            print(f"{shape}: built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
            for system, fn, extra in (
                ("hf_generate", hf_generate, ()),
                ("distlens_inprocess_capture", distlens, (True, tmp)),
                ("distlens_inprocess_nocapture", distlens, (False, tmp)),
            ):
                try:
                    row = {"shape": shape, "system": system, **fn(path, prompt, args.tokens, *extra)}
                except Exception as err:  # recorded, not hidden
                    row = {"shape": shape, "system": system, "error": f"{type(err).__name__}: {err}"[:400]}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                (out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
            import shutil

            shutil.rmtree(path)


if __name__ == "__main__":
    main()
