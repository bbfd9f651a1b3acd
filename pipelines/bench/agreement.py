"""Whether two systems computed the same lens: the baseline's and a peer's top-1 tokens and
log-probs against distlens's store, position by position, within `targets.yaml`'s tolerances."""

from __future__ import annotations

import numpy as np

from pipelines.bench.targets import TARGETS

TOLERANCE = TARGETS["like_for_like"]


def agreement(ours: dict, baseline: dict, prompt_len: int) -> dict:
    """The baseline projects each new position once; compare those positions of distlens's
    store (top-1 agreement, and the top-1 log-prob difference where they agree)."""
    if "top1" not in ours or "top1" not in baseline:
        return {}
    t = len(baseline["top1"][0])
    a = np.asarray(ours["top1"])[:, prompt_len - 1 : prompt_len - 1 + t]
    la = np.asarray(ours["top1_logprob"])[:, prompt_len - 1 : prompt_len - 1 + t]
    same = a == np.asarray(baseline["top1"])
    diff = np.abs(la - np.asarray(baseline["top1_logprob"]))[same]
    return {"top1_agreement": float(same.mean()), "max_logprob_diff": float(diff.max(initial=0.0))}


def like_for_like(peer: dict, ours: dict | None) -> dict:
    """A peer's lens against ours on every position: the same tokens, top-1 agreement and top-1
    log-prob (where they agree) within tolerance; otherwise the row says it disagrees, and where."""
    if not ours or "top1" not in peer or "top1" not in ours:
        return {}
    mine, theirs = ours.get("tokens"), peer.get("tokens")
    if mine != theirs:
        if not mine or not theirs:
            return {"like_for_like": "disagrees: generated other tokens"}
        common = min(len(mine), len(theirs))
        part = next((i for i in range(common) if mine[i] != theirs[i]), common)
        said = ""
        if "last_top2_logprob" in ours and 0 < part <= len(ours["last_top2_logprob"]):
            # how close distlens's (= HF's) own choice was there: a near-tie, or a clear token
            gap = ours["top1_logprob"][-1][part - 1] - ours["last_top2_logprob"][part - 1]
            said = f"; the top-2 log-prob gap there is {gap:.2g}"
        return {"like_for_like": f"disagrees: generated other tokens from position {part}{said}"}
    a, b = np.asarray(peer["top1"]), np.asarray(ours["top1"])
    n = min(a.shape[1], b.shape[1])
    same = a[:, :n] == b[:, :n]
    diff = np.abs(np.asarray(peer["top1_logprob"])[:, :n] - np.asarray(ours["top1_logprob"])[:, :n])[same]
    out = {"top1_agreement": float(same.mean()), "max_logprob_diff": float(diff.max(initial=0.0))}
    ok = (
        out["top1_agreement"] >= TOLERANCE["top1_agreement"]
        and out["max_logprob_diff"] <= TOLERANCE["max_logprob_diff"]
    )
    out["like_for_like"] = "ok" if ok else "disagrees"
    return out


def same_scores(peer: dict, ours: dict) -> dict:
    """A steering peer's answer-letter logits against distlens's sweep."""
    if "scores" not in peer or "scores" not in ours:
        return {}
    diff = float(np.abs(np.asarray(peer["scores"]) - np.asarray(ours["scores"])).max())
    return {
        "max_score_diff_vs_distlens": diff,
        "like_for_like": "ok" if diff <= TOLERANCE["max_score_diff"] else "disagrees",
    }
