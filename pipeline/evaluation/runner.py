"""The in-process scoring loop of `lgca eval`: every method in every setting and seed on labelled images, and its results.

No Ray: images are read with `sources.read_bytes`, decoded with `decode.decode_image` and scored with one
`scorer.Scorer` per setting and seed. The encoders and class vectors are injected, so tests can evaluate with
analytic encoders. Each view of a batch is encoded once and combined for every method (docs/METHOD.md).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import CROP_METHODS, METHODS, DecodeConfig, ScoringConfig
from pipeline.evaluation.errors import EvaluationError, shown_names
from pipeline.evaluation.labelled import LabelledImages
from pipeline.evaluation.metrics import TOP_K, confused_pairs, mean_per_class_recall, topk_hits
from pipeline.evaluation.sweep import Setting
from pipeline.schema import DECODE_ERROR, READ_ERROR
from pipeline.scoring.combine import ImageScore
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ImageEncoder, ViewFormat, ViewSet
from pipeline.stages.decode import DecodedImage, decode_image, short_side_for
from pipeline.stages.sources import read_bytes

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
    # (n,) per scored image, the share of runs that predicted its class: what paired intervals resample
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False)
    encoder_passes: float = 1.0  # image-encoder passes per image and run
    cascade: CascadeCost | None = None  # set for a cascade's result

    @property
    def runs(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class CascadeCost:
    """What the confidence cascade at one threshold spent (docs/METHOD.md step 7)."""

    threshold: float
    escalated: float  # share of images scored with lgca


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
    groups: tuple[str, ...] | None = None  # group of each scored image, in order, when the data has groups


@dataclass
class _Batch:
    keys: list[str]
    images: list[torch.Tensor]  # uint8 (3, H, W), possibly decoded at reduced scale
    sizes: list[tuple[int, int]]  # (width, height) of each upright original
    targets: np.ndarray  # (B,) true class indices


@dataclass
class _Tally:
    """Predictions and top-k hits of one method in one setting, per run, batch by batch; for the cascade's
    first pass also the top-1 minus top-2 margins."""

    predictions: list[list[np.ndarray]] = field(default_factory=list)
    hits: list[list[np.ndarray]] = field(default_factory=list)
    margins: list[np.ndarray] = field(default_factory=list)

    def add(self, run: int, probabilities: np.ndarray, targets: np.ndarray, k: int) -> None:
        while len(self.predictions) <= run:
            self.predictions.append([])
            self.hits.append([])
        self.predictions[run].append(np.argsort(-probabilities, axis=1, kind="stable")[:, 0])
        self.hits[run].append(topk_hits(probabilities, targets, k))


FIRST_PASS = "_first"  # the tally of the cascade's first pass: descriptors on lgca's class vectors


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
    cascade: Sequence[float] = (),
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
        cascade: thresholds of the confidence cascade to evaluate (needs lgca among `methods`); each adds a
            result `cascade@T`, computed from the same views: an image keeps the first pass (descriptors on
            lgca's class vectors) where its margin is at least T, and takes lgca's prediction otherwise.

    Returns:
        The metrics, failures and encoder cost.

    Raises:
        EvaluationError: bad arguments, a label outside `classes`, or no image could be read and decoded.
    """
    methods = check_methods(methods)
    cascade = check_cascade(methods, cascade)
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
        raise EvaluationError(f"label(s) {shown_names(absent)} are not in the vocabulary; they cannot be scored")
    targets = np.array([index[label] for label in images.labels], dtype=np.int64)
    k = min(TOP_K, len(classes))
    embed_as = embedding_method(methods)
    crop_methods = [m for m in methods if m in CROP_METHODS]
    configs = [dataclasses.replace(s.scoring, method=embed_as) for s in settings]
    if decode is None:
        alpha = min(c.crop_scale_for(m)[0] for c in configs for m in crop_methods) if crop_methods else None
        decode = DecodeConfig(min_short_side=short_side_for(model.view.size, alpha))

    counter = _CountingEncoder(model.encode_image)
    vector_cache: dict[tuple[str, float, str], torch.Tensor] = {}

    def vectors(method: str, config: ScoringConfig) -> torch.Tensor:
        # only the descriptors method itself averages descriptions plainly; wca and lgca always weigh them
        weighting = config.descriptor_weights if method == "descriptors" else "softmax"
        key = (text_method(method), config.text_scale, weighting)
        if key not in vector_cache:
            vector_cache[key] = class_vectors(key[0], dataclasses.replace(config, descriptor_weights=weighting))
        return vector_cache[key]

    seeds = [_seeds(config, runs if crop_methods else 1) for config in configs]

    def scorer(method: str, config: ScoringConfig, seed: int) -> Scorer:
        return Scorer(
            counter,
            classes,
            vectors(method, config),
            model.logit_scale,
            model.view,
            dataclasses.replace(config, method=method, seed=seed),
            model.device,
        )

    scorers = [[scorer(embed_as, config, seed) for seed in setting_seeds] for config, setting_seeds in zip(configs, seeds)]
    # wca keeps WCA's crop scale while lgca's defaults to its own: then wca's crops are embedded apart
    own_crops = [
        [
            scorer("wca", config, seed)
            if "wca" in methods and embed_as != "wca" and config.crop_scale_for("wca") != config.crop_scale_for(embed_as)
            else None
            for seed in setting_seeds
        ]
        for config, setting_seeds in zip(configs, seeds)
    ]
    tallies = [{m: _Tally() for m in (*methods, *((FIRST_PASS,) if cascade else ()))} for _ in settings]
    failures: list[Failure] = []
    bar = _progress(len(images), progress)
    try:
        for batch, failed in _decoded_batches(images, targets, batch_size, decode, storage_options or {}, workers):
            failures.extend(failed)
            if batch.keys:
                _score_batch(batch, scorers, own_crops, tallies, configs, vectors, k, observe)
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
    results = []
    for setting, setting_seeds, tally, config in zip(settings, seeds, tallies, configs):
        by_method = {}
        for method in methods:
            result = _method_result(
                method,
                setting_seeds if method in CROP_METHODS else setting_seeds[:1],
                tally[method],
                scored_targets,
                scored_groups,
                classes,
                confusions,
            )
            by_method[method] = dataclasses.replace(result, encoder_passes=float(dataclasses.replace(config, method=method).encoder_passes))
        for threshold in cascade:
            cascaded = _cascade_tally(tally[FIRST_PASS], tally["lgca"], threshold)
            result = _method_result("lgca", setting_seeds, cascaded, scored_targets, scored_groups, classes, confusions)
            escalated = float(np.mean(np.concatenate(tally[FIRST_PASS].margins) < threshold))
            lgca_passes = dataclasses.replace(config, method="lgca").encoder_passes
            name = f"cascade@{threshold:g}"
            by_method[name] = dataclasses.replace(
                result, method=name, encoder_passes=1.0 + escalated * (lgca_passes - 1), cascade=CascadeCost(threshold, escalated)
            )
        results.append(SettingResult(setting, by_method))
    groups = tuple(str(g) for g in scored_groups) if scored_groups is not None else None
    return Evaluation(classes, k, scored, tuple(failures), tuple(results), counter.rows, groups)


