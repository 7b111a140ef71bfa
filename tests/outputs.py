"""Output directories for the curation tests (a real run, synthetic 100k-row ones) and a headless Chromium driver."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.schema import DECODE_ERROR, OK, READ_ERROR, output_schema, rows_to_table

from .support import TINY_MODEL, labels_file

CHROMIUM = "/usr/bin/chromium"
CLASSES = ("cat", "dog", "bird")
SYNTHETIC_CLASSES = tuple(f"class{i:02d}" for i in range(10))
PASSTHROUGH = pa.schema([("batch", pa.string())])  # one manifest pass-through column in synthetic outputs

_REAL_OUTPUTS: dict[str, Path] = {}  # one real run per session, shared by the test modules
_SYNTHETIC: dict[tuple[str, int], Path] = {}


# ---------------------------------------------------------------- a real run


def real_output(base: Path) -> Path:
    """The output directory of a real `lgca run` (tiny random model) over six photos, a corrupt file and a text file.

    Runs once per session (on the session's Ray, else one started with 2 CPUs and shut down after); later calls
    return the same directory.
    """
    if "real" in _REAL_OUTPUTS:
        return _REAL_OUTPUTS["real"]
    import ray

    from pipeline.config import ExecutionConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig
    from pipeline.run.job import run

    images = base / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate([(160, 120), (120, 160), (200, 100), (96, 96), (180, 140), (140, 90)]):
        coarse = rng.integers(0, 256, size=(height // 10 + 1, width // 10 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(images / f"photo{index}.jpg", quality=90)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (images / "notes.txt").write_text("not an image\n")
    labels = labels_file(base, CLASSES)
    out = base / "out"
    started_here = not ray.is_initialized()  # the session's ray_local may be up already: reuse it
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        run(
            JobConfig(
                inputs=(str(images),),
                output=str(out),
                vocabulary=VocabularyConfig(labels=str(labels)),
                model=ModelConfig(name=TINY_MODEL, pretrained="random"),
                scoring=ScoringConfig(method="lgca", crops=4, regions=1, steps=1),
                execution=ExecutionConfig(batch_size=8),
            )
        )
    finally:
        if started_here:
            ray.shutdown()
    _REAL_OUTPUTS["real"] = out
    return out


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output directory of one real labelling run (see `real_output`)."""
    return real_output(tmp_path_factory.getbasetemp() / "real-run")


# ---------------------------------------------------------------- synthetic outputs


def sample_images(directory: Path, count: int = 8) -> list[str]:
    """Small flat-grey JPEGs of assorted sizes (one is 200 x 100) for synthetic rows to point at."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = [(200, 100), (100, 200), (160, 120), (120, 120)][index % 4]
        path = directory / f"grey{index}.jpg"
        Image.new("RGB", (width, height), (128, 128, 128)).save(path, quality=90)
        paths.append(str(path))
    return paths


def synthetic_rows(
    count: int, image_paths: Sequence[str], classes: Sequence[str] = SYNTHETIC_CLASSES, seed: int = 0, key_prefix: str = "img"
) -> list[dict[str, Any]]:
    """Output rows with predictable content: every 50th a decode_error, every 97th a read_error, the rest ok
    with two boxes each (a level-0 crop and the level-1 region grown from it)."""
    rng = np.random.default_rng(seed)
    sizes = {p: Image.open(p).size if os.path.exists(p) else (200, 100) for p in set(image_paths)}
    labels = rng.integers(0, len(classes), size=count)
    scores = rng.uniform(0.2, 0.99, size=count)
    corners = rng.uniform(0.05, 0.45, size=(count, 4))
    rows = []
    for i in range(count):
        path = image_paths[i % len(image_paths)]
        base = {
            "key": f"{key_prefix}{i:06d}.jpg",
            "path": path,
            "method": "lgca",
            "model": "synthetic",
            "pretrained": "none",
            "batch": f"b{i % 7}",
            "error_message": None,
            "width": None,
            "height": None,
        }
        if i % 50 == 49:
            rows.append({**base, "status": DECODE_ERROR, "error_message": f"not a recognised image format (row {i})"})
            continue
        if i % 97 == 96:
            rows.append({**base, "status": READ_ERROR, "error_message": f"FileNotFoundError: {path} (row {i})"})
            continue
        width, height = sizes[path]
        label = classes[labels[i]]
        others = [c for c in classes if c != label][:4]
        score = float(scores[i])
        rest = (1.0 - score) * np.array([0.5, 0.25, 0.15, 0.1])[: len(others)]
        x0, y0 = float(corners[i, 0]), float(corners[i, 1])
        x1, y1 = x0 + 0.3 + float(corners[i, 2]), y0 + 0.3 + float(corners[i, 3])
        boxes = [
            {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "level": 0, "parent": -1, "saliency": 0.1, "label": label, "score": score},
            {
                "x0": max(0.0, x0 - 0.05),
                "y0": max(0.0, y0 - 0.05),
                "x1": min(1.0, x1 + 0.05),
                "y1": min(1.0, y1 + 0.05),
                "level": 1,
                "parent": 0,
                "saliency": 0.08,
                "label": label,
                "score": score * 0.9,
            },
        ]
        rows.append(
            {
                **base,
                "status": OK,
                "width": width,
                "height": height,
                "label": label,
                "score": score,
                "topk_labels": [label] + others,
                "topk_scores": [score] + rest.tolist(),
                "margin": score - float(rest[0]) if len(rest) else score,
                "boxes": boxes,
            }
        )
    return rows


def write_output(
    directory: Path,
    rows: Sequence[dict[str, Any]],
    classes: Sequence[str] = SYNTHETIC_CLASSES,
    rows_per_file: int = 10_000,
    success: bool = True,
) -> Path:
    """Write rows as an lgca output directory: part files, `_manifest.json`, `_SUCCESS` (unless not `success`)."""
    directory.mkdir(parents=True, exist_ok=True)
    schema = output_schema(PASSTHROUGH)
    for index, start in enumerate(range(0, len(rows), rows_per_file)):
        table = rows_to_table(rows[start : start + rows_per_file], schema)
        pq.write_table(table, directory / f"part-00001-{index:06d}.parquet", compression="zstd")
    counts = dict.fromkeys(("ok", "read_error", "decode_error", "score_error"), 0)
    for row in rows:
        counts[row["status"]] += 1
    manifest = {
        "format": "lgca-label/1",
        "run_id": "synthetic",
        "code_version": "test",
        "started_at": "2026-01-01T00:00:00+00:00",
        "ended_at": "2026-01-01T00:10:00+00:00",
        "attempts": [{"attempt": 1, "rows_written": len(rows), "seconds": 600.0, "files_written": []}],
        "inputs": ["synthetic"],
        "output": str(directory),
        "model": {"name": "synthetic", "pretrained": "none", "source": "random", "weights_sha256": None},
        "vocabulary": {
            "sha256": "0" * 64,
            "classes": list(classes),
            "labels_file": "labels.txt",
            "templates_file": None,
            "prompt": "a photo of a {}.",
        },
        "method": "lgca",
        "scoring": {"method": "lgca", "crops": 4, "steps": 1, "regions": 1, "topk": 5},
        "decode": {},
        "execution": {},
        "counts": {"inputs": len(rows), "rows": len(rows), "non_image_files_skipped": 0, "non_image_examples": [], **counts},
    }
    (directory / "_manifest.json").write_text(json.dumps(manifest, indent=2))
    if success:
        (directory / "_SUCCESS").write_text("")
    return directory


def synthetic_output(base: Path, rows: int) -> Path:
    """A synthetic output of `rows` rows under `base` (built once per session per size), its images beside it."""
    key = (str(base), rows)
    if key not in _SYNTHETIC:
        images = sample_images(base / "images")
        _SYNTHETIC[key] = write_output(base / "out", synthetic_rows(rows, images))
    return _SYNTHETIC[key]


@pytest.fixture(scope="session")
def big_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100k-row synthetic output directory (10 part files, 10 labels, 2 boxes per ok row)."""
    return synthetic_output(tmp_path_factory.getbasetemp() / "big-output", 100_000)


# Runs `lgca ARGS...` in a fresh interpreter and prints its peak RSS last. VmHWM is read inside the child:
# the rusage of a forked child also counts the parent's pages it carried until exec (the test process,
# with Ray and torch loaded), which would swamp the figure.
_MEASURED_CLI = """
import sys
from pipeline.cli.main import main
code = main(sys.argv[1:]) if sys.argv[1:] else 0
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print(f"@@peak_rss_kb={peak}", flush=True)
sys.exit(code)
"""


def measure(args: Sequence[str]) -> dict[str, Any]:
    """Run `lgca ARGS` in a fresh Python; its wall time, peak resident memory and output.

    Without args the child only imports the CLI: the baseline to subtract.

    Raises:
        AssertionError: the command failed.
    """
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *args], capture_output=True, text=True)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lgca {' '.join(args)} failed ({result.returncode}):\n{output}"
    peak = int(re.search(r"@@peak_rss_kb=(\d+)", output).group(1))
    return {"seconds": seconds, "peak_rss_mb": peak / 1024.0, "output": re.sub(r"@@peak_rss_kb=\d+\n?", "", output)}


