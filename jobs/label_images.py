"""Ray job entrypoint: label images from a YAML job spec (`--spec`) or `lgca run` flags, on the cluster it runs in."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

# Submitted jobs run this file from the shipped working dir: its code must win over an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from pipeline.config import ConfigError, JobConfig
    from pipeline.run.submit import in_ray_working_dir_copy, load_spec, missing_package_hint, refuse_relative_output
except ModuleNotFoundError as missing:  # this file travelled without the package beside it
    sys.exit(
        f"label_images.py: error: {missing}; run it from a checkout of lgca-label (jobs/ beside pipeline/), or submit with `lgca submit`"
    )

EXIT_FAILED = 1  # the job ran and failed
EXIT_CONFIG = 2  # unusable spec or arguments: nothing ran

USAGE = """\
python jobs/label_images.py --spec FILE [--resume | --overwrite]
       python jobs/label_images.py INPUT... --labels FILE --output DIR [lgca run options]"""


def _spec_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label_images.py",
        usage=USAGE,
        description="Label images on the Ray cluster this runs in (the one `ray job submit` or KubeRay started it "
        "on, a `ray start` cluster on this machine, else a new local one) and print the run summary. "
        "Without --spec, the arguments are those of `lgca run` (see `lgca run --help`).",
    )
    parser.add_argument("--spec", required=True, metavar="FILE", help="YAML job spec (see jobs/specs/)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="override the spec: label only images without a committed row")
    mode.add_argument("--overwrite", action="store_true", help="override the spec: delete existing results first")
    return parser


def job_from_arguments(argv: Sequence[str]) -> tuple[JobConfig, dict[str, Any]]:
    """The job and storage options that `--spec FILE` or `lgca run` arguments describe.

    Args:
        argv: the script's arguments.

    Returns:
        The validated job and its storage options.

    Raises:
        ConfigError: an invalid spec or value (the key is named).
        SystemExit: argparse's usage error (status 2).
    """
    if any(arg == "--spec" or arg.startswith("--spec=") for arg in argv):
        args = _spec_parser().parse_args(argv)
        config, storage_options = load_spec(args.spec)
        if args.resume or args.overwrite:
            config = replace(config, resume=args.resume, overwrite=args.overwrite)
        from pipeline.stages.storage import gather_storage_options

        # a spec holds no secrets: those come from LGCA_STORAGE_OPTIONS (e.g. a secret in the job's environment)
        return config, {**storage_options, **gather_storage_options([])}
    if not argv or argv[0] in ("-h", "--help"):
        _spec_parser().print_help()
        raise SystemExit(0 if argv else EXIT_CONFIG)

    from pipeline.cli import args as cli_args
    from pipeline.cli.main import build_parser

    args = build_parser().parse_args(["run", *argv])
    return cli_args.job_config(args), cli_args.storage_options(args)


def on_cluster(config: JobConfig) -> JobConfig:
    """The job with the address of the cluster to join.

    An address in the job wins. Inside a submitted job Ray sets RAY_ADDRESS, so "auto" joins that cluster.
    Otherwise the address stays unset and `ray.init()` joins a `ray start` cluster on this machine, or
    starts a local one.

    Args:
        config: the validated job.

    Returns:
        The job, with `execution.address` set to "auto" when RAY_ADDRESS names a cluster.
    """
    if config.execution.address or not os.environ.get("RAY_ADDRESS"):
        return config
    return replace(config, execution=replace(config.execution, address="auto"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one labelling job and print its summary line.

    Args:
        argv: arguments (default: sys.argv[1:]).

    Returns:
        0 on success, 2 when the spec or arguments are unusable (nothing ran), 1 when a module is missing on the
        cluster (the message names the fix).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.run.job import run  # torch, open_clip, pyarrow: the first imports a bare cluster lacks

        config, storage_options = job_from_arguments(list(sys.argv[1:] if argv is None else argv))
        if in_ray_working_dir_copy():
            refuse_relative_output(config.output)
        summary = run(on_cluster(config), storage_options)
    except ConfigError as error:
        print(f"label_images.py: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as error:  # the driver's or a worker's import, as Ray passes it on
        hint = missing_package_hint(error)
        if hint is None:
            raise
        traceback.print_exc()
        print(f"label_images.py: error: {hint}", file=sys.stderr)
        return EXIT_FAILED
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
