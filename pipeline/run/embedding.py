"""Large vocabularies embedded once per job, with progress, before labelling starts.

Each scoring actor embeds the vocabulary in its constructor (once per node, then from the node's disk
cache). For 10^5 classes x 80 templates that is 8 M sentences per node, silently, before the first image. Above
LARGE_VOCABULARY_SENTENCES one actor, with a scoring actor's resources, embeds them while the driver reports
progress, and stores the vectors beside the plan (`_plan/text-vectors/<key>.safetensors`, on the output's
store, which every node reads); the scoring actors load that file. A resumed job finds it there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pipeline.config import ScoringConfig
from pipeline.models.spec import ModelSpec
from pipeline.stages.plan import PLAN_DIR, put_atomically
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)

LARGE_VOCABULARY_SENTENCES = 20_000  # about a minute of ViT-B-32 text encoding on a CPU core
VECTORS_DIR = f"{PLAN_DIR}/text-vectors"
PROGRESS_EVERY_S = 10.0


class VocabularyEmbedder:
    """A Ray actor that embeds one vocabulary and stores the class vectors under the output."""

    def __init__(self, model: ModelSpec, scoring: ScoringConfig, vocabulary: Vocabulary, storage_options: dict[str, Any]) -> None:
        from pipeline.models.load import load_model

        self.model = load_model(model, storage_options, warn=False)
        self.scoring = scoring
        self.vocabulary = vocabulary
        self.storage_options = storage_options
        self._done = 0
        self._lock = threading.Lock()

    def embed(self, output: str) -> str:
        """The URI of the stored vectors, embedding them unless an earlier attempt stored them."""
        import fsspec

        from pipeline.models.text_vectors import text_vectors, vectors_key, vectors_to_bytes

        fs, root = fsspec.core.url_to_fs(output, **self.storage_options)
        path = f"{root.rstrip('/')}/{VECTORS_DIR}/{vectors_key(self.model, self.vocabulary, self.scoring)}.safetensors"
        if not fs.exists(path):
            vectors = text_vectors(self.model, self.vocabulary, self.scoring, progress=self._count)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            put_atomically(fs, path, vectors_to_bytes(vectors))
        return fs.unstrip_protocol(path) if "://" in output else path

    def progress(self) -> int:
        with self._lock:
            return self._done

    def _count(self, sentences: int) -> None:
        with self._lock:
            self._done += sentences


def embed_vocabulary_once(
    ray: Any,
    *,
    output: str,
    model: ModelSpec,
    scoring: ScoringConfig,
    vocabulary: Vocabulary,
    storage_options: dict[str, Any],
    num_gpus: float,
    num_cpus: float,
    threshold: int | None = None,
) -> str | None:
    """Embed a large vocabulary once, reporting progress; the URI of the vectors, or None for a small one.

    Args:
        threshold: sentences above which the vocabulary is embedded here; LARGE_VOCABULARY_SENTENCES by default.
    """
    from pipeline.models.text_vectors import vocabulary_sentences

    total = vocabulary_sentences(vocabulary, scoring)
    if total < (LARGE_VOCABULARY_SENTENCES if threshold is None else threshold):
        return None
    log.info(
        "embedding %s sentences for %s classes once, before labelling (%s); the vectors are stored under %s/%s",
        f"{total:,}",
        f"{len(vocabulary.classes):,}",
        "on a GPU" if num_gpus else "on the CPU: expect minutes per 10^5 sentences",
        output.rstrip("/"),
        VECTORS_DIR,
    )
    # max_concurrency 2: progress() answers while embed() runs
    embedder = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_concurrency=2)(VocabularyEmbedder).remote(
        model, scoring, vocabulary, storage_options
    )
    try:
        result = embedder.embed.remote(output)
        started = time.time()
        while not ray.wait([result], timeout=PROGRESS_EVERY_S)[0]:
            done = ray.get(embedder.progress.remote())
            log.info("embedding the vocabulary: %s", _progress_line(done, total, time.time() - started))
        uri: str = ray.get(result)
    finally:
        ray.kill(embedder)
    log.info("vocabulary embedded in %.0f s", time.time() - started)
    return uri


def _progress_line(done: int, total: int, elapsed: float) -> str:
    line = f"{done:,}/{total:,} sentences ({100 * done / max(total, 1):.0f}%)"
    if done:
        line += f", about {(total - done) * elapsed / done:.0f} s left"
    return line
