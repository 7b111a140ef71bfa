"""Argument groups shared by the `lgca` commands, and the configuration each group builds."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pipeline.config import (
    CROP_LAYOUTS,
    DESCRIPTOR_WEIGHTS,
    GLOBAL_WEIGHT_RULES,
    INTERPOLATIONS,
    LETTERBOX_RULES,
    LEVEL0_BOXES,
    LEVEL_AGGREGATIONS,
    LGCA_GLOBAL_WEIGHT,
    LINEAGE_WEIGHTS,
    METHODS,
    PRECISIONS,
    REGION_POOLS,
    RESIZE_MODES,
    SALIENCY_RULES,
    SELECTIONS,
    DecodeConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    ScoringConfig,
    VocabularyConfig,
)

EXIT_CONFIG = 2  # bad configuration or input: nothing was labelled
EXIT_FAILED = 1  # the run started labelling and could not finish: what was committed stays for --resume

# --preset wca: the protocol of WCA's released code, as closely as the engine allows (docs/EVALUATION.md,
# "Reproducing WCA"). Each value fills a setting left at its default; a flag given with another value wins.
WCA_PRESET_SCORING: dict[str, Any] = {
    "method": "wca",
    "crops": 60,
    "crop_scale": (0.1, 0.9),  # the code's random_crop(img) never passes its alpha: sides are U[0.1, 0.9]
    "global_weight": 0.0,  # crops only: the global view only weighs the crops
    "image_scale": 4.0,
    "text_scale": 2.0,
    "descriptor_weights": "mean",  # its CuPL baseline averages the descriptions plainly
}
WCA_PRESET_MODEL: dict[str, Any] = {"name": "ViT-B-32", "pretrained": "openai", "precision": "fp16", "quick_gelu": True}
PRESETS = ("wca",)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=ModelConfig.name, help="open_clip architecture, or an open_clip model-config JSON (default: %(default)s)"
    )
    group.add_argument(
        "--pretrained",
        default=ModelConfig.pretrained,
        help="weights: an open_clip tag (downloads where internet exists), a local .safetensors/.pt file, an fsspec "
        "URI such as s3://bucket/w.safetensors (fetched once into the cache), or 'random' (meaningless labels; "
        "tests and speed only) (default: %(default)s)",
    )
    group.add_argument("--device", default=ModelConfig.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--precision", default=ModelConfig.precision, choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    group.add_argument(
        "--cache-dir", default=None, help="weights and text-embedding cache (default: ~/.cache/lgca-label or $LGCA_CACHE_DIR)"
    )
    group.add_argument(
        "--weights-tag",
        default=None,
        metavar="TAG",
        help="for weights from a file or URI: the open_clip tag they were exported from (e.g. openai, webli); "
        "it sets the preprocessing (mean, std, interpolation, resize mode) and the activation (QuickGELU) the weights "
        "were trained with. Without it a file gets the architecture default, with a warning where its tags disagree",
    )
    group.add_argument(
        "--image-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="normalisation mean (overrides the tag's)"
    )
    group.add_argument(
        "--image-std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="normalisation std (overrides the tag's)"
    )
    group.add_argument("--interpolation", default=None, choices=INTERPOLATIONS, help="resize interpolation (overrides the tag's)")
    group.add_argument(
        "--resize-mode",
        default=None,
        choices=RESIZE_MODES,
        help="global view: shortest (shorter side to S, centre crop), longest (longer side to S, padded) or squash (overrides the tag's)",
    )
    group.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the model with QuickGELU (OpenAI's weights were trained with it; a tag sets it)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="compile the image encoder with torch.compile: start-up takes longer (tens of seconds per actor), "
        "encoding may run faster; measure with jobs/bench_scorer.py --compile",
    )


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScoringConfig()
    group = parser.add_argument_group("scoring (see docs/METHOD.md)")
    group.add_argument("--method", default=d.method, choices=METHODS, help="scoring method (default: %(default)s)")
    group.add_argument("--crops", type=int, default=d.crops, help="N, local crops per image (default: %(default)s)")
    group.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=d.crop_scale,
        metavar=("ALPHA", "BETA"),
        help="crop side as a fraction of the shorter image side, drawn from [ALPHA, BETA] (default: 0.5 0.9 for wca, as "
        "WCA's paper; 0.3 0.7 for lgca, whose lineages regrow the context)",
    )
    group.add_argument(
        "--crop-layout",
        default=d.crop_layout,
        choices=CROP_LAYOUTS,
        help="random crops, or a sqrt(N) x sqrt(N) grid (default: %(default)s)",
    )
    group.add_argument(
        "--letterbox",
        default=d.letterbox,
        choices=LETTERBOX_RULES,
        help="detect: find a letter box (flat bands padding the picture to a square, as img2dataset's default "
        "resize_mode=border writes) and lay the crops out inside the picture (default: %(default)s; docs/EVALUATION.md)",
    )
    group.add_argument(
        "--saliency",
        default=d.saliency,
        choices=SALIENCY_RULES,
        help="region saliency: class, its best class similarity; global, its similarity to the whole image; margin, "
        "top-1 minus top-2 of its class probabilities; agreement, its similarity to the image's leading class "
        "from the crops and global view (default: %(default)s)",
    )
    group.add_argument("--steps", type=int, default=d.steps, help="T, expansion steps (default: %(default)s)")
    group.add_argument("--regions", type=int, default=d.regions, help="K, regions grown per step (default: %(default)s)")
    group.add_argument(
        "--growth",
        type=float,
        default=d.growth,
        help="gamma, growth of a selected region's side per step; grown boxes stay square, capped at the shorter side (default: %(default)s)",
    )
    group.add_argument(
        "--growth-target",
        type=float,
        default=d.growth_target,
        metavar="FRACTION",
        help="instead of --growth, grow each region geometrically to this fraction of the shorter side at the last step, in (0, 1]",
    )
    group.add_argument(
        "--image-scale", type=float, default=d.image_scale, help="region-weight temperature, exp(scale) (default: %(default)s)"
    )
    group.add_argument(
        "--text-scale", type=float, default=d.text_scale, help="description-weight temperature, exp(scale) (default: %(default)s)"
    )
    group.add_argument(
        "--expand-weight",
        type=float,
        default=d.expand_weight,
        help="extra weight of grown boxes among the regions; 0 drops them (default: %(default)s)",
    )
    group.add_argument(
        "--global-weight",
        type=float,
        default=d.global_weight,
        metavar="LAMBDA",
        help=f"share of the score given to the global view, in [0, 1] (default: {LGCA_GLOBAL_WEIGHT} for lgca, 0 for wca as WCA's code)",
    )
    group.add_argument(
        "--region-pool",
        default=d.region_pool,
        choices=REGION_POOLS,
        help="lgca's region term: lineages, the selected crops and the boxes grown from them, one region per expansion "
        "level, averaged over the levels (crops that were not selected carry no weight); all, every crop and grown box "
        "with WCA's weights, as revision 2 of the method (default: %(default)s)",
    )
    group.add_argument(
        "--selection",
        default=d.selection,
        choices=SELECTIONS,
        help="pool: each step grows the K most salient regions of the pool; lineages: K crops chosen once, each grown at "
        "every step (default: %(default)s)",
    )
    group.add_argument(
        "--level-aggregation",
        default=d.level_aggregation,
        choices=LEVEL_AGGREGATIONS,
        help="how a level's boxes combine: embedding, the cosine of their mean embedding; similarity, the mean of their "
        "cosines (default: %(default)s)",
    )
    group.add_argument(
        "--lineage-weights",
        default=d.lineage_weights,
        choices=LINEAGE_WEIGHTS,
        help="weights of a level's boxes: uniform, or saliency, softmax(--saliency-scale x saliency) (default: %(default)s)",
    )
    group.add_argument(
        "--saliency-scale", type=float, default=d.saliency_scale, help="temperature of saliency lineage weights (default: %(default)s)"
    )
    group.add_argument(
        "--level0",
        default=d.level0,
        choices=LEVEL0_BOXES,
        help="level 0 of the lineage term: the selected crops, or all local crops with WCA's weights (default: %(default)s)",
    )
    group.add_argument(
        "--global-weight-rule",
        default=d.global_weight_rule,
        choices=GLOBAL_WEIGHT_RULES,
        help="fixed: lambda for every image; confidence: lambda + (1 - lambda) x the global view's own top-1 minus top-2 "
        "probability, per image (default: %(default)s)",
    )
    group.add_argument(
        "--cascade-margin",
        type=float,
        default=d.cascade_margin,
        metavar="THRESHOLD",
        help="confidence cascade (lgca): an image whose global view alone gives a top-1 minus top-2 probability of at "
        "least THRESHOLD keeps that result (method 'descriptors' in its row, no salient boxes); only the others get "
        "crops and expansion. Off by default; docs/EVALUATION.md has the accuracy-cost table",
    )
    group.add_argument("--seed", type=int, default=d.seed, help="crop sampling seed, combined with each image key (default: %(default)s)")
    group.add_argument("--topk", type=int, default=d.topk, help="labels kept per image (default: %(default)s)")
    group.add_argument("--micro-batch", type=int, default=d.micro_batch, help="views per encoder call (default: %(default)s)")
    group.add_argument(
        "--descriptor-weights",
        default=d.descriptor_weights,
        choices=DESCRIPTOR_WEIGHTS,
        help="how the descriptors method weighs a class's descriptions: softmax against its prompt (METHOD.md) or mean "
        "(CuPL's plain mean, WCA's baseline); wca and lgca always use softmax (default: %(default)s)",
    )
    group.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="wca: the protocol of WCA's released code (method wca, 60 crops with sides U[0.1, 0.9], crops only, "
        "OpenAI ViT-B-32 weights with QuickGELU, fp16, plain-mean CuPL baseline); it fills the settings left at their "
        "defaults. What still differs is listed in docs/EVALUATION.md",
    )


def add_vocabulary_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("vocabulary")
    group.add_argument(
        "--labels",
        required=required,
        help="labels: .txt (one class per line), .json/.yaml list, or a descriptors "
        "JSON {class: [sentences]} (CuPL/DCLIP format); local or s3://",
    )
    group.add_argument(
        "--templates",
        default=None,
        help="prompt templates file, one per line with {} for the class (default: open_clip's OpenAI ImageNet set)",
    )
    group.add_argument("--prompt", default=VocabularyConfig.prompt, help="label prompt p_c (default: %(default)r)")


def add_storage_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://minio:9000); never recorded in outputs. Flags are "
        "visible to every user of the machine (ps): give secrets in --storage-options-file or LGCA_STORAGE_OPTIONS instead",
    )
    parser.add_argument(
        "--storage-options-file",
        metavar="FILE",
        help="JSON or YAML mapping of storage options (keep it readable by you only); LGCA_STORAGE_OPTIONS (a JSON "
        "object) is read next, then --storage-option flags, each winning over the one before",
    )


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The storage options of a command: --storage-options-file, then LGCA_STORAGE_OPTIONS, then --storage-option."""
    from pipeline.stages.storage import gather_storage_options

    return gather_storage_options(args.storage_option, getattr(args, "storage_options_file", None))


