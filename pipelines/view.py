"""`distlens view <store | steer run | trace> [--out page.html] [--serve]`: one self-contained HTML
page (script, style and data inline; nothing fetched at view time) to explore a lens store or a
steering study in a browser; a causal trace's folder gets its trace.html and heatmaps written again.

A lens page holds, per row, the token ids and, per (lens, component), the store's top-k ids and
log-probs, entropy, target log-prob and rank and `kl_to_final` of every position, as base64
typed arrays the page decodes on demand; token strings only for the ids that occur. A study
page holds each dataset's summary and its per-item propensities from `sweep.csv`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import http.server
import json
import sys
from pathlib import Path

import numpy as np

PAGE_DIR = Path(__file__).resolve().parent / "view_page"
FIELDS = ("entropy", "target_logprob", "target_rank", "kl_to_final")


class ViewError(ValueError):
    pass


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def token_text(tokenizer, token_id: int) -> str:
    """One token as text, whitespace made visible (the page escapes it)."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.decode([int(token_id)])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def load_tokenizer(attrs: dict):
    """The run's tokenizer, from the model path recorded in the store (None if it has none)."""
    from actors.checkpoint import resolve_checkpoint

    model = attrs.get("model", {})
    for name in (model.get("path"), model.get("name")):
        if not name:
            continue
        try:
            return resolve_checkpoint(name, model.get("revision")).tokenizer()
        except Exception:  # a tiny test model without tokenizer files, or a path gone since
            continue
    return None


def lens_data(store, tokenizer=None, rows: list[int] | None = None) -> dict:
    """Everything the lens page shows, read from the store through its reader."""
    g = store.group
    n_rows = g["tokens"].shape[0]
    rows = list(range(n_rows)) if rows is None else rows
    bad = [r for r in rows if not 0 <= r < n_rows]
    if bad:
        raise ViewError(f"--rows: row {bad[0]} is out of range: the store has rows 0..{n_rows - 1}")
    if "topk_ids" not in g:
        raise ViewError(f"{store.path} records no lens (a run that captured no layer): nothing to view")
    names = set(g.array_keys())
    lenses = store.lenses
    fields = [f for f in FIELDS if f in names]
    vocab: set[int] = set()
    out_rows, arrays = [], {}
    for r in rows:  # only the selected rows are read (each read takes its rows' shard index and chunks)
        n = int(g["lengths"][r])
        ids = g["tokens"][r, :n]
        vocab.update(int(t) for t in ids)
        coefficient = float(g["coefficient"][r]) if "coefficient" in names else 1.0
        source = int(g["source"][r]) if "source" in names else r
        corpus_index = int(g["corpus_index"][r]) if "corpus_index" in names else source  # its corpus row
        steered = bool("edit_kind" in names and (g["edit_kind"][r] >= 0).any()) or coefficient != 1.0
        out_rows.append({
            "row": r, "source": source if source >= 0 else r, "corpus_index": corpus_index, "coefficient": coefficient,
            "steered": steered, "length": n, "prompt_length": int(g["prompt_lengths"][r]),
            "prompt_text": str(g["prompt_text"][r]), "generated_text": str(g["generated_text"][r]),
            "tokens": ids.astype(int).tolist(), "mask": g["lens_mask"][r, :n].astype(int).tolist(),
        })  # fmt: skip
        for lens in lenses:
            for c, component in enumerate(store.components):
                key = f"{r}/{lens}/{component}"
                topk = store.field("topk_ids", lens)[r, :, c, :n]  # [layer, position, k]
                vocab.update(int(t) for t in np.unique(topk) if t >= 0)
                arrays[f"{key}/topk_ids"] = _b64(topk, "<i4")
                arrays[f"{key}/topk_logprobs"] = _b64(store.field("topk_logprobs", lens)[r, :, c, :n], "<f4")
                for f in fields:
                    arrays[f"{key}/{f}"] = _b64(store.field(f, lens)[r, :, c, :n], "<f4")
    attrs = store.attrs
    return {
        "kind": "lens", "path": str(store.path), "model": attrs.get("model", {}).get("name"),
        "complete": store.is_complete, "layers": store.layers, "components": store.components, "lenses": lenses,
        "k": int(g["topk_ids"].shape[-1]), "fields": fields, "rows": out_rows, "arrays": arrays,
        "vocab": {str(t): token_text(tokenizer, t) for t in sorted(vocab)},
    }  # fmt: skip


