"""The `lgca eval` subcommand: argparse wiring, checks before the model loads, and the results JSON of `pipeline.evaluation`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.cli.args import (
    add_model_arguments,
    add_scoring_arguments,
    add_storage_arguments,
    add_vocabulary_arguments,
    model_config,
    scoring_config,
    storage_options,
    vocabulary_config,
)
from pipeline.config import METHODS, ConfigError, ExecutionConfig, ModelConfig

if TYPE_CHECKING:  # the evaluation imports torch, pyarrow and fsspec: loaded only when `lgca eval` runs
    from pipeline.evaluation.labelled import LabelledImages
    from pipeline.evaluation.sweep import Setting
    from pipeline.vocab import Vocabulary

EVAL_EPILOG = """\
examples:
  lgca eval --data pets/ --labels pets_cupl.json --pretrained /weights/ViT-B-32.safetensors --output pets.json
  lgca eval --data s3://bucket/cub/test/ --labels cub_cupl.json --methods clip,descriptors,wca,lgca --runs 20
  lgca eval --data imagenet_val.parquet --labels imagenet_cupl.json --limit 5000 --sweep steps=1,2,3 regions=1,2,4
  lgca eval --data photos/ --labels labels.txt --pretrained random --crops 8 --limit 50   # dry run of the harness

