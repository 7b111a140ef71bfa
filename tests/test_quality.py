"""Label quality with the project's learned model (examples/fashion) on real Fashion-MNIST test images and scenes.

These tests measure, they do not mock: the committed weights load through `lgca eval --model CONFIG.json
--pretrained FILE`, the path users take, and score Fashion-MNIST test images (Debian package
dataset-fashion-mnist, which CI installs) that the model never saw. Thresholds sit below the figures
measured with jobs/bench_quality.py (docs/EVALUATION.md), with room for a different CPU's arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli.main import main
from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.evaluation.labelled import list_labelled
from pipeline.evaluation.runner import ImageModel, Observation, evaluate
from pipeline.evaluation.scenes import FASHION_MNIST_DIR
from pipeline.evaluation.sweep import Setting
from pipeline.models.load import load_model
from pipeline.models.text_vectors import text_vectors
from pipeline.scoring.regions import box_iou
from pipeline.stages.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))
from make_scenes import read_truth, write_scenes  # noqa: E402

FASHION = ROOT / "examples" / "fashion"
MODEL = str(FASHION / "fashion-clip.json")
WEIGHTS = str(FASHION / "fashion-clip.safetensors")
LABELS = str(FASHION / "descriptors.json")
TEMPLATES = str(FASHION / "templates.txt")

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
)

# measured (docs/EVALUATION.md, "Tests") on the 300 full-frame test images below: clip 78.7%, ensemble 78.3%,
# descriptors 77.3% (73.4% on the whole 10,000-image test split)
FULL_FRAME_MIN = 0.74
# measured on the 200 scenes below (scales 0.6 and 0.4, 10 per class, seed 0), at the defaults: acc1 clip 39.0%,
# wca 42.5%, lgca 41.5%; the most salient box overlaps the object in 90% of scenes, mean IoU 0.235 against 0.194
# for the image's local crops. On small objects (0.3 and below) no method beats clip with this model: see
# docs/EVALUATION.md, so no test claims it.
MID_SCALE = (0.6, 0.4)
MID_MARGIN_MIN = 0.015  # wca and lgca acc1 over clip (3 of 200 scenes)
TOP_BOX_OVERLAP_MIN = 0.8
TOP_BOX_IOU_GAIN_MIN = 0.02


@pytest.fixture(scope="module")
def full_frame(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("full-frame")
    return write_scenes(folder, per_class=1, scales=(), full_frame=30)


@pytest.fixture(scope="module")
def mid_scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mid")
    return write_scenes(folder, per_class=10, scales=MID_SCALE, seed=0, full_frame=0)


def test_committed_weights_reach_full_frame_accuracy_through_the_cli(full_frame, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        [
            "eval",
            "--data",
            str(full_frame),
            "--labels",
            LABELS,
            "--templates",
            TEMPLATES,
            "--model",
            MODEL,
            "--pretrained",
            WEIGHTS,
            "--device",
            "cpu",
            "--methods",
            "clip,ensemble,descriptors",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert records["descriptors"]["images"] == 300
    for method in ("clip", "ensemble", "descriptors"):
        assert records[method]["acc1"] >= FULL_FRAME_MIN, (method, records[method]["acc1"])
    assert "full-frame" in capsys.readouterr().out  # the per-group table


def test_wca_and_lgca_beat_clip_where_crops_cut_the_object_and_boxes_find_it(mid_scenes):
    """Objects at 0.6 and 0.4 of the shorter side: a crop often holds only part of the object (or little else)."""
    truth = {key: box for key, (_, box) in read_truth(mid_scenes).items()}
    top_iou: list[float] = []  # IoU of the most salient output box with the object's box
    crop_iou: list[float] = []  # mean IoU of the image's local crops with it: where chance placement lands

    def observe(seen: Observation) -> None:
        if seen.method == "lgca":
            for b, (key, score) in enumerate(zip(seen.keys, seen.scores)):
                top = max(score.boxes, key=lambda box: box.saliency)
                top_iou.append(float(box_iou(np.array([[top.x0, top.y0, top.x1, top.y1]]), truth[key])[0, 0]))
                crop_iou.append(float(box_iou(seen.views.boxes[b, : seen.views.crops], truth[key]).mean()))

    model = load_model(ModelConfig(name=MODEL, pretrained=WEIGHTS, device="cpu"))
    vocabulary = load_vocabulary(VocabularyConfig(labels=LABELS, templates=TEMPLATES))
    evaluation = evaluate(
        list_labelled(str(mid_scenes), {}),
        vocabulary.classes,
        lambda method, scoring: text_vectors(model, vocabulary, ScoringConfig(method=method, text_scale=scoring.text_scale)),
        ImageModel(model.encode_image, model.logit_scale, model.view),
        ("clip", "wca", "lgca"),
        [Setting({}, ScoringConfig(method="lgca"))],
        observe=observe,
    )
    acc = {method: result.acc1[0] for method, result in evaluation.results[0].methods.items()}
    assert acc["lgca"] >= acc["clip"] + MID_MARGIN_MIN, acc
    assert acc["wca"] >= acc["clip"] + MID_MARGIN_MIN, acc
    assert len(top_iou) == 200
    assert np.mean(np.array(top_iou) > 0) >= TOP_BOX_OVERLAP_MIN
    assert np.mean(top_iou) >= np.mean(crop_iou) + TOP_BOX_IOU_GAIN_MIN, (np.mean(top_iou), np.mean(crop_iou))