def _cascade_tally(first: _Tally, lgca: _Tally, threshold: float) -> _Tally:
    """The cascade at `threshold` from its two passes: the first pass where its margin reaches the threshold,
    lgca elsewhere, run by run (the first pass does not depend on the seed)."""
    keep = np.concatenate(first.margins) >= threshold  # NaN margins escalate, as in the Scorer
    first_predictions, first_hits = np.concatenate(first.predictions[0]), np.concatenate(first.hits[0])
    out = _Tally()
    for run_predictions, run_hits in zip(lgca.predictions, lgca.hits):
        out.predictions.append([np.where(keep, first_predictions, np.concatenate(run_predictions))])
        out.hits.append([np.where(keep, first_hits, np.concatenate(run_hits))])
    return out


def check_cascade(methods: Sequence[str], thresholds: Sequence[float]) -> tuple[float, ...]:
    """Validated cascade thresholds, repeats dropped.

    Raises:
        EvaluationError: a threshold below 0, or thresholds without lgca among `methods`.
    """
    if thresholds and "lgca" not in methods:
        raise EvaluationError("the cascade (--cascade) escalates to lgca; add lgca to --methods")
    if any(not threshold >= 0 for threshold in thresholds):
        raise EvaluationError(f"cascade thresholds must be >= 0, got {', '.join(f'{t:g}' for t in thresholds)}")
    return tuple(dict.fromkeys(float(t) for t in thresholds))


