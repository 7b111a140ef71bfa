"""The terminal report of `lgca eval`: header, results tables of methods, groups or sweep settings, confusions, failures."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.evaluation.results import Evaluation


def format_report(
    evaluation: Evaluation,
    records: Sequence[Mapping[str, Any]],
    identity: Mapping[str, Any],
    listed: int,
    random_weights: bool,
    sweep: bool,
) -> str:
    """The terminal report: header, a table of acc1/acc5/mean per-class recall (percent), confusions, failures.

    Args:
        evaluation: the outcome of `evaluate`.
        records: its `result_records`.
        identity: dataset, model and pretrained names for the header.
        listed: images in the data before --limit.
        random_weights: the model has random weights (the header says the accuracies measure nothing).
        sweep: one acc1 row per sweep setting, instead of the method, group and confusion tables.

    Returns:
        The report's lines, joined.
    """
    classes = len(evaluation.classes)
    lines = [
        f"dataset {identity['dataset']}: {evaluation.scored} images scored"
        + (f" ({len(evaluation.failures)} failed)" if evaluation.failures else "")
        + (f" of {listed} listed" if listed != evaluation.scored + len(evaluation.failures) else "")
        + f", {classes} classes; model {identity['model']} / {identity['pretrained']}",
        f"chance level: acc1 {100 / classes:.2f}%, acc5 (top-{evaluation.k}) {100 * evaluation.k / classes:.2f}%; "
        f"{evaluation.encoder_rows} views encoded",
    ]
    if random_weights:
        lines.append("RANDOM weights: these accuracies measure nothing but the harness (expect chance level)")
    if sweep:
        lines.extend(_sweep_table(records))
    else:
        lines.extend(_method_table(records))
        lines.extend(_group_table(records))
        lines.extend(_paired_group_table(records))
        lines.extend(_cascade_table(records))
        lines.extend(_confusion_lines(records))
    if evaluation.failures:
        lines.append(f"{len(evaluation.failures)} image(s) could not be read or decoded and are left out of the metrics:")
        lines.extend(f"  {f.key}: {f.status}: {f.error_message}" for f in evaluation.failures[:10])
    return "\n".join(lines)


def _metric(record: Mapping[str, Any], name: str) -> str:
    text = f"{100 * record[name]:.2f}"
    if f"{name}_std" in record:
        text += f" ± {100 * record[name + '_std']:.2f}"
    return text


def _method_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    baseline = next((r["paired"]["baseline"] for r in records if "paired" in r), None)
    paired = f"vs {baseline} [95%]" if baseline else ""
    width = max(12, *(len(r["method"]) for r in records))
    header = (
        f"{'method':<{width}} {'acc1 %':>15} {'acc1 95% interval':>18} {paired:>22} {'acc5 %':>15} {'mean/class %':>15} "
        f"{'passes':>7} {'runs':>5}"
    )
    rows = [
        f"{r['method']:<{width}} {_metric(r, 'acc1'):>15} {_interval(r):>18} {_paired(r):>22} {_metric(r, 'acc5'):>15} "
        f"{_metric(r, 'mean_per_class_recall'):>15} {r.get('encoder_passes', 0):>7.1f} {r['runs']:>5}"
        for r in records
    ]
    lines = [header, *rows]
    if baseline:
        lines.append(
            f"(95% intervals: bootstrap over images; 'vs {baseline}': acc1 minus {baseline}'s on the same images, "
            "points; an interval that holds 0 shows no difference)"
        )
    return lines


def _interval(record: Mapping[str, Any]) -> str:
    bounds = record.get("acc1_interval")
    return f"[{100 * bounds['low']:.1f}, {100 * bounds['high']:.1f}]" if bounds else ""


def _paired(record: Mapping[str, Any]) -> str:
    paired = record.get("paired")
    if not paired:
        return ""
    return f"{100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]"


def _paired_group_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """acc1 minus the baseline's per group, points, with the paired 95% interval."""
    shown = [r for r in records if "paired" in r and r.get("groups")]
    if not shown:
        return []
    groups = list(shown[0]["groups"])
    cells = {(r["method"], name): _paired(r["groups"][name]) for r in shown for name in groups}
    width = max(8, *(len(name) for name in groups), *(len(text) for text in cells.values()))
    method_width = max(12, *(len(r["method"]) for r in shown))
    lines = [
        f"acc1 minus {shown[0]['paired']['baseline']}'s per group, points [paired 95% interval]:",
        f"{'method':<{method_width}} " + " ".join(f"{name:>{width}}" for name in groups),
    ]
    for r in shown:
        lines.append(f"{r['method']:<{method_width}} " + " ".join(f"{cells[(r['method'], name)]:>{width}}" for name in groups))
    return lines


