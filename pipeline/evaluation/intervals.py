"""95% intervals over images: accuracy, and the paired difference of two methods scored on the same images.

A paired bootstrap: each resample draws images with replacement and takes both methods' results on the same
draw, so what the two methods share (an easy or a hopeless image) cancels out of the difference. With a few
hundred images a 3-point difference is often noise; the interval says whether it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # bootstrap draws: the interval's ends move by about 0.1 points between seeds at this count
LEVEL = 0.95
SEED = 0  # fixed: the same results give the same intervals
_FEW_VALUES = 256  # up to this many distinct per-image values, resample counts of values (the same distribution)
_CHUNK_CELLS = 4_000_000  # resample indices held at once (32 MB of int64), whatever the image count


@dataclass(frozen=True)
class Interval:
    """A mean over images and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def mean_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The mean of per-image values (1 correct, 0 wrong, or a share of runs) with its 95% bootstrap interval.

    Args:
        values: (n,) per-image values.
        resamples: bootstrap draws.
        seed: the draws' seed.

    Returns:
        The interval; NaN for no images.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= _FEW_VALUES:
        # correctness takes few values (0 and 1, or shares of R runs): drawing n images with replacement is
        # drawing how many of each value, one multinomial per resample instead of n indices
        means = rng.multinomial(n, counts / n, size=resamples) @ distinct / n
    else:
        means = np.empty(resamples)
        step = max(1, _CHUNK_CELLS // n)
        for start in range(0, resamples, step):
            count = min(step, resamples - start)
            means[start : start + count] = values[rng.integers(0, n, size=(count, n))].mean(axis=1)
    tail = (1.0 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high))


def paired_difference(first: np.ndarray, second: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """`first` minus `second`, per image and then averaged, with its paired 95% bootstrap interval.

    Args:
        first, second: (n,) per-image values of two methods on the same images, in the same order.

    Raises:
        ValueError: the two do not cover the same number of images.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"paired values need the same images: {first.shape[0]} against {second.shape[0]}")
    return mean_interval(first - second, resamples, seed)


__all__ = ["Interval", "LEVEL", "RESAMPLES", "mean_interval", "paired_difference"]
