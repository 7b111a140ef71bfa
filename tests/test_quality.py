"""Label quality with the project's learned model (examples/fashion) on real Fashion-MNIST test images and scenes.

These tests measure, they do not mock: the committed weights load through `lgca eval --model CONFIG.json
--pretrained FILE`, the path users take, and score Fashion-MNIST test images (Debian package
dataset-fashion-mnist, which CI installs) that the model never saw. Thresholds sit below the figures
measured with jobs/bench_quality.py (docs/EVALUATION.md), with room for a different CPU's arithmetic.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli.main import main
from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.evaluation.intervals import paired_difference
from pipeline.evaluation.labelled import list_labelled
from pipeline.evaluation.runner import ImageModel, Observation, evaluate
from pipeline.evaluation.scenes import FASHION_MNIST_DIR
from pipeline.evaluation.sweep import Setting
from pipeline.models.load import load_model
from pipeline.models.text_vectors import text_vectors
from pipeline.scoring.regions import box_iou
from pipeline.vocab import load_vocabulary

from .support import eval_args

ROOT = Path(__file__).resolve().parent.parent
MAKE_SCENES = ROOT / "jobs" / "make_scenes.py"
FASHION = ROOT / "examples" / "fashion"
MODEL = str(FASHION / "fashion-clip.json")
WEIGHTS = str(FASHION / "fashion-clip.safetensors")
LABELS = str(FASHION / "descriptors.json")
TEMPLATES = str(FASHION / "templates.txt")

pytestmark = [
    pytest.mark.skipif(
        not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
        reason=f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
    ),
    pytest.mark.integration,  # the scenes are rendered by jobs/make_scenes.py in a subprocess
]

# measured (docs/EVALUATION.md, "Tests") on the 300 full-frame test images below: clip 78.7%, ensemble 78.3%,
# descriptors 77.3% (73.4% on the whole 10,000-image test split)
FULL_FRAME_MIN = 0.74
# Revision 3 (docs/EVALUATION.md, "In the tests"): measured on the scenes below (seed 0, 20 per class and scale,
# the committed defaults), the paired difference of acc1 against clip, in points:
CUT_SCALES = (0.6, 0.4)  # random crops hold only part of the object
SMALL_SCALES = (0.3, 0.2)
CUT_GAIN_MIN = 0.10  # measured +14.8 [+10.3, +19.0] over 400 scenes (+15.2 on 2,000 held-out scenes)
SMALL_GAIN_MIN = 0.08  # measured +13.5 [+9.3, +17.8] (+14.7 held out)
TOP_BOX_AT_06_MIN = 0.15  # share of scale-0.6 scenes whose most salient box has IoU >= 0.5 with the object: measured 0.225
CASCADE_MARGIN = 0.3  # the README's recommended threshold
CASCADE_LOSS_MAX = 0.02  # the cascade's acc1 below full lgca's on the cut scenes: measured 0.5 points


def write_scenes(folder: Path, per_class: int, scales: tuple[float, ...], full_frame: int, seed: int = 0) -> Path:
    """Render scenes with jobs/make_scenes.py, as its users do; returns their manifest."""
    command = [sys.executable, str(MAKE_SCENES), "--output", str(folder), "--per-class", str(per_class), "--seed", str(seed)]
    command += ["--full-frame", str(full_frame), "--scales", *map(str, scales)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "manifest.csv"


def read_truth(manifest: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each scene's group and true object box, (1, 4) normalised xyxy, from the columns of make_scenes.py's manifest."""
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {row["key"]: (row["group"], np.array([[float(row[name]) for name in ("x0", "y0", "x1", "y1")]])) for row in rows}


@pytest.fixture(scope="module")
def full_frame(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("full-frame")
    return write_scenes(folder, per_class=1, scales=(), full_frame=30)


@pytest.fixture(scope="module")
def model_and_vocabulary():
    model = load_model(ModelConfig(name=MODEL, pretrained=WEIGHTS, device="cpu"))
    return model, load_vocabulary(VocabularyConfig(labels=LABELS, templates=TEMPLATES))


def _evaluate(scenes: Path, model_and_vocabulary, observe=None, cascade=()):
    model, vocabulary = model_and_vocabulary
    return evaluate(
        list_labelled(str(scenes), {}),
        vocabulary.classes,
        lambda method, scoring: text_vectors(model, vocabulary, ScoringConfig(method=method, text_scale=scoring.text_scale)),
        ImageModel(model.encode_image, model.logit_scale, model.view),
        ("clip", "lgca"),
        [Setting({}, ScoringConfig(method="lgca"))],
        observe=observe,
        cascade=cascade,
    )


def test_committed_weights_reach_full_frame_accuracy_through_the_cli(full_frame, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        eval_args(
            full_frame,
            LABELS,
            *("--templates", TEMPLATES, "--methods", "clip,ensemble,descriptors", "--output", str(out)),
            model=MODEL,
            pretrained=WEIGHTS,
        )
    )
    assert code == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert records["descriptors"]["images"] == 300
    for method in ("clip", "ensemble", "descriptors"):
        assert records[method]["acc1"] >= FULL_FRAME_MIN, (method, records[method]["acc1"])
    assert "full-frame" in capsys.readouterr().out  # the per-group table


def test_lgca_beats_clip_where_crops_cut_the_object_its_boxes_find_it_and_the_cascade_keeps_it(tmp_path, model_and_vocabulary):
    """Objects at 0.6 and 0.4 of the shorter side: a random crop often holds only part of the object. The salient
    lineages carry lgca's score, so the crops that cut the object lose their say."""
    scenes = write_scenes(tmp_path, per_class=20, scales=CUT_SCALES, seed=0, full_frame=0)
    truth = read_truth(scenes)
    top_hits: list[bool] = []  # scale 0.6: the most salient output box at IoU >= 0.5 with the object

    def observe(seen: Observation) -> None:
        if seen.method == "lgca":
            for key, score in zip(seen.keys, seen.scores):
                group, box = truth[key]
                if group == "scale-0.60":
                    top = max(score.boxes, key=lambda b: b.saliency)
                    top_hits.append(float(box_iou(np.array([[top.x0, top.y0, top.x1, top.y1]]), box)[0, 0]) >= 0.5)

    results = _evaluate(scenes, model_and_vocabulary, observe, cascade=(CASCADE_MARGIN,)).results[0].methods
    gain = paired_difference(results["lgca"].correct, results["clip"].correct)
    assert gain.mean >= CUT_GAIN_MIN and gain.low > 0, gain
    assert len(top_hits) == 200 and np.mean(top_hits) >= TOP_BOX_AT_06_MIN, np.mean(top_hits)
    cascade = results[f"cascade@{CASCADE_MARGIN:g}"]
    loss = paired_difference(results["lgca"].correct, cascade.correct)
    assert loss.mean <= CASCADE_LOSS_MAX, loss
    assert cascade.encoder_passes < results["lgca"].encoder_passes


def test_lgca_beats_clip_on_small_objects(tmp_path, model_and_vocabulary):
    scenes = write_scenes(tmp_path, per_class=20, scales=SMALL_SCALES, seed=0, full_frame=0)
    results = _evaluate(scenes, model_and_vocabulary).results[0].methods
    gain = paired_difference(results["lgca"].correct, results["clip"].correct)
    assert gain.mean >= SMALL_GAIN_MIN and gain.low > 0, gain
