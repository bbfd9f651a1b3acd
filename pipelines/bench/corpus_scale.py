"""The corpus-scale benchmark (issue 28, item 4): lens runs over a generated corpus of up to
100,000 rows on a tiny random model with a small vocabulary, each driver a process of its own.
It reports each run's driver peak RSS (1,000, 10,000 and 100,000 rows) and its RSS against the rows
written (sampled every 2 s, plotted in `rss.png`), the store's file count,
bytes and bytes per cell, the time for xarray to open it, and shows that a driver killed near row
50,000 and resumed writes a store equal, array by array, to the uninterrupted run's.

`python -m pipelines.bench.corpus_scale [--rows 1000,10000,100000] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = 500  # the vocabulary: this many words, plus the special tokens
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
BLOCK_ROWS = 4096  # rows compared at a time (bounded memory)
SAMPLE_S = 2.0  # seconds between samples of a driver's RSS


def build_model(root: Path, seed: int = 0) -> Path:
    """A 3-layer Llama (hidden 32) with every parameter random, norm weights included, and a
    word-level tokenizer of `WORDS` words, saved as a Hugging Face checkpoint at `root`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms too: a norm applied twice changes the numbers
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(root)
    fast.save_pretrained(root)
    return root


def build_corpus(path: Path, rows: int, seed: int = 0) -> Path:
    """A text corpus of `rows` lines of 2 to 24 random words (ragged), one prompt a line."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(" ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(2, 24))) + "\n")
    return path


def lens_args(model: Path, corpus: Path, root: Path, run: str, rows: int, batch: int, new: int) -> list[str]:
    """The driver's overrides: `rows` rows of the corpus, in-process stages, no heatmaps."""
    return [
        f"model.name={model}", f"corpus.path={corpus}", f"corpus.limit={rows}", "cluster=inprocess",
        f"cluster.micro_batch_size={batch}", f"generation.max_new_tokens={new}", "generation.chat_template=false",
        "progress=false", "plot.max_prompts=0", f"storage.root={root}", f"storage.run={run}",
    ]  # fmt: skip


def rows_written(store: Path, batch: int) -> int:
    """Rows in the store's finished batches, from its write log (each a full batch but the last)."""
    log = Path(f"{store}.writes.jsonl")
    if not log.exists():
        return 0
    return sum(batch for line in log.read_text().splitlines() if '"done"' in line)


def run_driver(
    args: list[str], log: Path, store: Path, batch: int, total: int, kill_at: int | None = None, module="pipelines.lens"
) -> dict:
    """`python -m <module> args` as a process of its own (its output to `log`), the rows written
    so far printed every 10 s; with `kill_at`, SIGKILLed once that many rows are written.
    Returns its exit code, wall seconds, peak RSS (MiB: the kernel's count for that process) and
    its RSS every `SAMPLE_S` seconds against the rows written by then (`rss_series`: [seconds,
    rows, MiB])."""
    t0 = shown = sampled = time.monotonic()
    series = []
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.5)
            now = time.monotonic()
            due, sample = now - shown >= 10, now - sampled >= SAMPLE_S
            if kill_at is None and not due and not sample:
                continue
            done = rows_written(store, batch)
            if sample and (rss := rss_mib(proc.pid)) is not None:
                sampled = now
                series.append([round(now - t0, 1), done, rss])
            if kill_at is not None and done >= kill_at:
                proc.kill()
                print(f"  killed at {done:,} rows written", flush=True)
                kill_at = None
            if due:
                shown = now
                print(f"  {done:,}/{total:,} rows, {done / (shown - t0):.0f} rows/s", flush=True)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "rss_series": series}  # fmt: skip


