"""The Ray Data graph of labelling: shards read, images read and decoded on CPU tasks, scored in an actor pool, staged.

Every stage here runs on workers. The driver sees only one small (shard, rows) record per staged piece, and
commits a shard (a worker task) once its pieces cover it; `run.job` drives this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, DecodeConfig, ModelConfig, ScoringConfig
from pipeline.faults import fault_point
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR, SCORE_ERROR, empty_prediction, output_schema
from pipeline.stages.decode import DecodedImage, DecodeFailure, DeferredJpeg, decode_image, defer_jpeg
from pipeline.stages.journal import DecodeJournal
from pipeline.stages.plan import read_shard
from pipeline.stages.sink import SHARD_COLUMN, keep_succeeded_rows, stage_pieces
from pipeline.stages.sources import check_scheme, filesystem_for, read_all, read_bytes
from pipeline.stages.vocab import Vocabulary

log = logging.getLogger(__name__)

READ_THREADS = 8  # concurrent reads per decode task: object-store latency, not CPU, bounds reading
# Columns between decoding and scoring, never written: decoded pixels, or a JPEG left for the scoring device
TRANSIENT_COLUMNS = ("pixels", "pixel_height", "pixel_width", "jpeg", "orientation")
DECODE_TASK_MEMORY = 1024 * 1024 * 1024  # bytes reserved per decode task: the worker (~0.5 GiB) plus decoded images
# Reading a shard's rows and staging a scored batch are small I/O: they take no CPU, or the decode tasks, which
# take every CPU the actors leave, would starve them and no shard would ever complete.
STAGE_TASK_CPUS = 0
MAX_INPUT_BLOCKS = 20_000  # blocks of shard positions: one per shard up to here, a few consecutive shards each beyond
# S3 reads retry in botocore, in s3fs (a loop of 5, nested twice in cat_file) and in read_bytes (4 attempts):
# multiplied, one object that keeps failing took many minutes. Reads use botocore's standard mode with 3
# attempts and s3fs's loop off, so a read makes at most 4 x 3 requests (docs/RELIABILITY.md); storage
# options that set their own config_kwargs keys win.
S3_READ_CONFIG: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 30, "retries": {"mode": "standard", "total_max_attempts": 3}}


def build_dataset(
    shards: list[dict[str, Any]],
    *,
    output: str,
    storage_options: dict[str, Any],
    listing_schema: pa.Schema,
    decode: DecodeConfig,
    defer_jpegs: bool,
    model_config: ModelConfig,
    scoring: ScoringConfig,
    vocabulary: Vocabulary,
    batch_size: int,
    decode_batch_size: int,
    actors: int,
    num_gpus: float,
    num_cpus_per_actor: float,
    run_id: str = "",
    vectors_uri: str | None = None,
) -> Any:
    """The lazy Ray Dataset that labels `shards` and yields (shard, rows) per staged piece.

    Each item of `shards` is {"shard": id, "retry": bool}, in the order they should complete; a retried
    shard is a committed one whose failed rows alone are labelled again, its other rows kept
    (`sink.keep_succeeded_rows`).
    """
    import ray

    # The shard list goes to the object store once; the dataset itself is only shard positions, read lazily
    # by tasks: nothing O(rows) is built in the driver, and listing rows are read by the task decoding them,
    # so the object store holds the work in flight and no more.
    todo = ray.put(pa.table({"shard": [s["shard"] for s in shards], "retry": [bool(s["retry"]) for s in shards]}))
    dataset: Any = ray.data.range(len(shards), override_num_blocks=max(1, min(len(shards), MAX_INPUT_BLOCKS)))
    dataset = dataset.map_batches(
        _read_and_decode_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "todo": [todo],  # in a list: the task fetches it once per worker process (_todo), not once per call
            "output": output,
            "storage_options": storage_options,
            "schema": listing_schema,
            "decode_batch_size": decode_batch_size,
            "decode": decode,
            "defer_jpegs": defer_jpegs,
            "run_id": run_id,
        },
        num_cpus=1,
        # Reserving decode memory also keeps Ray from fusing decoding into the scoring actors (it fuses
        # stages with equal resource requests): decoding must run on its own CPU tasks, beside the model.
        memory=DECODE_TASK_MEMORY,
    )
    dataset = dataset.map_batches(
        ScoringActor,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs={
            "model_config": model_config,
            "scoring": scoring,
            "vocabulary": vocabulary,
            "decode": decode,
            "storage_options": storage_options,
            "cpu_threads": max(1, (os.cpu_count() or 1) // actors) if num_gpus == 0 else None,
            "vectors_uri": vectors_uri,
        },
    )  # Ray Data's actor pools restart dead actors and retry their batches by default (max_restarts=-1)
    return dataset.map_batches(
        _stage,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"output": output, "storage_options": storage_options, "run_id": run_id},
        num_cpus=STAGE_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=max(2, actors)),  # CPU-free tasks: bound how many workers Ray starts
    )


def _read_and_decode_shards(
    batch: pa.Table,
    todo: list[Any],
    output: str,
    storage_options: dict[str, Any],
    schema: pa.Schema,
    decode_batch_size: int,
    decode: DecodeConfig,
    defer_jpegs: bool,
    run_id: str,
) -> Iterator[pa.Table]:
    """Each shard at the given positions of `todo`: its listing rows read, then read and decoded a batch at a time.

    A generator: Ray Data pauses it while its batches wait downstream, so a shard's decoded pixels are made
    as the scoring actors take them. Each batch carries the shard id and each row its position in the shard.
    """
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    table = _todo(todo[0])
    for position in batch.column("id").to_pylist():
        shard_id, retry = table.column("shard")[position].as_py(), table.column("retry")[position].as_py()
        rows = read_shard(fs, root, shard_id, schema)
        if retry:
            rows = rows.take(keep_succeeded_rows(fs, root, shard_id, run_id))
        rows = rows.append_column(SHARD_COLUMN, pa.array([shard_id] * rows.num_rows, pa.string()))
        for start in range(0, rows.num_rows, decode_batch_size):
            yield _read_and_decode(rows.slice(start, decode_batch_size), decode, storage_options, defer_jpegs, run_id)


_TODO_CACHE: dict[str, pa.Table] = {}  # the job's shard list, fetched once per worker process


def _todo(ref: Any) -> pa.Table:
    import ray

    key = ref.hex()
    if key not in _TODO_CACHE:
        _TODO_CACHE.clear()  # one job at a time per worker process is the common case: keep one list
        _TODO_CACHE[key] = ray.get(ref)
    return _TODO_CACHE[key]


def _stage(batch: pa.Table, output: str, storage_options: dict[str, Any], run_id: str) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    return stage_pieces(fs, root.rstrip("/"), batch, run_id)


def jpegs_on_device(decode_device: str, model_device: str) -> bool:
    """Whether the scoring actors decode JPEGs (`--decode`), given where they score.

    Raises:
        ConfigError: `--decode gpu` while the actors score on the CPU.
    """
    on_cuda = model_device.startswith("cuda")
    if decode_device == "gpu" and not on_cuda:
        raise ConfigError(
            "--decode gpu decodes on the scoring GPU, but this cluster has no GPU for the scoring actors; use --decode auto or cpu"
        )
    return on_cuda and decode_device in ("gpu", "auto")


def _read_and_decode(
    batch: pa.Table, decode: DecodeConfig, storage_options: dict[str, Any], defer_jpegs: bool = False, run_id: str = ""
) -> pa.Table:
    """Bytes to pixels for one batch of listing rows; every row comes out, failed ones with a status.

    Reads are bounded in size (`max_bytes`) and time (`read_timeout_s`). An input that killed this task's
    worker twice (the journal, `stages.journal`) becomes a decode_error row instead of killing it again.
    With `defer_jpegs`, JPEGs are only checked here (header, size limit, orientation) and travel as bytes,
    for the scoring actor to decode on its GPU; other files are decoded here as always.
    """
    paths = batch.column("path").to_pylist()
    with DecodeJournal.open(run_id, batch.column("key").to_pylist()) as journal:
        contents = _read_contents(paths, decode, storage_options, journal)
        columns: dict[str, list[Any]] = {name: [] for name in ("status", "error_message", "width", "height", *TRANSIENT_COLUMNS)}
        for index, content in enumerate(contents):
            row: dict[str, Any] = dict.fromkeys(columns)
            if journal.poisoned(index):
                row.update(status=DECODE_ERROR, error_message=_poison_message(journal.kills(index)))
            elif isinstance(content, Exception):
                row.update(status=READ_ERROR, error_message=f"cannot read: {type(content).__name__}: {content}")
            else:
                journal.decoding(index)
                fault_point("decoding", paths[index])
                row.update(_decoded_row(content, decode, defer_jpegs))
            for name, value in row.items():
                columns[name].append(value)
        journal.decoded_all()
    types = {"status": pa.string(), "error_message": pa.string(), "pixels": pa.large_binary(), "jpeg": pa.large_binary()}
    for name, values in columns.items():
        batch = batch.append_column(name, pa.array(values, types.get(name, pa.int32())))
    return batch


def _read_contents(
    paths: list[str], decode: DecodeConfig, storage_options: dict[str, Any], journal: DecodeJournal
) -> list[bytes | Exception]:
    def read(path: str) -> bytes:
        check_scheme(path, decode.allowed_schemes)  # before any request: a manifest must not choose what workers fetch
        return read_bytes(path, _read_options(path, storage_options), max_bytes=decode.max_bytes)

    readable = [i for i in range(len(paths)) if not journal.poisoned(i)]
    if not journal.read_one_at_a_time:
        journal.reading_all()
        found = read_all([paths[i] for i in readable], read, READ_THREADS, decode.read_timeout_s)
    else:  # the last attempt died during parallel reads: one at a time, so the journal names the culprit
        found = []
        for i in readable:
            journal.reading(i)
            found.extend(read_all([paths[i]], read, 1, decode.read_timeout_s))
    contents: list[bytes | Exception] = [b""] * len(paths)  # poisoned inputs keep b"": their rows never read it
    for i, content in zip(readable, found):
        contents[i] = content
    return contents


def _decoded_row(content: bytes, decode: DecodeConfig, defer_jpegs: bool) -> dict[str, Any]:
    result: DeferredJpeg | DecodedImage | DecodeFailure | None = defer_jpeg(content, decode) if defer_jpegs else None
    if result is None:
        result = decode_image(content, decode)
    if isinstance(result, DecodeFailure):
        return {"status": DECODE_ERROR, "error_message": result.message}
    if isinstance(result, DeferredJpeg):
        return {"status": OK, "width": result.width, "height": result.height, "jpeg": content, "orientation": result.orientation}
    return {
        "status": OK,
        "width": result.width,
        "height": result.height,
        "pixels": result.pixels.tobytes(),
        "pixel_height": result.pixels.shape[0],
        "pixel_width": result.pixels.shape[1],
    }


def _poison_message(kills: int) -> str:
    return (
        f"reading or decoding this file killed its worker process {kills} times (out of memory, or a crash in a "
        "decoder); it was not tried again. Check the file, or lower --max-bytes / --max-pixels"
    )


def _read_options(path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Storage options for reading `path`: bounded retries and timeouts on S3 (S3_READ_CONFIG), else unchanged."""
    if not path.startswith(("s3://", "s3a://")):
        return storage_options
    config = {**S3_READ_CONFIG, "retries": dict(S3_READ_CONFIG["retries"]), **storage_options.get("config_kwargs", {})}
    options = {**storage_options, "config_kwargs": config}
    filesystem_for(path, options)[0].retries = 1  # the instance read_bytes gets (fsspec caches it by options)
    return options


