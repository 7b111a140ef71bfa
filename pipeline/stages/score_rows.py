"""The scoring stage: decoded rows in, output rows out (label, scores, boxes, status), one Arrow batch per call.

A plain class that sets up once (the model, the class vectors, the `Scorer`); `run.dataset` runs it in a Ray Data
actor pool on GPUs or CPUs, and tests call it in process. `scorer_for` is the one way a `Scorer` is built from a
loaded model: the job, `lgca eval` and `Labeler` all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import pyarrow as pa
import torch

from pipeline.config import DecodeConfig, ScoringConfig
from pipeline.models.load import default_cache_dir, load_model
from pipeline.models.spec import ModelSpec
from pipeline.models.text_vectors import text_vectors, vectors_from_bytes
from pipeline.schema import (
    DECODE_ERROR,
    OK,
    PREDICTION_FIELDS,
    SCORE_ERROR,
    embedding_array,
    embedding_field,
    empty_prediction,
    output_schema,
)
from pipeline.scoring.combine import ImageScore
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ImageEncoder, ViewFormat
from pipeline.stages.decode import DecodeFailure, decode_image
from pipeline.stages.read_decode import TRANSIENT_COLUMNS, decoded_pixels
from pipeline.stages.storage import filesystem_for
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)


class EncoderModel(Protocol):
    """What a Scorer needs of a model: its image encoder, temperature, view format and device."""

    @property
    def logit_scale(self) -> float: ...
    @property
    def view(self) -> ViewFormat: ...
    @property
    def device(self) -> torch.device | str: ...
    def encode_image(self, views: torch.Tensor) -> torch.Tensor: ...


def scorer_for(
    model: EncoderModel, classes: Sequence[str], vectors: torch.Tensor, scoring: ScoringConfig, encode: ImageEncoder | None = None
) -> Scorer:
    """The Scorer of `scoring` on `model`'s image encoder (or `encode`, a wrapper of it) and view format."""
    return Scorer(
        encode_image=encode or model.encode_image,
        classes=classes,
        vectors=vectors,
        logit_scale=model.logit_scale,
        view=model.view,
        config=scoring,
        device=model.device,
    )


