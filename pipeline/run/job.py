"""The labelling job, the only Ray code: list, read and decode on CPU tasks, score in an actor pool, write Parquet."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.config import ConfigError, DecodeConfig, JobConfig, ModelConfig, ScoringConfig
from pipeline.faults import fault_point
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR, SCORE_ERROR, STATUSES, empty_prediction, output_schema
from pipeline.stages.decode import DecodeFailure, DeferredJpeg, decode_image, defer_jpeg, short_side_for
from pipeline.stages.sink import OutputError, OutputSink, not_yet_done
from pipeline.stages.sources import Listing, check_inputs, filesystem_for, list_inputs, parse_input, read_bytes
from pipeline.stages.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

READ_THREADS = 8  # concurrent reads per decode task: object-store latency, not CPU, bounds reading
BLOCKS_PER_BATCH = 2  # input block = this many scoring batches: a task emits its block when done, so blocks
# bound how often rows reach the writer (and how much a crash loses), while larger ones amortise scheduling
# Columns between decoding and scoring, never written: decoded pixels, or a JPEG left for the scoring device
TRANSIENT_COLUMNS = ("pixels", "pixel_height", "pixel_width", "jpeg", "orientation")
DECODE_TASK_MEMORY = 1024 * 1024 * 1024  # bytes reserved per decode task: the worker (~0.5 GiB) plus decoded images
ADDRESS_PROBE_TIMEOUT_S = 3.0  # TCP connect to --address before anything else: ray.init waits minutes on a dead one
# S3 reads retry in botocore, in s3fs (a loop of 5, nested twice in cat_file) and in read_bytes (4 attempts):
# multiplied, one object that keeps failing took many minutes. Reads use botocore's standard mode with 3
# attempts and s3fs's loop off, so a read makes at most 4 x 3 requests (docs/RELIABILITY.md); storage
# options that set their own config_kwargs keys win.
S3_READ_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"mode": "standard", "total_max_attempts": 3}}


@dataclass(frozen=True)
class RunSummary:
    """What one run did."""

    output: str
    inputs: int  # images listed
    already_done: int  # inputs skipped because a previous attempt committed them
    rows_written: int  # rows committed by this run
    counts: dict[str, int]  # rows per status over the whole output
    seconds: float  # wall time of the whole run
    label_seconds: float  # time from the first cluster work to the last committed row
    first_rows_seconds: float  # from the first cluster work to the first committed rows: start-up plus the first blocks
    steady_images_per_second: float  # rows/s after the first committed rows
    skipped_files: int  # non-image files found while listing

    @property
    def images_per_second(self) -> float:
        return self.rows_written / self.label_seconds if self.label_seconds > 0 else 0.0

    def _pace(self) -> str:
        then = f", then {_rate(self.steady_images_per_second)} images/s" if self.steady_images_per_second else ""
        return f"first rows after {self.first_rows_seconds:.1f} s{then}"

    def line(self) -> str:
        errors = sum(v for k, v in self.counts.items() if k != OK)
        detail = ", ".join(f"{k} {v}" for k, v in self.counts.items() if k != OK and v)
        return (
            f"lgca: {self.inputs} images ({self.already_done} already done), {self.rows_written} rows written: "
            f"{self.counts.get(OK, 0)} ok, {errors} errors{f' ({detail})' if detail else ''}; "
            f"{_rate(self.images_per_second)} images/s ({self._pace()}); "
            f"{self.skipped_files} non-image files skipped; output {self.output}"
        )


def _rate(per_second: float) -> str:
    """Three significant digits (0.213, 21.3), whole numbers from 1000 on: slow LGCA rates must not round to 0.2."""
    return f"{per_second:.0f}" if per_second >= 1000 else f"{per_second:.3g}"


@dataclass(frozen=True)
class PreparedJob:
    """Everything checked and listed before any cluster work."""

    config: JobConfig
    vocabulary: Vocabulary
    listing: Listing
    todo: pa.Table  # listing rows without a committed output row
    sink: OutputSink
    decode: DecodeConfig


def prepare(config: JobConfig, storage_options: Mapping[str, Any]) -> PreparedJob:
    """Validate the whole configuration and list the inputs; fails fast, starts no cluster.

    Raises:
        ConfigError: with a message naming the fix (bad labels, model, inputs or output).
    """
    from pipeline.models.load import check_model, model_image_size  # torch: kept out of the decode workers' imports

    vocabulary = load_vocabulary(config.vocabulary, storage_options)
    check_model(config.model)
    specs = [parse_input(text) for text in config.inputs]
    check_inputs(specs, storage_options)
    _refuse_output_inside_inputs(config)
    _check_address(config.execution.address)
    listing = list_inputs(specs, storage_options)
    if listing.table.num_rows == 0:
        raise ConfigError(f"no images found in {', '.join(config.inputs)} ({listing.skipped_count} other files)")
    passthrough = listing.table.schema
    mode = "resume" if config.resume else "overwrite" if config.overwrite else "new"
    sink = OutputSink.open(config.output, storage_options, mode, config.execution.rows_per_file, output_schema(passthrough))
    todo = listing.table
    if config.resume:
        todo = todo.filter(not_yet_done(todo.column("key"), sink.committed_keys()))
    alpha = config.scoring.crop_scale[0] if config.scoring.uses_crops else None
    decode = replace(config.decode, min_short_side=short_side_for(model_image_size(config.model), alpha))
    return PreparedJob(config, vocabulary, listing, todo, sink, decode)


def run(config: JobConfig, storage_options: Mapping[str, Any] | None = None) -> RunSummary:
    """Run a labelling job end to end: one committed output row per listed image.

    Args:
        config: the job.
        storage_options: fsspec options (credentials, endpoint) for inputs, output and weights; never recorded.

    Returns:
        The run's summary.

    Raises:
        ConfigError: the configuration is unusable (raised before the cluster starts).
    """
    storage_options = dict(storage_options or {})
    started = time.time()
    started_at = _now()
    job = prepare(config, storage_options)
    fault_point("listed")
    log.info("%d images listed, %d to label", job.listing.table.num_rows, job.todo.num_rows)
    label_started = time.time()
    first_rows_at, first_rows = label_started, 0
    if job.todo.num_rows:
        first_rows_at, first_rows = _label(job, storage_options)
    job.sink.flush()
    label_ended = time.time()
    steady_seconds = label_ended - first_rows_at
    steady_rows = job.sink.rows_written - first_rows
    counts, total = _check_output(job)
    summary = RunSummary(
        output=config.output,
        inputs=job.listing.table.num_rows,
        already_done=job.listing.table.num_rows - job.todo.num_rows,
        rows_written=job.sink.rows_written,
        counts=counts,
        seconds=time.time() - started,
        label_seconds=label_ended - label_started,
        first_rows_seconds=first_rows_at - label_started,
        # a rate after start-up means something only once several more batches than the first have arrived
        steady_images_per_second=steady_rows / steady_seconds if steady_rows >= 3 * first_rows > 0 and steady_seconds > 0 else 0.0,
        skipped_files=job.listing.skipped_count,
    )
    job.sink.finish(_manifest(job, summary, started_at, total))
    return summary


# ---------------------------------------------------------------- cluster work


def _label(job: PreparedJob, storage_options: dict[str, Any]) -> tuple[float, int]:
    """Run the Ray Data graph, committing rows as they arrive; returns when and how many rows came first."""
    import ray

    execution = job.config.execution
    if not ray.is_initialized():
        try:
            ray.init(address=execution.address, ignore_reinit_error=True, log_to_driver=True)
        except (ConnectionError, RuntimeError) as error:
            raise ConfigError(
                f"cannot join the Ray cluster at {execution.address}: {str(error).splitlines()[0]}; "
                "check --address (host:port of the head's GCS, or 'auto' on a cluster node)"
            ) from None
    num_gpus = execution.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actors = execution.concurrency or (max(1, int(ray.cluster_resources().get("GPU", 0) // num_gpus)) if num_gpus else 1)
    model_config = job.config.model
    if model_config.device == "auto":
        model_config = replace(model_config, device="cuda" if num_gpus > 0 else "cpu")
    jpegs_on_device = _jpegs_on_device(job.decode.device, model_config.device)

    block_rows = BLOCKS_PER_BATCH * max(execution.batch_size, execution.decode_batch_size)
    blocks = [job.todo.slice(start, block_rows) for start in range(0, job.todo.num_rows, block_rows)]
    dataset = ray.data.from_arrow(blocks)
    dataset = dataset.map_batches(
        _read_and_decode,
        batch_size=execution.decode_batch_size,
        batch_format="pyarrow",
        fn_kwargs={"decode": job.decode, "storage_options": storage_options, "defer_jpegs": jpegs_on_device},
        num_cpus=1,
        # Reserving decode memory also keeps Ray from fusing decoding into the scoring actors (it fuses
        # stages with equal resource requests): decoding must run on its own CPU tasks, beside the model.
        memory=DECODE_TASK_MEMORY,
    )
    dataset = dataset.map_batches(
        ScoringActor,
        batch_size=execution.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus,
        num_cpus=execution.num_cpus_per_actor,
        fn_constructor_kwargs={
            "model_config": model_config,
            "scoring": job.config.scoring,
            "vocabulary": job.vocabulary,
            "decode": job.decode,
            "storage_options": storage_options,
            "cpu_threads": max(1, (os.cpu_count() or 1) // actors) if num_gpus == 0 else None,
        },
    )  # Ray Data's actor pools restart dead actors and retry their batches by default (max_restarts=-1)
    first_rows_at, first_rows = 0.0, 0
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not first_rows_at:
            first_rows_at, first_rows = time.time(), table.num_rows
        job.sink.write(table)
        if job.sink.files_written:
            fault_point("scoring")
    return first_rows_at or time.time(), first_rows


def _jpegs_on_device(decode_device: str, model_device: str) -> bool:
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


def _read_and_decode(batch: pa.Table, decode: DecodeConfig, storage_options: dict[str, Any], defer_jpegs: bool = False) -> pa.Table:
    """Bytes to pixels for one batch of listing rows; every row comes out, failed ones with a status.

    With `defer_jpegs`, JPEGs are only checked here (header, size limit, orientation) and travel as bytes,
    for the scoring actor to decode on its GPU; other files are decoded here as always.
    """
    paths = batch.column("path").to_pylist()

    def fetch(path: str) -> bytes | Exception:
        try:
            return read_bytes(path, _read_options(path, storage_options))
        except Exception as error:  # reported in the row, never raised: one bad object must not stop the job
            return error

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(paths))) as pool:
        contents = list(pool.map(fetch, paths))
    columns: dict[str, list[Any]] = {name: [] for name in ("status", "error_message", "width", "height", *TRANSIENT_COLUMNS)}
    for content in contents:
        row: dict[str, Any] = dict.fromkeys(columns)
        if isinstance(content, Exception):
            row.update(status=READ_ERROR, error_message=f"cannot read: {type(content).__name__}: {content}")
        else:
            result = defer_jpeg(content, decode) if defer_jpegs else None
            if result is None:
                result = decode_image(content, decode)
            if isinstance(result, DecodeFailure):
                row.update(status=DECODE_ERROR, error_message=result.message)
            elif isinstance(result, DeferredJpeg):
                row.update(status=OK, width=result.width, height=result.height, jpeg=content, orientation=result.orientation)
            else:
                row.update(
                    status=OK,
                    width=result.width,
                    height=result.height,
                    pixels=result.pixels.tobytes(),
                    pixel_height=result.pixels.shape[0],
                    pixel_width=result.pixels.shape[1],
                )
        for name, value in row.items():
            columns[name].append(value)
    types = {"status": pa.string(), "error_message": pa.string(), "pixels": pa.large_binary(), "jpeg": pa.large_binary()}
    for name, values in columns.items():
        batch = batch.append_column(name, pa.array(values, types.get(name, pa.int32())))
    return batch


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
    ) -> None:
        import torch

        from pipeline.models.load import default_cache_dir, load_model
        from pipeline.models.text_vectors import text_vectors
        from pipeline.scoring.scorer import Scorer
        from pipeline.scoring.views import ViewFormat

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model = load_model(model_config, storage_options)
        # Each actor embeds the vocabulary with its own model (once per node, then from the disk cache):
        # a separate job-wide task would load the model a second time before any actor could start.
        vectors = text_vectors(self.model, vocabulary, scoring, default_cache_dir(model_config))
        self.scoring = scoring
        self.decode = decode
        self.identity = self.model.identity
        self.scorer = Scorer(
            encode_image=self.model.encode_image,
            classes=vocabulary.classes,
            vectors=vectors,
            logit_scale=self.model.logit_scale,
            view=ViewFormat(self.model.image_size, self.model.mean, self.model.std),
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
            row.update(prediction if isinstance(prediction, dict) else empty_prediction())
            row.update(method=self.scoring.method, model=self.identity["model"], pretrained=self.identity["pretrained"])
        schema = output_schema(batch.drop_columns(list(TRANSIENT_COLUMNS)).schema)
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
        for i, content, result in zip(deferred, contents, decoded):
            if isinstance(result, Exception):  # the device decoder refused it: libjpeg on the CPU, with its messages
                rejected += 1
                result = decode_image(content, self.decode)
                if isinstance(result, DecodeFailure):
                    failures[i] = result.message
                    continue
                result = torch.from_numpy(result.pixels).permute(2, 0, 1).contiguous()
            images[i] = result
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
            return {i: _prediction(score) for i, score in zip(indices, scores)}
        except Exception as error:  # isolate the image that broke the batch; the others still get scored
            log.warning("batch scoring failed (%s); scoring its %d images one by one", error, len(indices))
        out: dict[int, dict[str, Any] | str] = {}
        for i, image, key, size in zip(indices, pixels, keys, sizes):
            try:
                out[i] = _prediction(self.scorer.score([image], [key], [size])[0])
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
    }


# ---------------------------------------------------------------- bookkeeping


def _check_output(job: PreparedJob) -> tuple[dict[str, int], int]:
    """Counts per status over every committed file, after checking each listed key has exactly one row."""
    statuses, keys = [], []
    for path in job.sink.committed_files():
        with job.sink.fs.open(path, "rb") as handle:
            import pyarrow.parquet as pq

            table = pq.read_table(handle, columns=["key", "status"])
        statuses.append(table.column("status"))
        keys.append(table.column("key"))
    all_keys = pa.chunked_array([c for k in keys for c in k.chunks], type=pa.string())
    unique = pc.count_distinct(all_keys).as_py() if len(all_keys) else 0
    if unique != len(all_keys):
        raise OutputError(f"output {job.config.output} holds {len(all_keys) - unique} duplicate rows; rerun with --overwrite")
    missing = pc.sum(pc.invert(pc.is_in(job.listing.table.column("key"), value_set=all_keys.combine_chunks()))).as_py()
    if missing:
        raise OutputError(f"{missing} listed images have no output row; rerun with --resume to finish them")
    counts = dict.fromkeys(STATUSES, 0)
    for chunked in statuses:
        for value, count in zip(*_value_counts(chunked)):
            counts[value] = counts.get(value, 0) + count
    return counts, len(all_keys)


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _manifest(job: PreparedJob, summary: RunSummary, started_at: str, total_rows: int) -> dict[str, Any]:
    config = job.config
    previous = job.sink.previous_manifest() or {}
    attempt = {
        "attempt": job.sink.attempt,
        "run_id": uuid.uuid4().hex,
        "started_at": started_at,
        "ended_at": _now(),
        "rows_written": summary.rows_written,
        "files_written": job.sink.files_written,
        "seconds": round(summary.seconds, 3),
    }
    return {
        "format": "lgca-label/1",
        "run_id": attempt["run_id"],
        "code_version": _code_version(),
        "started_at": (previous.get("attempts") or [attempt])[0]["started_at"],
        "ended_at": attempt["ended_at"],
        "attempts": (previous.get("attempts") or []) + [attempt],
        "inputs": list(config.inputs),
        "output": config.output,
        "model": _model_record(job),
        "vocabulary": {
            "sha256": job.vocabulary.digest(),
            "classes": list(job.vocabulary.classes),
            "labels_file": config.vocabulary.labels,
            "templates_file": config.vocabulary.templates,
            "prompt": config.vocabulary.prompt,
        },
        "method": config.scoring.method,
        "scoring": config.scoring.to_dict(),
        "decode": asdict(job.decode),
        "execution": asdict(config.execution),
        "counts": {
            "inputs": summary.inputs,
            "rows": total_rows,
            "non_image_files_skipped": summary.skipped_files,
            "non_image_examples": list(job.listing.skipped),
            **summary.counts,
        },
    }


def _model_record(job: PreparedJob) -> dict[str, Any]:
    from pipeline.models.load import architecture_name, file_sha256, parse_weights_source

    model = job.config.model
    architecture = architecture_name(model.name)
    source = parse_weights_source(architecture, model.pretrained)
    record = {"name": architecture, "pretrained": model.pretrained, "source": source.kind, "weights_sha256": None}
    if source.kind == "file":
        record["weights_sha256"] = file_sha256(Path(source.value))
    if source.kind == "random":
        record["random_seed"] = model.random_seed
    return record


def _refuse_output_inside_inputs(config: JobConfig) -> None:
    output = _normalised(config.output)
    for text in config.inputs:
        root = _normalised(text)
        if output == root or output.startswith(root.rstrip("/") + "/"):
            raise OutputError(
                f"output {config.output} lies inside input {text}; the job would read its own output. Choose an --output outside the inputs"
            )


def _check_address(address: str | None) -> None:
    """Fail in seconds when an explicit `host:port` or `ray://host:port` address does not answer."""
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port; ray.init reports it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({error}); check --address (host:port of the head's GCS, "
            "ray://host:10001 for Ray Client, or 'auto' on a cluster node)"
        ) from None


def _normalised(location: str) -> str:
    if "://" in location:
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def _code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
