"""What a lease file holds, and who a process is: its host (hostname, boot id, PID namespace) and start time, so
a lease left by a killed job on this host is known dead at once and a reused pid is not taken for it."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LeaseRecord:
    """The content of `_lease.json`: who holds the output, since when, and where its process runs."""

    owner: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float  # the writer's clock: shown to people, never compared with another machine's
    ttl_s: float
    host_id: str = ""  # hostname, boot id and PID namespace: where `pid` means a process
    process_start: str = ""  # the process's start time since boot, so a reused pid is not taken for it

    @classmethod
    def parse(cls, text: str) -> LeaseRecord | None:
        try:
            data = json.loads(text)
            return cls(
                str(data["owner"]),
                str(data["host"]),
                int(data["pid"]),
                float(data["started_at"]),
                float(data["heartbeat_at"]),
                float(data["ttl_s"]),
                str(data.get("host_id", "")),
                str(data.get("process_start", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None  # torn or foreign: read again, and judged by its age only if it stays so

    def dead_here(self) -> bool:
        """Its process ran in this host's PID namespace since this boot, and is gone (a killed job, resumed at once)."""
        here = host_identity()
        return bool(here) and self.host_id == here and process_start(self.pid) != self.process_start

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")


def host_identity() -> str:
    """This host's hostname, boot id and PID namespace, or "" where they cannot be known (then no process on
    this host is ever judged dead from its pid: leases expire by time alone)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat); "" when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # the fields after the command name, which may hold spaces
