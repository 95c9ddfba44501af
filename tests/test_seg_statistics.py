"""Spread over seeds and paired bootstrap intervals of the downstream study, on known data."""

import math

import numpy as np
import pytest

from common.seg.metrics import study_statistics
from common.seg.statistics import bootstrap_difference, case_means, mean_sd


def test_mean_sd_is_over_the_per_seed_means():
    scores = [[0.5, 0.7], [0.6, 0.8], [0.7, 0.9]]  # seed means 0.6, 0.7, 0.8
    mean, sd = mean_sd(scores)
    assert mean == pytest.approx(0.7) and sd == pytest.approx(0.1)
    one_seed = mean_sd([[0.5, 0.7]])
    assert one_seed[0] == pytest.approx(0.6) and math.isnan(one_seed[1])
    assert mean_sd([[0.4, float("nan")], [0.6, 0.6]])[0] == pytest.approx(0.5)  # absent label


def test_a_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.3, 0.9, (3, 8))
    d, low, high = bootstrap_difference(reference + 0.1, reference, seed=1)
    assert d == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_the_interval_covers_a_known_mean_difference():
    """Differences drawn around 0.05 (sd 0.04): the interval holds 0.05 and excludes 0; it is
    wider than the normal interval of 120 independent differences, 2 x 1.96 x 0.04 /
    sqrt(120), but less than twice (resampling seeds and then cases counts the case noise
    once more: a conservative interval); the same seed gives the same interval."""
    rng = np.random.default_rng(3)
    reference = rng.uniform(0.3, 0.9, (3, 40))
    scores = reference + rng.normal(0.05, 0.04, (3, 40))
    d, low, high = bootstrap_difference(scores, reference, seed=0)
    assert low < 0.05 < high and low > 0
    normal = 2 * 1.96 * 0.04 / math.sqrt(120)
    assert normal < high - low < 2 * normal
    assert bootstrap_difference(scores, reference, seed=0) == (d, low, high)


def test_the_interval_covers_the_true_difference_about_95_in_100_times():
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(100):
        reference = rng.uniform(0.3, 0.9, (3, 20))
        scores = reference + rng.normal(0.02, 0.05, (3, 20))
        _, low, high = bootstrap_difference(scores, reference, resamples=2000, seed=0)
        covered += low <= 0.02 <= high
    assert 85 <= covered <= 100, covered


def test_missing_labels_are_left_out():
    a = np.array([[0.5, np.nan, 0.7]])
    d, low, high = bootstrap_difference(a + 0.2, a, seed=0)
    assert (d, low, high) == pytest.approx((0.2, 0.2, 0.2))
    assert case_means(np.array([[[0.2, np.nan], [0.4, 0.6]]])).tolist() == [[0.2, 0.5]]
    with pytest.raises(ValueError, match="seeds, cases"):
        bootstrap_difference([0.1, 0.2], [0.1, 0.2])


def _run(regime, seed, dice):
    """An evaluation of one regime and seed: per-case Dice ``(cases, 2 labels)``."""
    dice = np.asarray(dice, dtype=float)
    means = dice.mean(axis=0)
    return {
        "regime": regime,
        "seed": seed,
        "steps": [20] if regime == "E2-1" else [20, 10],
        "n_cases": len(dice),
        "dice": {"mean": float(means.mean()), "heart": means[0], "aorta": means[1]},
        "hd95": {"mean": 5.0, "heart": 4.0, "aorta": 6.0},
        "per_case": {"dice": dice.tolist()},
    }


def test_study_statistics_give_spread_and_paired_differences():
    base = [[[0.6, 0.4], [0.8, 0.6]], [[0.7, 0.5], [0.9, 0.7]]]  # 2 seeds x 2 cases x 2 labels
    runs = [_run("E2-1", s, base[s]) for s in (0, 1)]
    runs += [_run("E2-4", s, np.asarray(base[s]) + [0.1, 0.0]) for s in (0, 1)]
    stats = study_statistics(runs, ["E2-1", "E2-4"], compared=["E2-4"])
    assert stats["E2-1"]["seeds"] == [0, 1] and stats["E2-4"]["steps"] == "30 (20 + 10)"
    assert stats["E2-1"]["dice"]["heart"] == pytest.approx([0.75, 0.0707107], rel=1e-5)
    assert stats["E2-4"]["difference"]["heart"] == pytest.approx([0.1, 0.1, 0.1])
    assert stats["E2-4"]["difference"]["aorta"] == pytest.approx([0.0, 0.0, 0.0])
    assert stats["E2-4"]["difference"]["mean"] == pytest.approx([0.05, 0.05, 0.05])
    assert "difference" not in stats["E2-1"]
