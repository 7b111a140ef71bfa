"""The read-and-decode stage: a shard's listing rows in, decoded rows out, a batch at a time; every row comes out.

A plain class: `run.dataset` runs it in Ray Data tasks, and `lgca eval` and `Labeler` call the same code in
process, so every path reads with the same byte limit, read timeout and journal of poison inputs.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import DecodeConfig
from pipeline.faults import fault_point
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR
from pipeline.stages.decode import DecodedImage, DecodeFailure, DeferredJpeg, decode_image, defer_jpeg
from pipeline.stages.image_bytes import read_batches
from pipeline.stages.journal import DecodeJournal
from pipeline.stages.plan import ROW_COLUMN, put_atomically, read_shard
from pipeline.stages.readers import FileReader, SampleReader
from pipeline.stages.sink import MEMBERS_FILE, SHARD_COLUMN, SHARD_ROWS_COLUMN, keep_succeeded_rows, staging_folder
from pipeline.stages.storage import filesystem_for
from pipeline.stages.webdataset import FORMAT as WEBDATASET
from pipeline.stages.webdataset import TarTally, read_tar_batches

log = logging.getLogger(__name__)

# Columns between decoding and scoring, never written: decoded pixels, or a JPEG left for the scoring device
TRANSIENT_COLUMNS = ("pixels", "pixel_height", "pixel_width", "jpeg", "orientation")


class ReadDecodeStage:
    """Reads and decodes listing rows (key, path, ...); adds status, error_message, width, height and the pixels.

    With `defer_jpegs`, JPEGs are only checked here (header, size limit, orientation) and travel as bytes, for
    the scoring stage to decode on its GPU; other files are decoded here as always.
    """

    def __init__(
        self,
        decode: DecodeConfig,
        storage_options: Mapping[str, Any],
        *,
        defer_jpegs: bool = False,
        run_id: str = "",
        batch_size: int = 32,
        reader: SampleReader | None = None,
    ) -> None:
        self.decode = decode
        self.storage_options = dict(storage_options)
        self.defer_jpegs = defer_jpegs
        self.run_id = run_id or uuid.uuid4().hex  # in process (Labeler, lgca eval): a journal of this process only
        self.batch_size = batch_size
        self.reader = reader or FileReader(decode, self.storage_options)  # how the listed samples become bytes

    def shard_batches(self, output: str, shard_id: str, schema: pa.Schema, retry: bool = False, source: str = "") -> Iterator[pa.Table]:
        """A shard's rows decoded a batch at a time: its listing rows from the plan in `output`, or, for an
        archive's shard (`source`), its samples read from the archive.

        A generator: Ray Data pauses it while its batches wait downstream, so a shard's pixels are made as the
        scoring stage takes them. Each batch carries the shard id; with `retry`, only the shard's failed rows.
        """
        fs, root = filesystem_for(output, self.storage_options)
        root = root.rstrip("/")
        again = set(keep_succeeded_rows(fs, root, shard_id, self.run_id).tolist()) if retry else None
        if source:
            yield from _with_total(self._archive_batches(fs, root, shard_id, schema, source, again), count_rows=again is None)
            return
        rows = read_shard(fs, root, shard_id, schema)
        if again is not None:
            rows = rows.take(pa.array(sorted(again), pa.int64()))
        rows = rows.append_column(SHARD_COLUMN, pa.array([shard_id] * rows.num_rows, pa.string()))
        for start in range(0, rows.num_rows, self.batch_size):
            yield _total_column(self(rows.slice(start, self.batch_size)), None)

    def _archive_batches(
        self, fs: Any, root: str, shard_id: str, schema: pa.Schema, source: str, again: set[int] | None
    ) -> Iterator[tuple[pa.Table, int]]:
        """An archive's shard decoded a batch at a time, each with the samples read so far (a tar's are counted
        only as it is read); a tar's tally of members goes beside the shard's staged pieces for its commit."""
        tally = TarTally()
        if json.loads(source).get("format") == WEBDATASET:
            batches = read_tar_batches(source, schema, self.storage_options, self.batch_size, self.decode.max_bytes, tally)
        else:
            batches = read_batches(source, schema, self.storage_options, self.batch_size, self.decode.max_bytes)
        position = 0
        for rows, contents in batches:
            positions = list(range(position, position + rows.num_rows))
            position += rows.num_rows
            if again is not None:  # --retry-failed: only the failed rows of a committed shard
                chosen = [i for i, row in enumerate(positions) if row in again]
                rows, contents, positions = (
                    rows.take(pa.array(chosen, pa.int64())),
                    [contents[i] for i in chosen],
                    [positions[i] for i in chosen],
                )
            if not rows.num_rows:
                continue
            rows = rows.append_column(ROW_COLUMN, pa.array(positions, pa.int32()))
            rows = rows.append_column(SHARD_COLUMN, pa.array([shard_id] * rows.num_rows, pa.string()))
            with DecodeJournal.open(self.run_id, rows.column("key").to_pylist()) as journal:
                decoded = self._decoded(rows, [b"" if journal.poisoned(i) else c for i, c in enumerate(contents)], journal)
            yield decoded, position  # after the journal is closed: a worker killed while paused here left no open entry
        if tally.members:
            record = json.dumps(tally.to_dict(), sort_keys=True).encode()
            put_atomically(fs, f"{staging_folder(root, shard_id, self.run_id)}/{MEMBERS_FILE}", record)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Bytes to pixels for one batch of listing rows; every row comes out, failed ones with a status.

        An input that killed this process twice (the journal, `stages.journal`) becomes a decode_error row
        instead of killing it again.
        """
        with DecodeJournal.open(self.run_id, batch.column("key").to_pylist()) as journal:
            return self._decoded(batch, self.reader.read(batch.column("path").to_pylist(), journal), journal)

    def _decoded(self, batch: pa.Table, contents: list[bytes | Exception], journal: DecodeJournal) -> pa.Table:
        """`batch` with each row's status and pixels, from its bytes (or the error that kept them from being read)."""
        paths = batch.column("path").to_pylist()
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
                row.update(self._decoded_row(content))
            for name, value in row.items():
                columns[name].append(value)
        journal.decoded_all()
        types = {"status": pa.string(), "error_message": pa.string(), "pixels": pa.large_binary(), "jpeg": pa.large_binary()}
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values, types.get(name, pa.int32())))
        return batch

    def _decoded_row(self, content: bytes) -> dict[str, Any]:
        result: DeferredJpeg | DecodedImage | DecodeFailure | None = defer_jpeg(content, self.decode) if self.defer_jpegs else None
        if result is None:
            result = decode_image(content, self.decode)
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


