"""Uncertainty for per-example scores: bootstrap intervals and paired comparisons.

With 100 examples, F1 differences of a few points are noise; these functions say which are not.
All resampling is seeded, so the same summary always gives the same intervals and labels.
"""

import math

import numpy as np

N_BOOT = 4000
Z_95 = 1.959964
Z_80_POWER = 0.841621


def bootstrap_ci(values, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0):
    """Percentile bootstrap interval of the mean."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_comparison(a, b, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Compare a with b on the same examples: the mean difference a - b, its paired bootstrap
    interval, a two-sided sign-flip permutation p-value, and a label: "better" or "worse" when
    the interval excludes zero, else "indistinguishable"."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(d, level, n_boot, seed)
    rng = np.random.default_rng(seed + 1)
    observed = abs(d.mean()) if d.size else 0.0
    if d.size == 0 or not np.any(d):
        p = 1.0
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_boot, d.size))
        p = float((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).mean())
    label = "better" if lo > 0 else "worse" if hi < 0 else "indistinguishable"
    return {"diff": float(d.mean()) if d.size else math.nan, "diff_ci": (lo, hi),
            "p_value": p, "label": label}


def samples_needed(a, b, power_z: float = Z_80_POWER) -> int | None:
    """Examples needed to tell a from b (paired, 95% two-sided, 80% power) at the observed mean
    difference and variance of the per-example differences; None when they never differ."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2 or d.mean() == 0:
        return None
    return int(math.ceil(((Z_95 + power_z) * d.std(ddof=1) / abs(d.mean())) ** 2))


def ratio_ci(num, den, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0):
    """Ratio of means num/den with a paired bootstrap interval (same examples in both)."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if y.sum() == 0:
        return (math.nan, (math.nan, math.nan))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    den_b = y[idx].mean(axis=1)
    ratios = np.where(den_b > 0, x[idx].mean(axis=1) / np.where(den_b > 0, den_b, 1), np.nan)
    tail = (1 - level) / 2 * 100
    return (float(x.mean() / y.mean()),
            (float(np.nanpercentile(ratios, tail)), float(np.nanpercentile(ratios, 100 - tail))))


def _average_ranks(values) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    v = np.asarray(values, dtype=float)
    ranks = np.empty(v.size)
    ranks[np.argsort(v, kind="stable")] = np.arange(1, v.size + 1)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho: the Pearson correlation of the two average rankings; NaN when either
    ranking is constant (no order to agree with) or fewer than two items."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    if ra.size < 2:
        return math.nan
    da, db = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((da ** 2).sum() * (db ** 2).sum()))
    return float((da * db).sum() / den) if den else math.nan


def kendall_tau(a, b) -> float:
    """Kendall's tau-b: (concordant - discordant pairs) over the geometric mean of the pairs
    untied in each, so ties (no-op experiments repeat the baseline's F1) neither agree nor
    disagree. NaN when either side is all ties."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    i, j = np.triu_indices(x.size, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    den = math.sqrt(float((sx ** 2).sum() * (sy ** 2).sum()))
    return float((sx * sy).sum() / den) if den else math.nan


def kendall_tau_ci(first, final, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0):
    """Percentile bootstrap interval of Kendall's tau-b between two rankings of the same
    candidates by their mean score, each candidate scored on the same examples at two times
    (first, final: [candidates, examples]): the examples are resampled, the same draw for every
    candidate and both times, as their scores are paired. Draws where either ranking is all
    ties are left out; (NaN, NaN) when every draw is."""
    x, y = np.asarray(first, dtype=float), np.asarray(final, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    taus = np.array([kendall_tau(x[:, d].mean(axis=1), y[:, d].mean(axis=1)) for d in draws])
    if np.isnan(taus).all():
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    return (float(np.nanpercentile(taus, tail)), float(np.nanpercentile(taus, 100 - tail)))