class ScoreStage:
    """Holds the model on one GPU (or CPU); scores one batch of decoded rows per call."""

    def __init__(
        self,
        model: ModelSpec,
        scoring: ScoringConfig,
        vocabulary: Vocabulary,
        decode: DecodeConfig,
        storage_options: Mapping[str, Any],
        cpu_threads: int | None = None,
        vectors_uri: str | None = None,
        embeddings: bool = False,
    ) -> None:
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model = load_model(model, storage_options, warn=False)  # the driver warned about a missing hint
        if vectors_uri:  # a large vocabulary, embedded once for the job (run.embedding)
            fs, path = filesystem_for(vectors_uri, storage_options)
            vectors = vectors_from_bytes(fs.cat_file(path), len(vocabulary.classes))
            if vectors is None:
                raise RuntimeError(f"the class vectors at {vectors_uri} are not for this vocabulary of {len(vocabulary.classes)} classes")
        else:
            # A small vocabulary: each actor embeds it with its own model (once per node, then from the disk
            # cache); a separate task would load the model a second time before any actor could start.
            vectors = text_vectors(self.model, vocabulary, scoring, default_cache_dir(model.config))
        self.scoring = scoring
        self.decode = decode
        self.identity = self.model.identity
        self.embedding_dim = model.embed_dim if embeddings else None  # with --embeddings, the rows keep f(x)
        self.scorer = scorer_for(self.model, vocabulary.classes, vectors, scoring)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(list(TRANSIENT_COLUMNS)).to_pylist()
        images, failures = self._pixels(batch, [i for i, row in enumerate(rows) if row["status"] == OK])
        predictions = self._score_rows(batch, images)
        embeddings: list[Any] = []
        for index, row in enumerate(rows):
            prediction = predictions.get(index)
            if index in failures:
                row.update(status=DECODE_ERROR, error_message=failures[index])
            elif isinstance(prediction, str):
                row.update(status=SCORE_ERROR, error_message=prediction)
            row.update(method=self.scoring.method, model=self.identity["model"], pretrained=self.identity["pretrained"])
            row.update(prediction if isinstance(prediction, dict) else empty_prediction())  # its method: who scored it
            embeddings.append(row.pop("embedding", None) if row["status"] == OK else None)
            row.pop("embedding", None)
        passthrough = batch.drop_columns(list(TRANSIENT_COLUMNS)).schema  # _shard and _row ride along
        table = pa.Table.from_pylist(rows, schema=output_schema(passthrough))
        if self.embedding_dim is None:
            return table
        return table.add_column(
            len(PREDICTION_FIELDS), embedding_field(self.embedding_dim), embedding_array(embeddings, self.embedding_dim)
        )

    def _pixels(self, batch: pa.Table, indices: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
        """uint8 (3, H, W) tensors by row index, and decode failures (of deferred JPEGs) by row index."""
        from pipeline.stages.device_decode import decode_jpegs

        jpegs = batch.column("jpeg")
        images: dict[int, torch.Tensor] = {}
        deferred = [i for i in indices if jpegs[i].is_valid]
        for i in indices:
            if not jpegs[i].is_valid:
                images[i] = torch.from_numpy(decoded_pixels(batch, i)).permute(2, 0, 1).contiguous()
        failures: dict[int, str] = {}
        if not deferred:
            return images, failures
        contents = [jpegs[i].as_py() for i in deferred]
        orientations = [batch.column("orientation")[i].as_py() for i in deferred]
        decoded = decode_jpegs(contents, orientations, self.decode.min_short_side, self.model.device)
        rejected = 0
        for i, content, on_device in zip(deferred, contents, decoded):
            if isinstance(on_device, Exception):  # the device decoder refused it: libjpeg on the CPU, with its messages
                rejected += 1
                on_cpu = decode_image(content, self.decode)
                if isinstance(on_cpu, DecodeFailure):
                    failures[i] = on_cpu.message
                    continue
                on_device = torch.from_numpy(on_cpu.pixels).permute(2, 0, 1).contiguous()
            images[i] = on_device
        if rejected:
            log.warning("%d of %d JPEGs failed to decode on %s and were retried on the CPU", rejected, len(deferred), self.model.device)
        return images, failures

    def _score_rows(self, batch: pa.Table, images: dict[int, torch.Tensor]) -> dict[int, dict[str, Any] | str]:
        """Predictions by row index; a row whose scoring failed maps to its error message instead."""
        if not images:
            return {}
        indices = sorted(images)
        columns = {name: batch.column(name) for name in ("key", "width", "height")}
        pixels = [images[i] for i in indices]
        keys = [columns["key"][i].as_py() for i in indices]
        sizes = [(columns["width"][i].as_py(), columns["height"][i].as_py()) for i in indices]
        try:
            scores = self.scorer.score(pixels, keys, sizes)
            return {i: score.error or _prediction(score) for i, score in zip(indices, scores)}
        except Exception as error:  # isolate the image that broke the batch; the others still get scored
            log.warning("batch scoring failed (%s); scoring its %d images one by one", error, len(indices))
        out: dict[int, dict[str, Any] | str] = {}
        for i, image, key, size in zip(indices, pixels, keys, sizes):
            try:
                score = self.scorer.score([image], [key], [size])[0]
                out[i] = score.error or _prediction(score)
            except Exception as error:
                out[i] = f"scoring failed: {type(error).__name__}: {error}"
        return out


def _prediction(score: ImageScore) -> dict[str, Any]:
    return {
        "label": score.label,
        "score": score.score,
        "topk_labels": score.topk_labels,
        "topk_scores": score.topk_scores,
        "margin": score.margin,
        "boxes": [asdict(box) for box in score.boxes],
        "method": score.method,
        "embedding": score.embedding,
    }