def _seeds(config: ScoringConfig, runs: int) -> tuple[int, ...]:
    # the grid layout ignores the seed: more runs would repeat the first
    count = 1 if config.crop_layout == "grid" else runs
    return tuple(config.seed + r for r in range(count))


def _score_batch(
    batch: _Batch,
    scorers: list[list[Scorer]],
    own_crops: list[list[Scorer | None]],
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
            wca = own_crops[index][run]
            if wca is not None and embedding_key(wca.config) not in embedded:
                embedded[embedding_key(wca.config)] = wca.embed(batch.images, batch.keys, batch.sizes, global_emb=global_emb)
            for method, method_tally in tally.items():
                if run > 0 and method not in CROP_METHODS:
                    continue  # deterministic: the first run is the only one
                if method == FIRST_PASS:  # the cascade's first pass: the global view on lgca's class vectors
                    scores = scorer.combine(views, vectors("lgca", config), "descriptors")
                    method_tally.add(run, np.stack([score.probabilities for score in scores]), batch.targets, k)
                    method_tally.margins.append(np.array([score.margin for score in scores], dtype=np.float64))
                    continue
                scoring, seen = (wca, embedded[embedding_key(wca.config)]) if method == "wca" and wca is not None else (scorer, views)
                scores = scoring.combine(seen, vectors(method, config), method)
                probabilities = np.stack([score.probabilities for score in scores])  # (B, C)
                method_tally.add(run, probabilities, batch.targets, k)
                if observe is not None:
                    observe(Observation(index, run, method, batch.keys, scores, seen))


def embedding_key(config: ScoringConfig) -> ScoringConfig:
    """The parts of `config` that decide which views are encoded: two settings with one key share views.

    The combining weights (global_weight, expand_weight, image_scale), how lgca's region term pools its
    regions (region_pool, level_aggregation, lineage_weights, saliency_scale, level0, global_weight_rule), the
    cascade and the output size do not change the views, except that `agreement` saliency selects regions by
    the crops-and-global score, which global_weight and image_scale decide (expand_weight still does not: it
    weighs grown boxes only).
    """
    base = ScoringConfig()
    neutral: dict[str, Any] = {
        "crop_scale": config.view_crop_scale,  # None and the method default's value are one crop scale
        "topk": 1,
        "micro_batch": 1,
        "expand_weight": 1.0,
        "region_pool": base.region_pool,
        "level_aggregation": base.level_aggregation,
        "lineage_weights": base.lineage_weights,
        "saliency_scale": base.saliency_scale,
        "level0": base.level0,
        "global_weight_rule": base.global_weight_rule,
        "cascade_margin": None,
    }
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
    run_predictions = []
    for run in range(len(seeds)):
        predictions = np.concatenate(tally.predictions[run])
        hits = np.concatenate(tally.hits[run])
        acc1.append(float(np.mean(predictions == targets)))
        acc5.append(float(np.mean(hits)))
        recall.append(mean_per_class_recall(predictions, targets))
        for name, values in group_acc1.items():
            members = groups == name
            values.append(float(np.mean(predictions[members] == targets[members])))
        run_predictions.append(predictions)
    return MethodResult(
        correct=np.mean([p == targets for p in run_predictions], axis=0),
        method=method,
        seeds=tuple(seeds),
        acc1=tuple(acc1),
        acc5=tuple(acc5),
        mean_per_class_recall=tuple(recall),
        confusions=tuple(confused_pairs(run_predictions[0], targets, classes, confusions)),  # the first run's
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


__all__ = [
    "CascadeCost",
    "ClassVectors",
    "Evaluation",
    "Failure",
    "ImageModel",
    "MethodResult",
    "Observation",
    "Observer",
    "SettingResult",
    "check_cascade",
    "check_methods",
    "embedding_key",
    "embedding_method",
    "evaluate",
    "text_method",
]
