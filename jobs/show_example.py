#!/usr/bin/env python3
"""Print the labels of `make example` beside the true class each demo scene's folder names, and `clip`'s label
for the same scene (the committed model's global view with one prompt, scored in-process without Ray).

.venv/bin/python jobs/show_example.py out/example
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

FASHION = Path(__file__).resolve().parent.parent / "examples" / "fashion"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    output = Path(argv[0])
    rows = pd.read_parquet(output, columns=["key", "path", "status", "label", "score", "boxes"]).sort_values("key")
    rows["true"] = rows["key"].str.split("/").str[0]
    rows["clip"] = _clip_labels(rows["path"].tolist(), json.loads((output / "_manifest.json").read_text()))
    rows["right"] = (rows["label"] == rows["true"]).map({True: "yes", False: "NO"})
    rows["clip right"] = (rows["clip"] == rows["true"]).map({True: "yes", False: "NO"})
    rows["top box"] = rows["boxes"].map(_top_box)
    shown = rows.rename(columns={"label": "lgca"})[["key", "status", "clip", "clip right", "lgca", "score", "right", "top box"]]
    print(shown.to_string(index=False, float_format="%.3f"))
    right = int((rows["label"] == rows["true"]).sum())
    clip_right = int((rows["clip"] == rows["true"]).sum())
    print(f"{right} of {len(rows)} scenes labelled with their true class")
    print(f"clip alone: {clip_right} of {len(rows)}")
    gained = rows[(rows["label"] == rows["true"]) & (rows["clip"] != rows["true"])]["key"].tolist()
    lost = rows[(rows["label"] != rows["true"]) & (rows["clip"] == rows["true"])]["key"].tolist()
    print(f"lgca right where clip is wrong: {', '.join(gained) or 'none'}")
    print(f"clip right where lgca is wrong: {', '.join(lost) or 'none'}")
    return 0


def _clip_labels(paths: list[str], manifest: dict) -> list[str]:
    """`clip` on the committed model, with the run's own vocabulary: the label each scene gets from its whole
    image and one prompt."""
    from pipeline.config import ScoringConfig
    from pipeline.run.labeler import Labeler

    labeler = Labeler.load(
        labels=manifest["vocabulary"]["labels_file"],
        model=str(FASHION / "fashion-clip.json"),
        pretrained=str(FASHION / "fashion-clip.safetensors"),
        scoring=ScoringConfig(method="clip"),
        device="cpu",
    )
    return [result.label for result in labeler.label(paths)]


def _top_box(boxes) -> str:
    """The most salient box as normalised x0,y0,x1,y1 (the HTML report draws them all: lgca report DIR)."""
    if boxes is None or len(boxes) == 0:
        return "-"
    top = max(boxes, key=lambda box: box["saliency"])
    return ",".join(f"{top[name]:.2f}" for name in ("x0", "y0", "x1", "y1"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
