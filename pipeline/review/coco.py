"""The COCO export: an `images` entry and detection annotations per row, streamed into one COCO JSON file."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from pipeline.review.coordinates import PIXEL_DECIMALS, corners, xyxy_to_coco
from pipeline.review.output_dir import OutputDir
from pipeline.review.values import SCORE_DECIMALS, jsonable, number, numbers


def coco_image(row: Mapping[str, Any], image_id: int, categories: Mapping[str, int], passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """The COCO `images` entry of a row; the image-level prediction goes in its `attributes`.

    Args:
        row: an output row as a dict.
        image_id: this image's id (unique in the file).
        categories: label -> category id.
        passthrough: manifest columns to copy into `attributes`.

    Returns:
        The entry: id, file_name (the image path), width, height, attributes.
    """
    attributes: dict[str, Any] = {
        "key": row["key"],
        "status": row["status"],
        "label": row.get("label"),
        "category_id": categories.get(row["label"]) if row.get("label") is not None else None,
        "score": number(row.get("score"), SCORE_DECIMALS),
        "margin": number(row.get("margin"), SCORE_DECIMALS),
        "topk_labels": row.get("topk_labels"),
        "topk_scores": numbers(row.get("topk_scores"), SCORE_DECIMALS),
        "error_message": row.get("error_message"),
        "method": row.get("method"),
        "model": row.get("model"),
        "pretrained": row.get("pretrained"),
    }
    for name in passthrough:
        attributes.setdefault(name, jsonable(row.get(name)))
    return {"id": image_id, "file_name": row["path"], "width": row.get("width"), "height": row.get("height"), "attributes": attributes}


def coco_annotations(row: Mapping[str, Any], image_id: int, first_id: int, categories: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO detection annotations for a row's salient boxes, with ids first_id, first_id + 1, ...

    Each has `bbox` (absolute x, y, w, h), `area`, `iscrowd` 0, `score` (the box's own class score) and
    `attributes` {level, parent_id (annotation id of the box it grew from, or null), saliency}.
    A row without width/height (no successful decode) has no annotations.

    Args:
        row: an output row as a dict.
        image_id: the id of the row's `images` entry.
        first_id: the id of the row's first annotation.
        categories: label -> category id; every box label must be in it.

    Returns:
        One annotation per box, in box order.
    """
    width, height = row.get("width"), row.get("height")
    boxes = row.get("boxes") or ()
    if not boxes or not width or not height:
        return []
    annotations = []
    for index, box in enumerate(boxes):
        x, y, w, h = (number(v, PIXEL_DECIMALS) for v in xyxy_to_coco(corners(box), width, height))
        parent = box.get("parent")
        annotations.append(
            {
                "id": first_id + index,
                "image_id": image_id,
                "category_id": categories[box["label"]],
                "bbox": [x, y, w, h],
                "area": number(w * h, PIXEL_DECIMALS) if w is not None and h is not None else None,
                "iscrowd": 0,
                "score": number(box.get("score"), SCORE_DECIMALS),
                "attributes": {
                    "level": box.get("level"),
                    "parent_id": first_id + parent if parent is not None and 0 <= parent < len(boxes) else None,
                    "saliency": number(box.get("saliency"), SCORE_DECIMALS),
                },
            }
        )
    return annotations


def write_coco(handle: IO[str], rows: Iterable[dict[str, Any]], output: OutputDir, passthrough: Sequence[str]) -> None:
    """Write `rows` as one COCO detection JSON file: info, images, annotations, categories.

    Images stream into the file while annotations spool to a temporary file; categories come first,
    from the vocabulary, with any label outside it (there should be none) appended at the end.

    Args:
        handle: the text file to write.
        rows: output rows as dicts.
        output: the directory they come from (its vocabulary, manifest and URL fill `categories` and `info`).
        passthrough: manifest columns to copy into each image's `attributes`.
    """
    categories = {label: index + 1 for index, label in enumerate(output.classes)}
    manifest = output.manifest
    info = {
        "description": f"lgca-label predictions of {output.url}",
        "version": manifest.get("format"),
        "date_created": manifest.get("ended_at"),
        "lgca": {key: manifest.get(key) for key in ("run_id", "code_version", "method", "model")}
        | {"vocabulary_sha256": (manifest.get("vocabulary") or {}).get("sha256")},
    }
    next_annotation = 1
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        handle.write('{"info": ' + json.dumps(info) + ', "licenses": [],\n"images": [')
        for image_id, row in enumerate(rows, start=1):
            for label in [row.get("label")] + [b["label"] for b in row.get("boxes") or ()]:
                if label is not None and label not in categories:
                    categories[label] = len(categories) + 1
            handle.write(",\n" if image_id > 1 else "\n")
            handle.write(json.dumps(coco_image(row, image_id, categories, passthrough), ensure_ascii=False, allow_nan=False))
            for annotation in coco_annotations(row, image_id, next_annotation, categories):
                spool.write((",\n" if next_annotation > 1 else "\n") + json.dumps(annotation, allow_nan=False))
                next_annotation += 1
        handle.write('\n],\n"annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, handle)
        handle.write('\n],\n"categories": ')
        handle.write(json.dumps([{"id": i, "name": name, "supercategory": ""} for name, i in categories.items()], ensure_ascii=False))
        handle.write("}\n")
