"""Fault injection for reliability tests: `LGCA_FAULT_POINT=<name>` SIGKILLs the process at that point (or
stops it, as a paused VM or a stalled driver, with `LGCA_FAULT_SIGNAL=SIGSTOP`)."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LGCA_FAULT_POINT"
# With a path here, the fault fires once: the first process to create the file is killed, retries pass.
FAULT_ONCE_ENV = "LGCA_FAULT_ONCE"
# SIGKILL (a crash, the default) or SIGSTOP (a stall: the process continues where it stopped on SIGCONT).
FAULT_SIGNAL_ENV = "LGCA_FAULT_SIGNAL"
# With text here, a point given a subject (an input's path) fires only for subjects containing it.
FAULT_MATCH_ENV = "LGCA_FAULT_MATCH"
# Where a job can be killed (docs/RELIABILITY.md). The driver: after the plan is written, with pieces staged
# but no shard committed, once a shard is committed, with every shard committed and the output's final state
# not yet written, after _manifest.json but before _SUCCESS. A worker:
# while committing a shard, its part file written but not yet published; about to decode an input (a poison
# input that kills its decode worker every time, with LGCA_FAULT_MATCH naming it); --overwrite, after `_SUCCESS`
# and `_manifest.json` are gone and before the part files are.
FAULT_POINTS = ("listed", "staged", "scoring", "finishing", "before_success", "committing", "decoding", "clearing")


def fault_point(name: str, subject: str | None = None) -> None:
    """Kill this process with SIGKILL, as a crash or an OOM kill would, if LGCA_FAULT_POINT names `name`.

    No cleanup runs (no finally blocks, no atexit): what is left on disk is what a real crash leaves.
    Unset, as in production, this is one environment lookup.

    Args:
        name: one of FAULT_POINTS.
        subject: what the point is about (an input's path), matched against LGCA_FAULT_MATCH.
    """
    if os.environ.get(FAULT_ENV) != name:
        return
    match = os.environ.get(FAULT_MATCH_ENV)
    if match and (subject is None or match not in subject):
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    stall = os.environ.get(FAULT_SIGNAL_ENV) == "SIGSTOP"
    os.kill(os.getpid(), signal.SIGSTOP if stall else signal.SIGKILL)
