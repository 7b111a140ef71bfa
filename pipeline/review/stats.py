"""Statistics of an output directory, read column by column over every row, and the run's facts from its manifest."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.review.output_dir import OutputDir
from pipeline.schema import OK, STATUSES

SCORE_BINS = 20  # confidence histogram bins over [0, 1]


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The confidence-histogram bin of each score: [0, 0.05), [0.05, 0.1), ..., [0.95, 1]. One rule for the
    histogram and the report's rows, so a bar's count and the rows it opens agree."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64) * SCORE_BINS), 0, SCORE_BINS - 1).astype(np.int64)


@dataclass(frozen=True)
class LabelCount:
    """One label's share of the ok rows."""

    label: str
    count: int
    mean_score: float


@dataclass(frozen=True)
class OutputStats:
    """Counts and distributions over every row of an output directory, read column by column."""

    rows: int
    status_counts: dict[str, int]  # every status in STATUSES, zeros included, then any unknown one
    labels: list[LabelCount]  # ok rows per label, most frequent first
    score_histogram: list[int]  # SCORE_BINS counts of ok-row scores over [0, 1]
    score_quantiles: dict[str, float]  # min, p10, median, p90, max of ok-row scores (empty without ok rows)
    boxes: int  # salient boxes over all rows
    boxes_by_level: dict[int, int]
    error_examples: dict[str, list[tuple[str, str]]]  # status -> first (key, error_message) pairs
    manifest_mismatch: list[str] = field(default_factory=list)  # where _manifest.json counts disagree with the Parquet

    @property
    def ok(self) -> int:
        return self.status_counts.get(OK, 0)

    @property
    def errors(self) -> int:
        return self.rows - self.ok


def collect_stats(output: OutputDir, error_examples: int = 20) -> OutputStats:
    """Read the status, label, score, error and box columns of every part file, a batch at a time.

    Args:
        output: the opened output directory.
        error_examples: (key, message) examples kept per failure status.

    Returns:
        The statistics; memory grows only with the number of ok rows (one float32 score each).
    """
    statuses: Counter[str] = Counter()
    label_counts: Counter[str] = Counter()
    label_sums: dict[str, float] = {}
    levels: Counter[int] = Counter()
    histogram = np.zeros(SCORE_BINS, dtype=np.int64)
    scores: list[np.ndarray] = []
    examples: dict[str, list[tuple[str, str]]] = {}
    columns = ["key", "status", "error_message", "label", "score", "boxes"]
    for batch in output.batches(columns):
        table = pa.Table.from_batches([batch])
        statuses.update(_value_counts(table.column("status")))
        ok = table.filter(pc.equal(table.column("status"), OK))
        if ok.num_rows:
            grouped = ok.group_by("label").aggregate([("score", "sum"), ("score", "count")])
            for label, total, count in zip(*(grouped.column(n).to_pylist() for n in ("label", "score_sum", "score_count"))):
                label_counts[label] += count
                label_sums[label] = label_sums.get(label, 0.0) + (total or 0.0)
            values = ok.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
            values = values[np.isfinite(values)]
            scores.append(values)
            histogram += np.bincount(score_bins(values), minlength=SCORE_BINS)
        boxes = table.column("boxes")
        if boxes.null_count < len(boxes):
            flat = pc.list_flatten(boxes)
            if len(flat):
                levels.update(_value_counts(pc.struct_field(flat, "level")))
        failed = table.filter(pc.not_equal(table.column("status"), OK))
        for status in pc.unique(failed.column("status")).to_pylist():
            kept = examples.setdefault(status, [])
            wanted = error_examples - len(kept)
            if wanted > 0:  # only the rows still needed become Python objects
                some = failed.filter(pc.equal(failed.column("status"), status)).slice(0, wanted)
                kept += [(k, m or "") for k, m in zip(some.column("key").to_pylist(), some.column("error_message").to_pylist())]
    all_scores = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    quantiles = {}
    if all_scores.size:
        points = np.quantile(all_scores, [0.0, 0.1, 0.5, 0.9, 1.0])
        quantiles = dict(zip(("min", "p10", "median", "p90", "max"), (float(p) for p in points)))
    counts = {status: statuses.get(status, 0) for status in STATUSES}
    counts.update({status: n for status, n in statuses.items() if status not in counts})
    labels = [LabelCount(label, n, label_sums[label] / n if n else math.nan) for label, n in label_counts.items()]
    labels.sort(key=lambda item: (-item.count, item.label))
    stats = OutputStats(
        rows=sum(counts.values()),
        status_counts=counts,
        labels=labels,
        score_histogram=histogram.tolist(),
        score_quantiles=quantiles,
        boxes=sum(levels.values()),
        boxes_by_level=dict(sorted(levels.items())),
        error_examples=examples,
    )
    return _with_manifest_check(stats, output.manifest)


