"""The `lgca` command line: arguments to configuration to `job.run`; the `--help` text lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .config import (
    CROP_LAYOUTS,
    DECODE_DEVICES,
    LGCA_GLOBAL_WEIGHT,
    METHODS,
    PRECISIONS,
    SALIENCY_RULES,
    ConfigError,
    DecodeConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    ScoringConfig,
    VocabularyConfig,
)
from .curation_cli import add_curation_commands
from .eval_cli import add_eval_command
from .submit import add_cluster_commands

EXIT_CONFIG = 2  # bad configuration or input: nothing ran

DESCRIPTION = """\
Zero-shot image labelling with LGCA (Localized-Globalized Cross-Alignment) on Ray Data.

Point `lgca run` at images on local disk or S3 and a label vocabulary; get one Parquet row per image
(label, confidence, top-k, salient boxes, status, error message) in the output directory.
"""

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

Exit status: 0 when every input has a row (failed images included, with their status), 2 when the
configuration is unusable (nothing ran), 1 on an unexpected failure (rerun with --resume).
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=ModelConfig.name, help="open_clip architecture, or an open_clip model-config JSON (default: %(default)s)")
    group.add_argument(
        "--pretrained",
        default=ModelConfig.pretrained,
        help="weights: an open_clip tag (downloads where internet exists), a local .safetensors/.pt file, an fsspec "
        "URI such as s3://bucket/w.safetensors (fetched once into the cache), or 'random' (meaningless labels; "
        "tests and speed only) (default: %(default)s)",
    )
    group.add_argument("--device", default=ModelConfig.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--precision", default=ModelConfig.precision, choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    group.add_argument("--cache-dir", default=None, help="weights and text-embedding cache (default: ~/.cache/lgca-label or $LGCA_CACHE_DIR)")
    group.add_argument("--compile", action="store_true",
                       help="compile the image encoder with torch.compile: start-up takes longer (tens of seconds per actor), "
                            "encoding may run faster; measure with jobs/bench_scorer.py --compile")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScoringConfig()
    group = parser.add_argument_group("scoring (see docs/METHOD.md)")
    group.add_argument("--method", default=d.method, choices=METHODS, help="scoring method (default: %(default)s)")
    group.add_argument("--crops", type=int, default=d.crops, help="N, local crops per image (default: %(default)s)")
    group.add_argument("--crop-scale", type=float, nargs=2, default=d.crop_scale, metavar=("ALPHA", "BETA"),
                       help="crop side as a fraction of the shorter image side, drawn from [ALPHA, BETA] (default: 0.5 0.9)")
    group.add_argument("--crop-layout", default=d.crop_layout, choices=CROP_LAYOUTS, help="random crops, or a sqrt(N) x sqrt(N) grid (default: %(default)s)")
    group.add_argument("--saliency", default=d.saliency, choices=SALIENCY_RULES,
                       help="region saliency: class, its best class similarity; global, its similarity to the whole image; margin, "
                            "top-1 minus top-2 of its class probabilities; agreement, its similarity to the image's leading class "
                            "from the crops and global view (default: %(default)s)")
    group.add_argument("--steps", type=int, default=d.steps, help="T, expansion steps (default: %(default)s)")
    group.add_argument("--regions", type=int, default=d.regions, help="K, regions grown per step (default: %(default)s)")
    group.add_argument("--growth", type=float, default=d.growth,
                       help="gamma, growth of a selected region's side per step; grown boxes stay square, capped at the shorter side (default: %(default)s)")
    group.add_argument("--growth-target", type=float, default=d.growth_target, metavar="FRACTION",
                       help="instead of --growth, grow each region geometrically to this fraction of the shorter side at the last step, in (0, 1]")
    group.add_argument("--image-scale", type=float, default=d.image_scale, help="region-weight temperature, exp(scale) (default: %(default)s)")
    group.add_argument("--text-scale", type=float, default=d.text_scale, help="description-weight temperature, exp(scale) (default: %(default)s)")
    group.add_argument("--expand-weight", type=float, default=d.expand_weight, help="extra weight of grown boxes among the regions; 0 drops them (default: %(default)s)")
    group.add_argument("--global-weight", type=float, default=d.global_weight, metavar="LAMBDA",
                       help=f"share of the score given to the global view, in [0, 1] (default: {LGCA_GLOBAL_WEIGHT} for lgca, 0 for wca as WCA's code)")
    group.add_argument("--seed", type=int, default=d.seed, help="crop sampling seed, combined with each image key (default: %(default)s)")
    group.add_argument("--topk", type=int, default=d.topk, help="labels kept per image (default: %(default)s)")
    group.add_argument("--micro-batch", type=int, default=d.micro_batch, help="views per encoder call (default: %(default)s)")


def add_vocabulary_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("vocabulary")
    group.add_argument("--labels", required=required, help="labels: .txt (one class per line), .json/.yaml list, or a descriptors "
                       "JSON {class: [sentences]} (CuPL/DCLIP format); local or s3://")
    group.add_argument("--templates", default=None, help="prompt templates file, one per line with {} for the class (default: open_clip's OpenAI ImageNet set)")
    group.add_argument("--prompt", default=VocabularyConfig.prompt, help="label prompt p_c (default: %(default)r)")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://minio:9000); never recorded in outputs")


def scoring_config(args: argparse.Namespace) -> ScoringConfig:
    return ScoringConfig(
        method=args.method, crops=args.crops, crop_scale=tuple(args.crop_scale), crop_layout=args.crop_layout,
        saliency=args.saliency, steps=args.steps, regions=args.regions, growth=args.growth, growth_target=args.growth_target,
        image_scale=args.image_scale, text_scale=args.text_scale, expand_weight=args.expand_weight,
        global_weight=args.global_weight,
        seed=args.seed, topk=args.topk, micro_batch=args.micro_batch,
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        name=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
        compile=args.compile,
    )


def vocabulary_config(args: argparse.Namespace) -> VocabularyConfig:
    return VocabularyConfig(labels=args.labels, templates=args.templates, prompt=args.prompt)


def _add_run(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="label images into Parquet (local Ray, or --address for a cluster)",
        description="Label every image under INPUT... and write one Parquet row per image to --output.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="directory, glob, s3:// prefix, image file, or manifest")
    parser.add_argument("--output", required=True, help="output directory, local or s3://")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="label only inputs without a committed row in --output")
    mode.add_argument("--overwrite", action="store_true", help="delete existing results in --output first")
    add_vocabulary_arguments(parser)
    add_model_arguments(parser)
    add_scoring_arguments(parser)
    e, dec = ExecutionConfig(), DecodeConfig()
    group = parser.add_argument_group("execution")
    group.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local one")
    group.add_argument("--batch-size", type=int, default=e.batch_size, help="images per scoring call (default: %(default)s)")
    group.add_argument("--concurrency", type=int, default=None, help="scoring actors (default: one per GPU, else 1)")
    group.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor, fractional allowed (default: 1 if the cluster has GPUs, else 0)")
    group.add_argument("--num-cpus-per-actor", type=float, default=e.num_cpus_per_actor, help="CPUs reserved per scoring actor (default: %(default)s)")
    group.add_argument("--decode-batch-size", type=int, default=e.decode_batch_size, help="images per read-and-decode call (default: %(default)s)")
    group.add_argument("--rows-per-file", type=int, default=e.rows_per_file, help="rows per output Parquet file (default: %(default)s)")
    group.add_argument("--max-pixels", type=int, default=dec.max_pixels, help="refuse images declaring more pixels (decompression bombs) (default: %(default)s)")
    group.add_argument("--decode-timeout", type=float, default=dec.timeout_s, help="seconds allowed to decode one image on the CPU (default: %(default)s)")
    group.add_argument("--decode", default=dec.device, choices=DECODE_DEVICES,
                       help="where JPEGs are decoded: cpu workers; gpu, by nvJPEG on the scoring GPU in batches (other formats, "
                            "and JPEGs nvJPEG rejects, still decode on the CPU); auto, gpu when scoring runs on CUDA (default: %(default)s)")
    add_storage_arguments(group)
    parser.set_defaults(handler=_run)


def job_config(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        vocabulary=vocabulary_config(args),
        model=model_config(args),
        scoring=scoring_config(args),
        decode=DecodeConfig(max_pixels=args.max_pixels, timeout_s=args.decode_timeout, device=args.decode),
        execution=ExecutionConfig(
            address=args.address, batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus,
            num_cpus_per_actor=args.num_cpus_per_actor, decode_batch_size=args.decode_batch_size,
            rows_per_file=args.rows_per_file,
        ),
        resume=args.resume,
        overwrite=args.overwrite,
    )


def _run(args: argparse.Namespace) -> int:
    from .job import run
    from .sources import storage_options_from

    config = job_config(args)
    summary = run(config, storage_options_from(args.storage_option))
    print(summary.line(), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgca", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lgca-label {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_run,  # run
    add_cluster_commands,  # submit, status, logs, stop
    add_curation_commands,  # report, summary, export
    add_eval_command,  # eval
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # ours only: botocore's debug log prints request headers, credentials included
        logging.getLogger(__package__).setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"lgca: error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
