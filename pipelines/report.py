"""`python -m pipelines.report <dir>` (or `distlens report <dir>`): collect every steerability
result under a directory (a Hydra multirun's sweep dir, a `dataset=all` run, or several) into
one table: report.md and report.csv in that directory, and the table on stdout."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

COLUMNS = (
    "job", "dataset", "layers", "best_layer", "site", "positions", "mean_of_slopes", "mean_of_slopes_ci95",
    "slope_of_mean", "slope_of_mean_ci95", "unsteered_matching_rate", "train_items", "items", "cluster", "wall_s",
)  # fmt: skip


def collect(root: Path) -> list[dict]:
    """One row per summary.json of a steerability study under `root`, in path order."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"distlens: error: {path} is not a readable summary ({err})") from None
        if not isinstance(result, dict) or "mean_of_slopes" not in result:
            continue  # another tool's summary
        job = path.parent.relative_to(root).as_posix() or "."
        cluster = result.get("cluster") or {}
        rows.append(
            {**{k: result.get(k) for k in COLUMNS}, "job": job, "cluster": cluster.get("address", "in-process")}
        )
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    return "" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distlens report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun sweep dir (e.g. outputs/steer-multirun/<time>) or run dir")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(
            f"distlens: error: {args.dir} is not a directory: give a run or multirun output directory", file=sys.stderr
        )
        return 2
    rows = collect(args.dir)
    if not rows:
        print(
            f"distlens: error: no steerability summary.json under {args.dir} (did its jobs fail? each job's "
            "error is in its own directory's log)",
            file=sys.stderr,
        )
        return 2
    text = table(rows)
    (args.dir / "report.md").write_text(text)
    with open(args.dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in COLUMNS} for r in rows)
    print(text)
    print(f"{len(rows)} result(s); written to {args.dir / 'report.md'} and report.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
