"""Accuracy metrics on class scores: top-k hits and accuracy, mean per-class recall, confusions, run statistics."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

TOP_K = 5  # acc5 is top-k accuracy with k = min(TOP_K, classes), as in CLIP_benchmark


def topk_hits(probabilities: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Whether each image's true class is among its `k` best-scored classes.

    Args:
        probabilities: (n, C) class scores (any monotone score works).
        targets: (n,) true class indices.
        k: how many ranks count; ties are broken by class order, as in `ImageScore.topk_labels`.

    Returns:
        (n,) bool.
    """
    if probabilities.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (n, k)
    return (ranked == np.asarray(targets)[:, None]).any(axis=1)


def topk_accuracy(probabilities: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of images whose true class is among their `k` best (NaN for no images)."""
    hits = topk_hits(probabilities, targets, k)
    return float(hits.mean()) if hits.size else math.nan


def mean_per_class_recall(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes that have images of the share of their images predicted as them.

    Classes without images are left out (as in scikit-learn's balanced accuracy, which CLIP_benchmark
    reports under this name); NaN for no images.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if targets.size == 0:
        return math.nan
    recalls = [float(np.mean(predictions[targets == c] == c)) for c in np.unique(targets)]
    return float(np.mean(recalls))


def confused_pairs(predictions: np.ndarray, targets: np.ndarray, classes: Sequence[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) class pairs among wrong predictions, with their counts.

    Args:
        predictions: (n,) predicted class indices.
        targets: (n,) true class indices.
        classes: class names by index.
        top: how many pairs to return.

    Returns:
        (true name, predicted name, count), ordered by count, then by true and predicted class name.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    wrong = predictions != targets
    counts = Counter(zip(targets[wrong].tolist(), predictions[wrong].tolist()))
    pairs = [(classes[t], classes[p], n) for (t, p), n in counts.items()]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:top]


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, ddof=0) of per-run values."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


__all__ = [
    "TOP_K",
    "confused_pairs",
    "mean_and_std",
    "mean_per_class_recall",
    "topk_accuracy",
    "topk_hits",
]
