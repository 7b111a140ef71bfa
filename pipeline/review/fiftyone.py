"""The FiftyOne export: detections and classifications per row, in the JSON files of FiftyOne's image dataset formats."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import IO, Any

from pipeline.review.coordinates import RELATIVE_DECIMALS, corners, xyxy_to_relative_xywh
from pipeline.review.values import SCORE_DECIMALS, number

FIFTYONE_FILES = ("data.json", "labels.json", "classifications.json")  # the files of a FiftyOne export directory


def fiftyone_detections(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A row's boxes in FiftyOneImageDetectionDataset form: label, relative bounding_box, confidence, attributes."""
    return [
        {
            "label": box["label"],
            "bounding_box": [number(v, RELATIVE_DECIMALS) for v in xyxy_to_relative_xywh(corners(box))],
            "confidence": number(box.get("score"), SCORE_DECIMALS),
            "attributes": {
                "level": box.get("level"),
                "parent": box.get("parent"),
                "saliency": number(box.get("saliency"), SCORE_DECIMALS),
            },
        }
        for box in row.get("boxes") or ()
    ]


def fiftyone_classification(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A row's label in FiftyOneImageClassificationDataset form, or None (unlabeled) for a failed row."""
    if row.get("label") is None:
        return None
    return {
        "label": row["label"],
        "confidence": number(row.get("score"), SCORE_DECIMALS),
        "attributes": {"margin": number(row.get("margin"), SCORE_DECIMALS)},
    }


def fiftyone_uuid(key: str) -> str:
    """A sample id for FiftyOne's data manifest: stable per key, with no dot (FiftyOne strips "extensions")."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


def write_fiftyone(rows: Iterable[dict[str, Any]], data: IO[str], labels: IO[str], classifications: IO[str]) -> None:
    """Write `rows` as the three files of FIFTYONE_FILES, streaming.

    FiftyOneImageDetectionDataset labels.json and FiftyOneImageClassificationDataset classifications.json
    share one data.json manifest (uuid -> image path), so both import against the same samples.

    Args:
        rows: output rows as dicts.
        data: the data.json text file.
        labels: the labels.json text file (detections).
        classifications: the classifications.json text file.
    """
    data.write("{")
    labels.write('{"labels": {')
    classifications.write('{"labels": {')
    for index, row in enumerate(rows):
        sep = ",\n" if index else "\n"
        name = json.dumps(fiftyone_uuid(row["key"]))
        data.write(f"{sep}{name}: {json.dumps(row['path'], ensure_ascii=False)}")
        labels.write(f"{sep}{name}: {json.dumps(fiftyone_detections(row), ensure_ascii=False, allow_nan=False)}")
        classifications.write(f"{sep}{name}: {json.dumps(fiftyone_classification(row), ensure_ascii=False, allow_nan=False)}")
    data.write("\n}\n")
    labels.write("\n}}\n")
    classifications.write("\n}}\n")
