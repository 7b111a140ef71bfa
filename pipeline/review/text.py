"""Plain-text pieces shared by the terminal summary and the HTML report: shares, bars, one-line excerpts, aligned tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def percent(part: int, whole: int) -> str:
    """`part` as a percentage of `whole` with one decimal ("12.5%"), or "-" when `whole` is 0."""
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def bar(value: int, peak: int, width: int) -> str:
    """A bar of "#" for `value`, `width` characters long at `peak`."""
    return "#" * (round(width * value / peak) if peak else 0)


def one_line(text: str, limit: int) -> str:
    """`text` with its whitespace runs collapsed to single spaces, cut to `limit` characters with "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """An aligned plain-text table: a header line, a rule of dashes, one line per row.

    Args:
        headers: column titles.
        rows: cell values, shown with str().
        align: one letter per column, "l" (left) or "r" (right).

    Returns:
        The lines, without trailing spaces.
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths])] + [line(row) for row in cells[1:]]
