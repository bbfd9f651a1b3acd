"""One benchmark measurement in a fresh process, so its peak memory is its own.

`python -m pipelines.bench_worker '<json job>'` prints one JSON line: throughput, wall time,
peak RSS (this process, plus stage actors for the ray executor), the RSS growth during
generation (capture memory), bytes written and a lens fingerprint for the like-for-like check.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch


class RssSampler:
    """Peak resident memory of this process over the `with` block. Linux keeps the peak itself
    (VmHWM) and resets it on request (`clear_refs` = 5), so nothing polls while the timed code
    runs; elsewhere a thread samples every few milliseconds (which costs the timed code a little)."""

    def __init__(self, interval: float = 0.005):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = None
        self._interval = interval

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

    def _run(self, interval):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(interval)

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm()
        except OSError:
            self._thread = threading.Thread(target=self._run, args=(self._interval,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = max(self.peak, self._hwm())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def load_hf(model_path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every system generates exactly T tokens, no EOS stop
    return model


@torch.no_grad()
def hf_generate(job) -> dict:
    """(b) The engine's speed of light: HF generate with its KV cache, nothing captured."""
    model = load_hf(job["model_path"])
    ids = torch.tensor([job["prompt"]] * job["prompts"])
    loaded = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["T"], do_sample=False)
        wall = time.perf_counter() - t0
    new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens_per_s": new / wall, "wall_s": wall, "peak_rss": rss.peak, "capture_rss": rss.peak - loaded}


@torch.no_grad()
def lens_floor(job) -> dict:
    """What the exact all-layer lens alone costs on this machine: distlens's own lens
    (`LogitLens.summarise`, the model's real norm and unembedding) over one window of every
    layer (64 positions x L layers), per (position, layer) row; and the bare fp32 GEMM rate.
    Nothing that computes an exact lens can beat L x this per position."""
    from actors.lens import LogitLens

    model = load_hf(job["model_path"])
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
    ms_per_row = float(np.median(times)) / rows * 1e3
    return {
        "lens_ms_per_row": ms_per_row, "layers": layers, "wall_s": float(np.median(times)),
        "gemm_gflops": 2 * 256 * weight.shape[0] * weight.shape[1] / gemm / 1e9,
    }  # fmt: skip


@torch.no_grad()
def baseline_steps(model, ids: torch.Tensor, steps: int, capture: bool = True, lens_times: list | None = None):
    """The paper's naive loop (shared with the GPU bench): every new token re-runs the full
    prefix with no KV cache; with `capture`, every layer's output at the new position goes
    through norm + lm_head over the full vocabulary and the full softmaxes are kept (on the
    model's device). Returns the grown ids and the kept softmaxes, one [prompts, layers, vocab]
    per step (left as the loop keeps them: stacking them would be the harness's copy, not the
    baseline's memory). `lens_times` (CPU only: nothing is synchronised) gets each step's lens
    seconds."""
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


def agreement(ours: dict, baseline: dict, prompt_len: int) -> dict:
    """Like-for-like: the baseline projects each new position once; compare those positions of
    distlens's store (top-1 agreement, and the top-1 log-prob difference where they agree)."""
    if "top1" not in ours or "top1" not in baseline:
        return {}
    t = len(baseline["top1"][0])
    a = np.asarray(ours["top1"])[:, prompt_len - 1 : prompt_len - 1 + t]
    la = np.asarray(ours["top1_logprob"])[:, prompt_len - 1 : prompt_len - 1 + t]
    same = a == np.asarray(baseline["top1"])
    diff = np.abs(la - np.asarray(baseline["top1_logprob"]))[same]
    return {"top1_agreement": float(same.mean()), "max_logprob_diff": float(diff.max(initial=0.0))}


def paper_baseline(job) -> dict:
    """(c) The paper's naive baseline, as its original code did it (`baseline_steps`)."""
    model = load_hf(job["model_path"])
    ids = torch.tensor([job["prompt"]] * job["prompts"])
    capture = not job.get("no_capture")
    loaded = psutil.Process().memory_info().rss
    lens_times = []
    with RssSampler() as rss:
        t0 = time.perf_counter()
        ids, trajectory = baseline_steps(model, ids, job["T"], capture, lens_times)
        wall = time.perf_counter() - t0
    out = {"tokens_per_s": job["T"] * ids.shape[0] / wall, "wall_s": wall, "peak_rss": rss.peak}
    if capture:
        out.update(capture_rss=rss.peak - loaded, tokens=ids[0].tolist(), **top1_of(trajectory))
        out["lens_share"] = sum(lens_times) / wall
    return out


