"""What `lgca eval` measures: per method and setting, accuracy per run and the images behind it; the tallies
that collect predictions batch by batch and become those results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluation.metrics import confused_pairs, mean_per_class_recall, topk_hits
from pipeline.evaluation.sweep import Setting


@dataclass(frozen=True)
class Failure:
    """An image that could not be read or decoded; it is left out of the metrics and reported."""

    key: str
    path: str
    status: str  # read_error | decode_error
    error_message: str


@dataclass(frozen=True)
class MethodResult:
    """Metrics of one method in one setting, per run (seed)."""

    method: str
    seeds: tuple[int, ...]
    acc1: tuple[float, ...]
    acc5: tuple[float, ...]  # top-k with k = min(5, classes)
    mean_per_class_recall: tuple[float, ...]
    confusions: tuple[tuple[str, str, int], ...]  # most confused (true, predicted, count), first run
    group_acc1: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # acc1 per run in each group
    # (n,) per scored image, the share of runs that predicted its class: what paired intervals resample
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False)
    encoder_passes: float = 1.0  # image-encoder passes per image and run
    cascade: CascadeCost | None = None  # set for a cascade's result

    @property
    def runs(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class CascadeCost:
    """What the confidence cascade at one threshold spent (docs/METHOD.md step 7)."""

    threshold: float
    escalated: float  # share of images scored with lgca


@dataclass(frozen=True)
class SettingResult:
    """All methods' results for one setting."""

    setting: Setting
    methods: dict[str, MethodResult]  # in the requested order


@dataclass(frozen=True)
class Evaluation:
    """The outcome of `evaluate`."""

    classes: tuple[str, ...]  # the vocabulary: every class competes
    k: int  # the k of acc5
    scored: int  # images with predictions
    failures: tuple[Failure, ...]
    results: tuple[SettingResult, ...]
    encoder_rows: int  # views encoded in all
    groups: tuple[str, ...] | None = None  # group of each scored image, in order, when the data has groups


@dataclass
class Tally:
    """Predictions and top-k hits of one method in one setting, per run, batch by batch; for the cascade's
    first pass also the top-1 minus top-2 margins."""

    predictions: list[list[np.ndarray]] = field(default_factory=list)
    hits: list[list[np.ndarray]] = field(default_factory=list)
    margins: list[np.ndarray] = field(default_factory=list)

    def add(self, run: int, probabilities: np.ndarray, targets: np.ndarray, k: int) -> None:
        while len(self.predictions) <= run:
            self.predictions.append([])
            self.hits.append([])
        self.predictions[run].append(np.argsort(-probabilities, axis=1, kind="stable")[:, 0])
        self.hits[run].append(topk_hits(probabilities, targets, k))


def cascade_tally(first: Tally, lgca: Tally, threshold: float) -> Tally:
    """The cascade at `threshold` from its two passes: the first pass where its margin reaches the threshold,
    lgca elsewhere, run by run (the first pass does not depend on the seed)."""
    keep = np.concatenate(first.margins) >= threshold  # NaN margins escalate, as in the Scorer
    first_predictions, first_hits = np.concatenate(first.predictions[0]), np.concatenate(first.hits[0])
    out = Tally()
    for run_predictions, run_hits in zip(lgca.predictions, lgca.hits):
        out.predictions.append([np.where(keep, first_predictions, np.concatenate(run_predictions))])
        out.hits.append([np.where(keep, first_hits, np.concatenate(run_hits))])
    return out


def method_result(
    method: str,
    seeds: Sequence[int],
    tally: Tally,
    targets: np.ndarray,
    groups: np.ndarray | None,
    classes: Sequence[str],
    confusions: int,
) -> MethodResult:
    acc1, acc5, recall = [], [], []
    group_acc1: dict[str, list[float]] = {name: [] for name in sorted(set(groups))} if groups is not None else {}
    run_predictions = []
    for run in range(len(seeds)):
        predictions = np.concatenate(tally.predictions[run])
        hits = np.concatenate(tally.hits[run])
        acc1.append(float(np.mean(predictions == targets)))
        acc5.append(float(np.mean(hits)))
        recall.append(mean_per_class_recall(predictions, targets))
        for name, values in group_acc1.items():
            members = groups == name
            values.append(float(np.mean(predictions[members] == targets[members])))
        run_predictions.append(predictions)
    return MethodResult(
        correct=np.mean([p == targets for p in run_predictions], axis=0),
        method=method,
        seeds=tuple(seeds),
        acc1=tuple(acc1),
        acc5=tuple(acc5),
        mean_per_class_recall=tuple(recall),
        confusions=tuple(confused_pairs(run_predictions[0], targets, classes, confusions)),  # the first run's
        group_acc1={name: tuple(values) for name, values in group_acc1.items()},
    )
