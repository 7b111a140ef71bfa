"""Pipeline benchmarks: `lgca run` against the in-process scorer (overhead), and throughput and memory by job size.

    python jobs/bench_pipeline.py overhead --images 256 --method clip
    python jobs/bench_pipeline.py overhead --images 16 --method lgca --crops 8 --regions 1 --steps 2
    python jobs/bench_pipeline.py scaling --sizes 1000 10000 100000

overhead: the same JPEGs and model, (a) decoded up front at the pipeline's draft scale and scored in this
process with `Scorer.score` (no reading, decoding or writing timed), (b) labelled by `lgca run` on a local
Ray (read, decode, score, write). The ratio of images/s is the pipeline's efficiency; `lgca run` is measured both end to end (its
labelling phase, start-up included) and after the first rows are committed.

scaling: `lgca run` on 1k / 10k / 100k synthetic JPEGs with the tiny model and `--method clip` (so the
pipeline, not the encoder, is what is measured), on a Ray cluster started for the purpose: images/s and the
peak RSS of the driver and of the largest worker, which must stay flat as the job grows (tests/test_scaling.py
runs it on 200 and 2,000 images). Exits 1 if a run fails or does not write one ok row per image.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `pipeline` importable when run as a plain script

from benchlib import lgca_command, local_cluster, measure, megabytes, ray_workers_root, synthetic_jpegs  # noqa: E402

from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402
from pipeline.models.text_vectors import text_vectors  # noqa: E402
from pipeline.stages.decode import DecodedImage, decode_for_views, decode_image  # noqa: E402
from pipeline.stages.score_rows import scorer_for  # noqa: E402
from pipeline.vocab import load_vocabulary  # noqa: E402

SUMMARY = re.compile(r"([\d.]+) images/s \(first rows after ([\d.]+) s(?:, then ([\d.]+) images/s)?\)")
ROWS = re.compile(r"(\d+) rows written: (\d+) ok")


def photo_jpegs(directory: Path, count: int, size: tuple[int, int]) -> Path:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(photos[index % 4]).resize(size, Image.Resampling.BICUBIC).save(directory / f"{index:05d}.jpg", quality=90)
    return directory


def overhead(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lgca-bench-"))
    images = photo_jpegs(work / "images", args.images, tuple(args.size))
    labels = ROOT / "examples" / "labels.txt"
    scoring = ScoringConfig(method=args.method, crops=args.crops, regions=args.regions, steps=args.steps)
    flags = [
        "--method",
        args.method,
        "--crops",
        str(args.crops),
        "--regions",
        str(args.regions),
        "--steps",
        str(args.steps),
        "--decode",
        args.decode,
        *(["--compile"] if args.compile else []),
    ]

    model = load_model(ModelConfig(name=args.model, pretrained="random", compile=args.compile))
    vocabulary = load_vocabulary(VocabularyConfig(labels=str(labels)))
    vectors = text_vectors(model, vocabulary, scoring)
    scorer = scorer_for(model, vocabulary.classes, vectors, scoring)
    # decoded up front as the pipeline's CPU workers decode them (same draft scale), so both score the same pixels
    decode = decode_for_views(model.image_size, [scoring])
    files = sorted(images.iterdir())[: args.in_process_images]  # enough for a rate, not the whole set
    decoded = [d for d in (decode_image(path.read_bytes(), decode) for path in files) if isinstance(d, DecodedImage)]  # all decode
    pixels = [torch.from_numpy(d.pixels.copy()).permute(2, 0, 1).contiguous() for d in decoded]
    sizes = [(d.width, d.height) for d in decoded]
    keys = [f"k{i}" for i in range(len(decoded))]
    batch = args.batch_size
    scorer.score(pixels[:batch], keys[:batch], sizes[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(decoded), batch):
        scorer.score(pixels[start : start + batch], keys[start : start + batch], sizes[start : start + batch])
    in_process = len(decoded) / (time.perf_counter() - started)
    del model, scorer

    batches = ["--batch-size", str(args.batch_size), "--decode-batch-size", str(args.batch_size)]
    command = lgca_command("run", images, labels, work / "out", *batches, *flags, model=args.model)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    match = SUMMARY.search(result.stdout)
    assert match, result.stdout[-2000:]
    end_to_end, first_rows, steady = (float(v or 0) for v in match.groups())
    shutil.rmtree(work, ignore_errors=True)
    row = {
        "model": args.model,
        "method": args.method,
        "images": args.images,
        "decode": args.decode,
        "compiled": args.compile,
        "in_process_images_per_s": in_process,
        "lgca_run_images_per_s": end_to_end,
        "lgca_run_steady_images_per_s": steady,
        "first_rows_s": first_rows,
        "ratio_end_to_end": end_to_end / in_process,
        "ratio_steady": steady / in_process,
    }
    print(
        f"model {args.model}, method {args.method}, {args.images} JPEGs {args.size[0]}x{args.size[1]}, "
        f"{torch.get_num_threads()} torch threads, --decode {args.decode}{', compiled' if args.compile else ''}"
    )
    print(f"{'in-process scorer':22s} {in_process:8.2f} images/s")
    print(
        f"{'lgca run, end to end':22s} {end_to_end:8.2f} images/s  ratio {row['ratio_end_to_end']:.2f} "
        f"(start-up included; first rows after {first_rows:.1f} s)"
    )
    print(f"{'lgca run, after them':22s} {steady:8.2f} images/s  ratio {row['ratio_steady']:.2f}")
    return row


def scaling(args: argparse.Namespace) -> list[dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lgca-scale-"))
    labels = work / "labels.txt"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("cat\ndog\nbird\ncar\n")
    flags = ["--method", "clip", "--batch-size", str(args.batch_size), "--decode-batch-size", str(args.decode_batch_size)]
    flags += ["--rows-per-file", str(args.rows_per_file)] if args.rows_per_file else []
    rows = []
    with local_cluster(args.num_cpus) as cluster:
        for count in args.sizes:
            images = synthetic_jpegs(work / f"images-{count}", count)
            output = work / f"out-{count}"
            shutil.rmtree(output, ignore_errors=True)
            command = lgca_command("run", images, labels, output, *flags, "--address", cluster.address)
            run = measure(command, cluster.env(), ray_workers_root(cluster.temp_dir))
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            match, written = SUMMARY.search(run.stdout), ROWS.search(run.stdout)
            assert match and written, run.stdout[-2000:]
            if written.groups() != (str(count), str(count)):
                raise SystemExit(f"{count} images, but {written.group(0)}:\n{run.stdout[-2000:]}")
            end_to_end, _, steady = (float(v or 0) for v in match.groups())
            rows.append(
                {
                    "images": count,
                    "rows_written": int(written.group(1)),
                    "ok": int(written.group(2)),
                    "wall_s": run.seconds,
                    "images_per_s": end_to_end,
                    "steady_images_per_s": steady,
                    "driver_peak_rss_mib": megabytes(run.driver_peak_rss),
                    "worker_peak_rss_mib": megabytes(run.worker_peak_rss),
                }
            )
            shutil.rmtree(output, ignore_errors=True)
    print(f"{'images':>8s} {'wall s':>8s} {'images/s':>9s} {'steady':>8s} {'driver MiB':>11s} {'worker MiB':>11s}")
    for row in rows:
        print(
            f"{row['images']:8d} {row['wall_s']:8.1f} {row['images_per_s']:9.1f} {row['steady_images_per_s']:8.1f} "
            f"{row['driver_peak_rss_mib']:11.0f} {row['worker_peak_rss_mib']:11.0f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the results here")
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead", help="lgca run against the in-process scorer")
    over.add_argument("--model", default="ViT-B-32")
    over.add_argument("--images", type=int, default=64)
    over.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    over.add_argument("--method", default="clip")
    over.add_argument("--crops", type=int, default=60)
    over.add_argument("--regions", type=int, default=2)
    over.add_argument("--steps", type=int, default=3)
    over.add_argument("--batch-size", type=int, default=32)
    over.add_argument("--in-process-images", type=int, default=512, help="images decoded up front for the in-process rate")
    over.add_argument("--decode", default="cpu", choices=("cpu", "gpu", "auto"), help="lgca run --decode (default: %(default)s)")
    over.add_argument("--compile", action="store_true", help="torch.compile the encoder, in-process and in lgca run")
    scale = commands.add_parser("scaling", help="throughput and peak memory by job size")
    scale.add_argument("--sizes", type=int, nargs="+", default=(1000, 10000, 100000))
    scale.add_argument("--num-cpus", type=int, default=2)
    scale.add_argument("--workdir", default=None, help="keep the synthetic images here between runs")
    scale.add_argument("--batch-size", type=int, default=256, help="lgca run --batch-size (default: %(default)s)")
    scale.add_argument("--decode-batch-size", type=int, default=64, help="lgca run --decode-batch-size (default: %(default)s)")
    scale.add_argument("--rows-per-file", type=int, default=None, help="lgca run --rows-per-file (default: lgca's)")
    args = parser.parse_args()
    result = overhead(args) if args.command == "overhead" else scaling(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
