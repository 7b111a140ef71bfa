"""`lgca run`: label images into Parquet on a local embedded Ray or a cluster given by --address."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli import args
from pipeline.config import DECODE_DEVICES, DecodeConfig, ExecutionConfig

RUN_EPILOG = """\
examples:
  lgca run photos/ --labels labels.txt --output out/ --pretrained /weights/ViT-B-32.safetensors
  lgca run s3://bucket/images/ --labels s3://bucket/labels.json --output s3://bucket/labels-out/ \\
      --pretrained s3://bucket/weights/ViT-B-32.safetensors --num-gpus 1 --concurrency 4
  lgca run manifest.parquet --labels labels.txt --output out/ --resume
  lgca run examples/images --labels examples/labels.txt --output out/ --pretrained random --crops 8

INPUT is a directory (recursive), a glob, an s3:// prefix, one image, or a manifest (.parquet/.csv
with a `path` column; its other columns are copied to the output). Credentials come from the usual
AWS variables or files, or --storage-option key=value; they are never written to the output.

Exit status: 0 when every input has a row (failed images included, with their status; --resume
--retry-failed labels those again), 2 when the configuration or the inputs are unusable (nothing was
labelled), 1 when labelling started and could not finish (rerun with --resume).
"""


PLAN_EPILOG = """\
examples:
  lgca plan s3://bucket/images/ --labels labels.txt --output s3://bucket/labels-out/ --method lgca
  lgca plan manifests/ --labels labels.txt --output out/ --rows-per-file 20000

Takes the arguments of `lgca run`, lists the inputs on the cluster and writes the plan under
--output/_plan/ (shards of --rows-per-file images), then prints images, shards, skipped files and
the encoder passes the method will make. `lgca run` with the same arguments and --resume labels it;
a plan already there is reused when the arguments match it, and refused, naming what changed, when
they do not.
"""


def add_run_command(subparsers: Any) -> None:
    """Register `lgca run` on the `lgca` subcommand parsers."""
    parser = subparsers.add_parser(
        "run",
        help="label images into Parquet (local Ray, or --address for a cluster)",
        description="Label every image under INPUT... and write one Parquet row per image to --output.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(parser)
    parser.set_defaults(handler=_run)


def add_plan_command(subparsers: Any) -> None:
    """Register `lgca plan`: the arguments of `lgca run`; lists and writes the plan, labels nothing."""
    parser = subparsers.add_parser(
        "plan",
        help="list the inputs and write the job's plan of shards; print its size (labels nothing)",
        description="List every image under INPUT..., cut the list into shards under --output/_plan/, and summarise it.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(parser)
    parser.set_defaults(handler=_plan)


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="directory, glob, s3:// prefix, image file, or manifest")
    parser.add_argument("--output", required=True, help="output directory, local or s3://")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="label only the shards of the output's plan that have no committed file")
    mode.add_argument("--overwrite", action="store_true", help="delete existing results in --output first")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also label again the rows that failed (read, decode or score errors) in committed shards",
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="also write each image's normalised embedding (the global view the labels already use: no extra encoder pass) "
        "in an `embedding` column, fixed_size_list<halffloat>[D], for faiss, autofaiss and DuckDB (docs/CURATION.md)",
    )
    parser.add_argument(
        "--image-column",
        default=None,
        metavar="NAME",
        help="a Parquet INPUT that holds the images themselves: the column of image bytes (default: detected, jpg, png "
        "or webp as img2dataset writes them, or Hugging Face's `image` struct); other columns pass through",
    )
    args.add_vocabulary_arguments(parser)
    args.add_model_arguments(parser)
    args.add_scoring_arguments(parser)
    e, dec = ExecutionConfig(), DecodeConfig()
    group = parser.add_argument_group("execution")
    group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: HEAD:6379 (the head's GCS, not the dashboard) or auto on a cluster node; default: start a "
        "local one. Ships no code: the nodes need lgca-label installed (the infra/Dockerfile image), else use `lgca submit`",
    )
    group.add_argument("--batch-size", type=int, default=e.batch_size, help="images per scoring call (default: %(default)s)")
    group.add_argument("--concurrency", type=int, default=None, help="scoring actors (default: one per GPU, else 1)")
    group.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per actor, fractional allowed (default: 1 if the cluster has GPUs, else 0)"
    )
    group.add_argument(
        "--num-cpus-per-actor", type=float, default=e.num_cpus_per_actor, help="CPUs reserved per scoring actor (default: %(default)s)"
    )
    group.add_argument(
        "--decode-batch-size", type=int, default=e.decode_batch_size, help="images per read-and-decode call (default: %(default)s)"
    )
    group.add_argument(
        "--rows-per-file",
        type=int,
        default=e.rows_per_file,
        help="images per shard: the unit of work, of resume and of output files, one part-SHARD.parquet each (default: %(default)s)",
    )
    group.add_argument(
        "--max-bytes",
        type=int,
        default=dec.max_bytes,
        help="refuse files larger than this many bytes, before reading them; a read_error row (default: %(default)s)",
    )
    group.add_argument(
        "--read-timeout",
        type=float,
        default=dec.read_timeout_s,
        help="seconds allowed to read one file, retries included; a read_error row after that (default: %(default)s)",
    )
    group.add_argument(
        "--allow-scheme",
        action="append",
        default=[],
        metavar="SCHEME",
        help="also read inputs and manifest rows with this URL scheme (e.g. gs, https), repeatable; only file and s3 "
        "are read by default, so a manifest cannot make the workers fetch any address it names",
    )
    group.add_argument(
        "--max-pixels",
        type=int,
        default=dec.max_pixels,
        help="refuse images declaring more pixels (decompression bombs) (default: %(default)s)",
    )
    group.add_argument(
        "--decode-timeout", type=float, default=dec.timeout_s, help="seconds allowed to decode one image on the CPU (default: %(default)s)"
    )
    group.add_argument(
        "--decode",
        default=dec.device,
        choices=DECODE_DEVICES,
        help="where JPEGs are decoded: cpu workers; gpu, by nvJPEG on the scoring GPU in batches (other formats, "
        "and JPEGs nvJPEG rejects, still decode on the CPU); auto, gpu when scoring runs on CUDA (default: %(default)s)",
    )
    args.add_storage_arguments(group)


def _run(namespace: argparse.Namespace) -> int:
    from pipeline.run.job import run

    config = args.job_config(namespace)
    summary = run(config, args.storage_options(namespace))
    print(summary.line(), flush=True)
    return 0


def _plan(namespace: argparse.Namespace) -> int:
    from pipeline.run.job import plan_only

    summary = plan_only(args.job_config(namespace), args.storage_options(namespace))
    print(summary.line(), flush=True)
    return 0