def run_facts(output: OutputDir) -> list[tuple[str, str]]:
    """The run's identity and settings from `_manifest.json` as (name, value) text pairs, in display order.

    Args:
        output: the opened output directory.

    Returns:
        The pairs, shared by the terminal summary and the HTML report.
    """
    m = output.manifest
    model = m.get("model") or {}
    vocabulary = m.get("vocabulary") or {}
    classes = vocabulary.get("classes") or []
    attempts = m.get("attempts") or []
    shown_classes = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    facts = [
        ("output", output.url),
        ("state", "complete (_SUCCESS present)" if output.complete else "INCOMPLETE: no _SUCCESS; finish it with lgca run --resume"),
        ("run id", str(m.get("run_id"))),
        ("format", str(m.get("format"))),
        ("code version", str(m.get("code_version"))),
        ("started", str(m.get("started_at"))),
        ("ended", str(m.get("ended_at"))),
        (
            "attempts",
            f"{len(attempts)} ({sum(a.get('rows_written', 0) for a in attempts)} rows written, "
            f"{sum(a.get('seconds', 0) for a in attempts):.1f} s)",
        ),
        ("inputs", ", ".join(m.get("inputs") or [])),
        ("model", f"{model.get('name')} / {model.get('pretrained')} ({model.get('source')})"),
        ("weights sha256", str(model.get("weights_sha256"))),
        ("preprocessing", _preprocessing(model.get("preprocess"))),
        ("method", str(m.get("method"))),
        ("scoring", _pairs(m.get("scoring") or {}, skip=("method",))),
        ("vocabulary", f"{len(classes)} classes: {shown_classes}"),
        ("labels file", str(vocabulary.get("labels_file"))),
        ("templates", str(vocabulary.get("templates_file") or "default")),
        ("prompt", str(vocabulary.get("prompt"))),
        ("vocabulary sha256", str(vocabulary.get("sha256"))),
        ("decode", _pairs(m.get("decode") or {})),
        ("execution", _pairs(m.get("execution") or {})),
    ]
    cascade = m.get("cascade")
    if cascade:
        by_method = cascade.get("rows_by_method") or {}
        share = cascade.get("escalated_share")
        shown = ", ".join(f"{name} {n}" for name, n in sorted(by_method.items()))
        escalated = f"{100 * share:.1f}% of ok rows escalated to lgca" if share is not None else "share escalated not recorded"
        facts.append(("cascade", f"margin {cascade.get('margin')}: {escalated}" + (f" (ok rows by method: {shown})" if shown else "")))
    counts = m.get("counts") or {}
    if counts.get("non_image_files_skipped"):
        examples = ", ".join(counts.get("non_image_examples") or [])
        facts.append(("non-image files skipped", f"{counts['non_image_files_skipped']} (e.g. {examples})"))
    return facts


def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict[Any, int]:
    counted = pc.value_counts(column)
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))


def _with_manifest_check(stats: OutputStats, manifest: Mapping[str, Any]) -> OutputStats:
    """Note where the manifest's counts differ from the rows actually in the Parquet files."""
    recorded = manifest.get("counts") or {}
    mismatch = []
    if "rows" in recorded and recorded["rows"] != stats.rows:
        mismatch.append(f"rows: manifest {recorded['rows']}, Parquet {stats.rows}")
    for status, count in stats.status_counts.items():
        if status in recorded and recorded[status] != count:
            mismatch.append(f"{status}: manifest {recorded[status]}, Parquet {count}")
    return replace(stats, manifest_mismatch=mismatch)


def _pairs(values: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    return ", ".join(f"{k}={_compact(v)}" for k, v in values.items() if k not in skip)


def _compact(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_compact(v) for v in value) + ")"
    return str(value)


def _preprocessing(record: Any) -> str:
    """The model's preprocessing in one line, as the manifest records it (older outputs have none)."""
    if not isinstance(record, dict):
        return "not recorded"
    return (
        f"mean {record.get('mean')}, std {record.get('std')}, {record.get('interpolation')}, resize {record.get('resize_mode')}, "
        f"quick_gelu {record.get('quick_gelu')} ({record.get('origin')})"
    )
