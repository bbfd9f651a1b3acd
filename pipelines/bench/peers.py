"""The peers distlens is measured against, each from a virtual environment of its own (the
project's environment is never changed), and their runners: nnsight and TransformerLens doing
the same all-layer lens over a generated trajectory, steering-vectors doing the same sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipelines.bench.meter import Meter
from pipelines.bench.systems import load_hf

ENVS = {  # each peer runs from a virtual environment the harness makes; the project's stays as it is
    "peers": ["transformer-lens==4.3.0", "nnsight==0.8.1"],
    "steering_vectors": ["steering-vectors==0.12.2"],  # needs transformers<5: shadowed inside its venv only
}
ENV_OF = {"nnsight": "peers", "transformer_lens": "peers", "steering_vectors": "steering_vectors"}
# TransformerLens is measured three ways: its own generate with its KV cache (its default), the
# same without the cache, and the HF model's own generate before the bridge wraps it; then
# run_with_cache and the lens.
VARIANTS = {
    "transformer_lens": {
        "transformer_lens": {"tl_generate": "cached"},
        "transformer_lens_nocache": {"tl_generate": "nocache"},
        "transformer_lens_hf_generate": {"tl_generate": "hf"},
    }
}


def peer_python(system: str) -> str:
    """Python of a peer's virtual environment (system site packages visible, pins on top),
    created on first use under the distlens cache."""
    from actors.checkpoint import cache_root

    env = ENV_OF[system]
    venv = cache_root() / "bench-venvs" / env
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        print(f"[bench] creating {venv} with {ENVS[env]}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ENVS[env]], check=True)
        (venv / ".installed").write_text("\n".join(ENVS[env]))
    return str(python)


@torch.no_grad()
def naive_lens(model, hidden: list[torch.Tensor], tokens: list[int], k: int = 10) -> dict:
    """The lens done directly over the full vocabulary, as a peer's user would: per layer
    (hidden [positions, d], not yet normalised), top-k log-probs, entropy, target log-prob and
    rank. Returns top-1 ids and log-probs for the like-for-like check."""
    n = len(tokens) - 1
    targets = torch.tensor(tokens[1:])
    top1, top1_lp = [], []
    for h in hidden:
        logp = torch.log_softmax(model.lm_head(model.model.norm(h[:n])).float(), -1)
        top = logp.topk(k, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        target = logp.gather(1, targets[:, None])[:, 0]
        rank = (logp > target[:, None]).sum(-1)
        del entropy, rank
        top1.append(top.indices[:, 0])
        top1_lp.append(top.values[:, 0])
    return {"top1": torch.stack(top1).tolist(), "top1_logprob": torch.stack(top1_lp).tolist()}


def nnsight_trace(job: dict) -> dict:
    """nnsight: one trace over generation that saves every layer's output, then the lens."""
    from nnsight import LanguageModel

    lm = LanguageModel(job["model_path"], dispatch=True, dtype=torch.float32)
    hf = lm._module  # nnsight's wrapped HF model: the library offers no public name for it
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([job["prompt"]])
    with Meter() as m:
        with lm.generate(ids, max_new_tokens=job["T"], do_sample=False) as tracer:
            saved = list().save()
            # A bounded iteration over the T steps: code after an unbounded one never runs.
            for _ in tracer.iter[0 : job["T"]]:
                for layer in lm.model.layers:
                    saved.append(layer.output)
            sequence = tracer.result.save()
        n_layers = len(lm.model.layers)
        steps = [saved[i : i + n_layers] for i in range(0, len(saved), n_layers)]
        hidden = [torch.cat([step[layer][0] for step in steps], 0) for layer in range(n_layers)]
        tokens = sequence[0].tolist()
        lens_t0 = time.perf_counter()
        result = naive_lens(hf, hidden, tokens)
        lens = time.perf_counter() - lens_t0
    return {"tokens_per_s": job["T"] / m.wall, "wall_s": m.wall, **m.figures(), **result, "tokens": tokens,
            "lens_share": lens / m.wall}  # fmt: skip


def transformer_lens_cache(job: dict) -> dict:
    """TransformerLens 4: generate, then run_with_cache over the sequence, then the lens.
    `tl_generate` picks how the tokens are generated: "cached" (TransformerBridge.generate with
    its KV cache, TL's default), "nocache" (the same without the cache: every step re-runs the
    prefix) or "hf" (the Hugging Face model's own generate, run before the bridge wraps it:
    cached decoding through the wrapped model went wrong here; booting is not timed)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    hf = load_hf(job)
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    ids = torch.tensor([job["prompt"]])
    n_layers = hf.config.num_hidden_layers
    how = job.get("tl_generate", "cached")
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    with Meter() as m, torch.no_grad():
        wall = 0.0
        if how == "hf":
            t0 = time.perf_counter()
            sequence = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["T"], do_sample=False)
            wall += time.perf_counter() - t0
        bridge = TransformerBridge.boot_transformers(
            job.get("tl_name", "HuggingFaceTB/SmolLM2-135M-Instruct"), hf_model=hf, tokenizer=tokenizer
        )
        t0 = time.perf_counter()
        if how != "hf":
            sequence = bridge.generate(
                ids, max_new_tokens=job["T"], do_sample=False, verbose=False, stop_at_eos=False,
                use_past_kv_cache=how == "cached",
            )  # fmt: skip
        _, cache = bridge.run_with_cache(sequence, names_filter=lambda name: name in names)
        hidden = [cache[name][0] for name in names]
        tokens = sequence[0].tolist()
        lens_t0 = time.perf_counter()
        result = naive_lens(hf, hidden, tokens)
        lens = time.perf_counter() - lens_t0
        wall += time.perf_counter() - t0
    return {"tokens_per_s": job["T"] / wall, "wall_s": wall, **m.figures(), **result, "tokens": tokens,
            "lens_share": lens / wall}  # fmt: skip


@torch.no_grad()
def steering_vectors_sweep(job: dict) -> dict:
    """The steering-vectors library doing the same sweep: one forward pass per coefficient,
    its vector on decoder block L-1's output (= distlens's resid_pre of layer L), at every
    position or (steer_positions=last) from the last prompt column on."""
    from steering_vectors import SteeringVector
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(job["model_path"])
    saved = json.loads((Path(job["model_path"]) / "config.json").read_text())
    if "rope_parameters" in saved:  # transformers 4 reads the older rope_theta field
        config.rope_theta = saved["rope_parameters"]["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], config=config, torch_dtype=torch.float32).eval()
    prompts = job["prompt_list"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate (and distlens) place them
    vector = SteeringVector({job["steer_layer"] - 1: torch.tensor(job["vector"])}, "decoder_block")
    scores = []
    with Meter() as m:
        for c in job["coefficients"]:
            first = width - 1 if job.get("steer_positions") == "last" else 0
            with vector.apply(model, multiplier=c, min_token_index=first):
                logits = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            scores.append(logits[:, job["score_ids"]])
    rows = torch.stack(scores, 1).reshape(-1, len(job["score_ids"]))  # prompt-major, coefficient-minor
    return {"wall_s": m.wall, **m.figures(), "scores": rows.tolist()}


RUNNERS = {
    "nnsight": nnsight_trace,
    "transformer_lens": transformer_lens_cache,
    "steering_vectors": steering_vectors_sweep,
}