def _preset(args: argparse.Namespace, values: dict, defaults: object, keep: tuple[str, ...] = ()) -> dict:
    """`values` with each preset setting (but those in `keep`) filled in where the flag was left at its default."""
    if getattr(args, "preset", None) != "wca":
        return values
    preset = WCA_PRESET_MODEL if isinstance(defaults, ModelConfig) else WCA_PRESET_SCORING
    out = dict(values)
    for field, value in preset.items():
        if field in keep:
            continue
        default = getattr(defaults, field)
        if out[field] == default or (isinstance(default, tuple) and tuple(out[field]) == default):
            out[field] = value
    return out


def scoring_config(args: argparse.Namespace, keep_method: bool = False) -> ScoringConfig:
    """The scoring configuration of the flags; `keep_method`: the method is set by the caller (`lgca eval`), not a preset."""
    return ScoringConfig(**_preset(args, _scoring_values(args), ScoringConfig(), ("method",) if keep_method else ()))


def _scoring_values(args: argparse.Namespace) -> dict:
    return {
        "method": args.method,
        "crops": args.crops,
        "crop_scale": tuple(args.crop_scale) if args.crop_scale is not None else None,
        "crop_layout": args.crop_layout,
        "letterbox": args.letterbox,
        "saliency": args.saliency,
        "steps": args.steps,
        "regions": args.regions,
        "growth": args.growth,
        "growth_target": args.growth_target,
        "image_scale": args.image_scale,
        "text_scale": args.text_scale,
        "expand_weight": args.expand_weight,
        "global_weight": args.global_weight,
        "seed": args.seed,
        "topk": args.topk,
        "micro_batch": args.micro_batch,
        "descriptor_weights": args.descriptor_weights,
        "region_pool": args.region_pool,
        "selection": args.selection,
        "level_aggregation": args.level_aggregation,
        "lineage_weights": args.lineage_weights,
        "saliency_scale": args.saliency_scale,
        "level0": args.level0,
        "global_weight_rule": args.global_weight_rule,
        "cascade_margin": args.cascade_margin,
    }


