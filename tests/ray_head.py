"""A real Ray head on loopback, started with `ray start --head` in its own temp dir, and stopped without touching other Ray instances."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """`ray start --head` on 127.0.0.1; `address` for drivers, `dashboard_url` for job submission."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = False) -> None:
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        # short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> RayHead:
        command = [
            RAY,
            "start",
            "--head",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
            # free ports for what Ray would otherwise pin (Ray Client 10001, agent 52365): heads can coexist
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        if self.dashboard:
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        subprocess.run(command, check=True, capture_output=True, timeout=120, env=self.env())
        return self

    def add_node(self, name: str, num_cpus: int) -> str:
        """Start a worker node of this cluster on loopback (`ray start --address`), named `name`; returns the name."""
        command = [
            RAY,
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--node-name={name}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120, env=self.env())
        return name

    def node_roots(self, name: str) -> list[psutil.Process]:
        """The raylet of the node started as `name` (every other process of the node runs below it)."""
        roots = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if f"--node-name={name}" in (process.info["cmdline"] or []):
                    roots.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return roots

    def node_workers(self, name: str) -> list[psutil.Process]:
        """The Ray worker processes (tasks, actors) running on the node started as `name`."""
        found = []
        for root in self.node_roots(name):
            try:
                found.extend(p for p in root.children(recursive=True) if p.name().startswith("ray::") and "Agent" not in p.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def kill_node(self, name: str) -> int:
        """SIGKILL a worker node started by `add_node` and every process below it, as a lost machine would go; returns how many."""
        return _kill_trees(self.node_roots(name))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # a throwaway loopback cluster: no token to hand around between the head, drivers and job submitters
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        return env

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: its temp dir or its GCS address (the Ray Client server) on the command line."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                cmdline = process.info["cmdline"] or []
                if any(self.temp_dir in part or part.endswith(f"127.0.0.1:{self.port}") for part in cmdline):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def __exit__(self, *exc_info: object) -> None:
        _kill_trees(self.processes())
        time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill_trees(roots: list[psutil.Process]) -> int:
    """SIGKILL `roots` and every process below them, and wait for them; returns how many were sent the signal."""
    victims = set(roots)
    for process in roots:
        try:
            victims.update(process.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(list(victims), timeout=10)
    return len(victims)
