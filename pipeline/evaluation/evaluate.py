"""Accuracy of the scoring methods on labelled images: labelled data, metrics, sweeps, and the in-process scoring loop.

No Ray: images are read with `sources.read_bytes`, decoded with `decode.decode_image` and scored with one
`score.Scorer` per setting and seed. The encoders and class vectors are injected, so tests can evaluate with
analytic encoders. Each view of a batch is encoded once and combined for every method (docs/METHOD.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import posixpath
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.config import CROP_LAYOUTS, CROP_METHODS, METHODS, SALIENCY_RULES, ConfigError, DecodeConfig, ScoringConfig
from pipeline.schema import DECODE_ERROR, READ_ERROR
from pipeline.scoring.score import ImageEncoder, ImageScore, Scorer, ViewFormat, ViewSet
from pipeline.stages.decode import DecodedImage, decode_image, short_side_for
from pipeline.stages.sources import check_inputs, filesystem_for, list_inputs, parse_input, read_bytes

TOP_K = 5  # acc5 is top-k accuracy with k = min(TOP_K, classes), as in CLIP_benchmark
NAMES_SHOWN = 20  # class names or keys listed in one message
TASK = "zeroshot_classification"  # CLIP_benchmark's task name
_LOCAL_PROTOCOLS = (None, "file", "local")

# The scoring parameters each method depends on; they go into its result record, and a sweep may only
# vary parameters of a requested method. `topk` and `micro_batch` change no prediction.
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "clip": (),
    "ensemble": (),
    "descriptors": ("text_scale",),
    "wca": ("text_scale", "crops", "crop_scale", "crop_layout", "image_scale", "global_weight", "seed"),
    "lgca": (
        "text_scale",
        "crops",
        "crop_scale",
        "crop_layout",
        "image_scale",
        "global_weight",
        "expand_weight",
        "seed",
        "saliency",
        "steps",
        "regions",
        "growth",
        "growth_target",
        "overlap_iou",
    ),
}
_CHOICES = {"saliency": SALIENCY_RULES, "crop_layout": CROP_LAYOUTS}
# A sweep value is checked alone on a configuration where only the field's own rules can fail: no regions
# to outnumber the crops, and a square number of crops for the grid layout. Combinations are checked later.
_PROBE = ScoringConfig(method="lgca", crops=10_000, regions=0)


class EvaluationError(ConfigError):
    """Labelled data or evaluation settings are unusable; the message names the offending item and the fix."""


# ---------------------------------------------------------------- labelled data


@dataclass(frozen=True)
class LabelledImages:
    """Images with their true class names, sorted by key."""

    keys: tuple[str, ...]
    paths: tuple[str, ...]  # full URIs; plain absolute paths locally
    labels: tuple[str, ...]  # true class name of each image
    skipped: tuple[str, ...] = ()  # the first few non-image files seen in a folder tree
    skipped_count: int = 0  # all of them
    groups: tuple[str, ...] = ()  # a manifest's `group` of each image (e.g. an object scale); empty without one

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.paths) == len(self.labels):
            raise ValueError(f"{len(self.keys)} keys, {len(self.paths)} paths and {len(self.labels)} labels")
        if self.groups and len(self.groups) != len(self.keys):
            raise ValueError(f"{len(self.groups)} groups for {len(self.keys)} images")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes that have images, sorted."""
        return tuple(sorted(set(self.labels)))


