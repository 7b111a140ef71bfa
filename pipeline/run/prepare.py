"""Before any cluster work: the whole configuration checked, the model resolved once, the output opened.

Everything here fails fast with a message naming the fix, and starts nothing: no Ray, no listing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import DecodeConfig, JobConfig
from pipeline.models.spec import ModelSpec, resolve_model
from pipeline.run.ray_start import ADDRESS_PROBE_TIMEOUT_S
from pipeline.stages.decode import decode_for_views
from pipeline.stages.manifests import ManifestHeader, read_manifest_header
from pipeline.stages.plan import Plan, PlanError, changed_manifests, check_resumable, fingerprint, read_plan
from pipeline.stages.sink import Output, OutputError
from pipeline.stages.sources import InputSpec, check_inputs, glob_root, parse_input
from pipeline.stages.storage import filesystem_for
from pipeline.stages.webdataset import looks_like_img2dataset
from pipeline.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "lgca-label/2"  # _manifest.json of outputs made of shards and a plan


@dataclass(frozen=True)
class PreparedJob:
    """Everything checked before any cluster work."""

    config: JobConfig
    vocabulary: Vocabulary
    specs: list[InputSpec]
    output: Output
    mode: str  # new | resume | overwrite | restart (a resume whose listing never ended: labelled again)
    decode: DecodeConfig
    model: ModelSpec  # resolved once: what the actors load, and (its record) what the manifest says
    fingerprint: dict[str, Any]
    plan: Plan | None  # a resumed output's plan, already checked against this configuration
    manifests: dict[str, ManifestHeader] = field(default_factory=dict)  # manifest URI -> its header and version, read once


def prepare(config: JobConfig, storage_options: Mapping[str, Any]) -> PreparedJob:
    """Validate the whole configuration and the output; fails fast, starts no cluster, lists nothing.

    Raises:
        ConfigError: with a message naming the fix (bad labels, model, inputs or output; a resume whose
            configuration differs from its plan's).
    """
    from pipeline.models.load import resolve_device  # torch: kept out of the decode workers' imports

    if "://" not in config.output:  # every worker, whatever its working directory, writes to the same place
        config = replace(config, output=os.path.abspath(os.path.expanduser(config.output)))

    vocabulary = load_vocabulary(config.vocabulary, storage_options)
    model = resolve_model(config.model)
    if config.execution.address is None:  # a local cluster: its workers have this machine's devices
        resolve_device(config.model.device)
    specs = [parse_input(text) for text in expand_inputs(config.inputs)]
    check_inputs(specs, storage_options, config.decode.allowed_schemes)  # before any other request: errors name the fix
    specs = [_as_img2dataset_output(spec, storage_options) for spec in specs]
    manifests: dict[str, ManifestHeader] = {}
    for spec in specs:
        if spec.kind == "manifest":
            manifests[spec.uri] = read_manifest_header(spec, storage_options, config.image_column)
    # a Parquet file whose rows hold the images is listed by row ranges (`stages.image_bytes`), not path by path
    specs = [
        replace(spec, kind="image_bytes", image_column=config.image_column)
        if spec.uri in manifests and manifests[spec.uri].image_column
        else spec
        for spec in specs
    ]
    _refuse_output_inside_inputs(config, specs)
    check_address_fast(config.execution.address)
    mode = "resume" if config.resume else "overwrite" if config.overwrite else "new"
    output = Output.open(config.output, storage_options, mode)
    asked = fingerprint(
        config.inputs,
        vocabulary.digest(),
        config.scoring.to_dict(),
        model.record,
        config.decode.max_pixels,
        config.execution.rows_per_file,
        config.embeddings,
    )
    plan = None
    if mode == "resume":
        plan = read_plan(output.fs, output.root, f"the plan of {config.output}")
        if plan is not None:
            check_resumable(plan, asked, config.output)
            changed = changed_manifests(plan, {uri: header.version for uri, header in manifests.items()})
            if changed:
                log.warning(
                    "manifest %s changed since the plan was made (%s): --resume labels the images the plan lists, not rows "
                    "added since; label new rows with a new job (another --output), or start over with --overwrite",
                    ", ".join(changed),
                    plan.created_at,
                )
        elif output.committed():
            if not died_while_listing(output.previous_manifest() or {}):
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
    decode = decode_for_views(model.image_size, [config.scoring], config.decode)
    return PreparedJob(config, vocabulary, specs, output, mode, decode, model, asked, plan, manifests)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """INPUT arguments with brace ranges expanded (`s3://b/laion/{00000..09999}.tar` is 10^4 tars), as WebDataset does."""
    from braceexpand import braceexpand

    return [each for text in inputs for each in (braceexpand(text) if "{" in text else [text])]


def _as_img2dataset_output(spec: InputSpec, storage_options: Mapping[str, Any]) -> InputSpec:
    """A folder that is img2dataset's webdataset output (its `00000.tar` is there) is read as WebDataset tars."""
    if spec.kind != "directory":
        return spec
    fs, path = filesystem_for(spec.uri, storage_options)
    return replace(spec, kind="webdataset") if looks_like_img2dataset(fs, path) else spec


def _refuse_output_inside_inputs(config: JobConfig, specs: list[InputSpec]) -> None:
    output = _normalised(config.output)
    for spec in specs:
        pattern = any(c in spec.uri for c in "*?[") and spec.kind in ("glob", "webdataset")
        root = _normalised(glob_root(spec.uri) if pattern else spec.uri)  # a glob reads below its fixed part
        if output == root or output.startswith(root.rstrip("/") + "/"):
            raise OutputError(
                f"output {config.output} lies inside input {spec.uri}; the job would read its own output. Choose an --output outside the inputs"
            )


def check_address_fast(address: str | None) -> None:
    """Fail in seconds, before any cluster work, on an address ray.init would hang on or reject (see cluster_address)."""
    from pipeline.run.cluster_address import check_address

    check_address(address, ADDRESS_PROBE_TIMEOUT_S)


def _normalised(location: str) -> str:
    if "://" in location:
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def died_while_listing(manifest: Mapping[str, Any]) -> bool:
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