def model_config(args: argparse.Namespace) -> ModelConfig:
    values = _preset(
        args,
        {
            "name": args.model,
            "pretrained": args.pretrained,
            "device": args.device,
            "precision": args.precision,
            "cache_dir": args.cache_dir,
            "compile": args.compile,
            "weights_tag": args.weights_tag,
            "image_mean": tuple(args.image_mean) if args.image_mean else None,
            "image_std": tuple(args.image_std) if args.image_std else None,
            "interpolation": args.interpolation,
            "resize_mode": args.resize_mode,
            "quick_gelu": args.quick_gelu,
        },
        ModelConfig(),
    )
    if getattr(args, "preset", None) == "wca" and values["pretrained"] != "openai" and not values["weights_tag"]:
        values["weights_tag"] = "openai" if "://" in values["pretrained"] or os.path.isfile(values["pretrained"]) else None
    return ModelConfig(**values)


def vocabulary_config(args: argparse.Namespace) -> VocabularyConfig:
    return VocabularyConfig(labels=args.labels, templates=args.templates, prompt=args.prompt)


def job_config(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        vocabulary=vocabulary_config(args),
        model=model_config(args),
        scoring=scoring_config(args),
        decode=DecodeConfig(
            allowed_schemes=(*DecodeConfig().allowed_schemes, *args.allow_scheme),
            max_bytes=args.max_bytes,
            read_timeout_s=args.read_timeout,
            max_pixels=args.max_pixels,
            timeout_s=args.decode_timeout,
            device=args.decode,
        ),
        execution=ExecutionConfig(
            address=args.address,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
            num_cpus_per_actor=args.num_cpus_per_actor,
            decode_batch_size=args.decode_batch_size,
            rows_per_file=args.rows_per_file,
        ),
        resume=args.resume,
        retry_failed=args.retry_failed,
        overwrite=args.overwrite,
        embeddings=getattr(args, "embeddings", False),
        image_column=getattr(args, "image_column", None),
    )
