"""Tests of lgca export (review.export, the format modules, coordinates, output_dir): conversions, each format against its consumer, filters, 100k rows."""

from __future__ import annotations

import csv
import json
import re
import sys
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main as cli
from pipeline.review.coordinates import (
    coco_to_xyxy,
    percent_to_xyxy,
    relative_xywh_to_xyxy,
    xyxy_to_coco,
    xyxy_to_percent,
    xyxy_to_relative_xywh,
)
from pipeline.review.csv_export import CSV_COLUMNS
from pipeline.review.export import export, rewrite_path
from pipeline.review.fiftyone import fiftyone_uuid
from pipeline.review.formats import FORMATS
from pipeline.review.output_dir import CurationError, RowFilter, default_filter, open_output

from .outputs import CLASSES, SYNTHETIC_CLASSES, big_output, measure, real_run, sample_images, synthetic_rows, write_output  # noqa: F401

BOX_TOLERANCE = 1e-4  # normalised units: exports round to well below this

# ---------------------------------------------------------------- Label Studio's documented prediction format
# From Label Studio's "Import pre-annotated data" docs: a list of tasks, each {"data": {...}, "predictions": [...]};
# a prediction has model_version, score and result regions with id, type, from_name, to_name, value;
# rectangle values are x, y, width, height in percent (0-100) with rotation; choices values list the choices.
_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
LABEL_STUDIO_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data", "predictions"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}},
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["model_version", "result"],
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": ["number", "null"]},
                        "result": {
                            "type": "array",
                            "items": {
                                "oneOf": [
                                    {
                                        "type": "object",
                                        "required": ["id", "type", "from_name", "to_name", "value"],
                                        "properties": {
                                            "type": {"const": "choices"},
                                            "from_name": {"type": "string"},
                                            "to_name": {"type": "string"},
                                            "value": {
                                                "type": "object",
                                                "required": ["choices"],
                                                "additionalProperties": False,
                                                "properties": {"choices": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                                            },
                                            "score": {"type": ["number", "null"]},
                                        },
                                    },
                                    {
                                        "type": "object",
                                        "required": ["id", "type", "from_name", "to_name", "value", "original_width", "original_height"],
                                        "properties": {
                                            "type": {"const": "rectanglelabels"},
                                            "from_name": {"type": "string"},
                                            "to_name": {"type": "string"},
                                            "original_width": {"type": "integer", "minimum": 1},
                                            "original_height": {"type": "integer", "minimum": 1},
                                            "image_rotation": {"type": "number"},
                                            "score": {"type": ["number", "null"]},
                                            "value": {
                                                "type": "object",
                                                "required": ["x", "y", "width", "height", "rectanglelabels"],
                                                "properties": {
                                                    "x": _PERCENT,
                                                    "y": _PERCENT,
                                                    "width": _PERCENT,
                                                    "height": _PERCENT,
                                                    "rotation": {"type": "number"},
                                                    "rectanglelabels": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                                },
                                            },
                                        },
                                    },
                                ]
                            },
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------- coordinate conversions

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
sides = st.integers(min_value=1, max_value=100_000)


@st.composite
def xyxy_boxes(draw: st.DrawFn) -> tuple[float, float, float, float]:
    xs, ys = sorted([draw(unit), draw(unit)]), sorted([draw(unit), draw(unit)])
    return (xs[0], ys[0], xs[1], ys[1])


def _close(a, b, tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


@given(xyxy_boxes(), sides, sides)
def test_xyxy_to_coco_and_back(box, width, height):
    x, y, w, h = xyxy_to_coco(box, width, height)
    assert w >= 0 and h >= 0 and x + w <= width * (1 + 1e-9) and y + h <= height * (1 + 1e-9)
    assert _close(coco_to_xyxy((x, y, w, h), width, height), box, 1e-9)


@given(sides, sides, st.data())
def test_coco_to_xyxy_and_back(width, height, data):
    x = data.draw(st.floats(0, width, allow_nan=False))
    y = data.draw(st.floats(0, height, allow_nan=False))
    bbox = (x, y, data.draw(st.floats(0, width - x, allow_nan=False)), data.draw(st.floats(0, height - y, allow_nan=False)))
    assert _close(xyxy_to_coco(coco_to_xyxy(bbox, width, height), width, height), bbox, 1e-9 * max(width, height))


@given(xyxy_boxes())
def test_xyxy_to_percent_and_back(box):
    x, y, w, h = xyxy_to_percent(box)
    assert 0 <= x <= 100 and 0 <= y <= 100 and w >= 0 and h >= 0 and x + w <= 100 + 1e-9 and y + h <= 100 + 1e-9
    assert _close(percent_to_xyxy((x, y, w, h)), box, 1e-12)


@given(st.data())
def test_percent_to_xyxy_and_back(data):
    x, y = data.draw(st.floats(0, 100, allow_nan=False)), data.draw(st.floats(0, 100, allow_nan=False))
    rect = (x, y, data.draw(st.floats(0, 100 - x, allow_nan=False)), data.draw(st.floats(0, 100 - y, allow_nan=False)))
    assert _close(xyxy_to_percent(percent_to_xyxy(rect)), rect, 1e-9)


@given(xyxy_boxes())
def test_xyxy_to_relative_xywh_and_back(box):
    assert _close(relative_xywh_to_xyxy(xyxy_to_relative_xywh(box)), box, 1e-12)


@given(xyxy_boxes(), sides, sides)
def test_percent_and_coco_agree(box, width, height):
    x, y, w, h = xyxy_to_coco(box, width, height)
    px, py, pw, ph = xyxy_to_percent(box)
    assert _close((x / width * 100, y / height * 100, w / width * 100, h / height * 100), (px, py, pw, ph), 1e-9)


@pytest.mark.parametrize("width, height", [(0, 10), (10, 0), (-1, 5)])
def test_coco_conversions_refuse_empty_images(width, height):
    with pytest.raises(ValueError, match="image size must be positive"):
        xyxy_to_coco((0, 0, 1, 1), width, height)
    with pytest.raises(ValueError, match="image size must be positive"):
        coco_to_xyxy((0, 0, 1, 1), width, height)


def test_rewrite_path_takes_the_first_matching_prefix():
    prefixes = [("/data/photos/", "/data/local-files/?d=photos/"), ("/data/", "s3://bucket/")]
    assert rewrite_path("/data/photos/a.jpg", prefixes) == "/data/local-files/?d=photos/a.jpg"
    assert rewrite_path("/data/other/b.jpg", prefixes) == "s3://bucket/other/b.jpg"
    assert rewrite_path("/elsewhere/c.jpg", prefixes) == "/elsewhere/c.jpg"


@pytest.mark.parametrize("name", ["my café photo #1.jpg", "a b+c&x=2%41.jpg", "plain.jpg", "nested/dir/x y.png"])
def test_labelstudio_urls_percent_encode_file_names_and_decode_back_exactly(name, tmp_path):
    # Label Studio's /data/local-files/ view reads `d` from the query string as Django decodes it (parse_qs);
    # a raw '#' cut the name there, a raw ' ' or '+' became a different file: 404s.
    images = tmp_path / "photos"
    (images / name).parent.mkdir(parents=True, exist_ok=True)
    paths = sample_images(tmp_path / "grey", 1)
    (images / name).write_bytes(Path(paths[0]).read_bytes())
    rows = synthetic_rows(1, [str(images / name)])
    out = write_output(tmp_path / "out", rows)
    tasks_path = tmp_path / "tasks.json"
    export(
        open_output(str(out)),
        "labelstudio",
        str(tasks_path),
        default_filter("labelstudio"),
        [(f"{images}/", "/data/local-files/?d=photos/")],
    )
    url = json.loads(tasks_path.read_text())[0]["data"]["image"]
    value = url.split("?d=", 1)[1]
    assert not set(value) & set(" #&+é=") and re.fullmatch(r"([^%]|%[0-9A-F]{2})*", value)  # encoded once, whole
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["d"] == [f"photos/{name}"]
    # The other formats keep file paths as they are: they are paths, not URLs.
    export(open_output(str(out)), "csv", str(tmp_path / "a.csv"), default_filter("csv"), [(f"{images}/", "/mnt/photos/")])
    with (tmp_path / "a.csv").open(newline="") as handle:
        assert next(csv.DictReader(handle))["path"] == f"/mnt/photos/{name}"


# ---------------------------------------------------------------- the formats on a real run


def _parquet_rows(output_dir: Path, status: str | None = "ok") -> dict[str, dict]:
    table = pq.read_table(output_dir)
    if status:
        table = table.filter(pc.equal(table.column("status"), status))
    return {row["key"]: row for row in table.to_pylist()}


def test_coco_loads_in_pycocotools_and_boxes_round_trip(real_run, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco.json"
    summary = export(open_output(str(real_run)), "coco", str(out), default_filter("coco"))
    expected = _parquet_rows(real_run)
    coco = COCO(str(out))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(CLASSES)  # categories = the vocabulary, in order
    assert len(coco.imgs) == len(expected) == summary.rows
    assert len(coco.anns) == sum(len(r["boxes"]) for r in expected.values()) == summary.boxes > 0
    for image_id, image in coco.imgs.items():
        row = expected[image["attributes"]["key"]]
        assert image["file_name"] == row["path"]
        assert (image["width"], image["height"]) == (row["width"], row["height"])
        assert image["attributes"]["label"] == row["label"]
        assert coco.cats[image["attributes"]["category_id"]]["name"] == row["label"]
        assert image["attributes"]["score"] == pytest.approx(row["score"], abs=1e-5)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(row["boxes"])
        for annotation, box in zip(annotations, row["boxes"]):
            corners = coco_to_xyxy(annotation["bbox"], image["width"], image["height"])
            assert _close(corners, (box["x0"], box["y0"], box["x1"], box["y1"]), BOX_TOLERANCE)
            assert coco.cats[annotation["category_id"]]["name"] == box["label"]
            assert annotation["score"] == pytest.approx(box["score"], abs=1e-5)
            assert annotation["attributes"]["level"] == box["level"]
            parent = annotation["attributes"]["parent_id"]
            assert (parent is None) == (box["parent"] < 0)
            if parent is not None:
                assert coco.anns[parent]["image_id"] == image_id
    # pycocotools' detection-results loader takes the annotations too (the evaluation path)
    results = coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in coco.anns.values()])
    assert len(results.anns) == len(coco.anns)


def test_labelstudio_tasks_follow_the_documented_format(real_run, tmp_path):
    out = tmp_path / "tasks.json"
    summary = export(open_output(str(real_run)), "labelstudio", str(out), default_filter("labelstudio"))
    tasks = json.loads(out.read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_SCHEMA)
    expected = _parquet_rows(real_run)
    assert len(tasks) == len(expected) == summary.rows
    config = ET.fromstring((tmp_path / "tasks.label_config.xml").read_text())
    tags = {tag.get("name"): tag for tag in config}
    for task in tasks:
        row = expected[task["data"]["key"]]
        assert task["data"]["image"] == row["path"]
        (prediction,) = task["predictions"]
        choices, *rectangles = prediction["result"]
        assert choices["value"]["choices"] == [row["label"]]
        assert prediction["score"] == pytest.approx(row["score"], abs=1e-5)
        assert len(rectangles) == len(row["boxes"])
        for region, box in zip(rectangles, row["boxes"]):
            value = region["value"]
            corners = percent_to_xyxy((value["x"], value["y"], value["width"], value["height"]))
            assert _close(corners, (box["x0"], box["y0"], box["x1"], box["y1"]), BOX_TOLERANCE)
            assert (region["original_width"], region["original_height"]) == (row["width"], row["height"])
            assert value["rectanglelabels"] == [box["label"]]
        for region in prediction["result"]:  # every region names tags that exist in the labeling config
            assert region["to_name"] == "image" and tags[region["to_name"]].tag == "Image"
            control = tags[region["from_name"]]
            assert control.tag == {"choices": "Choices", "rectanglelabels": "RectangleLabels"}[region["type"]]
            offered = {child.get("value") for child in control}
            assert set(region["value"].get("choices", []) + region["value"].get("rectanglelabels", [])) <= offered


def test_fiftyone_files_share_one_data_manifest(real_run, tmp_path):
    out = tmp_path / "fiftyone"
    export(open_output(str(real_run)), "fiftyone", str(out), default_filter("fiftyone"))
    data = json.loads((out / "data.json").read_text())
    detections = json.loads((out / "labels.json").read_text())["labels"]
    classifications = json.loads((out / "classifications.json").read_text())["labels"]
    expected = _parquet_rows(real_run)
    by_path = {row["path"]: row for row in expected.values()}
    assert set(data) == set(detections) == set(classifications) == {fiftyone_uuid(k) for k in expected}
    for uuid, path in data.items():
        assert "." not in uuid and Path(path).is_absolute() and Path(path).exists()
        row = by_path[path]
        assert classifications[uuid]["label"] == row["label"]
        assert classifications[uuid]["confidence"] == pytest.approx(row["score"], abs=1e-5)
        assert len(detections[uuid]) == len(row["boxes"])
        for detection, box in zip(detections[uuid], row["boxes"]):
            assert all(0.0 <= v <= 1.0 for v in detection["bounding_box"])
            corners = relative_xywh_to_xyxy(detection["bounding_box"])
            assert _close(corners, (box["x0"], box["y0"], box["x1"], box["y1"]), BOX_TOLERANCE)
            assert detection["label"] == box["label"] and detection["attributes"]["level"] == box["level"]


def test_csv_is_flat_with_every_row_by_default(real_run, tmp_path):
    out = tmp_path / "all.csv"
    export(open_output(str(real_run)), "csv", str(out), default_filter("csv"))
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = _parquet_rows(real_run, status=None)
    assert len(rows) == len(expected) and list(rows[0]) == list(CSV_COLUMNS)
    for line in rows:
        row = expected[line["key"]]
        assert line["path"] == row["path"] and line["status"] == row["status"]
        if row["status"] == "ok":
            topk = json.loads(line["topk"])
            assert [t["label"] for t in topk] == row["topk_labels"]
            assert float(line["score"]) == pytest.approx(row["score"], abs=1e-5)
            assert len(json.loads(line["boxes"])) == len(row["boxes"])
        else:
            assert line["label"] == line["score"] == line["topk"] == ""
            assert line["error_message"] == row["error_message"] != ""
    assert {r["status"] for r in rows} == {"ok", "decode_error"}


# ---------------------------------------------------------------- filters, on a synthetic output


@pytest.fixture(scope="module")
def small_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("small")
    return write_output(base / "out", synthetic_rows(500, sample_images(base / "images")), rows_per_file=128)


def _exported_keys(fmt: str, out: Path) -> list[str]:
    if fmt == "labelstudio":
        return [t["data"]["key"] for t in json.loads(out.read_text())]
    if fmt == "coco":
        return [i["attributes"]["key"] for i in json.loads(out.read_text())["images"]]
    if fmt == "fiftyone":
        return list(json.loads((out / "classifications.json").read_text())["labels"])
    with out.open(newline="") as handle:
        return [r["key"] for r in csv.DictReader(handle)]


FILTERS = [
    pytest.param({}, id="defaults"),
    pytest.param({"min_score": 0.7}, id="min-score"),
    pytest.param({"max_score": 0.4}, id="max-score"),
    pytest.param({"labels": ("class03", "class07")}, id="labels"),
    pytest.param({"labels": ("class01",), "min_score": 0.5}, id="labels+min-score"),
    pytest.param({"statuses": ("decode_error", "read_error")}, id="failed-only"),
    pytest.param({"statuses": ("ok", "decode_error"), "min_score": 0.9}, id="status+min-score"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chosen", FILTERS)
def test_filters_apply_to_every_format(small_output, tmp_path, fmt, chosen):
    out = tmp_path / ("fo" if fmt == "fiftyone" else f"export.{'csv' if fmt == 'csv' else 'json'}")
    row_filter = default_filter(fmt, chosen.get("min_score"), chosen.get("labels", ()), chosen.get("statuses", ()), chosen.get("max_score"))
    summary = export(open_output(str(small_output)), fmt, str(out), row_filter)
    rows = pq.read_table(small_output).to_pylist()
    statuses = chosen.get("statuses") or (("ok",) if fmt != "csv" else ("ok", "read_error", "decode_error", "score_error"))
    wanted = [
        r["key"]
        for r in rows
        if r["status"] in statuses
        and (not chosen.get("labels") or r["label"] in chosen["labels"])
        and (chosen.get("min_score") is None or (r["score"] is not None and r["score"] >= chosen["min_score"]))
        and (chosen.get("max_score") is None or (r["score"] is not None and r["score"] <= chosen["max_score"]))
    ]
    keys = _exported_keys(fmt, out)
    if fmt == "fiftyone":
        wanted = [fiftyone_uuid(k) for k in wanted]
    assert sorted(keys) == sorted(wanted) and summary.rows == len(wanted)


def test_failed_rows_export_without_predictions(small_output, tmp_path):
    out = tmp_path / "failed.json"
    export(open_output(str(small_output)), "labelstudio", str(out), default_filter("labelstudio", statuses=("decode_error",)))
    tasks = json.loads(out.read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_SCHEMA)
    assert tasks and all(t["predictions"] == [] and t["data"]["status"] == "decode_error" and t["data"]["error_message"] for t in tasks)
    coco_out = tmp_path / "failed-coco.json"
    export(open_output(str(small_output)), "coco", str(coco_out), default_filter("coco", statuses=("read_error",)))
    coco = json.loads(coco_out.read_text())
    assert coco["images"] and coco["annotations"] == []
    assert all(i["width"] is None and i["attributes"]["label"] is None for i in coco["images"])


def test_passthrough_columns_reach_every_format(small_output, tmp_path):
    output = open_output(str(small_output))
    assert output.passthrough_columns() == ["batch"]
    export(output, "csv", str(tmp_path / "a.csv"), default_filter("csv"))
    with (tmp_path / "a.csv").open(newline="") as handle:
        assert {r["batch"] for r in csv.DictReader(handle)} == {f"b{i}" for i in range(7)}
    export(output, "labelstudio", str(tmp_path / "a.json"), default_filter("labelstudio"))
    assert all(t["data"]["batch"].startswith("b") for t in json.loads((tmp_path / "a.json").read_text()))
    export(output, "coco", str(tmp_path / "c.json"), default_filter("coco"))
    assert all(i["attributes"]["batch"].startswith("b") for i in json.loads((tmp_path / "c.json").read_text())["images"])


def test_path_prefixes_rewrite_image_urls(small_output, tmp_path):
    output = open_output(str(small_output))
    images_dir = str(Path(pq.read_table(small_output, columns=["path"]).column("path")[0].as_py()).parent)
    out = tmp_path / "tasks.json"
    export(
        output, "labelstudio", str(out), default_filter("labelstudio"), path_prefixes=[(images_dir + "/", "/data/local-files/?d=images/")]
    )
    assert all(t["data"]["image"].startswith("/data/local-files/?d=images/grey") for t in json.loads(out.read_text()))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "row_filter, message",
    [
        (RowFilter(statuses=("okay",)), "status okay is not one of"),
        (RowFilter(labels=("class99",)), "'class99' is not in this run's vocabulary"),
        (RowFilter(min_score=float("nan")), "--min-score must be a finite number"),
    ],
)
def test_bad_filters_name_the_fix(small_output, tmp_path, row_filter, message):
    with pytest.raises(CurationError, match=message):
        export(open_output(str(small_output)), "csv", str(tmp_path / "x.csv"), row_filter)
    assert not (tmp_path / "x.csv").exists()


def test_not_an_output_directory(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(CurationError, match=r"not an lgca output directory: .*images has no _manifest.json; point at the --output"):
        open_output(str(tmp_path / "images"))
    with pytest.raises(CurationError, match="does not exist"):
        open_output(str(tmp_path / "missing"))
    assert cli.main(["export", str(tmp_path / "images"), "--format", "csv", "--out", str(tmp_path / "x.csv")]) == cli.EXIT_CONFIG
    assert "not an lgca output directory" in capsys.readouterr().err


def test_unfinished_run_says_resume(tmp_path):
    write_output(tmp_path / "out", synthetic_rows(10, sample_images(tmp_path / "images", 2)))
    (tmp_path / "out" / "_manifest.json").unlink()
    with pytest.raises(CurationError, match="did not finish; rerun lgca run with --resume"):
        open_output(str(tmp_path / "out"))


def test_corrupt_manifest_says_how_to_rewrite_it(tmp_path):
    out = write_output(tmp_path / "out", synthetic_rows(5, sample_images(tmp_path / "images", 1)))
    (out / "_manifest.json").write_text("{not json")
    with pytest.raises(CurationError, match="_manifest.json is not valid JSON .*rerun lgca run with --resume"):
        open_output(str(out))


def test_cli_export_writes_and_reports(small_output, tmp_path, capsys):
    out = tmp_path / "coco.json"
    code = cli.main(
        ["export", str(small_output), "--format", "coco", "--out", str(out), "--labels", "class01,class02", "--min-score", "0.5"]
    )
    assert code == 0
    line = capsys.readouterr().out
    images = json.loads(out.read_text())["images"]
    assert f"lgca export: {len(images)} rows" in line
    assert images and all(i["attributes"]["label"] in ("class01", "class02") and i["attributes"]["score"] >= 0.5 for i in images)
    assert (
        cli.main(["export", str(small_output), "--format", "csv", "--out", str(tmp_path / "y.csv"), "--path-prefix", "nope"])
        == cli.EXIT_CONFIG
    )


def test_export_from_and_to_s3(s3_bucket, s3_server, tmp_path):
    import s3fs

    local = write_output(tmp_path / "out", synthetic_rows(120, sample_images(tmp_path / "images", 2)), rows_per_file=50)
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/run/", recursive=True)
    options = [f"--storage-option=endpoint_url={s3_server.endpoint_url}", "--storage-option=key=testing", "--storage-option=secret=testing"]
    assert cli.main(["export", f"{s3_bucket}/run", "--format", "csv", "--out", f"{s3_bucket}/exports/all.csv", *options]) == 0
    text = fs.cat_file(f"{s3_bucket[5:]}/exports/all.csv").decode()
    assert len(text.strip().splitlines()) == 121
    assert not [p for p in fs.ls(f"{s3_bucket[5:]}/exports") if p.endswith(".partial")]


@pytest.mark.integration
def test_curation_modules_import_neither_torch_nor_ray():
    import subprocess

    code = (
        "import sys, pipeline.review.export, pipeline.review.report, pipeline.cli.review; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- 100k rows


@pytest.mark.integration
def test_export_100k_rows_in_bounded_time_and_memory(big_output, tmp_path):
    statuses = pq.read_table(big_output, columns=["status"]).column("status")
    ok = pc.sum(pc.equal(statuses, "ok")).as_py()
    assert len(statuses) == 100_000
    baseline = measure([])
    for fmt in FORMATS:
        out = tmp_path / ("fo" if fmt == "fiftyone" else f"export.{fmt}")
        result = measure(["export", str(big_output), "--format", fmt, "--out", str(out)])
        growth = result["peak_rss_mb"] - baseline["peak_rss_mb"]
        print(
            f"\nexport {fmt:12s} 100k rows: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
            f"(+{growth:.0f} MB over a bare import, {baseline['peak_rss_mb']:.0f} MB); {result['output'].strip()}"
        )
        assert f"lgca export: {len(statuses) if fmt == 'csv' else ok} rows" in result["output"]
        assert result["seconds"] < 60 and growth < 1536
