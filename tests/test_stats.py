import math

import pytest

from latentwire import stats


def test_bootstrap_ci_of_a_known_proportion():
    # 50 ones and 50 zeros: mean 0.5, standard error 0.05, 95% CI about [0.40, 0.60].
    lo, hi = stats.bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert lo == pytest.approx(0.40, abs=0.015) and hi == pytest.approx(0.60, abs=0.015)


def test_paired_comparison_labels():
    base = [0.1 * (i % 10) for i in range(100)]
    assert stats.paired_comparison(base, base)["label"] == "indistinguishable"
    better = stats.paired_comparison([b + 0.2 for b in base], base)
    assert better["label"] == "better" and better["diff"] == pytest.approx(0.2)
    assert better["p_value"] < 0.01
    assert stats.paired_comparison([b - 0.2 for b in base], base)["label"] == "worse"
    # Gains on half, equal losses on the other half: no difference.
    mixed = [b + (0.3 if i % 2 else -0.3) for i, b in enumerate(base)]
    assert stats.paired_comparison(mixed, base)["label"] == "indistinguishable"


def test_samples_needed_follows_the_power_formula():
    # Differences of +1 on 60% and -1 on 40%: mean 0.2, sd ~0.98; n = (2.80 * 0.98 / 0.2)^2.
    a = [1.0] * 60 + [0.0] * 40
    b = [0.0] * 60 + [1.0] * 40
    n = stats.samples_needed(a, b)
    assert n == pytest.approx(190, abs=5)
    assert stats.samples_needed(a, a) is None


def test_ratio_ci():
    ratio, (lo, hi) = stats.ratio_ci([0.5] * 40, [1.0] * 40)
    assert ratio == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_rank_correlations_against_hand_computed_values():
    # One swapped pair of three: 2 concordant, 1 discordant; squared rank gaps sum to 2.
    assert stats.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert stats.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(1 - 6 * 2 / (3 * 8))
    # A tie in b: 5 concordant pairs, 1 tied in b only: tau-b = 5 / sqrt(5 * 6); b's ranks are
    # 1.5, 1.5, 3, 4, so rho = 4.5 / sqrt(5 * 4.5) = sqrt(0.9).
    assert stats.kendall_tau([1, 2, 3, 4], [0.1, 0.1, 0.2, 0.3]) == pytest.approx(5 / 30 ** 0.5)
    assert stats.spearman([1, 2, 3, 4], [0.1, 0.1, 0.2, 0.3]) == pytest.approx(0.9 ** 0.5)
    # Reversed order: -1 both; only the order counts, not the values.
    assert stats.kendall_tau([1, 2, 3, 4], [9, 7, 2, 1]) == pytest.approx(-1)
    assert stats.spearman([1, 2, 3, 4], [9, 7, 2, 1]) == pytest.approx(-1)
    # Nothing to rank: undefined, not 0.
    assert math.isnan(stats.spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(stats.kendall_tau([1, 2, 3], [5, 5, 5]))
    assert math.isnan(stats.spearman([1], [2]))


def test_kendall_intervals_resample_the_examples_paired_across_candidates_and_times():
    import numpy as np

    gen = np.random.default_rng(5)
    first, final = gen.random((4, 30)), gen.random((4, 30))
    final[0] += 0.3  # one candidate clearly ahead at the end
    got = stats.kendall_tau_ci(first, final, n_boot=200, seed=3)

    def tau_b(a, b):  # pair by pair, as a textbook counts them
        c = d = ta = tb = 0
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                u, v = a[i] - a[j], b[i] - b[j]
                ta += u == 0
                tb += v == 0
                c += u * v > 0
                d += u * v < 0
        pairs = len(a) * (len(a) - 1) // 2
        return (c - d) / math.sqrt((pairs - ta) * (pairs - tb))

    rng = np.random.default_rng(3)
    taus = []
    for _ in range(200):
        draw = rng.integers(0, 30, size=30)
        taus.append(tau_b([sum(row[k] for k in draw) / 30 for row in first],
                          [sum(row[k] for k in draw) / 30 for row in final]))
    assert got == pytest.approx((np.percentile(taus, 2.5), np.percentile(taus, 97.5)))
    # Every example scoring each candidate alike: every draw ranks them as the data do.
    flat = np.repeat([[0.1], [0.4], [0.2]], 10, axis=1)
    assert stats.kendall_tau_ci(flat, flat[[0, 2, 1]]) == pytest.approx((1 / 3, 1 / 3))
    assert all(math.isnan(x) for x in stats.kendall_tau_ci(flat, np.zeros((3, 10))))
