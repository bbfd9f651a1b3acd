"""The benchmark's targets (`targets.yaml`) checked against one run's rows: a table line per
target with its measured figure and met or MISSED, as `table.md` ends."""

from __future__ import annotations

from pathlib import Path

import yaml

TARGETS = yaml.safe_load((Path(__file__).with_name("targets.yaml")).read_text())


def check(rows: list[dict]) -> list[str]:
    """The targets as ratios from this run's rows, each saying met or missed."""
    ours_name, speed, memory = TARGETS["ours"], TARGETS["throughput_vs_baseline"], TARGETS["capture_memory_vs_baseline"]

    def find(system, workload="trajectory", size=None):
        for r in rows:
            if r["system"] == system and r["workload"] == workload and (size is None or r["T"] == size):
                return r
        return {}

    out = ["| target | measured | verdict |", "|---|---|---|"]
    base_sizes = sorted(
        r["T"]
        for r in rows
        if r["system"] == "paper_baseline" and r["workload"] == "trajectory" and "tokens_per_s" in r
    )
    if base_sizes:
        t = base_sizes[-1]
        ours, base = find(ours_name, size=t), find("paper_baseline", size=t)
        if "tokens_per_s" in ours:
            ratio = ours["tokens_per_s"] / base["tokens_per_s"]
            out.append(
                f"| throughput >= {speed:g}x the paper's baseline (T={t}) | {ratio:.1f}x | {'met' if ratio >= speed else 'MISSED'} |"
            )
        floor = find("lens_floor", "lens_floor")
        if "lens_ms_per_row" in floor and "tokens_per_s" in base:
            # The baseline projects each generated position once (L rows per token); distlens also
            # projects the prompt's positions, (T + prompt) / T as many. The ceilings count only the
            # baseline's own work, so they favour a system that did less than distlens does.
            per_token = floor["layers"] * floor["lens_ms_per_row"] / 1e3
            ceiling = 1 / per_token
            reachable = ceiling >= speed * base["tokens_per_s"]
            out.append(
                f"| ceiling set by the exact lens alone (T={t}; generated positions only, as the baseline; model "
                f"cost not counted) | {ceiling:.1f} tokens/s = {ceiling / base['tokens_per_s']:.1f}x the baseline "
                f"| {f'the lens alone does not rule {speed:g}x out' if reachable else f'{speed:g}x NOT reachable on this machine'} |"
            )
            nocap = find(f"{ours_name}_nocapture", size=t)
            if "tokens_per_s" in nocap:
                # The same lens plus a forward pass at the fastest this run measured (distlens without capture).
                both = 1 / (per_token + 1 / nocap["tokens_per_s"])
                share = (
                    f"; distlens (prompt positions too) runs at {ours['tokens_per_s'] / both:.0%} of it"
                    if "tokens_per_s" in ours
                    else ""
                )
                reachable = both >= speed * base["tokens_per_s"]
                out.append(
                    f"| ceiling with the forward's cost too (T={t}; that lens + distlens's forward without capture) "
                    f"| {both:.1f} tokens/s = {both / base['tokens_per_s']:.1f}x the baseline{share} "
                    f"| {f'{speed:g}x reachable' if reachable else f'{speed:g}x NOT reachable with this forward'} |"
                )
        if ours.get("capture_memory") and base.get("capture_memory"):
            mem = base["capture_memory"] / max(ours["capture_memory"], 1)
            out.append(
                f"| capture memory >= {memory:g}x lower than the baseline's (T={t}) | {mem:.1f}x lower | {'met' if mem >= memory else 'MISSED'} |"
            )
    out += long_targets(rows)
    keep = TARGETS["keeps_generation"]
    for t in sorted({r["T"] for r in rows if r["workload"] == "trajectory"}):
        ours, plain = find(ours_name, size=t), find("hf_generate", size=t)
        if "tokens_per_s" in ours and "tokens_per_s" in plain:
            ratio = ours["tokens_per_s"] / plain["tokens_per_s"]
            out.append(
                f"| all-layer capture keeps >= {keep:g}x plain generation (T={t}) | {ratio:.2f}x | {'met' if ratio >= keep else 'MISSED'} |"
            )
            own = find(f"{ours_name}_nocapture", size=t)
            if "tokens_per_s" in own:  # the same engine without capture: what capture itself costs
                ratio = ours["tokens_per_s"] / own["tokens_per_s"]
                out.append(
                    f"| all-layer capture keeps >= {keep:g}x distlens's own generation without capture (T={t}) "
                    f"| {ratio:.2f}x | {'met' if ratio >= keep else 'MISSED'} |"
                )
        for peer in TARGETS["faster_than"]:
            # the peer's fastest way that does the same work (like for like), else its default
            ways = [r for r in rows if r["workload"] == "trajectory" and r["T"] == t and "tokens_per_s" in r]
            ways = [r for r in ways if r["system"] == peer or r["system"].startswith(peer + "_")]
            same = [r for r in ways if r.get("like_for_like") == "ok"]
            p = max(same, key=lambda r: r["tokens_per_s"]) if same else find(peer, size=t)
            if "tokens_per_s" in ours and "tokens_per_s" in p:
                ratio = ours["tokens_per_s"] / p["tokens_per_s"]
                agree = p.get("like_for_like", "unchecked")
                verdict = ("met" if ratio > 1 else "MISSED") if agree == "ok" else "not comparable: the peer disagrees"
                out.append(f"| faster than {p['system']} (T={t}; like for like: {agree}) | {ratio:.2f}x | {verdict} |")
            elif p.get("error"):
                out.append(f"| faster than {peer} (T={t}) | did not run: {p['error']} | MISSED |")
    out += jacobian_targets(rows)
    out += capture_targets(rows)
    out += corpus_targets(rows)
    cost = TARGETS["sweep_cost"]
    sweeps = [r for r in rows if r["system"] == "distlens_sweep_one_pass" and "cost_vs_unsteered_pass" in r]
    for where in dict.fromkeys(r.get("steer_positions", "all") for r in sweeps):
        r = max((x for x in sweeps if x.get("steer_positions", "all") == where), key=lambda x: x["T"])
        verdict = "met" if r["cost_vs_unsteered_pass"] <= cost else "MISSED"
        out.append(
            f"| {r['T']}-coefficient sweep <= {cost:g}x one unsteered pass (steering positions: {where}) "
            f"| {r['cost_vs_unsteered_pass']:.2f}x | {verdict} |"
        )
    share = TARGETS["study_vs_hf_forward"]
    packed, alone = find("steer_packed", "study"), find("steer_one_at_a_time", "study")
    if "fraction_of_hf_forward" in packed:
        ratio = packed["fraction_of_hf_forward"]
        out.append(
            f"| a packed study's forward rows/s >= {share:g}x plain HF forward passes over the same padded rows "
            f"({packed['rows']} rows, {packed['datasets']} datasets) | {ratio:.2f}x | {'met' if ratio >= share else 'MISSED'} |"
        )
    if "wall_s" in packed and "wall_s" in alone:
        out.append(
            f"| a packed study of {packed.get('datasets', '?')} datasets against the same datasets one at a time "
            f"(same results: slopes differ by <= {packed.get('max_slope_difference', float('nan')):.1e}) "
            f"| {packed['wall_s']:.0f} s vs {alone['wall_s']:.0f} s = {alone['wall_s'] / packed['wall_s']:.2f}x faster "
            f"| {'met' if alone['wall_s'] > packed['wall_s'] else 'MISSED'} |"
        )
    tuned = find("tune_distlens_2stage", "tune")
    if "vs_plain_torch" in tuned:  # reported, no target: the same training as a single-process loop
        out.append(
            f"| tuned-lens training tokens/s against a single-process plain torch loop on the same "
            f"{tuned['tokens']} tokens (last step's KL differs by <= {tuned['max_kl_difference']:.1e} nats) "
            f"| {tuned['vs_plain_torch']:.2f}x | reported |"
        )
    return out


