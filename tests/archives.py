"""Archives made by the tools that make them: a loopback HTTP server for img2dataset to download from, and
img2dataset itself, run as its users run it (a separate process)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from PIL import Image

from pipeline.config import ExecutionConfig, JobConfig, ModelConfig, ScoringConfig, VocabularyConfig

from .support import TINY_MODEL, photo

PHOTOS = ("astronaut", "cat", "coffee", "rocket", "chelsea")
CLASSES = ("cat", "rocket", "coffee", "astronaut")


def tiny_clip_job(inputs: Sequence[str], output: Path, labels: Path, **overrides: object) -> JobConfig:
    """A job over `inputs` with the tiny random model and `clip`, small batches: what the archive tests run."""
    settings: dict = {"execution": ExecutionConfig(decode_batch_size=2, batch_size=4), **overrides}
    return JobConfig(
        inputs=tuple(inputs),
        output=str(output),
        vocabulary=VocabularyConfig(labels=str(labels)),
        model=ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu"),
        scoring=ScoringConfig(method="clip"),
        **settings,
    )


def write_photos(directory: Path, names: Sequence[str] = PHOTOS, side: int = 96) -> list[Path]:
    """Small JPEGs of scikit-image's photos, `side` pixels on the long side."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        image = Image.fromarray(photo(name))
        image.thumbnail((side, side))
        path = directory / f"{name}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


@contextmanager
def served(directory: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving `directory`; yields its base URL."""
    handler = partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


_DOWNLOAD = """
import sys
from img2dataset import download
download(url_list=sys.argv[1], output_folder=sys.argv[2], output_format=sys.argv[3], input_format="csv", url_col="url",
         caption_col="caption", processes_count=1, thread_count=4, image_size=64, resize_mode=sys.argv[4],
         number_sample_per_shard=int(sys.argv[5]), timeout=5, retries=0, enable_wandb=False, distributor="multiprocessing")
"""


def img2dataset(
    urls: Sequence[str], captions: Sequence[str], output: Path, output_format: str, resize_mode: str = "border", per_shard: int = 100
) -> Path:
    """Run img2dataset on `urls` into `output` (`webdataset` or `parquet`); returns `output`."""
    listing = output.parent / f"{output.name}-urls.csv"
    listing.write_text("url,caption\n" + "".join(f"{url},{caption}\n" for url, caption in zip(urls, captions)))
    subprocess.run(
        [sys.executable, "-c", _DOWNLOAD, str(listing), str(output), output_format, resize_mode, str(per_shard)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return output
