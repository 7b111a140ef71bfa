"""Decode benchmark: JPEG draft decoding at the smallest useful scale against full decoding, on large photographs.

    python jobs/bench_decode.py --size 4000 3000 --images 12

The photographs are scikit-image's sample photos upscaled to the given size and saved as JPEG (quality 90).
"full" decodes every pixel and converts to RGB; "draft" is what the job does (`pipeline.stages.decode.decode_image`
with the decode scale LGCA's default needs for ViT-B-32: shorter side >= ceil(224 / 0.5) = 448). With
`--decode gpu` the decode workers only run "header" (format, size limit, EXIF orientation) and the scoring
actor decodes a batch at once ("device", timed with --device cuda, or cpu for torchvision's libjpeg path).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DecodeConfig
from pipeline.stages.decode import DecodedImage, decode_image, defer_jpeg, short_side_for


def large_jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for index in range(count):
        image = Image.fromarray(photos[index % len(photos)]).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def full_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224, help="model input size S")
    parser.add_argument("--alpha", type=float, default=0.5, help="smallest crop fraction (LGCA's default 0.5)")
    parser.add_argument("--device", default=None, help="also time --decode gpu's batched decode here (cuda, or cpu for libjpeg)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    jpegs = large_jpegs(args.images, tuple(args.size))
    config = DecodeConfig(min_short_side=short_side_for(args.image_size, args.alpha))
    full_pixels = args.size[0] * args.size[1]

    def timed(name: str, decode_all, decoded_pixels: int) -> dict:
        decode_all(jpegs[:1])  # warm-up
        started = time.perf_counter()
        decode_all(jpegs)
        seconds = time.perf_counter() - started
        return {"mode": name, "images_per_s": len(jpegs) / seconds, "megapixels_per_image": decoded_pixels / 1e6}

    draft = decode_image(jpegs[0], config)
    assert isinstance(draft, DecodedImage), draft
    draft_shape = draft.pixels.shape
    rows = [
        timed("full", lambda batch: [full_decode(b) for b in batch], full_pixels),
        timed("draft", lambda batch: [decode_image(b, config) for b in batch], draft_shape[0] * draft_shape[1]),
        # --decode gpu, CPU side: the decode workers only check headers and pass the bytes on
        timed("header", lambda batch: [defer_jpeg(b, config) for b in batch], 0),
    ]
    if args.device:
        import torch

        from pipeline.stages.device_decode import decode_jpegs

        def on_device(batch: list[bytes]) -> None:
            decode_jpegs(batch, [1] * len(batch), config.min_short_side, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        rows.append(timed(f"device ({args.device})", on_device, full_pixels))  # --decode gpu, actor side: one batched call
    print(f"{args.images} JPEGs of {args.size[0]} x {args.size[1]}, decode short side >= {config.min_short_side}, one process")
    print(f"{'mode':14s} {'images/s':>9s} {'Mpx decoded/image':>18s}")
    for row in rows:
        print(f"{row['mode']:14s} {row['images_per_s']:9.2f} {row['megapixels_per_image']:18.2f}")
    print(f"draft / full speed: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
