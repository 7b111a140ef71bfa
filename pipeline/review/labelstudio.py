"""The Label Studio export: one pre-annotated task per row, the labeling config whose tags the tasks name, and the task list writer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from pipeline.review.coordinates import PERCENT_DECIMALS, corners, xyxy_to_percent
from pipeline.review.values import SCORE_DECIMALS, jsonable, number

LS_IMAGE = "image"  # Label Studio object tag name: <Image name="image" value="$image"/>
LS_CHOICES = "label"  # <Choices name="label" toName="image">, the image-level label
LS_BOXES = "box"  # <RectangleLabels name="box" toName="image">, the salient boxes


def labelstudio_task(row: Mapping[str, Any], passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """One Label Studio task with the row's prediction (choices for the label, rectanglelabels for the boxes).

    Follows Label Studio's import format for pre-annotations: `data` holds the image URL under "image"
    (plus key, status and pass-through columns, usable in filters), `predictions` one prediction whose
    `result` regions name the control tags of `labelstudio_config` (from_name "label" and "box",
    to_name "image"). A row without a prediction gets an empty `predictions` list.

    Args:
        row: an output row as a dict (columns of `pipeline.schema.output_schema`).
        passthrough: manifest columns to copy into `data`.

    Returns:
        The task dict, ready for json.dumps.
    """
    data: dict[str, Any] = {LS_IMAGE: row["path"], "key": row["key"], "status": row["status"]}
    if row.get("error_message"):
        data["error_message"] = row["error_message"]
    for name in passthrough:
        if name not in data:
            data[name] = jsonable(row.get(name))
    task: dict[str, Any] = {"data": data, "predictions": []}
    if row.get("label") is None:
        return task
    score = number(row.get("score"), SCORE_DECIMALS)
    result: list[dict[str, Any]] = [
        {
            "id": "label",
            "type": "choices",
            "from_name": LS_CHOICES,
            "to_name": LS_IMAGE,
            "value": {"choices": [row["label"]]},
            "score": score,
        }
    ]
    width, height = row.get("width"), row.get("height")
    for index, box in enumerate(row.get("boxes") or ()):
        x, y, w, h = (number(v, PERCENT_DECIMALS) for v in xyxy_to_percent(corners(box)))
        region: dict[str, Any] = {
            "id": f"box{index}",
            "type": "rectanglelabels",
            "from_name": LS_BOXES,
            "to_name": LS_IMAGE,
            "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [box["label"]]},
            "score": number(box.get("score"), SCORE_DECIMALS),
            "meta": {"text": [f"level {box['level']}, parent {box['parent']}, saliency {number(box.get('saliency'), 4)}"]},
        }
        if width and height:
            region["original_width"], region["original_height"] = int(width), int(height)
        result.append(region)
    task["predictions"].append({"model_version": _model_version(row), "score": score, "result": result})
    return task


def labelstudio_config(classes: Sequence[str]) -> str:
    """The Label Studio labeling config (XML) whose tag names match `labelstudio_task`'s regions.

    Args:
        classes: the choices and rectangle labels offered, in order.

    Returns:
        The `<View>` XML text, ending in a newline.
    """
    choices = "\n".join(f'    <Choice value="{_xml(c)}"/>' for c in classes)
    labels = "\n".join(f'    <Label value="{_xml(c)}"/>' for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>\n'
        f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInLine="true">\n{choices}\n  </Choices>\n'
        f'  <RectangleLabels name="{LS_BOXES}" toName="{LS_IMAGE}">\n{labels}\n  </RectangleLabels>\n'
        "</View>\n"
    )


def write_labelstudio(handle: IO[str], rows: Iterable[dict[str, Any]], passthrough: Sequence[str]) -> None:
    """Write `rows` as a Label Studio JSON task list, one task at a time so 100k rows never sit in memory as dicts.

    Args:
        handle: the text file to write.
        rows: output rows as dicts.
        passthrough: manifest columns to copy into each task's `data`.
    """
    handle.write("[")
    for index, row in enumerate(rows):
        handle.write(",\n" if index else "\n")
        handle.write(json.dumps(labelstudio_task(row, passthrough), ensure_ascii=False, allow_nan=False))
    handle.write("\n]\n")


def _model_version(row: Mapping[str, Any]) -> str:
    return f"{row.get('model')}:{row.get('pretrained')}:{row.get('method')}"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
