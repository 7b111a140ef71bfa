"""The `lgca` entry point: the top-level parser over the command groups, logging, and exit statuses."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import __version__
from pipeline.cli.args import EXIT_CONFIG, EXIT_FAILED
from pipeline.cli.cluster import add_cluster_commands
from pipeline.cli.eval import add_eval_command
from pipeline.cli.parser import Parser
from pipeline.cli.review import add_curation_commands
from pipeline.cli.run import add_plan_command, add_run_command
from pipeline.config import ConfigError, RunFailed

DESCRIPTION = """\
Zero-shot image labelling with LGCA (Localized-Globalized Cross-Alignment) on Ray Data.

Point `lgca run` at images on local disk or S3 and a label vocabulary; get one Parquet row per image
(label, confidence, top-k, salient boxes, status, error message) in the output directory.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lgca", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lgca-label {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_run_command,  # run
    add_plan_command,  # plan
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
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"lgca: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except RunFailed as error:
        print(f"lgca: error: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
