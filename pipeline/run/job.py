"""The labelling job, the only Ray code: check everything, hold the output's lease, plan in shards, label, commit.

The driver holds O(shards) state: the plan's shard records and a count per shard in flight. Listing,
reading, decoding, scoring and commits all run on workers (`run.planning`, `run.labelling`, `stages.sink`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import ConfigError, DecodeConfig, JobConfig, RunFailed
from pipeline.faults import fault_point
from pipeline.run.embedding import embed_vocabulary_once
from pipeline.run.labelling import DECODE_TASK_MEMORY, build_dataset, jpegs_on_device
from pipeline.run.planning import ShardFeed, build_plan, unwrap
from pipeline.run.progress import Progress
from pipeline.run.resources import check_resources, cluster_shapes
from pipeline.schema import OK, STATUSES
from pipeline.stages.decode import short_side_for
from pipeline.stages.lease import Lease, LeaseError
from pipeline.stages.listing import check_manifest_columns, known_schema, manifest_version
from pipeline.stages.plan import Plan, PlanError, PlanSummary, Shard, changed_manifests, check_resumable, fingerprint, read_plan
from pipeline.stages.sink import (
    Output,
    OutputError,
    add_counts,
    commit_shard,
    committed_counts,
    committed_methods,
    failed_rows,
    part_name,
)
from pipeline.stages.sources import InputSpec, check_inputs, glob_root, parse_input
from pipeline.stages.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

ADDRESS_PROBE_TIMEOUT_S = 3.0  # per probe of --address before any work: ray.init waits minutes on a dead one, forever on a dashboard
COMMIT_TASK_CPUS = 0  # a commit merges a few MB of staged rows; with a CPU share it would wait behind the decode tasks
COUNT_GROUP = 200  # committed shards whose footers one task reads at the end of a resumed run
# A listing still going after this long has its first shards labelled while it goes on; a shorter one is
# labelled in one go (each window of shards is one Ray Data run, its actors loading the model again).
LISTING_HEAD_START_S = 10.0
MANIFEST_FORMAT = "lgca-label/2"  # _manifest.json of outputs made of shards and a plan
LISTING_HEAD_START_ENV = "LGCA_LISTING_HEAD_START_S"


@dataclass(frozen=True)
class RunSummary:
    """What one run did."""

    output: str
    inputs: int  # images in the plan
    already_done: int  # images in shards a previous attempt committed
    rows_written: int  # rows committed by this run
    counts: dict[str, int]  # rows per status over the whole output
    seconds: float  # wall time of the whole run
    label_seconds: float  # time from the first labelling work to the last commit
    first_rows_seconds: float  # from the first labelling work to the first committed shard
    steady_images_per_second: float  # rows/s after the first committed shard
    skipped_files: int  # non-image files found while listing
    shards: int = 0  # shards in the plan
    shards_written: int = 0  # shards committed by this run
    plan_seconds: float = 0.0  # listing and planning; 0 when the plan was reused

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
            f"{self.skipped_files} non-image files skipped; {self.shards_written}/{self.shards} shards this run; output {self.output}"
        )


def _rate(per_second: float) -> str:
    """Three significant digits (0.213, 21.3), whole numbers from 1000 on: slow LGCA rates must not round to 0.2."""
    return f"{per_second:.0f}" if per_second >= 1000 else f"{per_second:.3g}"


@dataclass(frozen=True)
class PreparedJob:
    """Everything checked before any cluster work."""

    config: JobConfig
    vocabulary: Vocabulary
    specs: list[InputSpec]
    output: Output
    mode: str  # new | resume | overwrite | restart (a resume whose listing never ended: labelled again)
    decode: DecodeConfig
    model: dict[str, Any]  # the model's identity, as recorded in the manifest
    fingerprint: dict[str, Any]
    plan: Plan | None  # a resumed output's plan, already checked against this configuration
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest URI -> its version now


def prepare(config: JobConfig, storage_options: Mapping[str, Any]) -> PreparedJob:
    """Validate the whole configuration and the output; fails fast, starts no cluster, lists nothing.

    Raises:
        ConfigError: with a message naming the fix (bad labels, model, inputs or output; a resume whose
            configuration differs from its plan's).
    """
    from pipeline.models.load import check_model, model_image_size, resolve_device  # torch: kept out of the decode workers' imports

    vocabulary = load_vocabulary(config.vocabulary, storage_options)
    check_model(config.model)
    if config.execution.address is None:  # a local cluster: its workers have this machine's devices
        resolve_device(config.model.device)
    specs = [parse_input(text) for text in config.inputs]
    check_inputs(specs, storage_options, config.decode.allowed_schemes)
    manifests = {}
    for spec in specs:
        if spec.kind == "manifest":
            check_manifest_columns(spec, storage_options)
            manifests[spec.uri] = manifest_version(spec, storage_options)
    _refuse_output_inside_inputs(config, specs)
    _check_address(config.execution.address)
    mode = "resume" if config.resume else "overwrite" if config.overwrite else "new"
    output = Output.open(config.output, storage_options, mode)
    model = _model_record(config)
    asked = fingerprint(
        config.inputs, vocabulary.digest(), config.scoring.to_dict(), model, config.decode.max_pixels, config.execution.rows_per_file
    )
    plan = None
    if mode == "resume":
        plan = read_plan(output.fs, output.root, f"the plan of {config.output}")
        if plan is not None:
            check_resumable(plan, asked, config.output)
            changed = changed_manifests(plan, manifests)
            if changed:
                log.warning(
                    "manifest %s changed since the plan was made (%s): --resume labels the images the plan lists, not rows "
                    "added since; label new rows with a new job (another --output), or start over with --overwrite",
                    ", ".join(changed),
                    plan.created_at,
                )
        elif output.committed():
            if not _died_while_listing(output.previous_manifest() or {}):
                raise PlanError(
                    f"output {config.output} has results but no plan (_plan/plan.json): it was written by an older version "
                    "or by another tool; start over with --overwrite, or choose another --output"
                )
            # Its last attempt labelled while listing and died before the plan was complete: no plan to match
            # the committed shards against, so they are labelled again (a listing now may differ from then).
            log.warning(
                "output %s: the last attempt stopped before its listing ended (no _plan/plan.json), with %d shards committed; "
                "with no plan to resume, this run lists the inputs again and labels every shard",
                config.output,
                len(output.committed()),
            )
            mode = "restart"
    alpha = config.scoring.view_crop_scale[0] if config.scoring.uses_crops else None
    decode = replace(config.decode, min_short_side=short_side_for(model_image_size(config.model), alpha))
    return PreparedJob(config, vocabulary, specs, output, mode, decode, model, asked, plan, manifests)


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
    started_at = _now()
    job = prepare(config, storage_options)
    with Lease(job.output.fs, job.output.root, config.output) as lease:
        ray = _init_ray(config)
        execution = config.execution
        check_resources(
            cluster_shapes(ray),
            gpus_per_actor=execution.num_gpus,
            cpus_per_actor=execution.num_cpus_per_actor,
            actors=execution.concurrency,
            device=config.model.device,
            decode_device=config.decode.device,
            decode_memory=DECODE_TASK_MEMORY,
        )
        _begin(job)
        attempt = _attempt(job, started_at)
        job.output.write_manifest(_manifest(job, job.plan, attempt, {}, 0))  # the attempt is on record even if it dies
        try:
            work = _Work(ray, job, storage_options, lease, attempt["run_id"])
            try:
                plan, progress = work.label_resumed() if job.plan is not None else work.label_while_listing()
                progress.close()
                label_ended = time.time()
                lease.confirm()  # the output check and the manifest below describe this job's output: still ours?
                counts = _check_output(ray, job, plan, work.kept, work.outcome.counts, storage_options)
                scored_by: dict[str, int] | None = None
                if config.scoring.cascade_margin is not None:  # which pass labelled the rows: one more read of the footers
                    scored_by = {}
                    for part in _over_footers(ray, committed_methods, config.output, storage_options, set(job.output.committed())):
                        add_counts(scored_by, part)
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
                inputs=plan.images,
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
                ended_at=_now(),
                status="succeeded",
                rows_written=outcome.rows,
                shards_written=outcome.shards,
                seconds=round(summary.seconds, 3),
            )
            fault_point("finishing")
            try:
                lease.confirm()  # _SUCCESS, the manifest and removing _staging: never over another job's output
                job.output.finish(_manifest(job, plan, attempt, counts, sum(counts.values()), scored_by), lease.check)
            except LeaseError as error:
                raise RunFailed(str(error)) from error
        except Exception as error:
            _record_failure(job, attempt, lease, error)
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
        _init_ray(config)
        _begin(job)
        plan = job.plan if job.plan is not None else _plan(job, storage_options)
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
    )


# ---------------------------------------------------------------- cluster work


def _init_ray(config: JobConfig) -> Any:
    import ray

    verbose = logging.getLogger("pipeline").isEnabledFor(logging.DEBUG)
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # start-up notices, e.g. a first token's, go to Ray's logs
    if not ray.is_initialized():
        try:
            # Ray's own start-up and worker logs go to its session log files; --verbose brings them back here.
            ray.init(
                address=config.execution.address,
                ignore_reinit_error=True,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.ERROR,
            )
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as error:
            from pipeline.run.cluster_address import join_failure

            raise ConfigError(join_failure(config.execution.address, error, ADDRESS_PROBE_TIMEOUT_S)) from None
    import ray.data  # configures its loggers: the console handler is then there to quiet

    if not verbose:
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":  # Ray Data's notices stay in its session log file
                handler.setLevel(logging.ERROR)
        # A tuning hint Ray Data gives as a Python warning whenever a stage gets fewer blocks than its task
        # limit: true of every small job and of the commit stage by design, and nothing a user can act on.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # this job reports its own progress over the plan
    context.print_on_execution_start = verbose
    return ray


def _begin(job: PreparedJob) -> None:
    """Empty the output for --overwrite; withdraw `_SUCCESS` and what an earlier attempt left staged."""
    if job.mode in ("overwrite", "restart"):
        job.output.clear(keep_manifest=job.mode == "restart")  # a restart keeps the record of earlier attempts
    job.output.begin()


def _plan(job: PreparedJob, storage_options: dict[str, Any], **listing: Any) -> Plan:
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
        _now(),
        on_progress=report,
        manifests=job.manifests,
        **listing,
    )


class _Work:
    """The labelling of one attempt: a resumed plan's remaining shards, or a new plan's shards as they are listed."""

    def __init__(self, ray: Any, job: PreparedJob, storage_options: dict[str, Any], lease: Lease, run_id: str) -> None:
        self.ray, self.job, self.storage_options, self.lease, self.run_id = ray, job, storage_options, lease, run_id
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
        failed = _failed_rows(self.ray, job, committed, self.storage_options) if job.config.retry_failed else {}
        todo = [shard for shard in plan.shards if shard.id not in committed or shard.id in failed]
        self.kept = committed - set(failed)
        self.already = sum(shard.rows for shard in plan.shards if shard.id in self.kept)
        log.info("%d images in %d shards, %d shards to label", plan.images, len(plan.shards), len(todo))
        if failed:
            log.info("labelling again %d failed rows in %d committed shards", sum(failed.values()), len(failed))
        progress = Progress(plan.images, len(plan.shards), self.already, len(self.kept))
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
        schema = known_schema(job.specs, self.storage_options)
        head_start = listing_head_start_s() if schema is not None else math.inf
        started = time.time()
        feed = ShardFeed(lambda **listing: _plan(job, self.storage_options, schema=schema, **listing))
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
                progress.planned(plan.images, len(plan.shards))
                log.info("%d images in %d shards, %d shards to label", plan.images, len(plan.shards), len(window))
            assert schema is not None  # a window before the end of the listing has its schema from the start
            self._label(window, {}, schema, progress, feed)
        plan = feed.plan()
        progress.planned(plan.images, len(plan.shards))
        self.plan_seconds = plan.listing_seconds or time.time() - started
        return plan, progress

    def _label(self, todo: list[Shard], failed: Mapping[str, int], schema: Any, progress: Progress, feed: ShardFeed | None = None) -> None:
        self.labelling_started = True
        self.label_started = self.label_started or time.time()
        checks = [self.lease.check] + ([feed.check] if feed is not None else [])
        _label(
            self.ray, self.job, todo, failed, schema, self.storage_options, progress, checks, self.run_id, self.lease.owner, self.outcome
        )


@dataclass
class _Outcome:
    first_at: float  # when the first shard was committed
    rows: int = 0
    first_rows: int = 0
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def _label(
    ray: Any,
    job: PreparedJob,
    todo: list[Shard],
    failed: Mapping[str, int],
    listing_schema: Any,
    storage_options: dict[str, Any],
    progress: Progress,
    checks: list[Callable[[], None]],
    run_id: str,
    owner: str,
    outcome: _Outcome,
) -> None:
    """Label the `todo` shards into `outcome`; each is committed by a worker task once its staged pieces cover it.

    A shard in `failed` (committed, with that many failed rows) has only its failed rows labelled again.
    `checks` run before every staged batch is committed: each raises to stop the job (a lost lease, a failed
    listing). Pieces are staged under this run's id, and a commit publishes only while the lease names `owner`.
    """
    from pipeline.schema import output_schema

    execution = job.config.execution
    num_gpus = execution.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actors = execution.concurrency or (max(1, int(ray.cluster_resources().get("GPU", 0) // num_gpus)) if num_gpus else 1)
    model_config = job.config.model
    if model_config.device == "auto":
        model_config = replace(model_config, device="cuda" if num_gpus > 0 else "cpu")
    vectors_uri = embed_vocabulary_once(
        ray,
        output=job.config.output,
        model_config=model_config,
        scoring=job.config.scoring,
        vocabulary=job.vocabulary,
        storage_options=storage_options,
        num_gpus=num_gpus,
        num_cpus=execution.num_cpus_per_actor,
    )
    dataset = build_dataset(
        [{"shard": shard.id, "retry": shard.id in failed} for shard in todo],
        output=job.config.output,
        storage_options=storage_options,
        listing_schema=listing_schema,
        decode=job.decode,
        defer_jpegs=jpegs_on_device(job.decode.device, model_config.device),
        model_config=model_config,
        scoring=job.config.scoring,
        vocabulary=job.vocabulary,
        batch_size=execution.batch_size,
        decode_batch_size=execution.decode_batch_size,
        actors=actors,
        num_gpus=num_gpus,
        num_cpus_per_actor=execution.num_cpus_per_actor,
        run_id=run_id,
        vectors_uri=vectors_uri,
    )
    schema = output_schema(listing_schema)
    commit = ray.remote(num_cpus=COMMIT_TASK_CPUS, max_retries=3)(_commit_task)
    shard_rows = {shard.id: shard.rows for shard in todo}
    expected = {shard.id: failed.get(shard.id, shard.rows) for shard in todo}  # rows to stage before the commit
    staged: dict[str, int] = {}  # shards in flight only: dropped once committed
    commits: dict[Any, str] = {}

    def collect(timeout: float | None) -> None:
        ready, _ = ray.wait(list(commits), num_returns=len(commits) if timeout == 0 else 1, timeout=timeout)
        for ref in ready:
            shard_id = commits.pop(ref)
            counts = unwrap(ray, ref)
            if counts is None:
                continue  # not all pieces were there yet (a retried batch); the end of the stream tries again
            staged.pop(shard_id, None)
            expected.pop(shard_id, None)
            rows = sum(counts.values())
            if not outcome.first_at:
                outcome.first_at, outcome.first_rows = time.time(), rows
                fault_point("scoring")
            outcome.rows += rows
            outcome.shards += 1
            add_counts(outcome.counts, counts)
            progress.committed(counts)

    for pieces in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        fault_point("staged")
        for check in checks:  # before any commit: a driver that stalled past its lease commits nothing more
            check()
        for shard_id, rows in zip(pieces.column("shard").to_pylist(), pieces.column("rows").to_pylist()):
            if shard_id not in expected:
                continue  # a retried batch of a shard already committed: its rows are in the file
            staged[shard_id] = staged.get(shard_id, 0) + rows
            if staged[shard_id] >= expected[shard_id] and shard_id not in commits.values():
                commits[commit.remote(job.config.output, storage_options, shard_id, shard_rows[shard_id], schema, run_id, owner)] = shard_id
        if commits:
            collect(timeout=0)
    while commits:
        collect(timeout=None)
    for check in checks:  # the last commits write the output: only while the lease is still this job's
        check()
    for shard_id in list(expected):  # pieces that arrived after a commit found its shard incomplete
        commits[commit.remote(job.config.output, storage_options, shard_id, shard_rows[shard_id], schema, run_id, owner)] = shard_id
    while commits:
        collect(timeout=None)


def _commit_task(
    output: str, storage_options: dict[str, Any], shard_id: str, rows: int, schema: Any, run_id: str, owner: str
) -> dict[str, int] | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    return commit_shard(fs, root.rstrip("/"), shard_id, rows, schema, run_id, owner)


def _failed_rows(ray: Any, job: PreparedJob, committed: set[str], storage_options: dict[str, Any]) -> dict[str, int]:
    """Failed rows per committed shard that has some (--retry-failed), from the footers."""
    failed: dict[str, int] = {}
    for part in _over_footers(ray, failed_rows, job.config.output, storage_options, committed):
        failed.update(part)
    return failed


def _over_footers(ray: Any, reader: Any, output: str, storage_options: dict[str, Any], shard_ids: set[str]) -> list[dict[str, int]]:
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


# ---------------------------------------------------------------- bookkeeping


def _check_output(
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
    for part in _over_footers(ray, committed_counts, job.config.output, storage_options, earlier):
        add_counts(counts, part)
    return counts


def _attempt(job: PreparedJob, started_at: str) -> dict[str, Any]:
    previous = job.output.previous_manifest() or {}
    number = len(previous.get("attempts") or []) + 1
    return {"attempt": number, "run_id": uuid.uuid4().hex, "started_at": started_at, "ended_at": None, "status": "running"}


def _manifest(
    job: PreparedJob,
    plan: Plan | None,
    attempt: dict[str, Any],
    counts: Mapping[str, int],
    total_rows: int,
    scored_by: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    config = job.config
    previous = job.output.previous_manifest() or {}
    # We hold the lease: an earlier attempt still marked running died without finishing.
    attempts = [
        {**a, "status": "died"} if a.get("status") == "running" and a.get("run_id") != attempt["run_id"] else a
        for a in previous.get("attempts") or []
    ]
    attempts = [a for a in attempts if a.get("run_id") != attempt["run_id"]] + [dict(attempt)]
    return {
        "format": MANIFEST_FORMAT,
        "run_id": attempt["run_id"],
        "code_version": _code_version(),
        "started_at": attempts[0]["started_at"],
        "ended_at": attempt["ended_at"],
        "attempts": attempts,
        "inputs": list(config.inputs),
        "output": config.output,
        "model": job.model,
        "vocabulary": {
            "sha256": job.vocabulary.digest(),
            "classes": list(job.vocabulary.classes),
            "labels_file": config.vocabulary.labels,
            "templates_file": config.vocabulary.templates,
            "prompt": config.vocabulary.prompt,
        },
        "method": config.scoring.method,
        "scoring": config.scoring.to_dict(),
        **_cascade_record(config.scoring.cascade_margin, scored_by),
        "decode": asdict(job.decode),
        "execution": asdict(config.execution),
        "plan": _plan_record(plan),
        "counts": {
            "inputs": plan.images if plan else None,
            "rows": total_rows,
            "non_image_files_skipped": plan.skipped_count if plan else None,
            "non_image_examples": list(plan.skipped) if plan else [],
            **counts,
        },
    }


def _record_failure(job: PreparedJob, attempt: dict[str, Any], lease: Lease, error: Exception) -> None:
    """Mark this attempt `failed`, with its message, in `_manifest.json`, while the output is still this job's.

    Never raises: the error that ended the run is what the user must see.
    """
    try:
        lease.check()
        attempt.update(ended_at=_now(), status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        job.output.write_manifest(_manifest(job, job.plan, attempt, {}, 0))
    except Exception as unrecorded:  # a lost lease, or the store failing too
        log.warning("could not record the failed attempt in _manifest.json: %s", unrecorded)


def _cascade_record(margin: float | None, scored_by: Mapping[str, int] | None) -> dict[str, Any]:
    """The manifest's `cascade` entry: the threshold, ok rows per scoring pass and the share escalated to lgca."""
    if margin is None:
        return {}
    record: dict[str, Any] = {"margin": margin}
    if scored_by is not None:
        ok = sum(scored_by.values())
        record.update(rows_by_method=dict(scored_by), escalated_share=scored_by.get("lgca", 0) / ok if ok else None)
    return {"cascade": record}


def _died_while_listing(manifest: Mapping[str, Any]) -> bool:
    """Whether an output's last attempt (this version's) labelled while listing and died before its plan was complete.

    Its manifest, written when it started, then has no plan record and its attempt is still `running`: the
    manifest a finished listing leaves always names its plan.
    """
    attempts = manifest.get("attempts") or []
    return (
        manifest.get("format") == MANIFEST_FORMAT
        and manifest.get("plan") is None
        and bool(attempts)
        and attempts[-1].get("status") in ("running", "failed")  # died, or stopped by an error, before the plan was whole
    )


def _plan_record(plan: Plan | None) -> dict[str, Any] | None:
    if plan is None:
        return None  # not listed yet
    return {
        "shards": len(plan.shards),
        "images": plan.images,
        "created_at": plan.created_at,
        "listing_seconds": round(plan.listing_seconds, 3),
    }


def _model_record(config: JobConfig) -> dict[str, Any]:
    from pipeline.models.load import architecture_name, file_sha256, parse_weights_source
    from pipeline.models.preprocess import resolve_preprocessing

    model = config.model
    architecture = architecture_name(model.name)
    source = parse_weights_source(architecture, model.pretrained)
    record: dict[str, Any] = {"name": architecture, "pretrained": model.pretrained, "source": source.kind, "weights_sha256": None}
    # what the workers will use (they resolve it the same way); the driver warned already in check_model
    record["preprocess"] = resolve_preprocessing(architecture, source.kind, model, warn=False).to_dict()
    record["precision"] = model.precision
    if source.kind == "file":
        record["weights_sha256"] = file_sha256(Path(source.value))
    if source.kind == "random":
        record["random_seed"] = model.random_seed
    if model.name.endswith(".json") and Path(model.name).is_file():
        record["config_sha256"] = file_sha256(Path(model.name))  # the architecture is the file's content, not its name
    return record


def listing_head_start_s() -> float:
    """LISTING_HEAD_START_S, or the seconds `LGCA_LISTING_HEAD_START_S` gives (0: label from the first listed shard)."""
    text = os.environ.get(LISTING_HEAD_START_ENV, "").strip()
    if not text:
        return LISTING_HEAD_START_S
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ConfigError(f"{LISTING_HEAD_START_ENV}={text!r} is not a number of seconds") from None


def _refuse_output_inside_inputs(config: JobConfig, specs: list[InputSpec]) -> None:
    output = _normalised(config.output)
    for text, spec in zip(config.inputs, specs):
        root = _normalised(glob_root(spec.uri) if spec.kind == "glob" else text)  # a glob reads below its fixed part
        if output == root or output.startswith(root.rstrip("/") + "/"):
            raise OutputError(
                f"output {config.output} lies inside input {text}; the job would read its own output. Choose an --output outside the inputs"
            )


def _check_address(address: str | None) -> None:
    """Fail in seconds, before any cluster work, on an address ray.init would hang on or reject (see cluster_address)."""
    from pipeline.run.cluster_address import check_address

    check_address(address, ADDRESS_PROBE_TIMEOUT_S)


def _normalised(location: str) -> str:
    if "://" in location:
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def _code_version() -> str:
    from pipeline.run.submit import COMMIT_VARIABLE, working_tree_commit

    # Submitted jobs and the image run copies without .git: `lgca submit` and the image build name the commit.
    commit = os.environ.get(COMMIT_VARIABLE, "").strip() or working_tree_commit(Path(__file__).parent)
    return f"{__version__}+{commit}" if commit else __version__


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
