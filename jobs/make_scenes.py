#!/usr/bin/env python3
"""Write labelled scenes from the Fashion-MNIST test split: a folder `lgca eval` reads, with the true boxes.

    .venv/bin/python jobs/make_scenes.py --output scenes --per-class 20
    .venv/bin/lgca eval --data scenes/manifest.csv --labels examples/fashion/descriptors.json \
        --model examples/fashion/fashion-clip.json --pretrained examples/fashion/fashion-clip.safetensors

Layout: `scale-<s>/<class>/<index>.jpg` for each object scale (object tile side / canvas shorter side),
`full-frame/<class>/<index>.png` (the test images themselves, the model's home ground), and
`manifest.csv` with `key, path, label, group, x0, y0, x1, y1` (the object's box, normalised xyxy) and
`tile_x0..tile_y1` (the square its 28 x 28 tile was placed in). `lgca eval` reports every `group`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.evaluation.scenes import CLASSES, FASHION_MNIST_DIR, SCENE_SCALES, load_fashion_mnist, render_scenes

FULL_FRAME = "full-frame"
COLUMNS = ("key", "path", "label", "group", "x0", "y0", "x1", "y1", "tile_x0", "tile_y0", "tile_x1", "tile_y1")


def write_scenes(
    output: Path,
    per_class: int,
    scales: tuple[float, ...] = SCENE_SCALES,
    seed: int = 0,
    full_frame: int | None = None,
    data: str = FASHION_MNIST_DIR,
    quality: int = 92,
    letterbox: int = 0,
) -> Path:
    """Render and write a scene set; returns the manifest's path.

    Args:
        output: folder to write (created; existing files of the same names are replaced).
        per_class: scenes per class and scale.
        scales: object scales.
        seed: fixes every scene.
        full_frame: plain test images per class in the `full-frame` group (default: `per_class`; 0 for none).
        data: folder of the Fashion-MNIST IDX files.
        quality: JPEG quality of the scenes.
        letterbox: with a side S, each scene is resized to S on its longer side and padded with black to S x S, as
            img2dataset's default `resize_mode=border` stores images; the boxes follow.
    """
    objects = load_fashion_mnist("test", data)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for scene in render_scenes(objects, per_class, scales, seed):
        path = output / scene.key
        path.parent.mkdir(parents=True, exist_ok=True)
        image, box, tile_box = Image.fromarray(scene.pixels), tuple(scene.box), tuple(scene.tile_box)
        if letterbox:
            image, (box, tile_box) = _letterboxed(image, letterbox, [box, tile_box])
        image.save(path, quality=quality)
        rows.append((scene.key, scene.key, scene.label, scene.key.split("/", 1)[0], *box, *tile_box))
    count = per_class if full_frame is None else full_frame
    for label, name in enumerate(CLASSES):
        for index, member in enumerate(np.nonzero(objects.labels == label)[0][:count]):
            key = f"{FULL_FRAME}/{name}/{index:04d}.png"
            (output / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(objects.images[member]).convert("RGB").save(output / key)
            rows.append((key, key, name, FULL_FRAME, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0))
    manifest = output / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return manifest


def _letterboxed(image: Image.Image, side: int, boxes: list[tuple[float, ...]]) -> tuple[Image.Image, list[tuple[float, ...]]]:
    """`image` resized to `side` on its longer side and centred on a black `side` x `side` square; boxes moved along."""
    scale = side / max(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    left, top = (side - width) // 2, (side - height) // 2
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image.resize((width, height), Image.Resampling.LANCZOS), (left, top))
    moved: list[tuple[float, ...]] = [
        ((left + box[0] * width) / side, (top + box[1] * height) / side, (left + box[2] * width) / side, (top + box[3] * height) / side)
        for box in boxes
    ]
    return canvas, moved


def read_truth(manifest: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each key's group and true object box, (1, 4) normalised xyxy, from a manifest `write_scenes` wrote."""
    with manifest.open(newline="") as handle:
        return {
            row["key"]: (row["group"], np.array([[float(row[name]) for name in ("x0", "y0", "x1", "y1")]]))
            for row in csv.DictReader(handle)
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the scenes and manifest.csv into")
    parser.add_argument("--per-class", type=int, default=20, help="scenes per class and scale (default: %(default)s)")
    parser.add_argument(
        "--scales",
        type=float,
        nargs="*",
        default=list(SCENE_SCALES),
        help="object tile side / canvas shorter side; none: only the full-frame images (default: %(default)s)",
    )
    parser.add_argument("--full-frame", type=int, default=None, help="plain test images per class (default: --per-class)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every scene (default: %(default)s)")
    parser.add_argument("--data", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument(
        "--subset", type=int, nargs="*", default=[], metavar="N", help="also write manifest-N.csv: the first N scenes per class and group"
    )
    parser.add_argument(
        "--letterbox",
        type=int,
        default=0,
        metavar="S",
        help="pad each scene to an S x S square with black bands, as img2dataset's resize_mode=border does (default: none)",
    )
    args = parser.parse_args(argv)
    manifest = write_scenes(
        Path(args.output), args.per_class, tuple(args.scales), args.seed, args.full_frame, args.data, letterbox=args.letterbox
    )
    print(f"wrote {manifest}")
    for size in args.subset:
        print(f"wrote {write_subset(manifest, size)}")
    return 0


def write_subset(manifest: Path, per_class: int) -> Path:
    """`manifest-<per_class>.csv` beside `manifest`: its first `per_class` rows of each class in each group (a
    smaller instrument for sweeps whose every setting costs encoder passes)."""
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for row in rows:
        cell = (row["group"], row["label"])
        seen[cell] = seen.get(cell, 0) + 1
        if seen[cell] <= per_class:
            kept.append(row)
    subset = manifest.with_name(f"manifest-{per_class}.csv")
    with subset.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    return subset


if __name__ == "__main__":
    sys.exit(main())
