"""The report of one run's rows: `table.md` (every row, then the targets' verdicts) and the
plots (throughput and memory against T, the sweep's cost, throughput against what is scaled)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipelines.bench import targets


def mib(x) -> str:
    return f"{x / 2**20:,.0f}" if isinstance(x, float | int) and np.isfinite(x) else ""


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| workload | T | system | tokens/s (median, min-max) | wall s | peak RSS MiB (sum) | largest process MiB "
        "| capture memory MiB | lens share | bytes per row (compression) | like for like | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = (
            f"{r['tokens_per_s']:.2f} ({r.get('tokens_per_s_min', r['tokens_per_s']):.2f}-{r.get('tokens_per_s_max', r['tokens_per_s']):.2f})"
            if "tokens_per_s" in r and r["workload"] != "sweep"
            else ""
        )
        agree = r.get("like_for_like") or (
            f"top-1 {r['top1_agreement']:.4f}, dlogp {r['max_logprob_diff']:.1e}" if "top1_agreement" in r else ""
        )
        if "lens_ms_per_row" in r:
            r = {
                **r,
                "note": f"{r['lens_ms_per_row']:.3f} ms per (position, layer); fp32 GEMM {r['gemm_gflops']:.0f} GFLOP/s",
            }
        note = (
            r.get("error")
            or r.get("note")
            or (f"{r['cost_vs_unsteered_pass']:.2f}x one unsteered pass" if "cost_vs_unsteered_pass" in r else "")
        )
        if r.get("extrapolated"):
            note = "EXTRAPOLATED: " + note
        wall = f"{r['wall_s']:.2f}" if "wall_s" in r else ""
        system = r["system"] + (f" (steer {r['steer_positions']})" if "steer_positions" in r else "")
        share = f"{r['lens_share']:.0%}" if "lens_share" in r else ""
        stored = f"{r['bytes_per_row']:.1f} ({r['compression']:.1f}x)" if "bytes_per_row" in r else ""
        lines.append(
            f"| {r['workload']} | {r['T']} | {system} | {tps} | {wall} | {mib(r.get('peak_rss'))} "
            f"| {mib(r.get('largest_process_rss', r.get('peak_rss')))} | {mib(r.get('capture_memory'))} "
            f"| {share} | {stored} | {agree} | {note} |"
        )
    return lines


def report(rows: list[dict], out_dir: Path) -> None:
    """table.md (every row and the targets) and the plots."""
    from pipelines.plots import pyplot

    (out_dir / "table.md").write_text("\n".join([*table(rows), "", *targets.check(rows)]) + "\n")
    plt = pyplot()
    traj = [r for r in rows if re.fullmatch(r"trajectory(_\d+pos)?", r["workload"]) and "tokens_per_s" in r]
    for metric, name, ylabel, log in (
        ("tokens_per_s", "throughput_vs_T.png", "generated tokens / s", True),
        ("peak_rss", "memory_vs_T.png", "peak RSS (MiB, all processes)", False),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        colors = plt.get_cmap("tab20").colors  # more systems than the default ten colours
        for i, system in enumerate(dict.fromkeys(r["system"] for r in traj)):
            pts = sorted(
                (r["T"], r[metric] / (2**20 if metric == "peak_rss" else 1))
                for r in traj
                if r["system"] == system and metric in r
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="osD^v<>"[i % 7],
                    color=colors[i % len(colors)],
                    ls="--" if any(r.get("extrapolated") for r in traj if r["system"] == system) else "-",
                    label=system,
                )
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("generated tokens T")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    sweep_plot(rows, out_dir / "sweep_cost.png", plt)
    scaling_plot(rows, out_dir / "scaling.png", plt)


def sweep_plot(rows: list[dict], path: Path, plt) -> None:
    """A sweep's cost in unsteered passes against its coefficients: one pass, and one per coefficient."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for where in dict.fromkeys(r.get("steer_positions", "all") for r in rows if r["workload"] == "sweep"):
        mine = [r for r in rows if r.get("steer_positions", "all") == where and "cost_vs_unsteered_pass" in r]
        sweep = sorted((r["T"], r["cost_vs_unsteered_pass"]) for r in mine if r["system"] == "distlens_sweep_one_pass")
        per = [
            (r["T"], r["cost_vs_unsteered_pass"]) for r in mine if r["system"] == "distlens_one_pass_per_coefficient"
        ]
        if sweep:
            ax.plot(*zip(*sweep), marker="o", label=f"distlens, one pass (steer {where})")
        if per:
            ax.plot(*zip(*per), marker="s", ls="", label=f"one pass per coefficient (steer {where})")
    ax.set_xlabel("coefficients M")
    ax.set_ylabel("cost / one unsteered pass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_plot(rows: list[dict], path: Path, plt) -> None:
    """Throughput against layers captured, against pipeline stages (largest trajectory T) and
    against prompts per batch, side by side; a panel with no rows says so."""
    ok = [r for r in rows if "tokens_per_s" in r]
    biggest = max((r["T"] for r in ok if r["workload"] == "trajectory"), default=None)
    stage_pts = {}
    for r in ok:
        if r["workload"] == "trajectory" and r["T"] == biggest and "stages" in r and "nocapture" not in r["system"]:
            stage_pts.setdefault(f"distlens {r.get('executor', '')}", []).append((r["stages"], r["tokens_per_s"]))
    panels = (
        ("layers captured", {"distlens local 2 stages": [(r["T"], r["tokens_per_s"]) for r in ok
                                                         if r["workload"] == "scaling_layers"]}),
        (f"pipeline stages (T={biggest})", stage_pts),
        ("prompts per batch", {s: [(r["T"], r["tokens_per_s"]) for r in ok
                                   if r["workload"] == "scaling_prompts" and r["system"] == s]
                               for s in dict.fromkeys(r["system"] for r in ok if r["workload"] == "scaling_prompts")}),
    )  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (xlabel, series) in zip(axes, panels):
        for label, pts in series.items():
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        if not any(series.values()):
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
