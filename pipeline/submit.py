"""Cluster commands: `lgca submit`, `status`, `logs` and `stop` through Ray's job submission API."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .config import ConfigError, JobConfig, job_from_spec

ENTRYPOINT_SCRIPT = "jobs/label_images.py"  # relative to the working dir; the image's WORKDIR holds the same tree
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # the order `ray job` reads them in
PROBE_TIMEOUT_S = 5.0  # an unreachable head must fail in seconds, not hang on a TCP timeout
POLL_INTERVAL_S = 2.0
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# Shipped working dir: code only. Ray also honours .gitignore; these hold on checkouts without one.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    "/tests",
    "/out",
    "/bench-out",
]
PINNED_DISTRIBUTION = "lgca-label"
UNPINNED = ("ray",)  # the cluster's own Ray runs every worker; a second copy from pip would not match it
SECRET_WORDS = ("secret", "token", "password", "key")  # the rule job_from_spec applies to spec storage options

EPILOG = """\
examples:
  lgca submit --spec jobs/specs/gpu-fleet.yaml --address http://head:8265 --wait
  lgca submit --address http://head:8265 -- s3://bucket/images/ --labels s3://bucket/labels.txt \\
      --output s3://bucket/out/ --pretrained s3://bucket/weights/ViT-B-32.safetensors --num-gpus 1
  lgca logs lgca-20250101-120000-ab12cd --follow
  lgca submit --spec jobs/specs/gpu-fleet.yaml --resume     # finish an interrupted run

The job runs `python jobs/label_images.py ...` in --working-dir as shipped to the cluster (code only:
.git, .venv, tests and outputs are left out). Paths in the spec or arguments are read on the cluster,
so use s3:// URIs or paths that exist there. Credentials never travel with the job: the cluster reads
them from its environment, instance profile or service account.

Exit status: 0 submitted (with --wait: the job SUCCEEDED), 1 the job failed or was stopped,
2 the spec, the arguments or the address are unusable (nothing was submitted).
"""


class ClusterError(ConfigError):
    """The Ray job server is unreachable or refused a request; the message names the address and the fix."""


# ---------------------------------------------------------------- job description


def entrypoint(script_args: Sequence[str]) -> str:
    """The shell command a cluster runs for one labelling job; the RayJob manifest uses the same one.

    Args:
        script_args: arguments of jobs/label_images.py (`--spec FILE`, or `lgca run` arguments).

    Returns:
        `python jobs/label_images.py ARGS`, shell-quoted.
    """
    return shlex.join(["python", ENTRYPOINT_SCRIPT, *script_args])


def load_spec(path: str | Path) -> tuple[JobConfig, dict[str, Any]]:
    """Read a YAML job spec and validate it with `job_from_spec`.

    Args:
        path: a local YAML file.

    Returns:
        The job and its non-secret storage options.

    Raises:
        ConfigError: the file is missing or not YAML, or the spec is invalid (the key is named).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job spec {path} does not exist; pass --spec FILE (see jobs/specs/ for examples)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"job spec {path} is not valid YAML: {error}") from None
    return job_from_spec(spec if spec is not None else {}, where=f"job spec {path}")


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
    from .cli import build_parser, job_config
    from .sources import storage_options_from

    args = build_parser().parse_args(["run", *run_args])
    storage_options_from(args.storage_option)
    secrets = sorted({p.partition("=")[0] for p in args.storage_option if any(w in p.partition("=")[0].lower() for w in SECRET_WORDS)})
    if secrets:
        raise ConfigError(f"--storage-option {', '.join(secrets)} looks like a secret and would be stored in the job's entrypoint; "
                          "give credentials to the cluster through its environment, instance profile or service account")
    return job_config(args)