def _cascade_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Accuracy against encoder passes: full lgca, then each cascade threshold with its share escalated."""
    cascades = [r for r in records if "cascade" in r]
    lgca = next((r for r in records if r["method"] == "lgca"), None)
    if not cascades or lgca is None:
        return []
    lines = [
        "confidence cascade: accuracy against encoder passes (vs lgca: acc1 minus full lgca's, points [paired 95%]):",
        f"{'threshold':>9} {'escalated %':>11} {'passes':>7} {'passes/lgca':>11} {'acc1 %':>7} {'vs lgca [95%]':>22}",
        f"{'lgca':>9} {100.0:>11.1f} {lgca['encoder_passes']:>7.1f} {1.0:>11.2f} {100 * lgca['acc1']:>7.2f} {'':>22}",
    ]
    for r in cascades:
        c = r["cascade"]
        against = c["against_lgca"]
        text = f"{100 * against['difference']:+.1f} [{100 * against['low']:+.1f}, {100 * against['high']:+.1f}]"
        lines.append(
            f"{c['threshold']:>9g} {100 * c['escalated']:>11.1f} {r['encoder_passes']:>7.1f} "
            f"{r['encoder_passes'] / lgca['encoder_passes']:>11.2f} {100 * r['acc1']:>7.2f} {text:>22}"
        )
    return lines


def _group_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """acc1 % of each method (rows) in each group of the data (columns), when the data has groups."""
    groups = list(records[0].get("groups", {})) if records else []
    if not groups:
        return []
    width = max(8, *(len(name) for name in groups))
    lines = ["acc1 % per group:", f"{'method':<12} " + " ".join(f"{name:>{width}}" for name in groups)]
    for r in records:
        cells = []
        for name in groups:
            group = r["groups"][name]
            text = f"{100 * group['acc1']:.1f}" + (f"±{100 * group['acc1_std']:.1f}" if "acc1_std" in group else "")
            cells.append(f"{text:>{width}}")
        lines.append(f"{r['method']:<12} " + " ".join(cells))
    return lines


def _confusion_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    shown = [r for r in records if r["confusions"]]
    if not shown:
        return []
    lines = ["most confused (true -> predicted: count; first run):"]
    for r in shown:
        pairs = ", ".join(f"{c['true']} -> {c['predicted']}: {c['count']}" for c in r["confusions"])
        lines.append(f"  {r['method']:<12} {pairs}")
    return lines


def _sweep_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in records))
    fields = list(records[0].get("setting", {})) if records else []
    rows: dict[str, dict[str, str]] = {}
    for r in records:
        key = json.dumps(r.get("setting", {}), sort_keys=True)
        rows.setdefault(key, {name: _written(r["setting"][name]) for name in fields})[r["method"]] = _metric(r, "acc1")
    widths = {name: max(len(name), *(len(row[name]) for row in rows.values())) for name in fields}
    cell = max([15, *(len(m) for m in methods)])
    lines = ["sweep, acc1 % per setting (mean ± std over runs for wca and lgca):"]
    lines.append("  ".join(f"{name:<{widths[name]}}" for name in fields) + " | " + " ".join(f"{m:>{cell}}" for m in methods))
    for row in rows.values():
        lines.append("  ".join(f"{row[name]:<{widths[name]}}" for name in fields) + " | " + " ".join(f"{row[m]:>{cell}}" for m in methods))
    return lines


def _written(value: Any) -> str:
    return ":".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)


__all__ = ["format_report"]
