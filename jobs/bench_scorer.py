"""Scorer efficiency: LGCA images/s against the raw image encoder's crops/s, measured in one process and run.

    python jobs/bench_scorer.py --model ViT-B-32 --pretrained random --images 8

Efficiency = LGCA images/s * (1 + N + K*T) / encoder crops/s: 1.0 means the method costs exactly its encoder
passes and nothing else (cutting views, weighting, expansion bookkeeping are free). "in encoder" is the share
of the scorer's time spent inside encoder calls, measured over the same calls, so machine noise cancels out.
Random weights are fine: speed does not depend on the weights' values.

    python jobs/bench_scorer.py --hot-path --classes 10 21000

The last row is the confidence cascade at `--cascade-margin` on the same images: its passes per image are the
measured 1 + p * (N + K*T) for the share p it escalated, and "vs lgca" is its images/s over full lgca's, both
measured in this run. The share depends on the model and the images: for a meaningful one, use learned weights
on the images you label, e.g. the project's model on its scenes:

    python jobs/bench_scorer.py --model examples/fashion/fashion-clip.json \
        --pretrained examples/fashion/fashion-clip.safetensors --images-from bench-out/scenes --images 256 --batch 64

    python jobs/bench_scorer.py --hot-path --classes 10 21000

measures what is not the encoder, with a cheap stand-in encoder of ViT-B's width (D = 512) at S = 224: cutting
and resizing the views, expansion, combining (one softmax and one transfer per batch, per-region class scores
for the reported regions only), for vocabularies of each size. Columns: combine ms per batch, the peak memory
combine adds (Linux VmHWM, reset before each measurement), and scorer images/s without encoder cost.
"""

from __future__ import annotations

import argparse
import functools
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
from pipeline.stages.score_rows import scorer_for
from pipeline.vocab import Vocabulary

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