def long_targets(rows: list[dict]) -> list[str]:
    """The throughput and memory targets at the long trajectory, where the baseline was measured
    (not extrapolated): the largest T it was measured at. One row per distlens batch size; the
    baseline runs prompts one at a time (batched, it would keep every prompt's softmaxes at
    once), so its tokens/s is the same for any number of prompts."""
    speed, memory = TARGETS["throughput_vs_baseline"], TARGETS["capture_memory_vs_baseline"]
    base = next(
        (r for r in rows if r["system"] == "paper_baseline" and r["workload"].endswith("pos")
         and not r.get("extrapolated") and "tokens_per_s" in r),
        None,
    )  # fmt: skip
    if base is None:
        return []
    out = []
    t, workload = base["T"], base["workload"]
    ours = [
        r for r in rows if r["workload"] == workload and r["system"].startswith("distlens_") and "tokens_per_s" in r
    ]
    for r in sorted(ours, key=lambda r: r.get("prompts", 1)):
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        p = r.get("prompts", 1)
        batch = "one prompt" if p == 1 else f"{p} prompts in one batch, the baseline's one at a time"
        out.append(
            f"| throughput >= {speed:g}x the paper's baseline ({workload}, T={t}, the largest T it was measured at; {batch}) "
            f"| {ratio:.1f}x | {'met' if ratio >= speed else 'MISSED'} |"
        )
        if p == 1 and r.get("capture_memory") and base.get("capture_memory"):
            mem = base["capture_memory"] / r["capture_memory"]
            out.append(
                f"| capture memory >= {memory:g}x lower than the baseline's ({workload}, T={t}; peak RSS above the process "
                f"before generating, distlens's with its model) | {mem:.1f}x lower | {'met' if mem >= memory else 'MISSED'} |"
            )
    return out


