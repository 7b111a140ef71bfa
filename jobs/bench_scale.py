"""Archive-scale benchmark: planning, first commit, driver memory, object store and resume, by job size.

    python jobs/bench_scale.py manifests --sizes 100000 1000000 10000000
    python jobs/bench_scale.py prefix --objects 100000 --folders 100

manifests: for each size, a Parquet manifest of that many unique keys over a few hundred small JPEGs, then
`lgca run` with the tiny model and `--method clip` on a Ray cluster started for the purpose. Timed from the
driver's start: the plan written (`_plan/plan.json`), the first staged piece (labelling has begun), the first
committed part file (a whole shard of SHARD images); sampled: the driver's
peak RSS and the object store's peak use. The job is killed once a few shards are committed, and
`lgca run --resume` is timed until it stages rows again and until it commits a new shard (resume reads the
plan and lists part files; it reads no committed row).

prefix: an S3 prefix on moto (loopback, in this process) with OBJECTS objects in FOLDERS sub-prefixes, listed once by one
sequential `fs.find` (what a single-process lister does) and once by `lgca plan` (parallel listing tasks
fanned out over the sub-prefixes); wall time and peak RSS of each.

    python jobs/bench_scale.py archives --images 100000 --tars 10
    python jobs/bench_scale.py tarplan --tars 10000

archives: IMAGES small distinct JPEGs labelled (tiny model, `clip`) as IMAGES files and as the same images packed in
TARS WebDataset tars (the `webdataset` package's TarWriter), each on local disk and on moto S3: time to the plan,
to the first committed shard and to the end, images/s, and the driver's peak RSS.
tarplan: `lgca plan` over TARS tar objects on moto S3, named by a glob (one listing task) and by a brace range.

Every figure comes from the same run on the same machine; the tables print ratios only between them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from benchlib import Cluster, lgca_command, local_cluster, megabytes, synthetic_jpegs, venv_bin

POOL = 300  # distinct JPEG files the manifest rows point at
SHARD = 2000  # images per shard in this benchmark: the first commit needs one whole shard


class Timeline:
    """Polls a running `lgca` driver: when files appear under its output, its peak RSS, the object store's peak."""

    def __init__(self, process: subprocess.Popen, output: Path, head_address: str, interval_s: float = 0.2) -> None:
        self.process = process
        self.output = output
        self.started = time.perf_counter()
        self.events: dict[str, float] = {}
        self.peak_rss = 0
        self.peak_object_store = 0
        self._done = threading.Event()
        self._interval_s = interval_s
        self._address = head_address
        self._baseline_parts = set(output.glob("part-*.parquet")) if output.exists() else set()
        self._baseline_pieces = set(output.glob("_staging/*/*.piece")) if output.exists() else set()  # a killed run's
        self._threads = [threading.Thread(target=self._sample, daemon=True), threading.Thread(target=self._object_store, daemon=True)]
        for thread in self._threads:
            thread.start()

    def parts(self) -> int:
        return len(set(self.output.glob("part-*.parquet")) - self._baseline_parts)

    def wait_for(self, condition, timeout_s: float) -> bool:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline and self.process.poll() is None:
            if condition():
                return True
            time.sleep(self._interval_s)
        return condition()

    def _new_pieces(self) -> bool:
        try:
            return bool(set(self.output.glob("_staging/*/*.piece")) - self._baseline_pieces)
        except FileNotFoundError:  # a shard's staging folder removed by its commit while globbing
            return False

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _sample(self) -> None:
        driver = psutil.Process(self.process.pid)
        while not self._done.is_set():
            try:
                self.peak_rss = max(self.peak_rss, driver.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            now = time.perf_counter() - self.started
            if "plan" not in self.events and (self.output / "_plan" / "plan.json").exists():
                self.events["plan"] = now
            if "first_piece" not in self.events and self._new_pieces():
                self.events["first_piece"] = now  # labelling has started: scored rows are being staged
            if "first_commit" not in self.events and self.parts():
                self.events["first_commit"] = now
            self._done.wait(self._interval_s)

    def _object_store(self) -> None:
        # `ray memory --stats-only` against the head: the plasma store's use, every couple of seconds
        while not self._done.is_set():
            result = subprocess.run(
                [str(venv_bin() / "ray"), "memory", "--stats-only", "--address", self._address], capture_output=True, text=True, timeout=60
            )
            for line in result.stdout.splitlines():
                if "Plasma memory usage" in line:
                    self.peak_object_store = max(self.peak_object_store, int(line.split("Plasma memory usage")[1].split("MiB")[0]) * 2**20)
            self._done.wait(5.0)  # the CLI itself takes a core for a second: poll sparingly


def make_manifest(path: Path, rows: int, images: list[str]) -> None:
    """`rows` unique keys cycling over `images`, written in row groups of 10^6 rows."""
    writer = None
    for start in range(0, rows, 1_000_000):
        count = min(1_000_000, rows - start)
        keys = pa.array([f"img-{i:010d}.jpg" for i in range(start, start + count)], pa.string())
        paths = pa.array([images[i % len(images)] for i in range(start, start + count)], pa.string())
        table = pa.table({"key": keys, "path": paths})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def manifests(args: argparse.Namespace) -> list[dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lgca-scale-"))
    pool = synthetic_jpegs(work / "pool", POOL, size=(48, 36))
    images = sorted(str(p) for p in pool.rglob("*.jpg"))
    labels = work / "labels.txt"
    labels.write_text("cat\ndog\nbird\ncar\n")
    rows = []
    with local_cluster(args.num_cpus) as cluster:
        for size in args.sizes:
            manifest = work / f"manifest-{size}.parquet"
            if not manifest.exists():
                make_manifest(manifest, size, images)
            output = work / f"out-{size}"
            shutil.rmtree(output, ignore_errors=True)
            flags = ["--method", "clip", "--rows-per-file", str(SHARD), "--address", cluster.address]
            command = lgca_command("run", manifest, labels, output, *flags)
            first = _run_until(command, cluster, output, lambda t: t.parts() >= 3, args.timeout)
            # the cluster ends a dead driver's tasks and actors on its own; resume is timed from an idle cluster
            idle_after = _wait_for_idle_cluster(timeout_s=120)
            resumed = _run_until([*command, "--resume"], cluster, output, lambda t: t.parts() >= 1, args.timeout)
            row = {
                "images": size,
                "shards": -(-size // SHARD),
                "plan_s": first.get("plan"),
                "first_commit_s": first.get("first_commit"),
                "driver_peak_rss_mb": round(megabytes(first["peak_rss"]), 1),
                "object_store_peak_mb": round(megabytes(first["peak_object_store"]), 1),
                "first_piece_s": first.get("first_piece"),
                "resume_first_piece_s": resumed.get("first_piece"),
                "resume_first_commit_s": resumed.get("first_commit"),
                "resume_driver_peak_rss_mb": round(megabytes(resumed["peak_rss"]), 1),
                "cluster_idle_after_kill_s": idle_after,
                "plan_bytes": sum(p.stat().st_size for p in (output / "_plan").rglob("*") if p.is_file()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(output, ignore_errors=True)
    _table(
        rows,
        ["images", "shards", "plan_s", "first_piece_s", "first_commit_s", "driver_peak_rss_mb", "object_store_peak_mb",
         "resume_first_piece_s", "resume_first_commit_s", "resume_driver_peak_rss_mb"],
    )  # fmt: skip
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        print(f"driver peak RSS {a['images']:,} -> {b['images']:,} images: x{b['driver_peak_rss_mb'] / a['driver_peak_rss_mb']:.3f}")
    return rows


def archives(args: argparse.Namespace) -> list[dict]:
    import webdataset as wds

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lgca-archives-"))
    images = sorted(synthetic_jpegs(work / "images", args.images, size=(64, 48)).rglob("*.jpg"))
    per_tar = -(-len(images) // args.tars)
    tars = work / "tars"
    if not (tars / f".complete-{len(images)}-{args.tars}").exists():
        shutil.rmtree(tars, ignore_errors=True)
        tars.mkdir(parents=True)
        for number in range(args.tars):
            with wds.TarWriter(str(tars / f"{number:05d}.tar"), encoder=False) as sink:
                for path in images[number * per_tar : (number + 1) * per_tar]:
                    sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "txt": path.stem.encode()})
        (tars / f".complete-{len(images)}-{args.tars}").touch()
    labels = work / "labels.txt"
    labels.write_text("cat\ndog\nbird\ncar\n")
    rows = []
    with moto_s3() as (bucket, storage_options, store):
        started = time.perf_counter()
        for path in images:
            store.put_object(bucket[5:], f"images/{path.relative_to(work / 'images').as_posix()}", path.read_bytes())
        for tar in sorted(tars.glob("*.tar")):
            store.put_object(bucket[5:], f"tars/{tar.name}", tar.read_bytes())
        print(f"stored {len(images):,} images and {args.tars} tars on moto in {time.perf_counter() - started:.0f} s", flush=True)
        endpoint = f"--storage-option=endpoint_url={storage_options['endpoint_url']}"
        scenarios = [
            ("local", "objects", str(work / "images")),
            ("local", "tars", f"{tars}/*.tar"),
            ("s3", "objects", f"{bucket}/images"),
            ("s3", "tars", f"{bucket}/tars/*.tar"),
        ]
        with local_cluster(args.num_cpus) as cluster:
            for store_kind, layout, source in scenarios:
                output = work / f"out-{store_kind}-{layout}"
                shutil.rmtree(output, ignore_errors=True)
                flags = ["--method", "clip", "--rows-per-file", str(per_tar), "--address", cluster.address, endpoint]
                command = lgca_command("run", source, labels, output, *flags)
                started = time.perf_counter()
                timeline = _run_until(command, cluster, output, lambda t: (t.output / "_SUCCESS").exists(), args.timeout)
                seconds = time.perf_counter() - started
                written = pq.ParquetDataset(output).read(columns=["status"]).num_rows if (output / "_SUCCESS").exists() else 0
                row = {
                    "store": store_kind,
                    "layout": layout,
                    "images": written,
                    "plan_s": timeline.get("plan"),
                    "first_commit_s": timeline.get("first_commit"),
                    "total_s": round(seconds, 1),
                    "images_per_s": round(written / seconds, 1) if written else 0,
                    "driver_peak_rss_mb": round(megabytes(timeline["peak_rss"]), 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                _wait_for_idle_cluster(timeout_s=120)
                if not args.keep:
                    shutil.rmtree(output, ignore_errors=True)
    _table(rows, ["store", "layout", "images", "plan_s", "first_commit_s", "total_s", "images_per_s", "driver_peak_rss_mb"])
    by: dict[tuple[Any, Any], dict[str, Any]] = {(r["store"], r["layout"]): r for r in rows}
    for store_kind in ("local", "s3"):
        objects, tarred = by.get((store_kind, "objects")), by.get((store_kind, "tars"))
        if objects and tarred and objects["images_per_s"]:
            print(f"{store_kind}: tars / objects images/s x{float(tarred['images_per_s']) / float(objects['images_per_s']):.2f}")
    return rows


def tarplan(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lgca-tarplan-"))
    labels = work / "labels.txt"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("cat\ndog\n")
    row: dict[str, Any] = {"tars": args.tars}
    with moto_s3() as (bucket, storage_options, store):
        for number in range(args.tars):
            store.put_object(bucket[5:], f"laion/{number:05d}.tar", b"")  # never read by a plan
        endpoint = f"--storage-option=endpoint_url={storage_options['endpoint_url']}"
        with local_cluster(args.num_cpus) as cluster:
            for form, source in (("glob", f"{bucket}/laion/*.tar"), ("brace range", f"{bucket}/laion/{{00000..{args.tars - 1:05d}}}.tar")):
                output = work / f"plan-{form.replace(' ', '-')}"
                command = lgca_command("plan", source, labels, output, "--address", cluster.address, endpoint)
                measured = _measure_process(command, {**cluster.env(), **server_env()})
                shards = (
                    len(json.loads((output / "_plan" / "plan.json").read_text())["shards"])
                    if (output / "_plan" / "plan.json").exists()
                    else 0
                )
                row[f"{form} s"] = round(measured["seconds"], 2)
                row[f"{form} driver rss mb"] = round(megabytes(measured["peak_rss"]), 1)
                row[f"{form} shards"] = shards
    print(json.dumps(row, indent=1))
    return row


def _run_until(command: Sequence[str], cluster: Cluster, output: Path, done, timeout_s: float) -> dict:
    """Start `command`, wait until `done(timeline)` (or the driver exits), SIGKILL it, and return the timeline."""
    env = {**cluster.env(), "LGCA_CACHE_DIR": str(output.parent / "cache")}
    process = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline = Timeline(process, output, cluster.address)
    finished = timeline.wait_for(lambda: done(timeline), timeout_s)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    out, _ = process.communicate()
    timeline.stop()
    if not finished:
        print(out[-3000:], file=sys.stderr)
    return {**timeline.events, "peak_rss": timeline.peak_rss, "peak_object_store": timeline.peak_object_store}


def _wait_for_idle_cluster(timeout_s: float) -> float:
    """Seconds until no labelling worker of a killed driver is left (Ray Data map workers and tasks)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        busy = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(process.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if line.startswith("ray::") and ("Map" in line or "_task" in line or "_stage" in line or "_read_and_decode" in line):
                busy.append(line)
        if not busy:
            break
        time.sleep(0.5)
    return round(time.perf_counter() - started, 1)


def prefix(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lgca-prefix-"))
    labels = work / "labels.txt"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("cat\ndog\n")
    with moto_s3() as (bucket, storage_options, store):
        per_folder = args.objects // args.folders
        names = [f"images/f{f:04d}/{i:06d}.jpg" for f in range(args.folders) for i in range(per_folder)]
        started = time.perf_counter()
        for name in names:
            store.put_object(bucket[5:], name, b"x")
        print(f"stored {len(names):,} objects in {time.perf_counter() - started:.0f} s", flush=True)
        options = json.dumps(storage_options)
        find = _measure_process(
            [sys.executable, "-c", f"import fsspec, json, time; fs = fsspec.filesystem('s3', **json.loads({options!r})); "
             f"found = fs.find('{bucket[5:]}/images'); print(len(found))"],
            server_env(),
        )  # fmt: skip
        with local_cluster(args.num_cpus) as cluster:
            endpoint = f"--storage-option=endpoint_url={storage_options['endpoint_url']}"
            command = lgca_command("plan", f"{bucket}/images", labels, work / "plan-out", "--address", cluster.address, endpoint)
            planned = _measure_process(command, {**cluster.env(), **server_env()})
            ray_started = _measure_process(
                [str(venv_bin() / "python"), "-c", f"import ray; ray.init(address='{cluster.address}')"], cluster.env()
            )
    row = {
        "objects": len(names),
        "folders": args.folders,
        "find_s": round(find["seconds"], 2),
        "find_rss_mb": round(megabytes(find["peak_rss"]), 1),
        "plan_s": round(planned["seconds"], 2),
        "plan_rss_mb": round(megabytes(planned["peak_rss"]), 1),
        "driver_connect_s": round(ray_started["seconds"], 2),
        "plan_output": planned["out"].strip().splitlines()[-1] if planned["out"].strip() else "",
        "find_output": find["out"].strip(),
    }
    print(json.dumps(row, indent=1))
    listing_only = row["plan_s"] - row["driver_connect_s"]
    print(f"sequential find {row['find_s']} s; lgca plan {row['plan_s']} s end to end, ~{listing_only:.1f} s after joining Ray: "
          f"x{row['find_s'] / max(listing_only, 1e-9):.2f} (listing), x{row['find_s'] / row['plan_s']:.2f} (end to end)")  # fmt: skip
    return row


FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def server_env() -> dict[str, str]:
    return dict(os.environ) | FAKE_AWS_ENV


@contextmanager
def moto_s3() -> Iterator[tuple[str, dict[str, Any], Any]]:
    """moto's S3 server in this process on a free loopback port, with one empty bucket: the bucket's URI, the s3fs
    options that reach it, and moto's store, filled directly below (10^5 PUTs over HTTP take over 7 minutes)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    os.environ.update(FAKE_AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        store.create_bucket("bench", FAKE_AWS_ENV["AWS_DEFAULT_REGION"])
        options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}
        yield "s3://bench", {**options, "client_kwargs": {"region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"]}}, store
    finally:
        server.stop()


def _measure_process(command: Sequence[str], env: dict[str, str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    handle = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out, _ = process.communicate()
    if process.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak, "out": out}


def _table(rows: list[dict], columns: list[str]) -> None:
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c)) for c in columns))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep each size's output")
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = commands.add_parser("manifests")
    sizes.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    listing = commands.add_parser("prefix")
    listing.add_argument("--objects", type=int, default=100_000)
    listing.add_argument("--folders", type=int, default=100)
    archived = commands.add_parser("archives")
    archived.add_argument("--images", type=int, default=100_000)
    archived.add_argument("--tars", type=int, default=10)
    planned = commands.add_parser("tarplan")
    planned.add_argument("--tars", type=int, default=10_000)
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; {time.strftime('%Y-%m-%d')}"
    )
    {"manifests": manifests, "prefix": prefix, "archives": archives, "tarplan": tarplan}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
