"""95% intervals over images: percentile bootstrap of means and of paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.intervals import mean_interval, paired_difference


def test_an_interval_holds_its_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    small = (rng.random(100) < 0.6).astype(float)
    large = (rng.random(10_000) < 0.6).astype(float)
    a, b = mean_interval(small), mean_interval(large)
    assert a.low <= a.mean <= a.high and b.low <= b.mean <= b.high
    assert (b.high - b.low) < (a.high - a.low) / 5
    # the textbook width for a proportion: 2 * 1.96 * sqrt(p (1 - p) / n)
    assert b.high - b.low == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 10_000), rel=0.1)


def test_counting_values_and_drawing_images_give_the_same_interval():
    """Few distinct values are resampled as counts; many as image indices: the two agree."""
    rng = np.random.default_rng(2)
    binary = (rng.random(2000) < 0.3).astype(float)
    jittered = binary + rng.normal(0, 1e-9, size=2000)  # thousands of distinct values, the same data
    few, many = mean_interval(binary), mean_interval(jittered)
    assert few.low == pytest.approx(many.low, abs=0.006) and few.high == pytest.approx(many.high, abs=0.006)


def test_a_paired_difference_cancels_what_two_methods_share():
    """Two methods that agree on all but 20 of 1,000 images: the unpaired intervals overlap widely, the paired
    difference is 2 points with an interval that excludes 0."""
    rng = np.random.default_rng(3)
    shared = (rng.random(1000) < 0.5).astype(float)
    better = shared.copy()
    better[np.flatnonzero(shared == 0)[:20]] = 1.0
    difference = paired_difference(better, shared)
    assert difference.mean == pytest.approx(0.02)
    assert difference.low > 0
    assert mean_interval(better).low < mean_interval(shared).high  # unpaired, they overlap
    same = paired_difference(shared, shared)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_intervals_are_reproducible_and_reject_unpaired_data():
    values = np.array([0.0, 1.0, 1.0, 0.5])
    assert mean_interval(values) == mean_interval(values)
    assert np.isnan(mean_interval(np.zeros(0)).mean)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(np.ones(3), np.ones(4))
