"""Scorer efficiency: LGCA images/s against the raw image encoder's crops/s, measured in one process and run.

    python jobs/bench_scorer.py --model ViT-B-32 --pretrained random --images 8

Efficiency = LGCA images/s * (1 + N + K*T) / encoder crops/s: 1.0 means the method costs exactly its encoder
passes and nothing else (cutting views, weighting, expansion bookkeeping are free). "in encoder" is the share
of the scorer's time spent inside encoder calls, measured over the same calls, so machine noise cancels out.
Random weights are fine: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelConfig, ScoringConfig
from pipeline.models.load import load_model
from pipeline.models.text_vectors import text_vectors
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ViewFormat
from pipeline.stages.vocab import Vocabulary

CLASSES = ("cat", "dog", "car", "bird", "boat", "plane", "horse", "truck", "ship", "frog")


def sample_images(count: int, width: int, height: int) -> list[torch.Tensor]:
    """Real photographs from scikit-image when installed, resized; else smooth random images."""
    try:
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        tensors = [torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in photos]
    except ImportError:
        tensors = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)]
    out = []
    for index in range(count):
        base = tensors[index % len(tensors)][None].float()
        out.append(torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear")[0].to(torch.uint8))
    return out


def encoder_rate(model, batch: int, seconds: float) -> float:
    """Crops/s of the bare image encoder on (batch, 3, S, S) inputs, after a warm-up."""
    views = torch.randn(batch, 3, model.image_size, model.image_size, device=model.device)
    model.encode_image(views)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.encode_image(views)
        done += batch
    _sync(model.device)
    return done / (time.perf_counter() - started)


class _TimedEncoder:
    """The model's image encoder, timing its own calls (synchronised on CUDA so the time is the encoder's)."""

    def __init__(self, model) -> None:
        self.model, self.seconds = model, 0.0

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.model.encode_image(views)
        _sync(self.model.device)
        self.seconds += time.perf_counter() - started
        return out


def scorer_rate(model, vectors, config: ScoringConfig, images, batch: int) -> tuple[float, float]:
    """Images/s of Scorer.score over `images` after a one-batch warm-up, and the share of that time spent
    inside the encoder (immune to machine noise: both are measured over the same calls)."""
    encoder = _TimedEncoder(model)
    scorer = Scorer(encoder, CLASSES, vectors, model.logit_scale, ViewFormat(model.image_size, model.mean, model.std), config, model.device)
    scorer.score(images[:batch], [f"w{i}" for i in range(batch)])
    encoder.seconds = 0.0
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        scorer.score(chunk, [f"k{start + i}" for i in range(len(chunk))])
    _sync(model.device)
    seconds = time.perf_counter() - started
    return len(images) / seconds, encoder.seconds / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image encoder (compiled before timing)")
    parser.add_argument("--images", type=int, default=8, help="images per LGCA setting")
    parser.add_argument("--batch", type=int, default=4, help="images per Scorer.score call")
    parser.add_argument("--micro-batch", type=int, default=256, help="views per encoder call, also the encoder-rate batch")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"), help="decoded image size")
    parser.add_argument("--encoder-seconds", type=float, default=20.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    model = load_model(
        ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, compile=args.compile)
    )
    vocabulary = Vocabulary(classes=CLASSES)
    images = sample_images(args.images, *args.size)
    settings = {
        "default (N=60, K=2, T=3)": ScoringConfig(micro_batch=args.micro_batch),
        "small (N=8, K=1, T=2)": ScoringConfig(crops=8, regions=1, steps=2, micro_batch=args.micro_batch),
    }
    crops_per_s = encoder_rate(model, args.micro_batch, args.encoder_seconds)
    rows: list[dict[str, Any]] = []
    for name, config in settings.items():
        vectors = text_vectors(model, vocabulary, config)
        rate, encoder_share = scorer_rate(model, vectors, config, images, args.batch)
        rows.append(
            {
                "setting": name,
                "passes_per_image": config.encoder_passes,
                "images_per_s": rate,
                "encoder_share": encoder_share,
                "encoder_bound_images_per_s": crops_per_s / config.encoder_passes,
                "efficiency": rate * config.encoder_passes / crops_per_s,
            }
        )
    # the encoder rate drifts on a noisy machine: measure it again and report the mean of both
    crops_per_s_after = encoder_rate(model, args.micro_batch, args.encoder_seconds)
    eager_crops_per_s = None
    if args.compile:  # the same weights uncompiled, in the same run, for the speed-up
        eager = load_model(ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision))
        eager_crops_per_s = encoder_rate(eager, args.micro_batch, args.encoder_seconds)
        del eager
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {model.device}, "
        f"model {args.model}, precision {args.precision}{', compiled' if args.compile else ''}"
    )
    print(f"raw encoder: {crops_per_s:.1f} crops/s before, {crops_per_s_after:.1f} after (batch {args.micro_batch})")
    mean_rate = (crops_per_s + crops_per_s_after) / 2
    if eager_crops_per_s:
        print(f"uncompiled encoder: {eager_crops_per_s:.1f} crops/s; compiled / uncompiled: {mean_rate / eager_crops_per_s:.2f}")
    print(f"{'setting':28s} {'passes':>6s} {'images/s':>9s} {'bound':>9s} {'efficiency':>10s} {'in encoder':>10s}")
    for row in rows:
        row["efficiency"] = row["images_per_s"] * row["passes_per_image"] / mean_rate
        row["encoder_bound_images_per_s"] = mean_rate / row["passes_per_image"]
        print(
            f"{row['setting']:28s} {row['passes_per_image']:6d} {row['images_per_s']:9.3f} "
            f"{row['encoder_bound_images_per_s']:9.3f} {row['efficiency']:10.3f} {row['encoder_share']:10.3f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "encoder_crops_per_s": [crops_per_s, crops_per_s_after],
                    "rows": rows,
                    "model": args.model,
                    "device": str(model.device),
                    "compiled": args.compile,
                    "uncompiled_encoder_crops_per_s": eager_crops_per_s,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
