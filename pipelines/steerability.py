"""Steerability statistics of a coefficient sweep: how propensity moves with the coefficient.

propensity = logit(matching letter) - logit(non-matching letter) at the answer position.
Per example, steerability is the least-squares slope of propensity against coefficient. For a
dataset both definitions are reported, by name: `mean_of_slopes` (the mean of per-example
slopes) and `slope_of_mean` (the slope of the mean propensity curve, the paper's definition),
each with a bootstrap 95% CI over items, plus R^2 and the anti-steerable fraction.
"""

from __future__ import annotations

import numpy as np


def fit_slopes(coefficients: np.ndarray, propensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coefficients: [M]; propensity: [items, M] -> (slope [items], r2 [items])."""
    x = np.asarray(coefficients, np.float64)
    y = np.asarray(propensity, np.float64)
    xc = x - x.mean()
    slope = (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    fitted = y.mean(axis=1, keepdims=True) + slope[:, None] * xc[None, :]
    ss_res = ((y - fitted) ** 2).sum(axis=1)
    ss_tot = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 1.0)
    return slope, r2


def steerability(coefficients, propensity, matching_prob=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Dataset summary of a sweep. propensity: [items, M]; matching_prob: [items, M] (the
    probability of the matching answer among the item's choices), optional."""
    coefficients = np.asarray(coefficients, np.float64)
    propensity = np.asarray(propensity, np.float64)
    n = propensity.shape[0]
    slopes, r2 = fit_slopes(coefficients, propensity)
    mean_curve = propensity.mean(axis=0)
    slope_of_mean, r2_mean = fit_slopes(coefficients, mean_curve[None])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(n_boot, n))
    boot_mean_slopes = slopes[picks].mean(axis=1)
    boot_slope_of_mean = fit_slopes(coefficients, propensity[picks].mean(axis=1))[0]
    boot_curves = propensity[picks].mean(axis=1)  # [n_boot, M]
    out = {
        "items": int(n),
        "coefficients": coefficients.tolist(),
        "mean_of_slopes": float(slopes.mean()),
        "mean_of_slopes_ci95": np.percentile(boot_mean_slopes, [2.5, 97.5]).tolist(),
        "slope_of_mean": float(slope_of_mean[0]),
        "slope_of_mean_ci95": np.percentile(boot_slope_of_mean, [2.5, 97.5]).tolist(),
        "r2_of_mean_curve": float(r2_mean[0]),
        "mean_r2_per_example": float(r2.mean()),
        "anti_steerable_fraction": float((slopes < 0).mean()),
        "mean_propensity": mean_curve.tolist(),
        "mean_propensity_ci95": np.percentile(boot_curves, [2.5, 97.5], axis=0).T.tolist(),
    }
    if matching_prob is not None:
        matching_prob = np.asarray(matching_prob, np.float64)
        zero = int(np.argmin(np.abs(coefficients)))
        out["matching_prob"] = matching_prob.mean(axis=0).tolist()
        out["unsteered_matching_rate"] = float((matching_prob[:, zero] > 0.5).mean())
    return out
