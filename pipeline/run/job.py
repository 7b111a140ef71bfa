"""The labelling job, the only Ray code: check everything, hold the output's lease, plan in shards, label, commit.

The driver holds O(shards) state: the plan's shard records and a count per shard in flight. Listing,
reading, decoding, scoring and commits all run on workers (`run.listing_tasks`, `run.dataset`, `run.commits`).
Checks come first (`run.prepare`); what the job records of itself is `run.manifest_record`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config import ConfigError, JobConfig, RunFailed
from pipeline.faults import fault_point
from pipeline.run.commits import ShardCommits, check_output, failed_rows_by_shard, over_footers, rows_per_shard
from pipeline.run.dataset import DECODE_TASK_MEMORY, build_dataset
from pipeline.run.embedding import embed_vocabulary_once
from pipeline.run.listing_tasks import ShardFeed, build_plan
from pipeline.run.manifest_record import manifest_record, new_attempt, now, record_failure
from pipeline.run.plan_progress import Progress
from pipeline.run.prepare import PreparedJob, prepare
from pipeline.run.ray_start import start_ray
from pipeline.run.resources import Placement, cluster_shapes, place_scoring
from pipeline.run.run_summary import RunSummary
from pipeline.schema import output_schema
from pipeline.stages.lease import Lease, LeaseError
from pipeline.stages.listing import known_schema
from pipeline.stages.plan import Plan, PlanError, PlanSummary, Shard
from pipeline.stages.sink import add_counts, committed_members, committed_methods

log = logging.getLogger(__name__)

# A listing still going after this long has its first shards labelled while it goes on; a shorter one is
# labelled in one go (each window of shards is one Ray Data run, its actors loading the model again).
LISTING_HEAD_START_S = 10.0
LISTING_HEAD_START_ENV = "LGCA_LISTING_HEAD_START_S"


def run(config: JobConfig, storage_options: Mapping[str, Any] | None = None) -> RunSummary:
    """Run a labelling job end to end: one committed output row per listed image.

    Args:
        config: the job.
        storage_options: fsspec options (credentials, endpoint) for inputs, output and weights; never recorded.

    Returns:
        The run's summary.

    Raises:
        ConfigError: the configuration is unusable (raised before the cluster starts), another job holds
            the output, or the inputs hold no images or repeat a key (found while planning, before labelling).
        RunFailed: labelling had started and could not finish (another job took the output, shards missing,
            a listing that labelling had overtaken failed or found repeated keys).
    """
    storage_options = dict(storage_options or {})
    started = time.time()
    started_at = now()
    job = prepare(config, storage_options)
    config = job.config  # as prepared: a local output made absolute
    with Lease(job.output.fs, job.output.root, config.output) as lease:
        ray = start_ray(config)
        placement = place_scoring(cluster_shapes(ray), config.execution, job.model, config.decode.device, DECODE_TASK_MEMORY)
        _begin(job)
        attempt = new_attempt(job, started_at)
        job.output.write_manifest(manifest_record(job, job.plan, attempt, {}, 0))  # the attempt is on record even if it dies
        try:
            work = _Work(ray, job, storage_options, lease, attempt["run_id"], placement)
            try:
                plan, progress = work.label_resumed() if job.plan is not None else work.label_while_listing()
                progress.close()
                label_ended = time.time()
                lease.confirm()  # the output check and the manifest below describe this job's output: still ours?
                counts = check_output(ray, job, plan, work.kept, work.outcome.counts, storage_options)
                scored_by: dict[str, int] | None = None
                if config.scoring.cascade_margin is not None:  # which pass labelled the rows: one more read of the footers
                    scored_by = {}
                    for part in over_footers(ray, committed_methods, config.output, storage_options, set(job.output.committed())):
                        add_counts(scored_by, part)
                members: dict[str, int] | None = None
                if plan.uncounted:  # what the tars held besides their labelled images, from their footers
                    members = {}
                    tars = {shard.id for shard in plan.shards if shard.rows < 0}
                    for part in over_footers(ray, committed_members, config.output, storage_options, tars):
                        add_counts(members, part)
            except ConfigError as error:
                if not work.labelling_started:
                    raise  # nothing was labelled: a configuration or input error (exit 2)
                raise RunFailed(str(error)) from error
            outcome, already, label_started, plan_seconds = work.outcome, work.already, work.label_started or label_ended, work.plan_seconds
            outcome.first_at = outcome.first_at or label_ended
            steady_rows = outcome.rows - outcome.first_rows
            steady_seconds = label_ended - outcome.first_at
            summary = RunSummary(
                output=config.output,
                inputs=plan.images if not plan.uncounted else sum(counts.values()),  # tars: counted as read
                already_done=already,
                rows_written=outcome.rows,
                counts=counts,
                seconds=time.time() - started,
                label_seconds=label_ended - label_started,
                first_rows_seconds=outcome.first_at - label_started,
                # a rate after start-up means something only once several more shards than the first have arrived
                steady_images_per_second=steady_rows / steady_seconds
                if steady_rows >= 3 * outcome.first_rows > 0 and steady_seconds > 0
                else 0.0,
                skipped_files=plan.skipped_count,
                shards=len(plan.shards),
                shards_written=outcome.shards,
                plan_seconds=plan_seconds,
            )
            attempt.update(
                ended_at=now(),
                status="succeeded",
                rows_written=outcome.rows,
                shards_written=outcome.shards,
                seconds=round(summary.seconds, 3),
            )
            fault_point("finishing")
            try:
                lease.confirm()  # _SUCCESS, the manifest and removing _staging: never over another job's output
                job.output.finish(manifest_record(job, plan, attempt, counts, sum(counts.values()), scored_by, members), lease.check)
            except LeaseError as error:
                raise RunFailed(str(error)) from error
        except Exception as error:
            record_failure(job, attempt, lease, error)
            raise
    return summary


def plan_only(config: JobConfig, storage_options: Mapping[str, Any] | None = None) -> PlanSummary:
    """Write (or reuse) the plan of a job and summarise it, labelling nothing (`lgca plan`).

    Raises:
        ConfigError: as `run` does, before labelling would start.
    """
    storage_options = dict(storage_options or {})
    job = prepare(config if config.overwrite else replace(config, resume=True), storage_options)  # a plan there is reused
    if job.mode == "restart":
        raise PlanError(
            f"output {config.output} holds shards from an attempt that died before its listing ended; `lgca plan` labels "
            "nothing and deletes nothing: finish it with `lgca run ... --resume` (it lists again and relabels them)"
        )
    with Lease(job.output.fs, job.output.root, config.output):
        start_ray(config)
        _begin(job)
        plan = job.plan if job.plan is not None else _list_new_plan(job, storage_options)
    seconds = 0.0 if job.plan is not None else plan.listing_seconds
    return PlanSummary(
        output=config.output,
        images=plan.images,
        shards=len(plan.shards),
        skipped_count=plan.skipped_count,
        passes_per_image=config.scoring.encoder_passes,
        cascade_margin=config.scoring.cascade_margin,
        listing_seconds=seconds,
        reused=job.plan is not None,
        examples=list(plan.skipped),
        uncounted=plan.uncounted,
    )


# ---------------------------------------------------------------- cluster work


def _begin(job: PreparedJob) -> None:
    """Empty the output for --overwrite; withdraw `_SUCCESS` and what an earlier attempt left staged."""
    if job.mode in ("overwrite", "restart"):
        job.output.clear(keep_manifest=job.mode == "restart")  # a restart keeps the record of earlier attempts
    job.output.begin()


def _list_new_plan(job: PreparedJob, storage_options: dict[str, Any], **listing: Any) -> Plan:
    """List the inputs into a new plan (an earlier unfinished listing is discarded); `listing` goes to build_plan."""
    output = job.output
    from pipeline.stages.plan import PLAN_DIR

    if output.fs.exists(f"{output.root}/{PLAN_DIR}"):
        output.fs.rm(f"{output.root}/{PLAN_DIR}", recursive=True)  # a listing that died before plan.json
    last = [time.time()]

    def report(units: int, images: int) -> None:
        if time.time() - last[0] >= 30:
            last[0] = time.time()
            print(f"lgca: listing: {units} folders or manifest parts listed, {images:,} images so far", flush=True)

    return build_plan(
        job.specs,
        job.config.output,
        storage_options,
        job.config.execution.rows_per_file,
        job.fingerprint,
        now(),
        on_progress=report,
        manifests=job.manifests,
        **listing,
    )


class _Work:
    """The labelling of one attempt: a resumed plan's remaining shards, or a new plan's shards as they are listed."""

    def __init__(
        self, ray: Any, job: PreparedJob, storage_options: dict[str, Any], lease: Lease, run_id: str, placement: Placement
    ) -> None:
        self.ray, self.job, self.storage_options, self.lease, self.run_id = ray, job, storage_options, lease, run_id
        self.placement = placement
        self.outcome = _Outcome(first_at=0.0)
        self.kept: set[str] = set()  # shards committed by earlier attempts and kept as they are
        self.already = 0  # their images
        self.labelling_started = False
        self.label_started = 0.0
        self.plan_seconds = 0.0

    def label_resumed(self) -> tuple[Plan, Progress]:
        """Label the shards of the resumed plan without a part file (and, with --retry-failed, the failed rows)."""
        job, plan = self.job, self.job.plan
        assert plan is not None
        fault_point("listed")
        committed = job.output.committed() & {shard.id for shard in plan.shards}
        failed = failed_rows_by_shard(self.ray, job, committed, self.storage_options) if job.config.retry_failed else {}
        # A tar with failed rows is read again whole: a fault may have cut it short, so a retry can find more
        # samples than its part file holds; its rows are counted afresh as it is read.
        tars = {shard.id for shard in plan.shards if shard.rows < 0}
        again = {shard_id for shard_id in failed if shard_id in tars}
        failed = {shard_id: rows for shard_id, rows in failed.items() if shard_id not in again}
        todo = [shard for shard in plan.shards if shard.id not in committed or shard.id in failed or shard.id in again]
        self.kept = committed - set(failed) - again
        # archives' shards are counted as they are read: what a kept one holds, its footer says
        counted = rows_per_shard(self.ray, job.config.output, self.storage_options, (tars & committed) - again)
        todo = [replace(shard, rows=counted.get(shard.id, shard.rows)) for shard in todo]
        self.already = sum(counted.get(shard.id, shard.rows) for shard in plan.shards if shard.id in self.kept)
        log.info("%d images in %d shards, %d shards to label", plan.images, len(plan.shards), len(todo))
        if failed:
            log.info("labelling again %d failed rows in %d committed shards", sum(failed.values()), len(failed))
        progress = Progress(
            plan.images, len(plan.shards), self.already, len(self.kept), uncounted=plan.uncounted, estimate=plan.estimated_images
        )
        if todo:
            self._label(todo, failed, plan.schema, progress)
        return plan, progress

    def label_while_listing(self) -> tuple[Plan, Progress]:
        """List a new plan in the background and label its shards as they come: the first ones once the listing
        has run LISTING_HEAD_START_S (a shorter listing is labelled in one go), the rest in later windows.

        Labelling starts early only when the listing rows' schema is known up front (folders, globs, files,
        Parquet manifests): every part file must have the plan's column types, and a CSV manifest's types are
        known only once all of it is read.
        """
        job = self.job
        schema = known_schema(job.specs, self.storage_options, job.manifests)
        head_start = listing_head_start_s() if schema is not None else math.inf
        started = time.time()
        feed = ShardFeed(lambda **listing: _list_new_plan(job, self.storage_options, schema=schema, **listing))
        try:
            return self._label_windows(feed, schema, head_start, started)
        finally:
            if feed.listing:  # labelling failed while the listing goes on: end it while the job holds the output
                feed.stop()

    def _label_windows(self, feed: ShardFeed, schema: Any, head_start: float, started: float) -> tuple[Plan, Progress]:
        progress = Progress(None, None, 0, 0)
        while True:
            window = feed.take(head_start)
            if not window:
                break
            listing = feed.listing
            if not self.labelling_started and not listing:
                fault_point("listed")
            if listing:
                images, shards = feed.listed()
                log.info("labelling %d shards while the listing goes on (%d images in %d shards so far)", len(window), images, shards)
            else:
                plan = feed.plan()
                schema = schema if schema is not None else plan.schema
                progress.planned(plan.images, len(plan.shards), plan.uncounted, plan.estimated_images)
                log.info("%d images in %d shards, %d shards to label", plan.images, len(plan.shards), len(window))
            assert schema is not None  # a window before the end of the listing has its schema from the start
            self._label(window, {}, schema, progress, feed)
        plan = feed.plan()
        progress.planned(plan.images, len(plan.shards), plan.uncounted, plan.estimated_images)
        self.plan_seconds = plan.listing_seconds or time.time() - started
        return plan, progress

    def _label(self, todo: list[Shard], failed: Mapping[str, int], schema: Any, progress: Progress, feed: ShardFeed | None = None) -> None:
        self.labelling_started = True
        self.label_started = self.label_started or time.time()
        checks = [self.lease.check] + ([feed.check] if feed is not None else [])
        context = _LabelContext(self.placement, self.storage_options, progress, checks, self.run_id, self.lease.owner)
        _label(self.ray, self.job, todo, failed, schema, context, self.outcome)


@dataclass(frozen=True)
class _LabelContext:
    """What every labelling pass of one attempt shares."""

    placement: Placement
    storage_options: dict[str, Any]
    progress: Progress
    checks: list[Callable[[], None]]  # each raises to stop the job: a lost lease, a failed listing
    run_id: str
    owner: str  # the lease's owner: commits publish only while the lease names it


@dataclass
class _Outcome:
    first_at: float  # when the first shard was committed
    rows: int = 0
    first_rows: int = 0
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def _label(
    ray: Any, job: PreparedJob, todo: list[Shard], failed: Mapping[str, int], listing_schema: Any, context: _LabelContext, outcome: _Outcome
) -> None:
    """Label the `todo` shards into `outcome`; each is committed by a worker task once its staged pieces cover it.

    A shard in `failed` (committed, with that many failed rows) has only its failed rows labelled again.
    `context.checks` run before every staged batch is committed: each raises to stop the job (a lost lease, a
    failed listing). Pieces are staged under this run's id, and a commit publishes only while the lease names
    `context.owner`.
    """
    config, placement = job.config, context.placement
    vectors_uri = embed_vocabulary_once(
        ray, output=config.output, model=placement.model, scoring=config.scoring, vocabulary=job.vocabulary,
        storage_options=context.storage_options, num_gpus=placement.gpus_per_actor, num_cpus=placement.cpus_per_actor,
    )  # fmt: skip
    dataset = build_dataset(
        [{"shard": shard.id, "retry": shard.id in failed, "source": shard.source} for shard in todo],
        output=config.output,
        storage_options=context.storage_options,
        listing_schema=listing_schema,
        decode=job.decode,
        decode_batch_size=config.execution.decode_batch_size,
        batch_size=config.execution.batch_size,
        placement=placement,
        scoring=config.scoring,
        vocabulary=job.vocabulary,
        run_id=context.run_id,
        vectors_uri=vectors_uri,
        embeddings=config.embeddings,
    )
    embedding_dim = placement.model.embed_dim if config.embeddings else None
    commits = ShardCommits(
        ray, config.output, context.storage_options, output_schema(listing_schema, embedding_dim), context.run_id, context.owner
    )
    commits.expect({shard.id: shard.rows for shard in todo}, failed)

    def committed(counts: dict[str, int]) -> None:
        rows = sum(counts.values())
        if not outcome.first_at:
            outcome.first_at, outcome.first_rows = time.time(), rows
            fault_point("scoring")
        outcome.rows += rows
        outcome.shards += 1
        add_counts(outcome.counts, counts)
        context.progress.committed(counts)

    for pieces in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        fault_point("staged")
        for check in context.checks:  # before any commit: a driver that stalled past its lease commits nothing more
            check()
        commits.staged(pieces.column("shard").to_pylist(), pieces.column("rows").to_pylist(), pieces.column("total").to_pylist())
        commits.collect(committed, wait=False)
    commits.collect(committed, wait=True)
    for check in context.checks:  # the last commits write the output: only while the lease is still this job's
        check()
    commits.retry_incomplete()  # pieces that arrived after a commit found its shard incomplete
    commits.collect(committed, wait=True)


def listing_head_start_s() -> float:
    """LISTING_HEAD_START_S, or the seconds `LGCA_LISTING_HEAD_START_S` gives (0: label from the first listed shard)."""
    text = os.environ.get(LISTING_HEAD_START_ENV, "").strip()
    if not text:
        return LISTING_HEAD_START_S
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ConfigError(f"{LISTING_HEAD_START_ENV}={text!r} is not a number of seconds") from None
