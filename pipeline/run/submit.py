"""The cluster submission client: the job's entrypoint and runtime_env, and Ray's job server (probe, connect, wait)."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig
from pipeline.job_spec import job_from_spec

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
COMMIT_VARIABLE = "LGCA_CODE_COMMIT"  # the shipped tree's commit: the job records it as code_version (no .git travels)
RAY_WORKING_DIR_COPIES = "working_dir_files"  # Ray unpacks a job's working_dir into runtime_resources/<this>/_ray_pkg_HASH
MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")  # also in the text of Ray's wrappers of a worker's error


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
        raise ConfigError(
            f"--pip-pin reads versions from the installed {distribution}, which is not installed; pip install -e . first, or drop --pip-pin"
        ) from None
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
            raise ConfigError(
                f"--pip-pin: {requirement.name} is not installed here, so its version is unknown; install it or drop --pip-pin"
            ) from None
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pins.append(f"{requirement.name}{extras}=={version}")
    return pins


def runtime_env(working_dir: Path, pip: Sequence[str] = (), commit: str | None = None) -> dict[str, Any]:
    """The runtime_env of a labelling job: the code in `working_dir`, optionally pip packages and its commit.

    Args:
        working_dir: the repository root (it must hold jobs/label_images.py).
        pip: requirements to install on the workers; empty when the image already has them.
        commit: the git commit of `working_dir`, recorded by the job as its code_version; "" outside git (it then
            hides the image's commit, which is not the shipped code's), None to leave the variable alone.

    Returns:
        A runtime_env dict for `JobSubmissionClient.submit_job`.
    """
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if pip:
        env["pip"] = {"packages": list(pip), "pip_check": False}
    if commit is not None:
        env["env_vars"] = {COMMIT_VARIABLE: commit}
    return env


def working_tree_commit(path: Path) -> str:
    """The short git commit of the checkout holding `path`; empty outside git or without a git binary."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def refuse_relative_output(output: str) -> None:
    """Refuse a relative local output for a job that runs in Ray's copy of the working dir.

    Ray unpacks the shipped working dir into a temporary folder and deletes it after the job: results written
    there by a relative path are lost.

    Args:
        output: the job's `output`.

    Raises:
        ConfigError: `output` is a relative local path; the message names what to use instead.
    """
    if "://" in output or output.startswith(("/", "~")):
        return
    raise ConfigError(
        f"output {output} is a relative path: a submitted job runs in Ray's temporary copy of the working dir, which Ray "
        "deletes after the job, results included. Use an s3:// URI or an absolute path every node can write "
        f"(e.g. {Path(output).resolve()} for a head on this machine or a shared filesystem)"
    )


def in_ray_working_dir_copy(cwd: Path | None = None) -> bool:
    """Whether `cwd` (default: the current directory) is a working_dir that Ray unpacked for a submitted job."""
    return (cwd or Path.cwd()).parent.name == RAY_WORKING_DIR_COPIES


def missing_package_hint(error: BaseException) -> str | None:
    """How to give the cluster the code or dependency whose import failed in `error` or its causes, else None.

    A worker's ModuleNotFoundError reaches the driver wrapped by Ray (RayTaskError, or RaySystemError
    "System error: No module named ..."), so the messages along the chain count, not only the types.

    Args:
        error: what the job raised.

    Returns:
        One sentence naming the missing module and the fix, or None when no import failed.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        match = MISSING_MODULE.search(str(cause))
        name = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
        name = name or (match.group(1) if match else None)
        if name:
            return _install_hint(name.split(".")[0])
        cause = cause.__cause__ or cause.__context__
    return None


def _install_hint(module: str) -> str:
    if module == "pipeline":
        return (
            "the cluster's Python cannot import lgca-label's code (`pipeline`): submit with `lgca submit`, which ships this "
            "working tree, or run every node on the infra/Dockerfile image; `lgca run --address` ships no code"
        )
    return (
        f"the cluster's Python lacks `{module}`, a dependency of lgca-label: run every node on the infra/Dockerfile image, "
        "or submit with `lgca submit --pip-pin` (installs the dependencies, pinned to this machine's versions, on each node)"
    )


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


def call_for_job(address: str, action: Callable[[], Any], job_id: str) -> Any:
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