def capture_targets(rows: list[dict]) -> list[str]:
    """The capture workload's ratios, each taken within one round (its median, then its range
    over the rounds): distlens against plain generation (with and without kl_to_final) and
    against nnsight, verdicts on the median."""
    keep, out = TARGETS["keeps_generation"], []
    for r in rows:
        if r["workload"] != "capture" or not r["system"].startswith("distlens"):
            continue
        what = "kl_to_final off" if r["system"].endswith("_kl_off") else "defaults, kl_to_final on"
        rounds = len(r.get("vs_hf_generate_rounds", []))
        where = f"capture, T={r['T']}, {what}; ratio per round, {rounds} rounds in turn"
        if "vs_hf_generate" in r:
            ratio = r["vs_hf_generate"]
            out.append(
                f"| all-layer capture keeps >= {keep:g}x plain generation ({where}) | {ratio:.2f}x "
                f"({r['vs_hf_generate_min']:.2f}-{r['vs_hf_generate_max']:.2f}) | {'met' if ratio >= keep else 'MISSED'} |"
            )
        peer = next((x for x in rows if x["workload"] == "capture" and x["system"] == "nnsight"), {})
        if "vs_nnsight" in r:
            agree = peer.get("like_for_like", "unchecked")
            ratio = r["vs_nnsight"]
            verdict = ("met" if ratio > 1 else "MISSED") if agree == "ok" else "not comparable: the peer disagrees"
            out.append(
                f"| faster than nnsight ({where}; like for like: {agree}) | {ratio:.2f}x "
                f"({r['vs_nnsight_min']:.2f}-{r['vs_nnsight_max']:.2f}) | {verdict} |"
            )
    return out


def corpus_targets(rows: list[dict]) -> list[str]:
    """The corpus workload's ratios of rows/s, each taken within one round (its median, then its
    range): continuous batching over static micro-batches with capture, and without capture
    over HF generate batched at the same size; verdicts on the median."""
    out = []
    for system, name, target, what in (
        ("distlens_continuous", "vs_static", "continuous_vs_static", "static micro-batches, capture on"),
        ("distlens_continuous_nocapture", "vs_hf_generate", "continuous_vs_hf_generate", "HF generate batched, no capture"),
    ):  # fmt: skip
        r = next((x for x in rows if x["workload"] == "corpus" and x["system"] == system and name in x), None)
        if r is None:
            continue
        want, ratio = TARGETS[target], r[name]
        where = f"corpus, {r['rows']:.0f} rows, T<={r['T']}, batch {r['batch']}; rows/s per round, {r['repeats']} rounds in turn"
        out.append(
            f"| continuous batching >= {want:g}x {what} ({where}) | {ratio:.2f}x ({r[f'{name}_min']:.2f}-"
            f"{r[f'{name}_max']:.2f}) | {'met' if ratio >= want else 'MISSED'} |"
        )
    return out


def jacobian_targets(rows: list[dict]) -> list[str]:
    """The jacobian workload's ratio: distlens's fit throughput over plain torch's, same fit."""
    r = next((x for x in rows if x["workload"] == "jacobian" and "vs_plain_torch" in x), None)
    if r is None:
        return []
    want, ratio = TARGETS["jacobian_fit_vs_torch"], r["vs_plain_torch"]
    return [
        f"| Jacobian-lens fit throughput >= {want:g}x plain torch on the unsliced model in one process ({r['system']}; "
        f"{r['fitted']}; the fits differ by {r['max_rel_difference']:.1e} of their scale) | {ratio:.2f}x "
        f"| {'met' if ratio >= want else 'MISSED'} |"
    ]
