"""Commits and footers: a shard is committed by a worker task once its staged pieces cover it, and the driver
reads committed shards' counts from their Parquet footers in tasks, never their rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.run.listing_tasks import unwrap
from pipeline.schema import STATUSES
from pipeline.stages.plan import Plan
from pipeline.stages.sink import OutputError, add_counts, commit_shard, committed_counts, failed_rows, part_name

if TYPE_CHECKING:
    from pipeline.run.prepare import PreparedJob

COMMIT_TASK_CPUS = 0  # a commit merges a few MB of staged rows; with a CPU share it would wait behind the decode tasks


COUNT_GROUP = 200  # committed shards whose footers one task reads at the end of a resumed run


def commit_task(
    output: str, storage_options: dict[str, Any], shard_id: str, rows: int, schema: Any, run_id: str, owner: str
) -> dict[str, int] | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    return commit_shard(fs, root.rstrip("/"), shard_id, rows, schema, run_id, owner)


def failed_rows_by_shard(ray: Any, job: PreparedJob, committed: set[str], storage_options: dict[str, Any]) -> dict[str, int]:
    """Failed rows per committed shard that has some (--retry-failed), from the footers."""
    failed: dict[str, int] = {}
    for part in over_footers(ray, failed_rows, job.config.output, storage_options, committed):
        failed.update(part)
    return failed


def over_footers(ray: Any, reader: Any, output: str, storage_options: dict[str, Any], shard_ids: set[str]) -> list[dict[str, int]]:
    """`reader(fs, root, ids)` over committed shards' footers, COUNT_GROUP shards per worker task; one result per task."""
    task = ray.remote(num_cpus=COMMIT_TASK_CPUS, max_retries=3)(_footer_task)
    ids = sorted(shard_ids)
    refs = [task.remote(reader, output, storage_options, ids[i : i + COUNT_GROUP]) for i in range(0, len(ids), COUNT_GROUP)]
    return [unwrap(ray, ref) for ref in refs]


def _footer_task(reader: Any, output: str, storage_options: dict[str, Any], shard_ids: list[str]) -> dict[str, int]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    result: dict[str, int] = reader(fs, root.rstrip("/"), shard_ids)
    return result


def rows_per_shard(ray: Any, output: str, storage_options: dict[str, Any], shard_ids: set[str]) -> dict[str, int]:
    """The rows of each given committed shard, from its footer (archives' shards: counted only when read)."""
    out: dict[str, int] = {}
    for part in over_footers(ray, _shard_rows, output, storage_options, shard_ids):
        out.update(part)
    return out


def _shard_rows(fs: Any, root: str, shard_ids: list[str]) -> dict[str, int]:
    return {shard_id: sum(committed_counts(fs, root, [shard_id]).values()) for shard_id in shard_ids}


def check_output(
    ray: Any, job: PreparedJob, plan: Plan, earlier: set[str], this_run: dict[str, int], storage_options: dict[str, Any]
) -> dict[str, int]:
    """Rows per status over the whole output, after checking that every shard of the plan is committed.

    One listing of the output and the footers of shards committed by earlier attempts: no row is read.
    """
    committed = job.output.committed()
    missing = [shard.id for shard in plan.shards if shard.id not in committed]
    if missing:
        raise OutputError(
            f"{len(missing)} of {len(plan.shards)} shards have no committed file (e.g. {part_name(missing[0])}); rerun with --resume to finish them"
        )
    counts = dict.fromkeys(STATUSES, 0)
    add_counts(counts, this_run)
    for part in over_footers(ray, committed_counts, job.config.output, storage_options, earlier):
        add_counts(counts, part)
    return counts


class ShardCommits:
    """The commits of one labelling pass: a commit task per shard once its staged rows cover it, results as they come.

    The driver holds a count per shard in flight, never rows. A commit that finds pieces missing (a batch Ray Data
    retried) returns None and the shard waits; `retry_incomplete` commits such shards again once the stream ended.
    """

    def __init__(self, ray: Any, output: str, storage_options: dict[str, Any], schema: Any, run_id: str, owner: str) -> None:
        self.ray = ray
        self.task = ray.remote(num_cpus=COMMIT_TASK_CPUS, max_retries=3)(commit_task)
        self.arguments = (output, storage_options)
        self.schema = schema  # of the part files: `schema.output_schema`
        self.run_id, self.owner = run_id, owner
        self.shard_rows: dict[str, int] = {}  # a shard's rows; for an archive's, once its last batch told them
        self.expected: dict[str, int | None] = {}  # rows to stage before a shard's commit (None: not known yet)
        self.staged_rows: dict[str, int] = {}  # shards in flight only
        self.in_flight: dict[Any, str] = {}  # commit task -> shard

    def expect(self, shard_rows: Mapping[str, int], failed: Mapping[str, int]) -> None:
        """Shards to label, with their rows (UNKNOWN_ROWS for an archive's, counted as it is read); a shard in
        `failed` stages only that many (its failed rows)."""
        for shard, rows in shard_rows.items():
            if rows >= 0:
                self.shard_rows[shard] = rows
            self.expected[shard] = failed.get(shard, rows if rows >= 0 else None)

    def staged(self, shards: Sequence[str], rows: Sequence[int], totals: Sequence[int | None] | None = None) -> None:
        """Staged pieces of `rows` rows each (`totals`: an archive's shard's rows, told by its last piece): commit
        the shards they complete."""
        for shard_id, count, total in zip(shards, rows, totals or [None] * len(shards)):
            if shard_id not in self.expected:
                continue  # a retried batch of a shard already committed: its rows are in the file
            if total is not None and self.expected[shard_id] is None:
                self.shard_rows[shard_id] = self.expected[shard_id] = total
            self.staged_rows[shard_id] = self.staged_rows.get(shard_id, 0) + count
            expected = self.expected[shard_id]
            if expected is not None and self.staged_rows[shard_id] >= expected and shard_id not in self.in_flight.values():
                self._commit(shard_id)

    def retry_incomplete(self) -> None:
        for shard_id, expected in list(self.expected.items()):
            if expected is not None:
                self._commit(shard_id)

    def collect(self, committed: Callable[[dict[str, int]], None], wait: bool) -> None:
        """Hand each finished commit's counts per status to `committed`; with `wait`, until none is in flight."""
        while self.in_flight:
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1 if wait else len(self.in_flight), timeout=None if wait else 0)
            for ref in ready:
                shard_id = self.in_flight.pop(ref)
                counts = unwrap(self.ray, ref)
                if counts is None:
                    continue  # not all pieces were there yet (a retried batch); the end of the stream tries again
                self.staged_rows.pop(shard_id, None)
                self.expected.pop(shard_id, None)
                committed(counts)
            if not wait:
                return

    def _commit(self, shard_id: str) -> None:
        ref = self.task.remote(*self.arguments, shard_id, self.shard_rows[shard_id], self.schema, self.run_id, self.owner)
        self.in_flight[ref] = shard_id