def folder_images(folder: str, count: int) -> list[torch.Tensor]:
    """`count` images of a folder (JPEG and PNG, in path order, spread over the whole folder), decoded as
    `lgca run` decodes them for this model."""
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_image

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no JPEG or PNG images under {folder}")
    step = max(1, len(paths) // count)
    chosen = paths[::step][:count]
    out = []
    for path in chosen:
        decoded = decode_image(path.read_bytes(), DecodeConfig())
        if not hasattr(decoded, "pixels"):
            raise SystemExit(f"cannot decode {path}: {decoded.message}")
        out.append(torch.from_numpy(decoded.pixels.copy()).permute(2, 0, 1).contiguous())
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


def scorer_rate(model, vectors, config: ScoringConfig, images, batch: int, classes=CLASSES) -> tuple[float, float, float]:
    """Images/s of Scorer.score over `images` after a one-batch warm-up, the share of that time spent inside
    the encoder (immune to machine noise: both are measured over the same calls), and the share of images
    scored with lgca (the cascade's escalated share; 1 for lgca, 0 for the global-view methods)."""
    encoder = _TimedEncoder(model)
    scorer = scorer_for(model, classes, vectors, config, encoder)
    scorer.score(images[:batch], [f"w{i}" for i in range(batch)])
    encoder.seconds = 0.0
    escalated = 0
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        results = scorer.score(chunk, [f"k{start + i}" for i in range(len(chunk))])
        escalated += sum(result.method == "lgca" for result in results)
    _sync(model.device)
    seconds = time.perf_counter() - started
    return len(images) / seconds, encoder.seconds / seconds, escalated / len(images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CheapEncoder:
    """A stand-in for the encoder: pooled views through a fixed random projection to `width` dimensions."""

    def __init__(self, width: int) -> None:
        self.projection = torch.randn(3 * 16 * 16, width, generator=torch.Generator().manual_seed(0))

    def to(self, device: torch.device) -> _CheapEncoder:
        self.projection = self.projection.to(device)
        return self

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(views, 16).flatten(1)
        return torch.nn.functional.normalize(pooled @ self.projection, dim=-1)


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_added_mib(work) -> tuple[Any, float]:
    """Run `work()`, returning its result and how far it pushed the process's peak RSS above the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _resident_kib("VmRSS")
    out = work()
    return out, max(0, _resident_kib("VmHWM") - before) / 1024


def hot_path(args: argparse.Namespace) -> None:
    from pipeline.models.load import resolve_device
    from pipeline.scoring.views import ViewFormat

    device = resolve_device(args.device)
    width, batch = 512, args.batch
    encoder = _CheapEncoder(width).to(device)
    view = ViewFormat(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    config = ScoringConfig(micro_batch=args.micro_batch)
    images = sample_images(batch, *args.size)
    keys = [f"k{i}" for i in range(batch)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}; stand-in encoder D={width}, "
        f"S=224, default LGCA (N=60, K=2, T=3), {batch} images per batch of {args.size[0]} x {args.size[1]}"
    )
    print(f"{'classes':>8s} {'combine ms/batch':>17s} {'combine peak MiB':>17s} {'scorer images/s':>16s}")
    for classes in args.classes:
        names = [f"class {i}" for i in range(classes)]
        vectors = torch.nn.functional.normalize(torch.randn(classes, width, generator=torch.Generator().manual_seed(1)), dim=-1)
        scorer = Scorer(encoder, names, vectors, 100.0, view, config, device)
        views = scorer.embed(images, keys)
        scorer.combine(views)  # warm-up
        if device.type == "cuda":  # device memory: what combining allocates beyond what is held already
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            scorer.combine(views)
            peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        else:
            _, peak = _peak_added_mib(functools.partial(scorer.combine, views))
        started = time.perf_counter()
        for _ in range(args.repeats):
            scorer.combine(views)
        _sync(device)
        combine_ms = (time.perf_counter() - started) / args.repeats * 1000
        started = time.perf_counter()
        for _ in range(args.repeats):
            scorer.score(images, keys)
        _sync(device)
        rate = batch * args.repeats / (time.perf_counter() - started)
        print(f"{classes:8d} {combine_ms:17.1f} {peak:17.1f} {rate:16.2f}")


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
    parser.add_argument("--images-from", default=None, metavar="DIR", help="score images of this folder instead of the sample photos")
    parser.add_argument("--labels", default=None, help="vocabulary file (default: 10 CIFAR-like class names)")
    parser.add_argument("--cascade-margin", type=float, default=0.2, help="threshold of the cascade row (default: %(default)s)")
    parser.add_argument("--hot-path", action="store_true", help="measure everything but the encoder, for --classes sizes")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 21000], help="vocabulary sizes for --hot-path")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per vocabulary size for --hot-path")
    args = parser.parse_args()
    if args.hot_path:
        hot_path(args)
        return

    model = load_model(
        ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, compile=args.compile)
    )
    if args.labels:
        from pipeline.config import VocabularyConfig
        from pipeline.vocab import load_vocabulary

        vocabulary = load_vocabulary(VocabularyConfig(labels=args.labels))
    else:
        vocabulary = Vocabulary(classes=CLASSES)
    images = folder_images(args.images_from, args.images) if args.images_from else sample_images(args.images, *args.size)
    settings = {
        "default (N=60, K=2, T=3)": ScoringConfig(micro_batch=args.micro_batch),
        "small (N=8, K=1, T=2)": ScoringConfig(crops=8, regions=1, steps=2, micro_batch=args.micro_batch),
        f"cascade {args.cascade_margin:g} (default lgca)": ScoringConfig(cascade_margin=args.cascade_margin, micro_batch=args.micro_batch),
    }
    crops_per_s = encoder_rate(model, args.micro_batch, args.encoder_seconds)
    rows: list[dict[str, Any]] = []
    for name, config in settings.items():
        vectors = text_vectors(model, vocabulary, config)
        rate, encoder_share, escalated = scorer_rate(model, vectors, config, images, args.batch, vocabulary.classes)
        passes = config.encoder_passes if config.cascade_margin is None else 1 + escalated * (config.encoder_passes - 1)
        rows.append(
            {
                "setting": name,
                "passes_per_image": passes,
                "escalated": escalated,
                "images_per_s": rate,
                "encoder_share": encoder_share,
                "encoder_bound_images_per_s": crops_per_s / passes,
                "efficiency": rate * passes / crops_per_s,
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
    full_lgca = rows[0]["images_per_s"]
    print(
        f"{'setting':30s} {'passes':>6s} {'escalated':>9s} {'images/s':>9s} {'vs lgca':>7s} {'bound':>9s} {'efficiency':>10s} {'in encoder':>10s}"
    )
    for row in rows:
        row["efficiency"] = row["images_per_s"] * row["passes_per_image"] / mean_rate
        row["encoder_bound_images_per_s"] = mean_rate / row["passes_per_image"]
        row["vs_default_lgca"] = row["images_per_s"] / full_lgca
        print(
            f"{row['setting']:30s} {row['passes_per_image']:6.1f} {row['escalated']:9.2f} {row['images_per_s']:9.3f} "
            f"{row['vs_default_lgca']:7.2f} {row['encoder_bound_images_per_s']:9.3f} {row['efficiency']:10.3f} {row['encoder_share']:10.3f}"
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
