#!/usr/bin/env python3
"""Does laying crops out inside a letter box help? lgca with `letterbox=off` and `letterbox=detect` on the same
letter-boxed scenes (the learned demo model), with the paired difference per group and its 95% interval.

    .venv/bin/python jobs/bench_letterbox.py --scenes bench-out/scenes-letterbox --per-class 100 --runs 2

The scenes are `jobs/make_scenes.py`'s (seed 1, never tuned on) at object scales 0.6, 0.4 and 0.3, each resized
to 256 on its longer side and padded with black to 256 x 256, as img2dataset's default `resize_mode=border`
stores images: a quarter of every image is padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `pipeline` importable when run as a plain script

from make_scenes import write_scenes  # noqa: E402

from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig  # noqa: E402
from pipeline.evaluation.intervals import mean_interval, paired_difference  # noqa: E402
from pipeline.evaluation.labelled import list_labelled  # noqa: E402
from pipeline.evaluation.runner import ImageModel, evaluate  # noqa: E402
from pipeline.evaluation.sweep import Setting  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402
from pipeline.models.text_vectors import text_vectors  # noqa: E402
from pipeline.vocab import load_vocabulary  # noqa: E402

FASHION = ROOT / "examples" / "fashion"
SCALES = (0.6, 0.4, 0.3)
SIDE = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", default="bench-out/scenes-letterbox")
    parser.add_argument("--per-class", type=int, default=100, help="scenes per class and scale (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=2, help="crop seeds (default: %(default)s)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    scenes = Path(args.scenes)
    if not (scenes / "manifest.csv").is_file():
        write_scenes(scenes, args.per_class, SCALES, seed=1, full_frame=0, letterbox=SIDE)
    model = load_model(
        ModelConfig(name=str(FASHION / "fashion-clip.json"), pretrained=str(FASHION / "fashion-clip.safetensors"), device="cpu")
    )
    vocabulary = load_vocabulary(VocabularyConfig(labels=str(FASHION / "descriptors.json"), templates=str(FASHION / "templates.txt")))
    settings = [Setting({"letterbox": rule}, ScoringConfig(method="lgca", letterbox=rule)) for rule in ("off", "detect")]
    started = time.monotonic()
    evaluation = evaluate(
        list_labelled(str(scenes / "manifest.csv"), {}),
        vocabulary.classes,
        lambda method, scoring: text_vectors(model, vocabulary, dataclasses.replace(scoring, method=method)),
        ImageModel(model.encode_image, model.logit_scale, model.view, model.device),
        ["lgca"],
        settings,
        runs=args.runs,
        batch_size=64,
    )
    seconds = time.monotonic() - started
    off, detect = (result.methods["lgca"].correct for result in evaluation.results)
    groups = np.asarray(evaluation.groups)
    rows = []
    for group in [*sorted(set(groups)), "all"]:
        chosen = groups == group if group != "all" else np.ones(len(groups), dtype=bool)
        rows.append(
            {
                "group": group,
                "images": int(chosen.sum()),
                "off": mean_interval(off[chosen]).to_dict(),
                "detect": mean_interval(detect[chosen]).to_dict(),
                "detect_minus_off": paired_difference(detect[chosen], off[chosen]).to_dict(),
            }
        )
    print(
        f"lgca on {len(groups)} letter-boxed scenes ({SIDE} x {SIDE}), {args.runs} crop seeds, {evaluation.encoder_rows:,} views in "
        f"{seconds:.0f} s; {platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print("| group | images | lgca, crops anywhere | lgca, crops in the picture | difference [95% interval] |\n|---|---|---|---|---|")
    for row in rows:
        difference = row["detect_minus_off"]
        print(
            f"| {row['group']} | {row['images']} | {100 * row['off']['mean']:.1f} | {100 * row['detect']['mean']:.1f} | "
            f"{100 * difference['mean']:+.1f} [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}] |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "seconds": seconds, "runs": args.runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
