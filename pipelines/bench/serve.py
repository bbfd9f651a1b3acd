"""The serving benchmark (issue 30, item 4): `distlens serve` started as a user starts it (its own
local Ray cluster, 2 stage actors), then the same 64 chat requests sent by 8 concurrent clients
in four modes, in turn within one run: unsteered; mixed per-request steering (every request its
own vector, layer, site and coefficient; every fourth none); every request with the all-layer
lens; and the unsteered requests one at a time. Each mode reports requests/s, generated tokens/s
and p50/p99 latency; the verdict compares mixed steering's throughput with unsteered (target
>= 0.9x). All traffic is on 127.0.0.1; the server is stopped at the end.

`python -m pipelines.bench.serve [--requests 64] [--clients 8] [--max-tokens 24] [--rounds 2] [--out DIR]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["the sea", "a lighthouse", "bread", "the moon", "trains", "a small town", "rain", "chess"]
ASKS = ["Tell me about {}.", "Write two sentences about {}.", "What do you know about {}?", "Describe {} to a child."]
SITES = ["resid_pre", "resid_post", "attn_in", "mlp_in"]
MODES = ("unsteered", "mixed_steering", "all_layer_lens", "one_at_a_time")


def requests_for(n: int, d_model: int, n_layers: int, mode: str) -> list[dict]:
    """The `n` request bodies of `mode` (the same prompts in every mode)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        body = {
            "messages": [{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i // len(ASKS) % len(TOPICS)])}]
        }
        if mode == "mixed_steering" and i % 4:
            v = rng.standard_normal(d_model)
            body["distlens"] = {"steering": [{
                "vector": (v / np.linalg.norm(v)).round(5).tolist(), "layer": int(rng.integers(0, n_layers)),
                "site": SITES[i % len(SITES)], "coefficient": float(rng.uniform(-8, 8)),
            }]}  # fmt: skip
        if mode == "all_layer_lens":
            body["distlens"] = {"lens": {"k": 5, "positions": "generated"}}
        out.append(body)
    return out


async def _send(url: str, model: str, bodies: list[dict], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent clients drain `bodies`; each request's latency and tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies, tokens = [], []

    async def worker():
        while not queue.empty():
            body = queue.get_nowait()
            extra = {"distlens": body["distlens"]} if "distlens" in body else None
            t = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, messages=body["messages"], max_tokens=max_tokens, temperature=0, extra_body=extra
            )
            latencies.append(time.perf_counter() - t)
            tokens.append(r.usage.completion_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = sorted(latencies)
    return {
        "requests": len(lat), "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 3),
        "tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / wall, 2),
        "p50_latency_s": round(statistics.median(lat), 3), "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
    }  # fmt: skip


def _start(args, out: Path) -> tuple[subprocess.Popen, str]:
    from actors.distributed import free_port

    port = free_port()
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.serve", f"model.name={args.model}", f"serve.port={port}",
         f"cluster.micro_batch_size={args.clients}", "cluster.micro_batches_in_flight=2", "serve.max_waiting=256"],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=out,
        env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )  # fmt: skip
    for line in proc.stdout:
        if "serving" in line:
            return proc, f"http://127.0.0.1:{port}/v1"
    raise RuntimeError(f"the server did not start: see {out / 'server.log'}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.serve")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="every mode once per round, in turn")
    parser.add_argument("--out", default="outputs/bench/serve")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from actors.checkpoint import resolve_checkpoint

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.model = str(resolve_checkpoint(args.model).path) if not Path(args.model).is_dir() else args.model
    config = AutoConfig.from_pretrained(args.model)
    proc, url = _start(args, out)
    rounds = []
    try:
        warm = requests_for(args.clients, config.hidden_size, config.num_hidden_layers, "mixed_steering")
        asyncio.run(_send(url, args.model, warm, args.clients, 4))  # first requests pay for lazy set-up
        for r in range(args.rounds):
            row = {}
            for mode in MODES:
                bodies = requests_for(args.requests, config.hidden_size, config.num_hidden_layers,
                                      "unsteered" if mode == "one_at_a_time" else mode)  # fmt: skip
                row[mode] = asyncio.run(_send(url, args.model, bodies, 1 if mode == "one_at_a_time" else args.clients,
                                              args.max_tokens))  # fmt: skip
                print(f"round {r + 1} {mode}: {json.dumps(row[mode])}", flush=True)
            rounds.append(row)
    finally:
        proc.send_signal(signal.SIGTERM)  # as `ray job stop` does (a shell's background job ignores SIGINT)
        proc.wait(timeout=120)
    ratios = [row["mixed_steering"]["tokens_per_s"] / row["unsteered"]["tokens_per_s"] for row in rounds]
    result = {
        "model": args.model, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "rounds": rounds, "mixed_over_unsteered_tokens_per_s": [round(x, 3) for x in ratios],
        "target": "mixed per-request steering >= 0.9x the unsteered throughput",
        "verdict": "met" if statistics.median(ratios) >= 0.9 else "MISSED",
    }  # fmt: skip
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    _plot(rounds, out / "serve.png")
    print(
        f"mixed / unsteered tokens/s: {result['mixed_over_unsteered_tokens_per_s']} ({result['verdict']}); {out}/serve.json"
    )
    return result


def _plot(rounds: list[dict], path: Path) -> None:
    """Tokens/s and p50/p99 latency per mode, one bar per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(rounds)
    for r, row in enumerate(rounds):
        xs = [i + r * width for i in range(len(MODES))]
        a.bar(xs, [row[m]["tokens_per_s"] for m in MODES], width, label=f"round {r + 1}")
        b.bar(xs, [row[m]["p50_latency_s"] for m in MODES], width, label=f"p50, round {r + 1}")
        b.scatter(xs, [row[m]["p99_latency_s"] for m in MODES], marker="_", s=200, color="k")
    for ax, title in ((a, "generated tokens/s"), (b, "latency s (bar p50, mark p99)")):
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(MODES))], [m.replace("_", "\n") for m in MODES], fontsize=7
        )
        ax.set_title(title, fontsize=9)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