def rss_mib(pid: int) -> float | None:
    """The process's resident set now (MiB, the kernel's VmRSS), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return round(kib / 1024, 1)


def plot_rss(runs: dict, path: Path) -> Path:
    """The drivers' RSS against the rows written, one line per run, from its first shard written
    (before it, the process is loading) to its end; the legend gives each run's peak."""
    from pipelines.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, got in runs.items():
        series = [(rows, mib) for _, rows, mib in got["rss_series"] if rows]
        if series:
            ax.plot(*zip(*series), marker=".", label=f"{int(n):,} rows (peak {got['peak_rss_mib']:.0f} MiB)")
    ax.set_xlabel("rows written (a shard at a time)")
    ax.set_ylabel("driver RSS (MiB)")
    ax.set_title("corpus-scale lens runs: the driver's memory as rows are written")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def open_time(store: Path) -> dict:
    """Seconds for `xarray.open_zarr` to open the store lazily, in a fresh process (imports
    not counted), and the dimensions it names."""
    code = (
        "import json, sys, time, xarray as xr\n"
        "t = time.perf_counter(); ds = xr.open_zarr(sys.argv[1]); s = time.perf_counter() - t\n"
        "print(json.dumps({'open_s': round(s, 3), 'dims': {k: int(v) for k, v in ds.sizes.items()}}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stores_equal(a: Path, b: Path) -> list[str]:
    """Where two stores differ (empty: equal): the same arrays (names, shapes, dtypes), each
    compared `BLOCK_ROWS` rows at a time (bounded memory): floats to fp32 noise (NaN where the
    other has NaN), the rest exactly; and the same fingerprint (what determines the numbers)."""
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(ga.array_keys())
    if names != sorted(gb.array_keys()):
        return [f"arrays differ: {names} against {sorted(gb.array_keys())}"]
    problems = []
    if ga.attrs.get("fingerprint") != gb.attrs.get("fingerprint"):
        problems.append("the fingerprints differ")
    for name in names:
        x, y = ga[name], gb[name]
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            problems.append(f"{name}: {x.shape} {x.dtype} against {y.shape} {y.dtype}")
            continue
        for start in range(0, x.shape[0] if x.shape else 1, BLOCK_ROWS):
            block = slice(start, start + BLOCK_ROWS) if x.shape else ()
            u, v = x[block], y[block]
            same = (
                np.allclose(u, v, atol=1e-5, rtol=1e-6, equal_nan=True) if u.dtype.kind == "f" else np.array_equal(u, v)
            )
            if not same:
                problems.append(f"{name}: rows {start}.. differ")
                break
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.bench.corpus_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rows", default="1000,10000,100000", help="the runs' row counts, comma-separated")
    parser.add_argument(
        "--kill-at", type=int, default=50_000, help="rows written before the killed run's driver is killed"
    )
    parser.add_argument("--batch", type=int, default=64, help="cluster.micro_batch_size")
    parser.add_argument("--new", type=int, default=4, help="generation.max_new_tokens")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/corpus_scale"))
    parser.add_argument("--results", type=Path, default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    counts = sorted(int(n) for n in args.rows.split(","))
    if counts[0] < 1 or not 0 < args.kill_at < counts[-1]:
        print(f"--rows={args.rows} --kill-at={args.kill_at}: rows must be >= 1 and the kill point inside the largest run",
              file=sys.stderr)  # fmt: skip
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").exists():
        build_model(model)
    corpus = build_corpus(out / "corpus.txt", counts[-1])
    results = {"model": "llama, 3 layers, hidden 32, vocabulary 504 (random)", "batch": args.batch,
               "max_new_tokens": args.new, "runs": {}}  # fmt: skip
    for n in counts:
        print(f"run of {n:,} rows", flush=True)
        run = f"rows{n}"
        store = out / run / "lens.zarr"
        lens = lens_args(model, corpus, out, run, n, args.batch, args.new)
        got = run_driver([*lens, "overwrite=true"], out / f"{run}.log", store, args.batch, n)
        if got["returncode"] != 0:
            print(f"the run of {n} rows failed: see {out / f'{run}.log'}", file=sys.stderr)
            return 1
        from actors.store import LensStore

        got.update(size=LensStore.open(store).size(), xarray=open_time(store), rows_per_s=round(n / got["wall_s"], 1))
        results["runs"][n] = got
        print(f"  {json.dumps(got)}", flush=True)
    n = counts[-1]
    print(f"distlens verify on the store of {n:,} rows", flush=True)
    store = out / f"rows{n}" / "lens.zarr"
    results["verify"] = run_driver([str(store)], out / "verify.log", store, args.batch, n, module="pipelines.verify")
    results["verify"]["output"] = (out / "verify.log").read_text().strip().splitlines()[-2:]
    print(f"  {json.dumps(results['verify'])}", flush=True)
    print(f"a run of {n:,} rows killed near row {args.kill_at:,}, then resumed", flush=True)
    store = out / "killed" / "lens.zarr"
    lens = lens_args(model, corpus, out, "killed", n, args.batch, args.new)
    killed = run_driver([*lens, "overwrite=true"], out / "killed.log", store, args.batch, n, kill_at=args.kill_at)
    written = rows_written(store, args.batch)
    resumed = run_driver([*lens, "resume=true"], out / "resumed.log", store, args.batch, n)
    problems = stores_equal(store, out / f"rows{n}" / "lens.zarr")
    results["killed"] = {
        "killed": killed,
        "rows_written_when_killed": written,
        "resumed": resumed,
        "differences": problems,
    }
    print(f"  killed with {written:,} rows written; resumed: exit {resumed['returncode']}; "
          f"equal to the uninterrupted run: {not problems} {problems[:3]}", flush=True)  # fmt: skip
    text = json.dumps(results, indent=1)
    (out / "results.json").write_text(text)
    plot = plot_rss(results["runs"], out / "rss.png")
    if args.results:
        args.results.write_text(text)
        shutil.copyfile(plot, args.results.with_name(f"{args.results.stem}_rss.png"))
    print(text)
    return 0 if not problems and resumed["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
