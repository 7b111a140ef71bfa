"""The in-process scoring loop of `lgca eval`: every method in every setting and seed on labelled images, and its results.

No Ray: images are read and decoded by the job's `ReadDecodeStage` and scored with one
`scorer.Scorer` per setting and seed. The encoders and class vectors are injected, so tests can evaluate with
analytic encoders. Each view of a batch is encoded once and combined for every method (docs/METHOD.md).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.config import CROP_METHODS, METHODS, DecodeConfig, ScoringConfig
from pipeline.evaluation.errors import EvaluationError, shown_names
from pipeline.evaluation.labelled import LabelledImages
from pipeline.evaluation.metrics import TOP_K
from pipeline.evaluation.results import CascadeCost, Evaluation, Failure, SettingResult, Tally, cascade_tally, method_result
from pipeline.evaluation.sweep import Setting
from pipeline.schema import OK
from pipeline.scoring.combine import ImageScore
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.views import ImageEncoder, ViewFormat, ViewSet
from pipeline.stages.decode import decode_for_views
from pipeline.stages.read_decode import ReadDecodeStage, decoded_pixels
from pipeline.stages.score_rows import scorer_for

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


@dataclass
class _Batch:
    keys: list[str]
    images: list[torch.Tensor]  # uint8 (3, H, W), possibly decoded at reduced scale
    sizes: list[tuple[int, int]]  # (width, height) of each upright original
    targets: np.ndarray  # (B,) true class indices


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
        decode = decode_for_views(model.view.size, [dataclasses.replace(c, method=m) for c in configs for m in crop_methods])

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
        return scorer_for(model, classes, vectors(method, config), dataclasses.replace(config, method=method, seed=seed), counter)

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
    tallies = [{m: Tally() for m in (*methods, *((FIRST_PASS,) if cascade else ()))} for _ in settings]
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
            result = method_result(
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
            cascaded = cascade_tally(tally[FIRST_PASS], tally["lgca"], threshold)
            result = method_result("lgca", setting_seeds, cascaded, scored_targets, scored_groups, classes, confusions)
            escalated = float(np.mean(np.concatenate(tally[FIRST_PASS].margins) < threshold))
            lgca_passes = dataclasses.replace(config, method="lgca").encoder_passes
            name = f"cascade@{threshold:g}"
            by_method[name] = dataclasses.replace(
                result, method=name, encoder_passes=1.0 + escalated * (lgca_passes - 1), cascade=CascadeCost(threshold, escalated)
            )
        results.append(SettingResult(setting, by_method))
    groups = tuple(str(g) for g in scored_groups) if scored_groups is not None else None
    return Evaluation(classes, k, scored, tuple(failures), tuple(results), counter.rows, groups)


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
    tallies: list[dict[str, Tally]],
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
    """Batches of decoded images in key order, each with the images that failed; up to `workers` batches are read
    and decoded ahead, by the job's own read-and-decode stage (its byte limit, read timeout and messages)."""
    stage = ReadDecodeStage(decode, storage_options)

    def load(start: int) -> pa.Table:
        stop = min(start + batch_size, len(images))
        return stage(pa.table({"key": list(images.keys[start:stop]), "path": list(images.paths[start:stop])}))

    def collect(start: int, rows: pa.Table) -> tuple[_Batch, list[Failure]]:
        batch, failed = _Batch([], [], [], np.zeros(0, dtype=np.int64)), []
        chosen = []
        for offset, row in enumerate(rows.select(["key", "path", "status", "error_message", "width", "height"]).to_pylist()):
            if row["status"] != OK:
                failed.append(Failure(row["key"], row["path"], row["status"], row["error_message"]))
                continue
            chosen.append(start + offset)
            batch.keys.append(row["key"])
            batch.images.append(torch.from_numpy(decoded_pixels(rows, offset).copy()).permute(2, 0, 1).contiguous())  # (3, H, W)
            batch.sizes.append((row["width"], row["height"]))
        batch.targets = targets[chosen]
        return batch, failed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future]] = deque()
        for start in range(0, len(images), batch_size):
            pending.append((start, pool.submit(load, start)))
            if len(pending) > workers:
                first, future = pending.popleft()
                yield collect(first, future.result())
        while pending:
            first, future = pending.popleft()
            yield collect(first, future.result())


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="lgca eval", unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


__all__ = [
    "ClassVectors",
    "ImageModel",
    "Observation",
    "Observer",
    "check_cascade",
    "check_methods",
    "embedding_key",
    "embedding_method",
    "evaluate",
    "text_method",
]
