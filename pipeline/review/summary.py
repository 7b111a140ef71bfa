"""`lgca summary`: an output directory's facts and statistics as plain aligned text tables, for a terminal."""

from __future__ import annotations

import textwrap

from pipeline.review.output_dir import OutputDir
from pipeline.review.stats import SCORE_BINS, OutputStats, run_facts
from pipeline.review.text import bar, one_line, percent, text_table


def format_summary(output: OutputDir, stats: OutputStats, max_labels: int = 30, examples: int = 5) -> str:
    """The run summary as plain aligned text tables, for a terminal.

    Args:
        output: the opened output directory.
        stats: its statistics (`collect_stats`).
        max_labels: label rows shown (the rest are summed into one line).
        examples: error examples shown per status.

    Returns:
        Text ending in a newline.
    """
    lines = [f"lgca summary of {output.url}", ""]
    facts = run_facts(output)
    indent = max(len(name) for name, _ in facts) + 2
    for name, value in facts:  # long values (scoring settings) wrap under themselves, not across the table
        wrapped = textwrap.wrap(value, width=max(40, 110 - indent), break_on_hyphens=False) or [""]
        lines.append(name.ljust(indent) + wrapped[0])
        lines += [" " * indent + more for more in wrapped[1:]]
    lines += [""]
    status_rows = [(s, n, percent(n, stats.rows)) for s, n in stats.status_counts.items()]
    lines += text_table(["status", "rows", "share"], status_rows + [("total", stats.rows, "100.0%" if stats.rows else "-")], "lrr")
    for problem in stats.manifest_mismatch:
        lines.append(f"WARNING: _manifest.json disagrees with the Parquet files ({problem}); rerun lgca run --resume")
    lines += [""]
    if stats.labels:
        peak = max(item.count for item in stats.labels)
        label_rows = [
            (i.label, i.count, percent(i.count, stats.ok), f"{i.mean_score:.3f}", bar(i.count, peak, 30)) for i in stats.labels[:max_labels]
        ]
        rest = stats.labels[max_labels:]
        if rest:
            label_rows.append(
                (f"({len(rest)} more labels)", sum(i.count for i in rest), percent(sum(i.count for i in rest), stats.ok), "", "")
            )
        lines += text_table(["label", "rows", "share", "mean score", ""], label_rows, "lrrrl")
    else:
        lines.append("no ok rows: no labels to show")
    lines += [""]
    if stats.score_quantiles:
        q = stats.score_quantiles
        lines.append("confidence (image-level score of ok rows): " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
        peak = max(stats.score_histogram) or 1
        width = 1.0 / SCORE_BINS
        filled = [i for i, n in enumerate(stats.score_histogram) if n]  # empty bins at either end are left out
        hist_rows = (
            [
                (f"{i * width:.2f}-{(i + 1) * width:.2f}", stats.score_histogram[i], bar(stats.score_histogram[i], peak, 40))
                for i in range(filled[0], filled[-1] + 1)
            ]
            if filled
            else []
        )
        lines += text_table(["score", "rows", ""], hist_rows, "lrl")
        lines += [""]
    levels = ", ".join(f"level {level}: {n}" for level, n in stats.boxes_by_level.items())
    lines.append(f"salient boxes: {stats.boxes}" + (f" ({levels})" if levels else ""))
    for status, kept in stats.error_examples.items():
        lines += ["", f"{status}: {stats.status_counts.get(status, 0)} rows; first {min(examples, len(kept))}:"]
        lines += text_table(["key", "error_message"], [(k, one_line(m, 160)) for k, m in kept[:examples]], "ll")
    return "\n".join(lines) + "\n"
