"""The output contract: Arrow schema, status values, and builders of ok and failed rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

OK = "ok"
READ_ERROR = "read_error"
DECODE_ERROR = "decode_error"
SCORE_ERROR = "score_error"
STATUSES = (OK, READ_ERROR, DECODE_ERROR, SCORE_ERROR)

BOX_TYPE = pa.struct(
    [
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("level", pa.int16()),
        ("parent", pa.int16()),
        ("saliency", pa.float32()),
        ("label", pa.string()),
        ("score", pa.float32()),
    ]
)

PREDICTION_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
    pa.field("margin", pa.float32()),
    pa.field("boxes", pa.list_(BOX_TYPE)),
    pa.field("method", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("pretrained", pa.string(), nullable=False),
]
OUTPUT_COLUMNS = tuple(f.name for f in PREDICTION_FIELDS)
# With --embeddings: the normalised global-view embedding of each ok row (null otherwise), in half precision
EMBEDDING_COLUMN = "embedding"
EMBEDDING_TYPE = pa.float16()
PREDICTION_COLUMNS = ("label", "score", "topk_labels", "topk_scores", "margin", "boxes")


def embedding_field(dim: int) -> pa.Field:
    """The `embedding` column: `fixed_size_list<halffloat>[dim]`, as faiss, DuckDB (`FLOAT[dim]`) and numpy take it."""
    return pa.field(EMBEDDING_COLUMN, pa.list_(EMBEDDING_TYPE, dim))


def embedding_array(vectors: Sequence[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """The `embedding` column of a batch: each vector in half precision, null where there is none (failed rows)."""
    present = np.zeros((len(vectors), dim), dtype=np.float16)
    missing = np.array([vector is None for vector in vectors], dtype=bool)
    for index, vector in enumerate(vectors):
        if vector is not None:
            present[index] = vector
    return pa.FixedSizeListArray.from_arrays(pa.array(present.ravel(), EMBEDDING_TYPE), dim, mask=pa.array(missing))


def output_schema(passthrough: pa.Schema | None = None, embedding_dim: int | None = None) -> pa.Schema:
    """The schema of an output file: the fixed columns, the embedding (with `embedding_dim`), then manifest
    pass-through columns in their order.

    Its pandas metadata maps integer columns to pandas' nullable integer types: without it pandas reads
    `width` and `height` (null in failed rows) as float64.
    """
    fields = list(PREDICTION_FIELDS)
    if embedding_dim is not None:
        fields.append(embedding_field(embedding_dim))
    if passthrough is not None:
        fields.extend(f for f in passthrough if f.name not in (*OUTPUT_COLUMNS, EMBEDDING_COLUMN))
    return pa.schema(fields, metadata={b"pandas": _pandas_metadata(fields)})


def _pandas_metadata(fields: Sequence[pa.Field]) -> bytes:
    """pyarrow's `pandas` schema metadata naming a nullable dtype (Int32, UInt8, ...) for each integer column;
    `pyarrow.Table.to_pandas` and `pandas.read_parquet` honour it, other readers ignore it."""
    columns = [
        {
            "name": f.name,
            "field_name": f.name,
            "pandas_type": str(f.type),
            "numpy_type": str(f.type).capitalize().replace("Uint", "UInt"),
            "metadata": None,
        }
        for f in fields
        if pa.types.is_integer(f.type)
    ]
    return json.dumps({"index_columns": [], "column_indexes": [], "columns": columns}).encode()


def empty_prediction() -> dict[str, Any]:
    """The prediction columns of a row that has none: all null, never invented values."""
    return dict.fromkeys(PREDICTION_COLUMNS)


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """An Arrow table of `rows` (dicts keyed by column) with exactly `schema`.

    Raises:
        ValueError: a row has a status outside STATUSES, or an ok row lacks a label.
    """
    for row in rows:
        _check_row(row)
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


def _check_row(row: Mapping[str, Any]) -> None:
    status = row.get("status")
    if status not in STATUSES:
        raise ValueError(f"row {row.get('key')!r}: status {status!r} is not one of {STATUSES}")
    if status == OK and row.get("label") is None:
        raise ValueError(f"row {row.get('key')!r}: an ok row needs a label")
    if status != OK and any(row.get(name) is not None for name in PREDICTION_COLUMNS):
        raise ValueError(f"row {row.get('key')!r}: a {status} row must not carry predictions")


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts
