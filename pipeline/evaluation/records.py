"""Result records of an evaluation: one JSON-ready record per setting and method, with CLIP_benchmark's keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.intervals import Interval, mean_interval, paired_difference
from pipeline.evaluation.metrics import mean_and_std
from pipeline.evaluation.sweep import METHOD_PARAMETERS

if TYPE_CHECKING:
    from pipeline.evaluation.results import Evaluation, MethodResult

TASK = "zeroshot_classification"  # CLIP_benchmark's task name


def result_records(evaluation: Evaluation, identity: Mapping[str, Any], baseline: str | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per setting and method, with CLIP_benchmark's metric keys.

    Each record holds `acc1`, `acc5` (top-k, k = `acc5_k`) and `mean_per_class_recall` (fractions, means
    over runs), the `identity` fields (dataset, model, pretrained, ...), `method`, `task`, the method's
    scoring parameters, the runs' seeds, the swept values under `setting`, and the most confused pairs.
    With more than one run also `<metric>_std` (population) and `<metric>_runs` (per-run values).
    `acc1_interval` is acc1's 95% bootstrap interval over images; `paired` (on every method but the baseline)
    the paired difference of acc1 against the baseline method of the same setting, with its 95% interval;
    both again per group. `encoder_passes` is the image-encoder passes per image and run; a cascade's record
    also has `cascade` (threshold, share escalated).

    Args:
        evaluation: the outcome of `evaluate`.
        identity: fields copied into every record (dataset, model, pretrained, ...).
        baseline: the method paired differences are taken against; None for none.

    Returns:
        The records, by setting, then by method in the requested order.
    """
    records = []
    groups = np.asarray(evaluation.groups, dtype=object) if evaluation.groups is not None else None
    for setting_result in evaluation.results:
        against = setting_result.methods.get(baseline) if baseline else None
        for method, result in setting_result.methods.items():
            scoring = setting_result.setting.scoring
            record: dict[str, Any] = {**identity, "task": TASK, "method": method}
            for name in ("acc1", "acc5", "mean_per_class_recall"):
                values = getattr(result, name)
                mean, std = mean_and_std(values)
                record[name] = mean
                if result.runs > 1:
                    record[f"{name}_std"] = std
                    record[f"{name}_runs"] = list(values)
            record["acc5_k"] = evaluation.k
            record["runs"] = result.runs
            record["seeds"] = list(result.seeds)
            record["images"] = evaluation.scored
            record["classes"] = len(evaluation.classes)
            scored_as = "lgca" if result.cascade is not None else method
            record["scoring"] = {
                name: (list(value) if isinstance(value, tuple) else value)
                for name, value in scoring.to_dict().items()
                if name in METHOD_PARAMETERS[scored_as]
            }
            if "global_weight" in record["scoring"]:
                record["scoring"]["global_weight"] = scoring.global_weight_for(scored_as)  # the λ used, not "default"
            if "crop_scale" in record["scoring"]:
                record["scoring"]["crop_scale"] = list(scoring.crop_scale_for(scored_as))  # the crops this method cut
            record["encoder_passes"] = result.encoder_passes
            if result.cascade is not None:
                record["cascade"] = _cascade_record(result, setting_result.methods["lgca"], groups)
            record.update(_interval_fields(result, against, None))
            if setting_result.setting.changes:
                record["setting"] = {
                    name: (list(value) if isinstance(value, tuple) else value) for name, value in setting_result.setting.changes.items()
                }
            record["confusions"] = [{"true": t, "predicted": p, "count": n} for t, p, n in result.confusions]
            if result.group_acc1:
                record["groups"] = {
                    name: {**_group_record(values), **_interval_fields(result, against, groups == name if groups is not None else None)}
                    for name, values in result.group_acc1.items()
                }
            records.append(record)
    return records


def _group_record(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_and_std(values)
    return {"acc1": mean, "acc1_std": std} if len(values) > 1 else {"acc1": mean}


def _interval_fields(result: MethodResult, baseline: MethodResult | None, members: np.ndarray | None) -> dict[str, Any]:
    """acc1's interval, and the paired difference against `baseline`, over all images or a group's."""
    if result.correct.size == 0:
        return {}
    correct = result.correct if members is None else result.correct[members]
    out: dict[str, Any] = {"acc1_interval": _bounds(mean_interval(correct))}
    if baseline is not None and baseline is not result and baseline.correct.size:
        other = baseline.correct if members is None else baseline.correct[members]
        out["paired"] = {"baseline": baseline.method, **_difference(correct, other)}
    return out


def _cascade_record(result: MethodResult, lgca: MethodResult, groups: np.ndarray | None) -> dict[str, Any]:
    """A cascade's threshold, share escalated, and its paired difference against full lgca, overall and per group."""
    assert result.cascade is not None
    record: dict[str, Any] = {
        "threshold": result.cascade.threshold,
        "escalated": result.cascade.escalated,
        "against_lgca": _difference(result.correct, lgca.correct),
    }
    if groups is not None:
        record["groups"] = {
            str(name): _difference(result.correct[groups == name], lgca.correct[groups == name]) for name in sorted(set(groups))
        }
    return record


def _difference(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    interval = paired_difference(first, second)
    return {"difference": interval.mean, "low": interval.low, "high": interval.high}


def _bounds(interval: Interval) -> dict[str, float]:
    return {"low": interval.low, "high": interval.high}


__all__ = [
    "TASK",
    "result_records",
]