def pinned_requirements(distribution: str = PINNED_DISTRIBUTION) -> list[str]:
    """This package's runtime dependencies pinned to the versions installed here, for a runtime_env `pip` list.

    Args:
        distribution: the installed distribution whose requirements to pin.

    Returns:
        Requirements such as `torch==2.5.1`, without Ray (the cluster's Ray must serve every worker).

    Raises:
        ConfigError: the distribution or one of its dependencies is not installed here.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        raise ConfigError(f"--pip-pin reads versions from the installed {distribution}, which is not installed; "
                          "pip install -e . first, or drop --pip-pin") from None
    pins = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # test and other optional extras
        if requirement.name.lower() in UNPINNED:
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"--pip-pin: {requirement.name} is not installed here, so its version is unknown; "
                              "install it or drop --pip-pin") from None
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pins.append(f"{requirement.name}{extras}=={version}")
    return pins


def runtime_env(working_dir: Path, pip: Sequence[str] = ()) -> dict[str, Any]:
    """The runtime_env of a labelling job: the code in `working_dir`, and optionally pip packages.

    Args:
        working_dir: the repository root (it must hold jobs/label_images.py).
        pip: requirements to install on the workers; empty when the image already has them.

    Returns:
        A runtime_env dict for `JobSubmissionClient.submit_job`.
    """
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if pip:
        env["pip"] = {"packages": list(pip), "pip_check": False}
    return env


def _check_working_dir(working_dir: str) -> Path:
    path = Path(working_dir).expanduser().resolve()
    if not (path / ENTRYPOINT_SCRIPT).is_file():
        raise ConfigError(f"--working-dir {working_dir} has no {ENTRYPOINT_SCRIPT}; run from the repository root "
                          "or pass --working-dir PATH/TO/lgca-label")
    return path


def _spec_argument(spec: Path, working_dir: Path) -> str:
    """The spec path as the job sees it: relative to the shipped working dir when the spec is inside it."""
    resolved = spec.expanduser().resolve()
    try:
        return resolved.relative_to(working_dir).as_posix()
    except ValueError:
        print(f"lgca: note: {spec} lies outside --working-dir, so it is not shipped; the job reads {resolved} "
              "on the cluster (fine for a local cluster or a shared filesystem; otherwise move the spec "
              "under the working dir, e.g. jobs/specs/)", file=sys.stderr)
        return str(resolved)


# ---------------------------------------------------------------- talking to the job server


def default_address() -> str:
    """The job server address used when --address is not given.

    Returns:
        $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (unless "auto"), else http://127.0.0.1:8265.
    """
    for name in ADDRESS_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "auto":
            return value
    return DEFAULT_ADDRESS


def _normalised_address(address: str | None) -> str:
    address = (address or default_address()).strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check that a Ray job server answers at `address`, within `timeout_s`.

    Any HTTP answer but 404 counts, even 401: authentication is the SDK's business and its message is better.

    Args:
        address: the job server's URL, e.g. http://head:8265.
        timeout_s: how long to wait for an answer.

    Raises:
        ClusterError: nothing answers, or a server that is not Ray's; the message names --address and the fix.
    """
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout_s):
            return
    except urllib.error.HTTPError as error:
        if error.code != 404:
            return
        raise ClusterError(
            f"--address {address} answers HTTP but is no Ray job server (404 on /api/version); pass the dashboard "
            "port (8265 by default), not the GCS (6379) or Ray Client (10001) port"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ClusterError(
            f"cannot reach a Ray job server at --address {address} ({reason}). Start the cluster, or pass the head's "
            "dashboard URL, e.g. --address http://HEAD:8265 (KubeRay: kubectl port-forward svc/CLUSTER-head-svc 8265; "
            "launcher: ray dashboard infra/aws/cluster.yaml), or set RAY_API_SERVER_ADDRESS"
        ) from None


def connect(address: str | None) -> Any:
    """A `JobSubmissionClient` for `address`, failing fast when nothing answers there.

    Args:
        address: the head's dashboard URL; None for `default_address()`.

    Returns:
        A connected `ray.job_submission.JobSubmissionClient`.

    Raises:
        ClusterError: the server is unreachable, or refused the connection (e.g. a missing auth token).
    """
    url = _normalised_address(address)
    probe(url)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as error:  # the SDK raises ConnectionError, RuntimeError or AuthenticationError
        raise ClusterError(f"the Ray job server at --address {url} refused the connection: {error}") from None


def _call(address: str, action: Callable[[], Any], job_id: str) -> Any:
    try:
        return action()
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise ClusterError(f"no job {job_id} on --address {address}; list jobs with `ray job list --address {address}`") from None
        raise


def wait_for(client: Any, job_id: str, follow_logs: bool = True, out: Any = None) -> str:
    """Stream a job's logs (optionally) until it ends, and return its final status.

    Args:
        client: a connected JobSubmissionClient.
        job_id: the submission id.
        follow_logs: print the log as it grows; else only poll the status.
        out: where logs go (default stdout).

    Returns:
        The terminal status name: SUCCEEDED, FAILED or STOPPED.
    """
    out = out or sys.stdout
    if follow_logs:
        try:
            asyncio.run(_tail(client, job_id, out))
        except Exception as error:  # a dropped log stream must not lose the job's outcome; polling follows
            print(f"lgca: log stream ended early ({error}); polling the job status", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(POLL_INTERVAL_S)


async def _tail(client: Any, job_id: str, out: Any) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


# ---------------------------------------------------------------- command handlers


def _submit(args: argparse.Namespace) -> int:
    if bool(args.spec) == bool(args.run_args):
        raise ConfigError("pass either --spec FILE or `-- <lgca run arguments>` (exactly one)")
    if args.spec:
        load_spec(args.spec)  # fail here, before anything reaches the cluster
    elif args.resume:
        raise ConfigError("--resume before `--` applies to --spec only; put --resume after `--` with the run arguments")
    else:
        run_arguments_config(args.run_args)
    working_dir = _check_working_dir(args.working_dir)
    if args.spec:
        script_args = ["--spec", _spec_argument(Path(args.spec), working_dir)] + (["--resume"] if args.resume else [])
    else:
        script_args = list(args.run_args)
    pip = pinned_requirements() if args.pip_pin else []
    client = connect(args.address)
    submission_id = args.submission_id or _new_submission_id()
    command = entrypoint(script_args)
    try:
        client.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env(working_dir, pip),
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
        print(f"\nlgca: stopped waiting; job {job_id} keeps running (stop it with `lgca stop {job_id} --address {address}`)",
              file=sys.stderr)
        return 130
    message = client.get_job_info(job_id).message or ""
    print(f"lgca: job {job_id} {status}{f': {message}' if message else ''}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    info = _call(client.get_address(), lambda: client.get_job_info(args.job_id), args.job_id)
    status = str(info.status.value)
    print(f"{args.job_id} {status}{f': {info.message}' if info.message else ''}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    _call(client.get_address(), lambda: client.get_job_status(args.job_id), args.job_id)
    if args.follow:
        return _wait_and_report(client, args.job_id, client.get_address())
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    stopped = _call(client.get_address(), lambda: client.stop_job(args.job_id), args.job_id)
    if stopped:
        print(f"lgca: stop requested for job {args.job_id}", file=sys.stderr)
    else:
        print(f"lgca: job {args.job_id} had already ended ({client.get_job_status(args.job_id).value})", file=sys.stderr)
    return 0


def _new_submission_id() -> str:
    return f"lgca-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- argparse wiring


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the head's dashboard URL, e.g. http://head:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        f"else $RAY_ADDRESS, else {DEFAULT_ADDRESS})")


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
    submit.add_argument("--pip-pin", action="store_true",
                        help="also pip-install this package's dependencies, pinned to the versions installed here "
                        "(not needed on clusters running the infra/Dockerfile image)")
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

    stop = subparsers.add_parser("stop", help="stop a submitted job",
                                 description="Stop a submitted job; its committed rows stay, and --resume finishes it later.")
    stop.add_argument("job_id", metavar="ID", help="submission id printed by `lgca submit`")
    _add_address(stop)
    stop.set_defaults(handler=_stop)


__all__ = [
    "ClusterError",
    "add_cluster_commands",
    "connect",
    "default_address",
    "entrypoint",
    "load_spec",
    "pinned_requirements",
    "probe",
    "run_arguments_config",
    "runtime_env",
    "wait_for",
]
