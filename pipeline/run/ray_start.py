"""Joining or starting Ray for a job, with Ray's own start-up noise kept in its session logs."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from pipeline.config import ConfigError, JobConfig

ADDRESS_PROBE_TIMEOUT_S = 3.0  # per probe of --address before any work: ray.init waits minutes on a dead one, forever on a dashboard


def start_ray(config: JobConfig) -> Any:
    """Join `--address`, or start a local Ray; Ray's notices go to its session logs unless --verbose.

    Raises:
        ConfigError: the address cannot be joined (the message says what answers there).
    """
    import ray

    verbose = logging.getLogger("pipeline").isEnabledFor(logging.DEBUG)
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # start-up notices, e.g. a first token's, go to Ray's logs
    if not ray.is_initialized():
        try:
            # Ray's own start-up and worker logs go to its session log files; --verbose brings them back here.
            ray.init(
                address=config.execution.address,
                ignore_reinit_error=True,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.ERROR,
            )
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as error:
            from pipeline.run.cluster_address import join_failure

            raise ConfigError(join_failure(config.execution.address, error, ADDRESS_PROBE_TIMEOUT_S)) from None
    import ray.data  # configures its loggers: the console handler is then there to quiet

    if not verbose:
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":  # Ray Data's notices stay in its session log file
                handler.setLevel(logging.ERROR)
        # A tuning hint Ray Data gives as a Python warning whenever a stage gets fewer blocks than its task
        # limit: true of every small job and of the commit stage by design, and nothing a user can act on.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
        _spend_actor_restart_notice(ray)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # this job reports its own progress over the plan
    context.print_on_execution_start = verbose
    return ray


class _RestartableProbe:
    def __init__(self, argument: Any) -> None:
        del argument


def _spend_actor_restart_notice(ray: Any) -> None:
    """Emit Ray's once-per-process notice about actor arguments in the object store (ray#53727), unseen.

    Every Ray Data actor pool hands its actors object-store references and lets them restart, so the notice
    is printed on the driver's terminal at the first scoring actor, where it reads like an error although the
    driver holds those references all job long. Ray logs it once per process: a throwaway restartable actor
    takes that once with stderr pointed at /dev/null (the line still goes to the driver's session log). The
    scoring actors keep their restarts. Should Ray log it more often, the line simply shows again.
    """
    probe_class = ray.remote(num_cpus=0, max_restarts=1)(_RestartableProbe)
    reference = ray.put(None)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        probe = probe_class.remote(reference)  # the notice is logged inside this call
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(probe, no_restart=True)
