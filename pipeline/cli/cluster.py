"""`lgca submit`, `status`, `logs` and `stop`: argparse wiring over the cluster submission client."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cli.args import job_config
from pipeline.cli.parser import Parser
from pipeline.cli.run import add_run_command
from pipeline.config import ConfigError, JobConfig
from pipeline.credentials import is_secret_option
from pipeline.run.submit import (
    DEFAULT_ADDRESS,
    ENTRYPOINT_SCRIPT,
    ClusterError,
    call_for_job,
    connect,
    entrypoint,
    load_spec,
    pinned_requirements,
    refuse_relative_output,
    runtime_env,
    wait_for,
    working_tree_commit,
)

EPILOG = """\
examples:
  lgca submit --spec jobs/specs/gpu-fleet.yaml --address http://head:8265 --wait
  lgca submit --address http://head:8265 -- s3://bucket/images/ --labels s3://bucket/labels.txt \\
      --output s3://bucket/out/ --pretrained s3://bucket/weights/ViT-B-32.safetensors --num-gpus 1
  lgca logs lgca-20250101-120000-ab12cd --follow
  lgca submit --spec jobs/specs/gpu-fleet.yaml --resume     # finish an interrupted run

The job runs `python jobs/label_images.py ...` in --working-dir as shipped to the cluster (code only:
.git, .venv, tests and outputs are left out; the job records the tree's git commit). Paths in the spec
or arguments are read on the cluster, so use s3:// URIs or paths that exist there; a relative output is
refused, because Ray deletes the job's copy of the working dir when the job ends. Credentials never
travel with the job: the cluster reads them from its environment, instance profile or service account.

Exit status: 0 submitted (with --wait: the job SUCCEEDED), 1 the job failed or was stopped,
2 the spec, the arguments or the address are unusable (nothing was submitted).
"""
PIP_PIN_NOTE = (
    "lgca: note: --pip-pin: each node installs the {count} pinned dependencies it lacks at those versions into the job's "
    "environment (torch with its CUDA libraries alone: about 5 GB per node, on first use); nodes on the infra/Dockerfile "
    "image already have them"
)


def run_arguments_config(run_args: Sequence[str]) -> JobConfig:
    """Validate `lgca run` arguments exactly as `lgca run` would, without running anything.

    Args:
        run_args: the arguments after `lgca run`.

    Returns:
        The job they describe.

    Raises:
        ConfigError: an invalid value, or a secret-looking `--storage-option` (it would be stored in the
            job's entrypoint, visible to anyone who can read the dashboard).
        SystemExit: argparse's usage error (status 2) for unknown or malformed arguments.
    """
    from pipeline.stages.storage import storage_options_from

    parser = Parser(prog="lgca")
    add_run_command(parser.add_subparsers())
    args = parser.parse_args(["run", *run_args])
    storage_options_from(args.storage_option)
    secrets = sorted({p.partition("=")[0] for p in args.storage_option if is_secret_option(p.partition("=")[0])})
    if secrets:
        raise ConfigError(
            f"--storage-option {', '.join(secrets)} looks like a secret and would be stored in the job's entrypoint; "
            "give credentials to the cluster through its environment, instance profile or service account"
        )
    return job_config(args)


def _check_working_dir(working_dir: str) -> Path:
    path = Path(working_dir).expanduser().resolve()
    if not (path / ENTRYPOINT_SCRIPT).is_file():
        raise ConfigError(
            f"--working-dir {working_dir} has no {ENTRYPOINT_SCRIPT}; run from the repository root or pass --working-dir PATH/TO/lgca-label"
        )
    return path


def _spec_argument(spec: Path, working_dir: Path) -> str:
    """The spec path as the job sees it: relative to the shipped working dir when the spec is inside it."""
    resolved = spec.expanduser().resolve()
    try:
        return resolved.relative_to(working_dir).as_posix()
    except ValueError:
        print(
            f"lgca: note: {spec} lies outside --working-dir, so it is not shipped; the job reads {resolved} "
            "on the cluster (fine for a local cluster or a shared filesystem; otherwise move the spec "
            "under the working dir, e.g. jobs/specs/)",
            file=sys.stderr,
        )
        return str(resolved)


# ---------------------------------------------------------------- command handlers


def _submit(args: argparse.Namespace) -> int:
    if bool(args.spec) == bool(args.run_args):
        raise ConfigError("pass either --spec FILE or `-- <lgca run arguments>` (exactly one)")
    if args.spec:
        config, _ = load_spec(args.spec)  # fail here, before anything reaches the cluster
    elif args.resume:
        raise ConfigError("--resume before `--` applies to --spec only; put --resume after `--` with the run arguments")
    else:
        config = run_arguments_config(args.run_args)
    refuse_relative_output(config.output)
    working_dir = _check_working_dir(args.working_dir)
    if args.spec:
        script_args = ["--spec", _spec_argument(Path(args.spec), working_dir)] + (["--resume"] if args.resume else [])
    else:
        script_args = list(args.run_args)
    pip = pinned_requirements() if args.pip_pin else []
    if pip:
        print(PIP_PIN_NOTE.format(count=len(pip)), file=sys.stderr)
    client = connect(args.address)
    submission_id = args.submission_id or _new_submission_id()
    command = entrypoint(script_args)
    try:
        client.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env(working_dir, pip, working_tree_commit(working_dir)),
            metadata={"tool": "lgca-label", "version": __version__},
        )
    except RuntimeError as error:
        raise ClusterError(f"the Ray job server at --address {client.get_address()} refused the job: {error}") from None
    print(submission_id, flush=True)
    address = client.get_address()
    print(f"lgca: submitted `{command}`; dashboard {address}/#/jobs/{submission_id}", file=sys.stderr)
    if not args.wait:
        print(f"lgca: follow with `lgca logs {submission_id} --follow --address {address}`", file=sys.stderr)
        return 0
    return _wait_and_report(client, submission_id, address)


def _wait_and_report(client: Any, job_id: str, address: str) -> int:
    try:
        status = wait_for(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nlgca: stopped waiting; job {job_id} keeps running (stop it with `lgca stop {job_id} --address {address}`)", file=sys.stderr
        )
        return 130
    message = client.get_job_info(job_id).message or ""
    print(f"lgca: job {job_id} {status}{f': {message}' if message else ''}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    info = call_for_job(client.get_address(), lambda: client.get_job_info(args.job_id), args.job_id)
    status = str(info.status.value)
    print(f"{args.job_id} {status}{f': {info.message}' if info.message else ''}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    call_for_job(client.get_address(), lambda: client.get_job_status(args.job_id), args.job_id)
    if args.follow:
        return _wait_and_report(client, args.job_id, client.get_address())
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    stopped = call_for_job(client.get_address(), lambda: client.stop_job(args.job_id), args.job_id)
    if stopped:
        print(f"lgca: stop requested for job {args.job_id}", file=sys.stderr)
    else:
        print(f"lgca: job {args.job_id} had already ended ({client.get_job_status(args.job_id).value})", file=sys.stderr)
    return 0


def _new_submission_id() -> str:
    return f"lgca-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- argparse wiring


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="the head's dashboard URL, e.g. http://head:8265 (default: $RAY_API_SERVER_ADDRESS, "
        f"else $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )


def add_cluster_commands(subparsers: Any) -> None:
    """Register `submit`, `status`, `logs` and `stop` on the `lgca` subcommand parsers.

    Args:
        subparsers: the object `ArgumentParser.add_subparsers()` returned.
    """
    submit = subparsers.add_parser(
        "submit",
        help="submit a labelling job to a Ray cluster (a YAML spec, or `lgca run` arguments after --)",
        description="Submit `python jobs/label_images.py` with a job spec or `lgca run` arguments to a Ray cluster "
        "through its job server; the spec or arguments are validated here first.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--spec", metavar="FILE", help="YAML job spec (see jobs/specs/); validated before submission")
    submit.add_argument("run_args", nargs="*", metavar="-- RUN_ARGS", help="instead of --spec: `lgca run` arguments after --")
    _add_address(submit)
    submit.add_argument("--wait", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    submit.add_argument("--working-dir", default=".", help="code to ship: the repository root (default: the current directory)")
    submit.add_argument(
        "--pip-pin",
        action="store_true",
        help="also pip-install this package's dependencies, pinned to the versions installed here, into each node's job "
        "environment: a node without the same versions downloads them (torch with its CUDA libraries: about 5 GB per node). "
        "Not needed on clusters running the infra/Dockerfile image",
    )
    submit.add_argument("--resume", action="store_true", help="with --spec: label only images without a committed row")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: lgca-DATE-TIME-RANDOM)")
    submit.set_defaults(handler=_submit)

    status = subparsers.add_parser("status", help="print a submitted job's status", description="Print a submitted job's status.")
    status.add_argument("job_id", metavar="ID", help="submission id printed by `lgca submit`")
    _add_address(status)
    status.set_defaults(handler=_status)

    logs = subparsers.add_parser("logs", help="print a submitted job's logs", description="Print a submitted job's logs.")
    logs.add_argument("job_id", metavar="ID", help="submission id printed by `lgca submit`")
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends; exit 0 only if it SUCCEEDED")
    _add_address(logs)
    logs.set_defaults(handler=_logs)

    stop = subparsers.add_parser(
        "stop", help="stop a submitted job", description="Stop a submitted job; its committed rows stay, and --resume finishes it later."
    )
    stop.add_argument("job_id", metavar="ID", help="submission id printed by `lgca submit`")
    _add_address(stop)
    stop.set_defaults(handler=_stop)
