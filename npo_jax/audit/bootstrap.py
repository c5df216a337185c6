"""Percentile bootstrap over items: every reported rate comes with how much it could move by chance.

A probe's rate is the mean of its per-item values (0/1 leaks, accuracies, chance-corrected
scores or NLL differences). Its 95% CI is the 2.5th and 97.5th percentiles of the means of
`n_resamples` resamples of the items drawn with replacement by `numpy.random.default_rng(seed)`;
the same seed gives the same interval.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 2000


def bootstrap_ci(values, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_resamples, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarise(values, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{"rate": mean, "ci": [lo, hi], "n": items}; rate and CI are null when there are no items."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"rate": None, "ci": [None, None], "n": 0}
    lo, hi = bootstrap_ci(v, n_resamples=n_resamples, seed=seed)
    return {"rate": float(v.mean()), "ci": [lo, hi], "n": int(v.size)}