def _with_total(batches: Iterator[tuple[pa.Table, int]], count_rows: bool) -> Iterator[pa.Table]:
    """Each batch with SHARD_ROWS_COLUMN: null, but on the shard's last batch the number of its rows, so the
    driver learns when an archive's shard (counted only as it is read) is whole. A retry's rows are known already."""
    held: pa.Table | None = None
    read = 0
    for batch, so_far in batches:
        if held is not None:
            yield _total_column(held, None)
        held, read = batch, so_far
    if held is not None:
        yield _total_column(held, read if count_rows else None)


def _total_column(batch: pa.Table, total: int | None) -> pa.Table:
    return batch.append_column(SHARD_ROWS_COLUMN, pa.array([total] * batch.num_rows, pa.int64()))


def decoded_pixels(batch: pa.Table, index: int) -> np.ndarray:
    """The (H, W, 3) uint8 pixels the stage decoded for row `index` of `batch` (a row of status ok, not deferred)."""
    height, width = batch.column("pixel_height")[index].as_py(), batch.column("pixel_width")[index].as_py()
    return np.frombuffer(batch.column("pixels")[index].as_buffer(), dtype=np.uint8).reshape(height, width, 3)


def _poison_message(kills: int) -> str:
    return (
        f"reading or decoding this file killed its worker process {kills} times (out of memory, or a crash in a "
        "decoder); it was not tried again. Check the file, or lower --max-bytes / --max-pixels"
    )