def distlens(job) -> dict:
    """(a) distlens: staged pipeline, every layer's resid_post lens (k=10), written to Zarr."""
    from actors.coordinator import Coordinator, RunSpec
    from actors.sampling import SamplingSpec
    from actors.store import LensStore

    if job["executor"] == "ray":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(
            num_cpus=max(2, job["stages"] + 1),
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": repo}},
            log_to_driver=False,
        )
    store_path = Path(tempfile.mkdtemp(dir=job.get("scratch"))) / "lens.zarr"
    prompts = job.get("prompt_list") or [job["prompt"]] * job["prompts"]
    steering = ()
    if job.get("vector") is not None:
        from actors.stage import SteeringEdit

        where = job.get("steer_positions", "all")
        steering = (SteeringEdit(job["steer_layer"], "resid_pre", np.asarray(job["vector"], np.float32), where),)
    spec = RunSpec(
        model_path=job["model_path"], store_path=str(store_path), num_stages=job["stages"], executor=job["executor"],
        components=tuple(job.get("components", ["resid_post"])), k=10, lens_window=job.get("window", 64),
        sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0), max_new_tokens=job["T"],
        micro_batch_size=len(prompts) * len(job.get("coefficients") or [1]), micro_batches_in_flight=1,
        progress=False, steering=steering, coefficients=job.get("coefficients"),
        layers=() if job.get("no_capture") else (tuple(job["layers"]) if job.get("layers") else None), score_ids=tuple(job.get("score_ids", ())),
    )  # fmt: skip
    loaded = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        summary = Coordinator(spec).run(prompts)
    store = LensStore.open(store_path)
    stage_peaks = [info["peak_rss_bytes"] for info in summary["stage_info"]]
    in_process = job["executor"] == "local"
    out = {
        "tokens_per_s": summary["tokens_per_s"], "wall_s": summary["generate_s"],
        "peak_rss": rss.peak if in_process else rss.peak + sum(stage_peaks),
        "largest_process_rss": rss.peak if in_process else max([rss.peak, *stage_peaks]),
        "capture_rss": rss.peak - loaded if in_process else None,
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
    from actors.stage import LENS_FIELDS

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


def nnsight_trace(job) -> dict:
    """(d) nnsight: one trace over generation that saves every layer's output, then the lens."""
    from nnsight import LanguageModel

    lm = LanguageModel(job["model_path"], dispatch=True, dtype=torch.float32)
    lm._module.generation_config.eos_token_id = None
    ids = torch.tensor([job["prompt"]])
    with RssSampler() as rss:
        t0 = time.perf_counter()
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
        result = naive_lens(lm._module, hidden, tokens)
        lens = time.perf_counter() - lens_t0
        wall = time.perf_counter() - t0
    return {"tokens_per_s": job["T"] / wall, "wall_s": wall, "peak_rss": rss.peak, **result, "tokens": tokens,
            "lens_share": lens / wall}  # fmt: skip


def transformer_lens_cache(job) -> dict:
    """(d) TransformerLens 4: generate, then run_with_cache over the sequence, then the lens.
    `tl_generate` picks how the tokens are generated: "cached" (TransformerBridge.generate with
    its KV cache, TL's default), "nocache" (the same without the cache: every step re-runs the
    prefix) or "hf" (the Hugging Face model's own generate, run before the bridge wraps it:
    cached decoding through the wrapped model went wrong here; booting is not timed)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    hf = load_hf(job["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    ids = torch.tensor([job["prompt"]])
    n_layers = hf.config.num_hidden_layers
    how = job.get("tl_generate", "cached")
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    with RssSampler() as rss, torch.no_grad():
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
    return {"tokens_per_s": job["T"] / wall, "wall_s": wall, "peak_rss": rss.peak, **result, "tokens": tokens,
            "lens_share": lens / wall}  # fmt: skip


@torch.no_grad()
def steering_vectors_sweep(job) -> dict:
    """(e) The steering-vectors library doing the same sweep: one forward pass per coefficient,
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
    with RssSampler() as rss:
        t0 = time.perf_counter()
        for c in job["coefficients"]:
            first = width - 1 if job.get("steer_positions") == "last" else 0
            with vector.apply(model, multiplier=c, min_token_index=first):
                logits = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            scores.append(logits[:, job["score_ids"]])
        wall = time.perf_counter() - t0
    rows = torch.stack(scores, 1).reshape(-1, len(job["score_ids"]))  # prompt-major, coefficient-minor
    return {"wall_s": wall, "peak_rss": rss.peak, "scores": rows.tolist()}


SYSTEMS = {
    "steering_vectors": steering_vectors_sweep,
    "hf_generate": hf_generate,
    "paper_baseline": paper_baseline,
    "lens_floor": lens_floor,
    "distlens": distlens,
    "nnsight": nnsight_trace,
    "transformer_lens": transformer_lens_cache,
}


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.manual_seed(0)
    result = SYSTEMS[job["system"]](job)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
