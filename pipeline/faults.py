"""Fault injection for reliability tests: `LGCA_FAULT_POINT=<name>` SIGKILLs the process at that point."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LGCA_FAULT_POINT"
# Where the driver can be killed (docs/RELIABILITY.md): after listing, while scoring (once a file is
# committed), with a file staged but not yet moved, and after _manifest.json but before _SUCCESS.
FAULT_POINTS = ("listed", "scoring", "staged", "before_success")


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL, as a crash or an OOM kill would, if LGCA_FAULT_POINT names `name`.

    No cleanup runs (no finally blocks, no atexit): what is left on disk is what a real crash leaves.
    Unset, as in production, this is one environment lookup.

    Args:
        name: one of FAULT_POINTS.
    """
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