def study_data(run_dir: Path) -> dict:
    """Each dataset's summary (curve and its bootstrap band) and per-item propensities."""
    from pipelines.steerability import fit_slopes

    results = json.loads((run_dir / "results.json").read_text())
    datasets = []
    for result in results:
        folder = run_dir / result["dataset"] if len(results) > 1 else run_dir
        coefficients = result["coefficients"]
        per_item: dict[int, dict[float, float]] = {}
        with open(folder / "sweep.csv") as f:
            for line in csv.DictReader(f):
                per_item.setdefault(int(line["item"]), {})[float(line["coefficient"])] = float(line["propensity"])
        propensity = np.array([[per_item[i][float(c)] for c in coefficients] for i in sorted(per_item)])
        slopes, _ = fit_slopes(np.asarray(coefficients), propensity)
        datasets.append({
            "dataset": result["dataset"], "layer": result["best_layer"], "site": result["site"],
            "coefficients": coefficients, "mean": result["mean_propensity"], "band": result["mean_propensity_ci95"],
            "mean_of_slopes": result["mean_of_slopes"], "mean_of_slopes_ci95": result["mean_of_slopes_ci95"],
            "slope_of_mean": result["slope_of_mean"], "anti_steerable_fraction": result["anti_steerable_fraction"],
            "propensity": propensity.tolist(), "slopes": slopes.tolist(), "cost": result.get("cost"),
        })  # fmt: skip
    return {"kind": "study", "path": str(run_dir), "datasets": datasets}


def page(data: dict) -> str:
    """The HTML page: the viewer's style and script inline, the data as one JSON script element."""
    css = (PAGE_DIR / "page.css").read_text()
    js = (PAGE_DIR / f"{data['kind']}.js").read_text()
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"distlens: {Path(data['path']).name}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{css}</style></head><body>"
        f'<script type="application/json" id="distlens-data">{blob}</script>'
        f"<script>{js}</script></body></html>"
    )


def resolve(target: Path) -> tuple[str, Path]:
    """("lens", store path), ("study", run directory) or ("trace", run directory) for what the user named."""
    if (target / "results.json").is_file():
        return "study", target
    if target.name == "trace.zarr" and target.is_dir():
        target = target.parent
    if (target / "trace.zarr").is_dir():
        return "trace", target
    if (target / "lens.zarr").is_dir():
        target = target / "lens.zarr"
    if (target / "zarr.json").is_file():
        return "lens", target
    raise ViewError(
        f"{target} is neither a lens store (a lens.zarr, or a run folder holding one), a steering study "
        "(a pipelines.steer run folder holding results.json) nor a causal trace (a folder holding trace.zarr)"
    )


def write_page(target: str | Path, out: str | Path | None = None, rows: list[int] | None = None) -> Path:
    """Write the page for a store or study; returns its path (default: view.html beside it)."""
    from actors.store import LensStore, StoreError

    kind, path = resolve(Path(target))
    if kind == "trace":  # its page shows the heatmaps beside it: written where they are
        import zarr

        from pipelines.trace_store import write_pictures

        if out and Path(out).resolve() != (path / "trace.html").resolve():
            raise ViewError(f"--out={out}: a trace's page is written beside its heatmaps, {path / 'trace.html'}")
        write_pictures(path / "trace.zarr", path, load_tokenizer(dict(zarr.open_group(str(path / "trace.zarr")).attrs)))
        return path / "trace.html"
    if kind == "study":
        data = study_data(path)
        default = path / "view.html"
    else:
        try:
            store = LensStore.open(path)
        except StoreError as err:
            raise ViewError(str(err)) from err
        data = lens_data(store, load_tokenizer(store.attrs), rows)
        default = path.parent / "view.html"
    out = Path(out) if out else default
    out.write_text(page(data), encoding="utf-8")
    return out


def serve(path: Path, port: int = 0) -> None:
    """Serve the page's folder on 127.0.0.1 until interrupted."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(f"serving http://127.0.0.1:{server.server_address[1]}/{path.name} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distlens view", description=__doc__.splitlines()[0])
    parser.add_argument(
        "target",
        help="a lens.zarr, a run folder holding one, a pipelines.steer run folder, or a pipelines.trace folder",
    )
    parser.add_argument("--out", help="the page to write (default: view.html beside the store)")
    parser.add_argument("--rows", help="rows to include, e.g. 0,1,5 (default: all)")
    parser.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 after writing it")
    parser.add_argument("--port", type=int, default=0, help="port for --serve (default: a free one)")
    args = parser.parse_args(argv)
    try:
        rows = None
        if args.rows:
            try:
                rows = [int(x) for x in args.rows.split(",")]
            except ValueError:
                raise ViewError(f"--rows={args.rows!r}: give row indices separated by commas, e.g. 0,2") from None
        out = write_page(args.target, args.out, rows)
    except ViewError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.serve:
        serve(out, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