def list_labelled(data: str, storage_options: Mapping[str, Any]) -> LabelledImages:
    """List labelled images: a class-per-folder tree or a manifest with `path` and `label` columns.

    A tree is the ImageFolder layout, DATA/<class>/<image> (deeper folders belong to their top class),
    on local disk or s3://. A manifest is a .parquet, .csv or .csv.gz file; relative paths are taken
    from the manifest's folder, an optional `key` column names the images (default: the path), and an
    optional `group` column splits the metrics (accuracy per object scale, camera, source, ...).

    Args:
        data: the folder or manifest, local or a URI.
        storage_options: fsspec options for remote data.

    Returns:
        The images, sorted by key.

    Raises:
        EvaluationError: `data` is neither a folder nor a manifest; a tree holds images outside class
            folders; a manifest lacks `path` or `label`, has empty or non-text values, or repeats a key.
        SourceError: the folder is missing, unreadable or holds no images.
    """
    spec = parse_input(data)
    if spec.kind == "manifest":
        return _labelled_manifest(spec.uri, storage_options)
    if spec.kind != "directory":
        raise EvaluationError(
            f"--data {data} is a {spec.kind}; pass a class-per-folder directory (DATA/<class>/<image>) "
            "or a .parquet/.csv manifest with path and label columns"
        )
    check_inputs([spec], storage_options)
    listing = list_inputs([spec], storage_options)
    keys = listing.table.column("key").to_pylist()
    loose = [key for key in keys if "/" not in key]
    if loose:
        raise EvaluationError(
            f"{data} holds {len(loose)} image(s) outside class folders ({_shown(loose)}); "
            f"put every image in {data.rstrip('/')}/<class>/ or list them in a manifest with a label column"
        )
    return LabelledImages(
        keys=tuple(keys),
        paths=tuple(listing.table.column("path").to_pylist()),
        labels=tuple(key.split("/", 1)[0] for key in keys),
        skipped=tuple(listing.skipped),
        skipped_count=listing.skipped_count,
    )


def limit_images(images: LabelledImages, limit: int | None) -> LabelledImages:
    """At most `limit` images, taken round-robin over the classes in key order so every class is represented.

    Raises:
        EvaluationError: `limit` < 1.
    """
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {limit}")
    if limit is None or limit >= len(images):
        return images
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(images.labels):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[name] for name in sorted(by_class)]
    rounds = itertools.chain.from_iterable(itertools.zip_longest(*queues))
    chosen = sorted(itertools.islice((index for index in rounds if index is not None), limit))
    return LabelledImages(
        keys=tuple(images.keys[i] for i in chosen),
        paths=tuple(images.paths[i] for i in chosen),
        labels=tuple(images.labels[i] for i in chosen),
        skipped=images.skipped,
        skipped_count=images.skipped_count,
        groups=tuple(images.groups[i] for i in chosen) if images.groups else (),
    )


@dataclass(frozen=True)
class ClassCheck:
    """How the classes of the data and of the vocabulary differ."""

    absent: tuple[str, ...]  # data classes the vocabulary lacks: their images cannot be scored
    unused: tuple[str, ...]  # vocabulary classes without images: they still compete as distractors


def check_classes(data_classes: Sequence[str], vocabulary_classes: Sequence[str]) -> ClassCheck:
    """Compare class names exactly (case and spaces count), keeping each side's order."""
    known, present = set(vocabulary_classes), set(data_classes)
    return ClassCheck(
        absent=tuple(name for name in data_classes if name not in known),
        unused=tuple(name for name in vocabulary_classes if name not in present),
    )


def require_scorable(check: ClassCheck, vocabulary_classes: Sequence[str]) -> None:
    """Raise if any data class is missing from the vocabulary, naming them (with close matches as hints).

    Raises:
        EvaluationError: some data classes are absent from the vocabulary.
    """
    if not check.absent:
        return
    hints = []
    for name in check.absent[:5]:
        close = difflib.get_close_matches(name, list(vocabulary_classes), n=1, cutoff=0.6)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}?")
    hint = f" Close vocabulary names: {', '.join(hints)}." if hints else ""
    raise EvaluationError(
        f"{len(check.absent)} class(es) of the data are not in the vocabulary, so their images cannot be scored: "
        f"{_shown(check.absent)}.{hint} Class folder names (or manifest labels) must equal the class names of "
        "--labels exactly; rename them, add the classes to the labels file, or use a manifest (docs/EVALUATION.md)"
    )


def unused_classes_warning(check: ClassCheck) -> str | None:
    """The warning line for vocabulary classes without images, or None."""
    if not check.unused:
        return None
    return f"{len(check.unused)} vocabulary class(es) have no images; they still compete as distractors: {_shown(check.unused)}"