# ---------------------------------------------------------------- headless Chromium


def chromium_or_skip() -> str:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"headless Chromium not installed at {CHROMIUM}: apt-get install -y chromium (CI installs it)")
    return CHROMIUM


class HeadlessChromium:
    """Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no port, no websocket library.

    Chromium reads NUL-terminated JSON commands on fd 3 and writes responses and events on fd 4.
    """

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--remote-debugging-pipe",
    )

    def __init__(self, executable: str = CHROMIUM, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="lgca-chromium-")  # a fresh profile every time
        commands_read, self._commands = os.pipe()
        self._events, events_write = os.pipe()

        def wire_pipes() -> None:  # runs in the child before exec: the protocol's fixed descriptors
            # Move both ends above 4 first: a pipe end may itself be fd 3 or 4, and dup2 onto itself would
            # neither free the slot nor clear close-on-exec.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, events_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [executable, *self.FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes,
            close_fds=False,
        )
        os.close(commands_read)
        os.close(events_write)
        self._next_id = 0
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.width, self.height = width, height
        self.session = ""

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._events, 1 << 16)
            if not chunk:  # Chromium exited
                os.close(self._events)
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._inbox.put(json.loads(message))

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its result; events arriving meanwhile go to `self.events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, url: str) -> None:
        """Open `url` in a new page and wait for its load event."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}
        )
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> Image.Image:
        """The viewport as an RGB image (CSS pixels = image pixels at device scale 1)."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads (Log errors) seen so far."""
        while not self._inbox.empty():
            self.events.append(self._inbox.get_nowait())
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"{entry.get('text')} {entry.get('url', '')}")
        return errors

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium() -> Iterator[HeadlessChromium]:
    """A fresh headless Chromium; the test is skipped when none is installed."""
    browser = HeadlessChromium(chromium_or_skip())
    try:
        yield browser
    finally:
        browser.close()
