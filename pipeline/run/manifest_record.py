"""`_manifest.json`: what a job records of itself, attempt by attempt (the model, the vocabulary, the plan, counts)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.run.prepare import MANIFEST_FORMAT, PreparedJob
from pipeline.schema import EMBEDDING_COLUMN
from pipeline.stages.lease import Lease
from pipeline.stages.plan import Plan

log = logging.getLogger(__name__)


def new_attempt(job: PreparedJob, started_at: str) -> dict[str, Any]:
    previous = job.output.previous_manifest() or {}
    number = len(previous.get("attempts") or []) + 1
    return {"attempt": number, "run_id": uuid.uuid4().hex, "started_at": started_at, "ended_at": None, "status": "running"}


def manifest_record(
    job: PreparedJob,
    plan: Plan | None,
    attempt: dict[str, Any],
    counts: Mapping[str, int],
    total_rows: int,
    scored_by: Mapping[str, int] | None = None,
    archive_members: Mapping[str, int] | None = None,
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
        "code_version": code_version(),
        "started_at": attempts[0]["started_at"],
        "ended_at": attempt["ended_at"],
        "attempts": attempts,
        "inputs": list(config.inputs),
        "output": config.output,
        "model": job.model.record,
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
        **_embeddings_record(job),
        "decode": asdict(job.decode),
        "execution": asdict(config.execution),
        "plan": _plan_record(plan),
        "counts": {
            "inputs": (plan.images if not plan.uncounted else total_rows or None) if plan else None,  # tars: once read
            "rows": total_rows,
            "non_image_files_skipped": plan.skipped_count if plan else None,
            "non_image_examples": list(plan.skipped) if plan else [],
            **({"archive_members": dict(archive_members)} if archive_members is not None else {}),
            **counts,
        },
    }


def record_failure(job: PreparedJob, attempt: dict[str, Any], lease: Lease, error: Exception) -> None:
    """Mark this attempt `failed`, with its message, in `_manifest.json`, while the output is still this job's.

    Never raises: the error that ended the run is what the user must see.
    """
    try:
        lease.check()
        attempt.update(ended_at=now(), status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        job.output.write_manifest(manifest_record(job, job.plan, attempt, {}, 0))
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


def _embeddings_record(job: PreparedJob) -> dict[str, Any]:
    """The manifest's `embeddings` entry (with --embeddings): the column, its shape and type, and whose space it is."""
    if not job.config.embeddings:
        return {}
    model = job.model.record
    return {
        "embeddings": {
            "column": EMBEDDING_COLUMN,
            "dim": job.model.embed_dim,
            "dtype": "float16",
            "normalised": True,
            "view": "global",  # the whole image, as the model's preprocessing sees it
            "model": {key: model.get(key) for key in ("name", "pretrained", "weights_sha256", "config_sha256") if model.get(key)},
        }
    }


def _plan_record(plan: Plan | None) -> dict[str, Any] | None:
    if plan is None:
        return None  # not listed yet
    return {
        "shards": len(plan.shards),
        "images": plan.images,
        "created_at": plan.created_at,
        "listing_seconds": round(plan.listing_seconds, 3),
    }


def code_version() -> str:
    from pipeline.run.submit import COMMIT_VARIABLE, working_tree_commit

    # Submitted jobs and the image run copies without .git: `lgca submit` and the image build name the commit.
    commit = os.environ.get(COMMIT_VARIABLE, "").strip() or working_tree_commit(Path(__file__).parent)
    return f"{__version__}+{commit}" if commit else __version__


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