class ScoringActor:
    """Holds the model on one GPU (or CPU); scores one batch of decoded rows per call."""

    def __init__(
        self,
        model_config: ModelConfig,
        scoring: ScoringConfig,
        vocabulary: Vocabulary,
        decode: DecodeConfig,
        storage_options: dict[str, Any],
        cpu_threads: int | None,
        vectors_uri: str | None = None,
    ) -> None:
        import torch

        from pipeline.models.load import default_cache_dir, load_model
        from pipeline.models.text_vectors import text_vectors, vectors_from_bytes
        from pipeline.scoring.scorer import Scorer

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model = load_model(model_config, storage_options, warn=False)  # the driver warned about a missing hint
        if vectors_uri:  # a large vocabulary, embedded once for the job (run.embedding)
            fs, path = fsspec.core.url_to_fs(vectors_uri, **storage_options)
            vectors = vectors_from_bytes(fs.cat_file(path), len(vocabulary.classes))
            if vectors is None:
                raise RuntimeError(f"the class vectors at {vectors_uri} are not for this vocabulary of {len(vocabulary.classes)} classes")
        else:
            # A small vocabulary: each actor embeds it with its own model (once per node, then from the disk
            # cache); a separate task would load the model a second time before any actor could start.
            vectors = text_vectors(self.model, vocabulary, scoring, default_cache_dir(model_config))
        self.scoring = scoring
        self.decode = decode
        self.identity = self.model.identity
        self.scorer = Scorer(
            encode_image=self.model.encode_image,
            classes=vocabulary.classes,
            vectors=vectors,
            logit_scale=self.model.logit_scale,
            view=self.model.view,
            config=scoring,
            device=self.model.device,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(list(TRANSIENT_COLUMNS)).to_pylist()
        images, failures = self._pixels(batch, [i for i, row in enumerate(rows) if row["status"] == OK])
        predictions = self._score_rows(batch, images)
        for index, row in enumerate(rows):
            prediction = predictions.get(index)
            if index in failures:
                row.update(status=DECODE_ERROR, error_message=failures[index])
            elif isinstance(prediction, str):
                row.update(status=SCORE_ERROR, error_message=prediction)
            row.update(method=self.scoring.method, model=self.identity["model"], pretrained=self.identity["pretrained"])
            row.update(prediction if isinstance(prediction, dict) else empty_prediction())  # its method: who scored it
        schema = output_schema(batch.drop_columns(list(TRANSIENT_COLUMNS)).schema)  # _shard and _row ride along
        return pa.Table.from_pylist(rows, schema=schema)

    def _pixels(self, batch: pa.Table, indices: list[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """uint8 (3, H, W) tensors by row index, and decode failures (of deferred JPEGs) by row index."""
        import torch

        from pipeline.stages.device_decode import decode_jpegs

        columns = {name: batch.column(name) for name in TRANSIENT_COLUMNS}
        images: dict[int, Any] = {}
        deferred = [i for i in indices if columns["jpeg"][i].is_valid]
        for i in indices:
            if not columns["jpeg"][i].is_valid:
                height, width = columns["pixel_height"][i].as_py(), columns["pixel_width"][i].as_py()
                buffer = np.frombuffer(columns["pixels"][i].as_buffer(), dtype=np.uint8).reshape(height, width, 3)
                images[i] = torch.from_numpy(buffer).permute(2, 0, 1).contiguous()
        failures: dict[int, str] = {}
        if not deferred:
            return images, failures
        contents = [columns["jpeg"][i].as_py() for i in deferred]
        orientations = [columns["orientation"][i].as_py() for i in deferred]
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

    def _score_rows(self, batch: pa.Table, images: dict[int, Any]) -> dict[int, dict[str, Any] | str]:
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


def _prediction(score: Any) -> dict[str, Any]:
    return {
        "label": score.label,
        "score": score.score,
        "topk_labels": score.topk_labels,
        "topk_scores": score.topk_scores,
        "margin": score.margin,
        "boxes": [asdict(box) for box in score.boxes],
        "method": score.method,
    }