def _shown(names: Sequence[str]) -> str:
    more = f", ... and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def _labelled_manifest(uri: str, storage_options: Mapping[str, Any]) -> LabelledImages:
    fs, path = filesystem_for(uri, storage_options)
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
        else:
            # "001" or "7" stay text: a class may be named by a number
            text = {name: pa.string() for name in ("path", "label", "key", "group")}
            with fs.open(path, "rb", compression="infer") as handle:
                table = pa_csv.read_csv(handle, convert_options=pa_csv.ConvertOptions(column_types=text))
    except FileNotFoundError:
        raise EvaluationError(f"manifest {uri} does not exist; check the path") from None
    except (pa.ArrowInvalid, EOFError, UnicodeDecodeError) as error:
        raise EvaluationError(f"manifest {uri} could not be read ({error}); write it as Parquet or UTF-8 CSV with a header") from None
    missing = [name for name in ("path", "label") if name not in table.column_names]
    if missing:
        raise EvaluationError(
            f"manifest {uri} lacks column(s) {', '.join(missing)} (found: {', '.join(table.column_names) or 'none'}); "
            "an evaluation manifest has one row per image with its path and its class name in label"
        )
    if table.num_rows == 0:
        raise EvaluationError(f"manifest {uri} has no rows")
    raw_paths = _text_column(table, "path", uri)
    labels = [label.strip() for label in _text_column(table, "label", uri)]
    keys = _text_column(table, "key", uri) if "key" in table.column_names else raw_paths
    groups = _text_column(table, "group", uri) if "group" in table.column_names else []
    local = fsspec.core.split_protocol(uri)[0] in _LOCAL_PROTOCOLS
    folder = os.path.dirname(path) if local else posixpath.dirname(path)
    paths = [_resolve(raw, fs, folder, local) for raw in raw_paths]
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if repeated:
        raise EvaluationError(f"manifest {uri} repeats key(s) {_shown(repeated)}; give each image one row")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return LabelledImages(
        keys=tuple(keys[i] for i in order),
        paths=tuple(paths[i] for i in order),
        labels=tuple(labels[i] for i in order),
        groups=tuple(groups[i] for i in order) if groups else (),
    )


def _text_column(table: pa.Table, name: str, uri: str) -> list[str]:
    column = table.column(name)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        what = "class names as text (the names of --labels), not indices" if name == "label" else "text"
        raise EvaluationError(f"manifest {uri}: column {name!r} holds {column.type}; write {what}")
    values = column.cast(pa.string()).to_pylist()
    empty = [row for row, value in enumerate(values) if value is None or not value.strip()]
    if empty:
        raise EvaluationError(f"manifest {uri}: column {name!r} is empty in rows {empty[:5]} (0-based); fill or remove them")
    return values


def _resolve(raw: str, fs: fsspec.AbstractFileSystem, folder: str, local: bool) -> str:
    """A manifest path as a full path or URI: absolute ones as written, relative ones from the manifest's folder."""
    protocol, rest = fsspec.core.split_protocol(raw)
    if protocol is not None:
        return rest if protocol in _LOCAL_PROTOCOLS else raw
    if local:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(raw)))
    return fs.unstrip_protocol(posixpath.normpath(posixpath.join(folder, raw)).lstrip("/"))


# ---------------------------------------------------------------- metrics


