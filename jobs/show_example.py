#!/usr/bin/env python3
"""Print the labels of `make example` beside the true class that each demo scene's folder names.

.venv/bin/python jobs/show_example.py out/example
"""

from __future__ import annotations

import sys

import pandas as pd


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows = pd.read_parquet(argv[0], columns=["key", "status", "label", "score", "boxes"]).sort_values("key")
    rows["true"] = rows["key"].str.split("/").str[0]
    rows["right"] = (rows["label"] == rows["true"]).map({True: "yes", False: "NO"})
    rows["top box"] = rows["boxes"].map(_top_box)
    print(rows[["key", "status", "label", "score", "right", "top box"]].to_string(index=False, float_format="%.3f"))
    right = int((rows["label"] == rows["true"]).sum())
    print(f"{right} of {len(rows)} scenes labelled with their true class")
    return 0


def _top_box(boxes) -> str:
    """The most salient box as normalised x0,y0,x1,y1 (the HTML report draws them all: lgca report DIR)."""
    if boxes is None or len(boxes) == 0:
        return "-"
    top = max(boxes, key=lambda box: box["saliency"])
    return ",".join(f"{top[name]:.2f}" for name in ("x0", "y0", "x1", "y1"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
