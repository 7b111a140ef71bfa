"""The CSV export: one line per row, lists as JSON text, for spreadsheets and dataframes."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from pipeline.review.coordinates import RELATIVE_DECIMALS
from pipeline.review.values import SCORE_DECIMALS, jsonable, number

CSV_COLUMNS = (
    "key",
    "path",
    "status",
    "label",
    "score",
    "margin",
    "topk",
    "error_message",
    "width",
    "height",
    "boxes",
    "method",
    "model",
    "pretrained",
)


def csv_record(row: Mapping[str, Any], passthrough: Sequence[str] = ()) -> list[Any]:
    """One CSV line's values, in CSV_COLUMNS order then `passthrough`; lists become JSON text.

    Args:
        row: an output row as a dict.
        passthrough: manifest columns appended after CSV_COLUMNS.

    Returns:
        The cell values; missing and non-finite values are empty strings.
    """
    topk = None
    if row.get("topk_labels") is not None:
        topk = json.dumps(
            [
                {"label": label, "score": number(score, SCORE_DECIMALS)}
                for label, score in zip(row["topk_labels"], row.get("topk_scores") or ())
            ]
        )
    boxes = None
    if row.get("boxes") is not None:
        boxes = json.dumps(
            [{k: (number(v, RELATIVE_DECIMALS) if isinstance(v, float) else v) for k, v in box.items()} for box in row["boxes"]]
        )
    values = {
        **row,
        "topk": topk,
        "boxes": boxes,
        "score": number(row.get("score"), SCORE_DECIMALS),
        "margin": number(row.get("margin"), SCORE_DECIMALS),
    }
    return [_csv_cell(values.get(name)) for name in CSV_COLUMNS] + [_csv_cell(row.get(name)) for name in passthrough]


def write_csv(handle: IO[str], rows: Iterable[dict[str, Any]], passthrough: Sequence[str]) -> None:
    """Write a header of CSV_COLUMNS then `passthrough`, and one `csv_record` line per row.

    Args:
        handle: the text file to write (opened with newline="").
        rows: output rows as dicts.
        passthrough: manifest columns appended after CSV_COLUMNS.
    """
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(list(CSV_COLUMNS) + list(passthrough))
    for row in rows:
        writer.writerow(csv_record(row, passthrough))


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(jsonable(value), ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value