def topk_hits(probabilities: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Whether each image's true class is among its `k` best-scored classes.

    Args:
        probabilities: (n, C) class scores (any monotone score works).
        targets: (n,) true class indices.
        k: how many ranks count; ties are broken by class order, as in `ImageScore.topk_labels`.

    Returns:
        (n,) bool.
    """
    if probabilities.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (n, k)
    return (ranked == np.asarray(targets)[:, None]).any(axis=1)


def topk_accuracy(probabilities: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of images whose true class is among their `k` best (NaN for no images)."""
    hits = topk_hits(probabilities, targets, k)
    return float(hits.mean()) if hits.size else math.nan


def mean_per_class_recall(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes that have images of the share of their images predicted as them.

    Classes without images are left out (as in scikit-learn's balanced accuracy, which CLIP_benchmark
    reports under this name); NaN for no images.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if targets.size == 0:
        return math.nan
    recalls = [float(np.mean(predictions[targets == c] == c)) for c in np.unique(targets)]
    return float(np.mean(recalls))


def confused_pairs(predictions: np.ndarray, targets: np.ndarray, classes: Sequence[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) class pairs among wrong predictions, with their counts.

    Ordered by count, then by true and predicted class name.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    wrong = predictions != targets
    counts = Counter(zip(targets[wrong].tolist(), predictions[wrong].tolist()))
    pairs = [(classes[t], classes[p], n) for (t, p), n in counts.items()]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:top]


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, ddof=0) of per-run values."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


# ---------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Setting:
    """One point of a parameter sweep: the swept values, and the configuration they give."""

    changes: Mapping[str, Any]  # swept field -> value; empty without a sweep
    scoring: ScoringConfig


def parse_sweep(items: Sequence[str], methods: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """Parse `FIELD=V1,V2,...` items into values per ScoringConfig field.

    Values take the field's type; `crop_scale` values are written `ALPHA:BETA`.

    Args:
        items: e.g. ["steps=1,2,3", "saliency=class,global"].
        methods: the requested methods; a field must change at least one of them.

    Raises:
        EvaluationError: a malformed item, an unknown or repeated field, a field none of `methods` uses,
            a value of the wrong type, outside the field's choices or invalid whatever the other
            parameters (e.g. steps=-1), each named.
    """
    fields = {f.name: f for f in dataclasses.fields(ScoringConfig)}
    used = {name for method in methods for name in METHOD_PARAMETERS[method]}
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not raw.strip():
            raise EvaluationError(f"--sweep item {item!r} is not FIELD=V1,V2,...; write e.g. steps=1,2,3")
        if name == "method":
            raise EvaluationError("--sweep cannot vary method; list methods with --methods")
        if name not in fields:
            sweepable = sorted(set(fields) - {"method"})
            raise EvaluationError(f"--sweep field {name!r} is not a scoring parameter; choose from {', '.join(sweepable)}")
        if name in grid:
            raise EvaluationError(f"--sweep lists {name} twice; give all its values in one item, e.g. {name}=1,2")
        if name not in used:
            users = [m for m, names in METHOD_PARAMETERS.items() if name in names]
            needs = f"it changes only {', '.join(users)}" if users else "it changes no prediction"
            raise EvaluationError(f"--sweep field {name} changes none of the methods {', '.join(methods)}: {needs}")
        values = tuple(_sweep_value(name, text.strip(), fields[name].default) for text in raw.split(","))
        if len(set(values)) != len(values):
            raise EvaluationError(f"--sweep {name} repeats a value: {raw}")
        grid[name] = values
    if not grid:
        raise EvaluationError("--sweep needs at least one FIELD=V1,V2,... item")
    return grid


def sweep_settings(base: ScoringConfig, grid: Mapping[str, Sequence[Any]]) -> tuple[list[Setting], list[tuple[dict[str, Any], str]]]:
    """The cartesian product of `grid` over `base`, split into valid settings and skipped ones with the reason.

    A combination ScoringConfig rejects (e.g. more regions than crops) is skipped, not an error.

    Raises:
        EvaluationError: no combination is valid.
    """
    names = list(grid)
    settings: list[Setting] = []
    skipped: list[tuple[dict[str, Any], str]] = []
    for values in itertools.product(*(grid[name] for name in names)):
        changes = dict(zip(names, values))
        try:
            settings.append(Setting(changes, dataclasses.replace(base, **changes)))
        except ConfigError as error:
            skipped.append((changes, str(error)))
    if not settings:
        raise EvaluationError(f"no setting of the sweep is valid; e.g. {describe_changes(skipped[0][0])}: {skipped[0][1]}")
    return settings, skipped


def describe_changes(changes: Mapping[str, Any]) -> str:
    """`steps=2 saliency=global`, as a sweep item would write them."""
    return " ".join(f"{name}={_written(value)}" for name, value in changes.items())


def _sweep_value(name: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            alpha, sep, beta = text.partition(":")
            if not sep:
                raise ValueError
            value: Any = (float(alpha), float(beta))
        elif isinstance(default, bool):
            raise ValueError
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        elif default is None:  # the optional numbers (global_weight, growth_target); "none" is the method default
            value = None if text.lower() == "none" else float(text)
        else:
            value = text
    except ValueError:
        if isinstance(default, tuple):
            example = "ALPHA:BETA such as 0.4:0.8"
        else:
            example = "a number or none" if default is None else type(default).__name__
        raise EvaluationError(f"--sweep {name}: value {text!r} is not {example}") from None
    if name in _CHOICES and value not in _CHOICES[name]:
        raise EvaluationError(f"--sweep {name}: value {text!r} is unknown; choose from {', '.join(_CHOICES[name])}")
    try:
        dataclasses.replace(_PROBE, **{name: value})
    except ConfigError as error:
        raise EvaluationError(f"--sweep {name}={text} is invalid: {error}") from None
    return value


def _written(value: Any) -> str:
    return ":".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


# ---------------------------------------------------------------- evaluation


ClassVectors = Callable[[str, ScoringConfig], torch.Tensor]  # (method, scoring) -> (C, D) class vectors


@dataclass(frozen=True)
class Observation:
    """One method's scores of one batch in one setting and run, for measurements beyond accuracy."""

    setting: int  # index into the settings
    run: int  # seed index
    method: str
    keys: list[str]
    scores: list[ImageScore]  # with salient boxes and view shares
    views: ViewSet  # every encoded view of the batch


Observer = Callable[[Observation], None]


@dataclass(frozen=True)
class ImageModel:
    """The image side of a model, as the evaluation needs it."""

    encode_image: ImageEncoder  # (B, 3, S, S) normalised views -> (B, D)
    logit_scale: float
    view: ViewFormat
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class Failure:
    """An image that could not be read or decoded; it is left out of the metrics and reported."""

    key: str
    path: str
    status: str  # read_error | decode_error
    error_message: str


@dataclass(frozen=True)
class MethodResult:
    """Metrics of one method in one setting, per run (seed)."""

    method: str
    seeds: tuple[int, ...]
    acc1: tuple[float, ...]
    acc5: tuple[float, ...]  # top-k with k = min(5, classes)
    mean_per_class_recall: tuple[float, ...]
    confusions: tuple[tuple[str, str, int], ...]  # most confused (true, predicted, count), first run
    group_acc1: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # acc1 per run in each group

    @property
    def runs(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class SettingResult:
    """All methods' results for one setting."""

    setting: Setting
    methods: dict[str, MethodResult]  # in the requested order


@dataclass(frozen=True)
class Evaluation:
    """The outcome of `evaluate`."""

    classes: tuple[str, ...]  # the vocabulary: every class competes
    k: int  # the k of acc5
    scored: int  # images with predictions
    failures: tuple[Failure, ...]
    results: tuple[SettingResult, ...]
    encoder_rows: int  # views encoded in all


@dataclass
class _Batch:
    keys: list[str]
    images: list[torch.Tensor]  # uint8 (3, H, W), possibly decoded at reduced scale
    sizes: list[tuple[int, int]]  # (width, height) of each upright original
    targets: np.ndarray  # (B,) true class indices


@dataclass
class _Tally:
    """Predictions and top-k hits of one method in one setting, per run, batch by batch."""

    predictions: list[list[np.ndarray]] = field(default_factory=list)
    hits: list[list[np.ndarray]] = field(default_factory=list)

    def add(self, run: int, probabilities: np.ndarray, targets: np.ndarray, k: int) -> None:
        while len(self.predictions) <= run:
            self.predictions.append([])
            self.hits.append([])
        self.predictions[run].append(np.argsort(-probabilities, axis=1, kind="stable")[:, 0])
        self.hits[run].append(topk_hits(probabilities, targets, k))


def embedding_method(methods: Sequence[str]) -> str:
    """The method whose views serve all `methods`: lgca's views hold wca's, which hold the global view."""
    for candidate in ("lgca", "wca"):
        if candidate in methods:
            return candidate
    return methods[0]


def text_method(method: str) -> str:
    """The method whose class vectors `method` uses: descriptors, wca and lgca share T_c (docs/METHOD.md)."""
    return method if method in ("clip", "ensemble") else "descriptors"


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated methods in the given order.

    Raises:
        EvaluationError: an unknown method, or none.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not methods:
        raise EvaluationError(f"no methods given; choose from {', '.join(METHODS)}")
    return tuple(dict.fromkeys(methods))


def evaluate(
    images: LabelledImages,
    classes: Sequence[str],
    class_vectors: ClassVectors,
    model: ImageModel,
    methods: Sequence[str],
    settings: Sequence[Setting],
    runs: int = 1,
    batch_size: int = 32,
    storage_options: Mapping[str, Any] | None = None,
    decode: DecodeConfig | None = None,
    workers: int = 4,
    confusions: int = 10,
    progress: bool = False,
    observe: Observer | None = None,
) -> Evaluation:
    """Score every image with every method in every setting, and measure accuracy.

    Per batch the images are read and decoded once. For each setting and seed one Scorer configured for
    `embedding_method(methods)` encodes the views, and `Scorer.combine` scores them for every method with
    that method's class vectors, so all methods together cost the encoder passes of the most expensive one.
    The global view does not depend on the seed or the setting: it is encoded once per batch. Methods
    without crops are deterministic and run once per setting; wca and lgca run with seeds seed, seed+1, ...,
    seed+runs-1 (once with the grid layout, which has no randomness).

    Args:
        images: labelled images; every label must be one of `classes`.
        classes: the vocabulary, in class-vector order.
        class_vectors: (method, scoring) -> (C, D) class vectors; called once per text method and text scale.
        model: image encoder, logit scale, view format and device.
        methods: methods to evaluate.
        settings: scoring configurations (their `method` is replaced by the embedding method).
        runs: R, seeds per crop method.
        batch_size: images per scoring call.
        storage_options: fsspec options for remote images.
        decode: decoding limits; default: the smallest scale every view of every setting needs.
        workers: threads reading and decoding images.
        confusions: (true, predicted) pairs kept per method.
        progress: show a progress bar on stderr.
        observe: called with every method's scores of every batch (boxes, view shares, the views).

    Returns:
        The metrics, failures and encoder cost.

    Raises:
        EvaluationError: bad arguments, a label outside `classes`, or no image could be read and decoded.
    """
    methods = check_methods(methods)
    if runs < 1 or batch_size < 1 or workers < 1:
        raise EvaluationError(f"runs, batch size and workers must be >= 1, got {runs}, {batch_size}, {workers}")
    if not settings:
        raise EvaluationError("no valid setting to evaluate")
    if not len(images):
        raise EvaluationError("no images to evaluate")
    classes = tuple(classes)
    index = {name: i for i, name in enumerate(classes)}
    absent = sorted(set(images.labels) - set(index))
    if absent:
        raise EvaluationError(f"label(s) {_shown(absent)} are not in the vocabulary; they cannot be scored")
    targets = np.array([index[label] for label in images.labels], dtype=np.int64)
    k = min(TOP_K, len(classes))
    embed_as = embedding_method(methods)
    crop_methods = [m for m in methods if m in CROP_METHODS]
    configs = [dataclasses.replace(s.scoring, method=embed_as) for s in settings]
    if decode is None:
        alpha = min(c.crop_scale[0] for c in configs) if crop_methods else None
        decode = DecodeConfig(min_short_side=short_side_for(model.view.size, alpha))

    counter = _CountingEncoder(model.encode_image)
    vector_cache: dict[tuple[str, float], torch.Tensor] = {}

    def vectors(method: str, config: ScoringConfig) -> torch.Tensor:
        key = (text_method(method), config.text_scale)
        if key not in vector_cache:
            vector_cache[key] = class_vectors(key[0], config)
        return vector_cache[key]

    seeds = [_seeds(config, runs if crop_methods else 1) for config in configs]
    scorers = [
        [
            Scorer(
                counter,
                classes,
                vectors(embed_as, config),
                model.logit_scale,
                model.view,
                dataclasses.replace(config, seed=seed),
                model.device,
            )
            for seed in setting_seeds
        ]
        for config, setting_seeds in zip(configs, seeds)
    ]
    tallies = [{m: _Tally() for m in methods} for _ in settings]
    failures: list[Failure] = []
    bar = _progress(len(images), progress)
    try:
        for batch, failed in _decoded_batches(images, targets, batch_size, decode, storage_options or {}, workers):
            failures.extend(failed)
            if batch.keys:
                _score_batch(batch, scorers, tallies, configs, vectors, k, observe)
            bar.update(len(batch.keys) + len(failed))
    finally:
        bar.close()
    scored = len(images) - len(failures)
    if scored == 0:
        examples = "; ".join(f"{f.key}: {f.error_message}" for f in failures[:3])
        raise EvaluationError(f"none of the {len(images)} images could be read and decoded ({examples})")
    failed_keys = {f.key for f in failures}
    kept = [key not in failed_keys for key in images.keys]
    scored_targets = targets[kept]  # predictions exist for these, in order
    scored_groups = np.asarray(images.groups, dtype=object)[kept] if images.groups else None
    results = tuple(
        SettingResult(
            setting,
            {
                method: _method_result(
                    method,
                    setting_seeds if method in CROP_METHODS else setting_seeds[:1],
                    tally[method],
                    scored_targets,
                    scored_groups,
                    classes,
                    confusions,
                )
                for method in methods
            },
        )
        for setting, setting_seeds, tally in zip(settings, seeds, tallies)
    )
    return Evaluation(classes, k, scored, tuple(failures), results, counter.rows)


def _seeds(config: ScoringConfig, runs: int) -> tuple[int, ...]:
    # the grid layout ignores the seed: more runs would repeat the first
    count = 1 if config.crop_layout == "grid" else runs
    return tuple(config.seed + r for r in range(count))


def _score_batch(
    batch: _Batch,
    scorers: list[list[Scorer]],
    tallies: list[dict[str, _Tally]],
    configs: list[ScoringConfig],
    vectors: Callable[[str, ScoringConfig], torch.Tensor],
    k: int,
    observe: Observer | None,
) -> None:
    global_emb = None  # f(x) depends on neither seed nor setting: encoded once per batch
    embedded: dict[ScoringConfig, ViewSet] = {}  # settings that differ only in how views combine share views
    for index, (setting_scorers, tally, config) in enumerate(zip(scorers, tallies, configs)):
        for run, scorer in enumerate(setting_scorers):
            view_key = embedding_key(scorer.config)
            if view_key not in embedded:
                embedded[view_key] = scorer.embed(batch.images, batch.keys, batch.sizes, global_emb=global_emb)
            views = embedded[view_key]
            global_emb = views.global_emb
            for method, method_tally in tally.items():
                if run > 0 and method not in CROP_METHODS:
                    continue  # deterministic: the first run is the only one
                scores = scorer.combine(views, vectors(method, config), method)
                probabilities = np.stack([score.probabilities for score in scores])  # (B, C)
                method_tally.add(run, probabilities, batch.targets, k)
                if observe is not None:
                    observe(Observation(index, run, method, batch.keys, scores, views))


def embedding_key(config: ScoringConfig) -> ScoringConfig:
    """The parts of `config` that decide which views are encoded: two settings with one key share views.

    The combining weights (global_weight, expand_weight, image_scale) and the output size do not change
    the views, except that `agreement` saliency selects regions by the crops-and-global score, which
    global_weight and image_scale decide (expand_weight still does not: it weighs grown boxes only).
    """
    neutral: dict[str, Any] = {"topk": 1, "micro_batch": 1, "expand_weight": 1.0}
    if config.saliency == "agreement":
        neutral["global_weight"] = config.view_global_weight  # None and the default's value are one lambda
    else:
        neutral.update(global_weight=None, image_scale=ScoringConfig.image_scale)
    return dataclasses.replace(config, **neutral)


def _method_result(
    method: str,
    seeds: Sequence[int],
    tally: _Tally,
    targets: np.ndarray,
    groups: np.ndarray | None,
    classes: Sequence[str],
    confusions: int,
) -> MethodResult:
    acc1, acc5, recall = [], [], []
    group_acc1: dict[str, list[float]] = {name: [] for name in sorted(set(groups))} if groups is not None else {}
    first_predictions = None
    for run in range(len(seeds)):
        predictions = np.concatenate(tally.predictions[run])
        hits = np.concatenate(tally.hits[run])
        acc1.append(float(np.mean(predictions == targets)))
        acc5.append(float(np.mean(hits)))
        recall.append(mean_per_class_recall(predictions, targets))
        for name, values in group_acc1.items():
            members = groups == name
            values.append(float(np.mean(predictions[members] == targets[members])))
        if first_predictions is None:
            first_predictions = predictions
    return MethodResult(
        method=method,
        seeds=tuple(seeds),
        acc1=tuple(acc1),
        acc5=tuple(acc5),
        mean_per_class_recall=tuple(recall),
        confusions=tuple(confused_pairs(first_predictions, targets, classes, confusions)),
        group_acc1={name: tuple(values) for name, values in group_acc1.items()},
    )


class _CountingEncoder:
    """Counts the views passed to the image encoder (the cost the evaluation reports)."""

    def __init__(self, encode: ImageEncoder) -> None:
        self.encode, self.rows = encode, 0

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        self.rows += int(views.shape[0])
        return self.encode(views)


def _decoded_batches(
    images: LabelledImages,
    targets: np.ndarray,
    batch_size: int,
    decode: DecodeConfig,
    storage_options: Mapping[str, Any],
    workers: int,
) -> Iterator[tuple[_Batch, list[Failure]]]:
    """Batches of decoded images in key order, each with the images that failed; the next batch decodes meanwhile."""

    def load(i: int) -> DecodedImage | Failure:
        try:
            data = read_bytes(images.paths[i], storage_options)
        except Exception as error:  # reported as a failure, never raised: one bad object must not stop the run
            return Failure(images.keys[i], images.paths[i], READ_ERROR, f"cannot read: {type(error).__name__}: {error}")
        decoded = decode_image(data, decode)
        if isinstance(decoded, DecodedImage):
            return decoded
        return Failure(images.keys[i], images.paths[i], DECODE_ERROR, decoded.message)

    def collect(start: int, futures: list[Future]) -> tuple[_Batch, list[Failure]]:
        batch, failed = _Batch([], [], [], np.zeros(0, dtype=np.int64)), []
        chosen = []
        for offset, future in enumerate(futures):
            result = future.result()
            if isinstance(result, Failure):
                failed.append(result)
                continue
            chosen.append(start + offset)
            batch.keys.append(images.keys[start + offset])
            batch.images.append(torch.from_numpy(result.pixels.copy()).permute(2, 0, 1).contiguous())  # (3, H, W)
            batch.sizes.append((result.width, result.height))
        batch.targets = targets[chosen]
        return batch, failed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, list[Future]]] = deque()
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            pending.append((start, [pool.submit(load, i) for i in range(start, stop)]))
            if len(pending) > 1:
                yield collect(*pending.popleft())
        while pending:
            yield collect(*pending.popleft())


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="lgca eval", unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------- records


def result_records(evaluation: Evaluation, identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per setting and method, with CLIP_benchmark's metric keys.

    Each record holds `acc1`, `acc5` (top-k, k = `acc5_k`) and `mean_per_class_recall` (fractions, means
    over runs), the `identity` fields (dataset, model, pretrained, ...), `method`, `task`, the method's
    scoring parameters, the runs' seeds, the swept values under `setting`, and the most confused pairs.
    With more than one run also `<metric>_std` (population) and `<metric>_runs` (per-run values).
    """
    records = []
    for setting_result in evaluation.results:
        for method, result in setting_result.methods.items():
            scoring = setting_result.setting.scoring
            record: dict[str, Any] = {**identity, "task": TASK, "method": method}
            for name in ("acc1", "acc5", "mean_per_class_recall"):
                values = getattr(result, name)
                mean, std = mean_and_std(values)
                record[name] = mean
                if result.runs > 1:
                    record[f"{name}_std"] = std
                    record[f"{name}_runs"] = list(values)
            record["acc5_k"] = evaluation.k
            record["runs"] = result.runs
            record["seeds"] = list(result.seeds)
            record["images"] = evaluation.scored
            record["classes"] = len(evaluation.classes)
            record["scoring"] = {
                name: (list(value) if isinstance(value, tuple) else value)
                for name, value in scoring.to_dict().items()
                if name in METHOD_PARAMETERS[method]
            }
            if "global_weight" in record["scoring"]:
                record["scoring"]["global_weight"] = scoring.global_weight_for(method)  # the λ used, not "default"
            if setting_result.setting.changes:
                record["setting"] = {
                    name: (list(value) if isinstance(value, tuple) else value) for name, value in setting_result.setting.changes.items()
                }
            record["confusions"] = [{"true": t, "predicted": p, "count": n} for t, p, n in result.confusions]
            if result.group_acc1:
                record["groups"] = {name: _group_record(values) for name, values in result.group_acc1.items()}
            records.append(record)
    return records


def _group_record(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_and_std(values)
    return {"acc1": mean, "acc1_std": std} if len(values) > 1 else {"acc1": mean}


__all__ = [
    "ClassCheck",
    "EvaluationError",
    "Evaluation",
    "Failure",
    "ImageModel",
    "LabelledImages",
    "METHOD_PARAMETERS",
    "MethodResult",
    "Observation",
    "Observer",
    "Setting",
    "SettingResult",
    "check_classes",
    "check_methods",
    "confused_pairs",
    "describe_changes",
    "embedding_key",
    "embedding_method",
    "evaluate",
    "limit_images",
    "list_labelled",
    "mean_and_std",
    "mean_per_class_recall",
    "parse_sweep",
    "require_scorable",
    "result_records",
    "sweep_settings",
    "text_method",
    "topk_accuracy",
    "topk_hits",
    "unused_classes_warning",
]