DATA is a class-per-folder tree (DATA/<class>/<image>, the ImageFolder layout; local or s3://) or a
.parquet/.csv manifest with `path` and `label` columns. Class names must equal those of --labels: data
classes missing from the vocabulary stop the run (exit 2) with their names; vocabulary classes without
images are named in a warning and still compete as distractors.

Every view of a batch is encoded once and scored for all --methods. clip, ensemble and descriptors are
deterministic and run once; wca and lgca run --runs times with seeds --seed, --seed+1, ... and report
mean and standard deviation. acc5 is top-k accuracy with k = min(5, classes). Accuracies are printed in
percent and written as fractions (CLIP_benchmark's keys). See docs/EVALUATION.md.
"""

WARNING = "lgca: warning:"


def add_eval_command(subparsers: Any) -> None:
    """Register `eval` on the `lgca` subparsers.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers`.
    """
    # cli imports this module to register it, so its argument groups are imported here, when called

    parser = subparsers.add_parser(
        "eval",
        help="measure the accuracy of clip, ensemble, descriptors, wca and lgca on labelled images (no Ray)",
        description="Score labelled images with each method and report acc1, acc5 and mean per-class recall.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--data",
        required=True,
        help="class-per-folder tree (DATA/<class>/<image>) or a .parquet/.csv manifest with path and label columns; local or s3://",
    )
    group.add_argument(
        "--methods",
        type=_comma_list,
        default=None,
        help=f"comma-separated methods to compare (default: {','.join(METHODS)}); --method M is the same as --methods M",
    )
    group.add_argument(
        "--runs",
        type=int,
        default=1,
        help="R, seeds per crop method (wca, lgca): mean and std over seed, seed+1, ... (default: %(default)s)",
    )
    group.add_argument("--output", default=None, help="write the results as JSON to this file (local or s3://)")
    group.add_argument("--dataset", default=None, help="dataset name in the results (default: the last part of --data)")
    group.add_argument("--limit", type=int, default=None, help="evaluate at most N images, taken round-robin over the classes")
    group.add_argument("--batch-size", type=int, default=ExecutionConfig.batch_size, help="images per scoring call (default: %(default)s)")
    group.add_argument("--workers", type=int, default=8, help="threads reading and decoding images (default: %(default)s)")
    group.add_argument(
        "--sweep",
        nargs="+",
        default=None,
        metavar="FIELD=V1,V2",
        help="evaluate every combination of these scoring parameter values, e.g. steps=1,2,3 regions=1,2,4 "
        "saliency=class,global (crop_scale values as ALPHA:BETA); other parameters come from the options",
    )
    group.add_argument(
        "--confusions", type=int, default=10, help="most confused (true, predicted) pairs shown per method (default: %(default)s)"
    )
    group.add_argument(
        "--baseline",
        default=None,
        metavar="METHOD",
        help="paired differences of acc1 (with 95%% intervals) are taken against this method (default: clip when it "
        "is evaluated, else the first method)",
    )
    group.add_argument(
        "--cascade",
        type=_thresholds,
        default=(),
        metavar="T1,T2,...",
        help="also evaluate the confidence cascade at these margin thresholds (needs lgca): the same views, an image "
        "kept at its global-view result where that margin is at least T; prints accuracy against encoder passes",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_storage_arguments(group)
    add_vocabulary_arguments(parser)
    add_model_arguments(parser)
    add_scoring_arguments(parser)
    # --method comes with the scoring group; here it is a one-method --methods (None: not given)
    parser.set_defaults(handler=_eval, method=None)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.1,0.2,0.3") from None


def _eval(args: argparse.Namespace) -> int:
    plan = _plan(args)  # everything checkable without a model, checked first
    from pipeline.evaluation.records import TASK, result_records
    from pipeline.evaluation.runner import ImageModel, evaluate
    from pipeline.evaluation.tables import format_report
    from pipeline.models.load import default_cache_dir, load_model
    from pipeline.models.text_vectors import text_vectors

    loaded = load_model(plan.model, plan.storage_options)
    cache_dir = default_cache_dir(plan.model)
    view = loaded.view
    evaluation = evaluate(
        plan.images,
        plan.vocabulary.classes,
        lambda method, scoring: text_vectors(loaded, plan.vocabulary, dataclasses.replace(scoring, method=method), cache_dir),
        ImageModel(loaded.encode_image, loaded.logit_scale, view, loaded.device),
        plan.methods,
        plan.settings,
        runs=args.runs,
        batch_size=args.batch_size,
        storage_options=plan.storage_options,
        workers=args.workers,
        confusions=args.confusions,
        progress=not args.no_progress,
        cascade=plan.cascade,
    )
    identity = {
        "dataset": args.dataset or _dataset_name(args.data),
        "model": loaded.identity["model"],
        "pretrained": loaded.identity["pretrained"],
    }
    records = result_records(evaluation, identity, plan.baseline)
    random_weights = loaded.identity["pretrained"].startswith("random")
    print(format_report(evaluation, records, identity, plan.listed, random_weights, sweep=bool(args.sweep)), flush=True)
    if args.output:
        document = {
            **identity,
            "task": TASK,
            "data": args.data,
            "labels": args.labels,
            "images": len(plan.images),
            "images_listed": plan.listed,
            "scored": evaluation.scored,
            "classes": len(evaluation.classes),
            "acc5_k": evaluation.k,
            "classes_without_images": list(plan.unused),
            "failures": [dataclasses.asdict(f) for f in evaluation.failures],
            "encoder_views": evaluation.encoder_rows,
            "results": records,
            "skipped_settings": [{"setting": _jsonable(c), "reason": r} for c, r in plan.skipped],
        }
        _write_json(args.output, document, plan.storage_options)
        print(f"results: {args.output}", flush=True)
    return 0


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What an evaluation will run, checked before any model is loaded."""

    methods: tuple[str, ...]
    settings: list[Setting]
    skipped: list[tuple[dict[str, Any], str]]  # sweep settings ScoringConfig rejects, with the reason
    images: LabelledImages  # after --limit
    listed: int  # images in the data before --limit
    unused: tuple[str, ...]  # vocabulary classes without images
    vocabulary: Vocabulary
    model: ModelConfig
    storage_options: dict[str, Any]
    baseline: str  # paired differences are taken against this method
    cascade: tuple[float, ...]  # cascade thresholds to evaluate


def _plan(args: argparse.Namespace) -> _Plan:
    """Validate options, sweep, data and vocabulary; print the warnings. Raises ConfigError subclasses."""
    from pipeline.evaluation.errors import EvaluationError
    from pipeline.evaluation.labelled import check_classes, limit_images, list_labelled, require_scorable, unused_classes_warning
    from pipeline.evaluation.runner import check_cascade, embedding_method
    from pipeline.evaluation.sweep import Setting, describe_changes, parse_sweep, sweep_settings
    from pipeline.vocab import load_vocabulary

    methods = _requested_methods(args)
    for name in ("runs", "batch_size", "workers", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.confusions < 0:
        raise EvaluationError(f"--confusions must be >= 0, got {args.confusions}")
    options = storage_options(args)
    if args.output:
        _prepare_output(args.output)
    model = model_config(args)
    # --cascade-margin names one threshold of --cascade: the views of every method serve the cascade too
    cascade = check_cascade(methods, (*args.cascade, *((args.cascade_margin,) if args.cascade_margin is not None else ())))
    if args.baseline is not None and args.baseline not in methods:
        raise EvaluationError(f"--baseline {args.baseline} is not among the evaluated methods {', '.join(methods)}; add it to --methods")
    baseline = args.baseline or ("clip" if "clip" in methods else methods[0])
    scoring_args = {**vars(args), "method": embedding_method(methods), "cascade_margin": None}
    base = scoring_config(argparse.Namespace(**scoring_args), keep_method=True)
    skipped: list[tuple[dict[str, Any], str]] = []
    if args.sweep:
        settings, skipped = sweep_settings(base, parse_sweep(args.sweep, methods))
    else:
        settings = [Setting({}, base)]

    images = list_labelled(args.data, options)
    vocabulary = load_vocabulary(vocabulary_config(args), options)
    check = check_classes(images.classes, vocabulary.classes)
    require_scorable(check, vocabulary.classes)
    warnings = [unused_classes_warning(check)]
    if images.skipped_count:
        warnings.append(f"{images.skipped_count} non-image file(s) under {args.data} were skipped (e.g. {', '.join(images.skipped[:3])})")
    warnings.extend(f"sweep setting {describe_changes(changes)} skipped: {reason}" for changes, reason in skipped)
    if args.runs > 1 and any(s.scoring.crop_layout == "grid" for s in settings):
        warnings.append(f"the grid layout has no randomness: grid settings run once, not {args.runs} times")
    for line in filter(None, warnings):
        print(f"{WARNING} {line}", file=sys.stderr)
    return _Plan(
        methods=methods,
        settings=settings,
        skipped=skipped,
        images=limit_images(images, args.limit),
        listed=len(images),
        unused=check.unused,
        vocabulary=vocabulary,
        model=model,
        storage_options=options,
        baseline=baseline,
        cascade=cascade,
    )


def _requested_methods(args: argparse.Namespace) -> tuple[str, ...]:
    from pipeline.evaluation.errors import EvaluationError
    from pipeline.evaluation.runner import check_methods

    if args.method is not None and args.methods is not None:
        raise EvaluationError("give --methods or --method, not both")
    if args.methods is not None:
        return check_methods(args.methods)
    return check_methods([args.method] if args.method is not None else list(METHODS))


def _dataset_name(data: str) -> str:
    name = data.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".parquet", ".csv.gz", ".csv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _jsonable(changes: Mapping[str, Any]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value for name, value in changes.items()}


def _prepare_output(output: str) -> None:
    """Create a local output's folder now, so a bad path fails before the evaluation, not after it."""
    import fsspec

    if fsspec.core.split_protocol(output)[0] not in (None, "file", "local"):
        return
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(fsspec.core.split_protocol(output)[1])))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the folder of --output {output}: {error}") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--output {output}: folder {folder} is not writable")


def _write_json(output: str, document: Mapping[str, Any], storage_options: Mapping[str, Any]) -> None:
    from pipeline.stages.storage import filesystem_for

    fs, path = filesystem_for(output, storage_options)
    with fs.open(path, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
