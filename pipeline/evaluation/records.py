"""Result records of an evaluation: one JSON-ready record per setting and method, with CLIP_benchmark's keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.evaluation.metrics import mean_and_std
from pipeline.evaluation.sweep import METHOD_PARAMETERS

if TYPE_CHECKING:  # the runner imports torch; records are made and read without it
    from pipeline.evaluation.runner import Evaluation

TASK = "zeroshot_classification"  # CLIP_benchmark's task name


def result_records(evaluation: Evaluation, identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per setting and method, with CLIP_benchmark's metric keys.

    Each record holds `acc1`, `acc5` (top-k, k = `acc5_k`) and `mean_per_class_recall` (fractions, means
    over runs), the `identity` fields (dataset, model, pretrained, ...), `method`, `task`, the method's
    scoring parameters, the runs' seeds, the swept values under `setting`, and the most confused pairs.
    With more than one run also `<metric>_std` (population) and `<metric>_runs` (per-run values).

    Args:
        evaluation: the outcome of `evaluate`.
        identity: fields copied into every record (dataset, model, pretrained, ...).

    Returns:
        The records, by setting, then by method in the requested order.
    """
    records = []
    for setting_result in evaluation.results:
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
            record["scoring"] = {
                name: (list(value) if isinstance(value, tuple) else value)
                for name, value in scoring.to_dict().items()
                if name in METHOD_PARAMETERS[method]
            }
            if "global_weight" in record["scoring"]:
                record["scoring"]["global_weight"] = scoring.global_weight_for(method)  # the λ used, not "default"
            if setting_result.setting.changes:
                record["setting"] = {
                    name: (list(value) if isinstance(value, tuple) else value) for name, value in setting_result.setting.changes.items()
                }
            record["confusions"] = [{"true": t, "predicted": p, "count": n} for t, p, n in result.confusions]
            if result.group_acc1:
                record["groups"] = {name: _group_record(values) for name, values in result.group_acc1.items()}
            records.append(record)
    return records


def _group_record(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_and_std(values)
    return {"acc1": mean, "acc1_std": std} if len(values) > 1 else {"acc1": mean}


__all__ = [
    "TASK",
    "result_records",
]
