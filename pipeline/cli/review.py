"""Argparse wiring of the curation subcommands `lgca report`, `lgca summary` and `lgca export`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.cli.args import add_storage_arguments, storage_options
from pipeline.config import ConfigError
from pipeline.review.formats import FORMATS, PREDICTION_FORMATS
from pipeline.schema import STATUSES

REPORT_EPILOG = """\
examples:
  lgca report out/ --out review/report.html
  lgca report s3://bucket/labels-out/ --out report.html --max-thumbnails 50000 \\
      --path-prefix s3://bucket/images/=https://images.example.com/ --storage-option endpoint_url=http://minio:9000

Writes report.html and report_files/ (thumbnails, row details) beside it; open the file in any browser:
no server, no network. The top is the summary (rows by status, labels, confidence histogram, errors);
below, a gallery of every row (up to --max-gallery-rows) with filters by label, status, score range and
key, sorting by confidence or margin either way, and a view of one image with all its boxes and top-k.
Thumbnails are made for up to --max-thumbnails images, each label's least confident rows first (the
budget bounds the image reads; progress and the time left are printed while they are made); rows beyond
it show a local image itself and a remote one as a placeholder. A report run again keeps the thumbnails
it made before.
See docs/CURATION.md.
"""

EXPORT_EPILOG = f"""\
examples:
  lgca export out/ --format labelstudio --out tasks.json --max-score 0.5
  lgca export out/ --format coco --out coco.json --labels cat,dog --min-score 0.3
  lgca export out/ --format fiftyone --out fo-dataset/
  lgca export out/ --format csv --out all.csv --status decode_error,read_error

formats (see docs/CURATION.md):
  labelstudio  a JSON list of tasks with predictions (choices + rectanglelabels), and
               <stem>.label_config.xml, the labeling config whose tag names the predictions use
  coco         COCO detection JSON: categories = vocabulary, boxes as annotations with score; the
               image-level label, score and top-k go in each image's "attributes"
  fiftyone     a directory: data.json (sample id -> image path), labels.json
               (FiftyOneImageDetectionDataset) and classifications.json (FiftyOneImageClassificationDataset)
  csv          one line per row: key, path, status, label, score, margin, topk (JSON), error_message,
               width, height, boxes (JSON), method, model, pretrained, then pass-through columns

--status defaults to ok for {", ".join(PREDICTION_FORMATS)} (failed rows have no predictions) and to
every status for csv.
"""


def add_curation_commands(subparsers: Any) -> None:
    """Register `report`, `summary` and `export` on the `lgca` subparsers.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers`.
    """
    _add_report(subparsers)
    _add_summary(subparsers)
    _add_export(subparsers)


def _add_report(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report of an output directory: summary, filterable gallery, one-image view",
        description="Write an HTML report of OUTPUT_DIR (the --output of lgca run): rows by status, labels, confidence "
        "histogram and errors, then a gallery of every row with the salient boxes drawn, to filter, sort and page.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="output directory of lgca run, local or s3://")
    parser.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write, local (default: %(default)s)")
    parser.add_argument(
        "--max-thumbnails",
        type=int,
        metavar="N",
        default=20_000,
        help="images thumbnailed at most, each label's least confident rows first; 0 for none (default: %(default)s)",
    )
    parser.add_argument("--page-size", type=int, metavar="N", default=24, help="gallery cards per page (default: %(default)s)")
    parser.add_argument(
        "--thumbnail-size", type=int, metavar="N", default=256, help="longer side of a thumbnail in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--error-examples", type=int, metavar="N", default=20, help="examples shown per error status (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, metavar="N", default=8, help="threads reading images for thumbnails (default: %(default)s)")
    parser.add_argument(
        "--path-prefix",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite image paths starting with OLD into links starting with NEW, repeatable "
        "(e.g. s3://bucket/=https://bucket.s3.amazonaws.com/); local files link as file:// URLs without it",
    )
    parser.add_argument(
        "--max-gallery-rows",
        type=int,
        metavar="N",
        default=200_000,
        help="rows the gallery holds; above it each label and failure status keeps its share (default: %(default)s)",
    )
    add_storage_arguments(parser)
    parser.set_defaults(handler=_report)


def _add_summary(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="print the summary of an output directory",
        description="Print the run summary of OUTPUT_DIR as plain text tables: run settings, rows by status, "
        "labels, confidence distribution, boxes, error examples.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="output directory of lgca run, local or s3://")
    parser.add_argument("--max-labels", type=int, metavar="N", default=30, help="label rows shown, the rest summed (default: %(default)s)")
    parser.add_argument("--error-examples", type=int, metavar="N", default=5, help="examples shown per error status (default: %(default)s)")
    add_storage_arguments(parser)
    parser.set_defaults(handler=_summary)


def _add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export predictions for Label Studio, COCO, FiftyOne or CSV",
        description="Export the rows of OUTPUT_DIR (the --output of lgca run) in a curation format, optionally filtered.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="output directory of lgca run, local or s3://")
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write (a directory for fiftyone), local or s3://")
    parser.add_argument("--min-score", type=float, default=None, metavar="X", help="keep rows whose image-level score is >= X")
    parser.add_argument(
        "--max-score", type=float, default=None, metavar="X", help="keep rows whose image-level score is <= X (review the unsure ones)"
    )
    parser.add_argument("--labels", default="", metavar="A,B", help="keep rows labelled with one of these, comma-separated (e.g. cat,dog)")
    parser.add_argument(
        "--status", default="", metavar="S,...", help=f"keep rows with one of these statuses, comma-separated ({', '.join(STATUSES)})"
    )
    parser.add_argument(
        "--path-prefix",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite image paths starting with OLD to start with NEW, repeatable "
        "(e.g. /data/photos/=/data/local-files/?d=photos/ for Label Studio local storage)",
    )
    add_storage_arguments(parser)
    parser.set_defaults(handler=_export)


def _report(args: argparse.Namespace) -> int:
    from pipeline.review.output_dir import open_output
    from pipeline.review.report import write_report

    options = storage_options(args)
    output = open_output(args.output_dir, options)
    summary = write_report(
        output,
        args.out,
        max_thumbnails=args.max_thumbnails,
        page_size=args.page_size,
        thumbnail_size=args.thumbnail_size,
        error_examples=args.error_examples,
        storage_options=options,
        workers=args.workers,
        max_gallery_rows=args.max_gallery_rows,
        path_prefixes=_prefixes(args.path_prefix),
    )
    print(summary.line(), flush=True)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from pipeline.review.output_dir import open_output
    from pipeline.review.stats import collect_stats
    from pipeline.review.summary import format_summary

    output = open_output(args.output_dir, storage_options(args))
    stats = collect_stats(output, error_examples=args.error_examples)
    sys.stdout.write(format_summary(output, stats, max_labels=args.max_labels, examples=args.error_examples))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.review.export import export
    from pipeline.review.output_dir import default_filter, open_output

    options = storage_options(args)
    output = open_output(args.output_dir, options)
    row_filter = default_filter(args.format, args.min_score, _split(args.labels), _split(args.status), args.max_score)
    summary = export(output, args.format, args.out, row_filter, _prefixes(args.path_prefix), options)
    print(summary.line(), flush=True)
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _prefixes(pairs: Sequence[str]) -> list[tuple[str, str]]:
    prefixes = []
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old:
            raise ConfigError(f"--path-prefix {pair!r} is not OLD=NEW; write e.g. /data/photos/=/data/local-files/?d=photos/")
        prefixes.append((old, new))
    return prefixes
