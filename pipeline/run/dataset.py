"""The Ray Data graph of labelling: the stages of `pipeline.stages`, wrapped from outside and wired together.

Shard positions in; `ReadDecodeStage` in CPU tasks; `ScoreStage` in an actor pool (GPUs, or CPUs); staged
pieces out. The driver sees only one small (shard, rows) record per staged piece, and commits a shard (a
worker task, `run.commits`) once its pieces cover it; `run.job` drives this.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.config import DecodeConfig, ScoringConfig
from pipeline.run.resources import Placement
from pipeline.stages.read_decode import ReadDecodeStage
from pipeline.stages.score_rows import ScoreStage
from pipeline.stages.sink import stage_pieces
from pipeline.stages.storage import filesystem_for
from pipeline.vocab import Vocabulary

DECODE_TASK_MEMORY = 1024 * 1024 * 1024  # bytes reserved per decode task: the worker (~0.5 GiB) plus decoded images
# Reading a shard's rows and staging a scored batch are small I/O: they take no CPU, or the decode tasks, which
# take every CPU the actors leave, would starve them and no shard would ever complete.
STAGE_TASK_CPUS = 0
MAX_INPUT_BLOCKS = 20_000  # blocks of shard positions: one per shard up to here, a few consecutive shards each beyond


def build_dataset(
    shards: list[dict[str, Any]],
    *,
    output: str,
    storage_options: dict[str, Any],
    listing_schema: pa.Schema,
    decode: DecodeConfig,
    decode_batch_size: int,
    batch_size: int,
    placement: Placement,
    scoring: ScoringConfig,
    vocabulary: Vocabulary,
    run_id: str,
    vectors_uri: str | None = None,
    embeddings: bool = False,
) -> Any:
    """The lazy Ray Dataset that labels `shards` and yields (shard, rows) per staged piece.

    Each item of `shards` is {"shard": id, "retry": bool, "source": where an archive's shard's samples are, or ""}, in the order they should complete; a retried
    shard is a committed one whose failed rows alone are labelled again, its other rows kept
    (`sink.keep_succeeded_rows`).
    """
    import ray

    # The shard list goes to the object store once; the dataset itself is only shard positions, read lazily
    # by tasks: nothing O(rows) is built in the driver, and listing rows are read by the task decoding them,
    # so the object store holds the work in flight and no more.
    todo = ray.put(
        pa.table(
            {
                "shard": [s["shard"] for s in shards],
                "retry": [bool(s["retry"]) for s in shards],
                "source": [s.get("source", "") for s in shards],  # an archive's shard: where its samples are
            }
        )
    )
    dataset: Any = ray.data.range(len(shards), override_num_blocks=max(1, min(len(shards), MAX_INPUT_BLOCKS)))
    reading = ReadDecodeStage(decode, storage_options, defer_jpegs=placement.decode_on_device, run_id=run_id, batch_size=decode_batch_size)
    dataset = dataset.map_batches(
        _read_and_decode_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "todo": [todo],  # in a list: the task fetches it once per worker process (_todo), not once per call
            "stage": reading,
            "output": output,
            "schema": listing_schema,
        },
        num_cpus=1,
        # Reserving decode memory also keeps Ray from fusing decoding into the scoring actors (it fuses
        # stages with equal resource requests): decoding must run on its own CPU tasks, beside the model.
        memory=DECODE_TASK_MEMORY,
    )
    dataset = dataset.map_batches(
        ScoreStage,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=placement.actors),
        num_gpus=placement.gpus_per_actor,
        num_cpus=placement.cpus_per_actor,
        fn_constructor_kwargs={
            "model": placement.model,
            "scoring": scoring,
            "vocabulary": vocabulary,
            "decode": decode,
            "storage_options": storage_options,
            "cpu_threads": placement.cpu_threads,
            "vectors_uri": vectors_uri,
            "embeddings": embeddings,
        },
    )  # Ray Data's actor pools restart dead actors and retry their batches by default (max_restarts=-1)
    return dataset.map_batches(
        _stage,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"output": output, "storage_options": storage_options, "run_id": run_id},
        num_cpus=STAGE_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=max(2, placement.actors)),  # CPU-free tasks: bound how many workers Ray starts
    )


def _read_and_decode_shards(batch: pa.Table, todo: list[Any], stage: ReadDecodeStage, output: str, schema: pa.Schema) -> Iterator[pa.Table]:
    """Each shard at the given positions of `todo`, read and decoded a batch at a time by `stage`."""
    table = _todo(todo[0])
    for position in batch.column("id").to_pylist():
        shard_id, retry = table.column("shard")[position].as_py(), table.column("retry")[position].as_py()
        yield from stage.shard_batches(output, shard_id, schema, retry, table.column("source")[position].as_py())


_TODO_CACHE: dict[str, pa.Table] = {}  # the job's shard list, fetched once per worker process


def _todo(ref: Any) -> pa.Table:
    import ray

    key = ref.hex()
    if key not in _TODO_CACHE:
        _TODO_CACHE.clear()  # one job at a time per worker process is the common case: keep one list
        _TODO_CACHE[key] = ray.get(ref)
    return _TODO_CACHE[key]


def _stage(batch: pa.Table, output: str, storage_options: dict[str, Any], run_id: str) -> pa.Table:
    fs, root = filesystem_for(output, storage_options)
    return stage_pieces(fs, root.rstrip("/"), batch, run_id)
