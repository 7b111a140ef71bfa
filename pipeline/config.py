"""Typed, validated configuration for scoring, models and jobs: one home for every default."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.credentials import REFUSED as CREDENTIALS_REFUSED
from pipeline.credentials import has_credentials, mask_credentials

METHODS = ("clip", "ensemble", "descriptors", "wca", "lgca")
CROP_METHODS = ("wca", "lgca")
SALIENCY_RULES = ("class", "global", "margin", "agreement")
CROP_LAYOUTS = ("random", "grid")
LETTERBOX_RULES = ("off", "detect")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "longest", "squash")
MAX_SCALE = 20.0  # |image_scale|, |text_scale|: exp(20) ~ 4.9e8 already makes the softmax a hard max; exp(89) overflows float32
DECODE_DEVICES = ("auto", "cpu", "gpu")
DEFAULT_PROMPT = "a photo of a {}."
# lambda of lgca when `global_weight` is not given: the share of the score carried by the global view, chosen
# on the learned model's scenes (docs/EVALUATION.md, "Choosing the defaults"). wca's default is 0 (WCA's
# official code aggregates the crops only).
LGCA_GLOBAL_WEIGHT = 0.3
# Crop sides as fractions of the shorter side when `crop_scale` is not given: WCA's paper setting for wca; for
# lgca, smaller crops, whose lineages regrow the context (docs/EVALUATION.md, "Choosing the defaults").
WCA_CROP_SCALE = (0.5, 0.9)
LGCA_CROP_SCALE = (0.3, 0.7)
DESCRIPTOR_WEIGHTS = ("softmax", "mean")
REGION_POOLS = ("lineages", "all")
SELECTIONS = ("pool", "lineages")
LEVEL_AGGREGATIONS = ("embedding", "similarity")
LINEAGE_WEIGHTS = ("uniform", "saliency")
LEVEL0_BOXES = ("selected", "all")
GLOBAL_WEIGHT_RULES = ("fixed", "confidence")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class RunFailed(Exception):
    """Work had started and the run could not finish (exit 1); committed results stay for --resume."""


def decodes_on_device(decode_device: str, scoring_device: str) -> bool:
    """Whether the scoring stage decodes JPEGs on its GPU (`--decode`), given where it scores: the one rule.

    Raises:
        ConfigError: `--decode gpu` while scoring runs on the CPU.
    """
    on_cuda = scoring_device.startswith("cuda")
    if decode_device == "gpu" and not on_cuda:
        raise ConfigError(
            "--decode gpu decodes on the scoring GPU, but there is no GPU for the scoring actors (--device cpu, "
            "--num-gpus 0, or a cluster without GPUs); use --decode auto or cpu"
        )
    return on_cuda and decode_device in ("gpu", "auto")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _refuse_credentials(what: str, value: str | None) -> None:
    """A URL the job records (inputs, output, labels, templates, weights) must carry no credentials."""
    if value is not None and has_credentials(value):
        raise ConfigError(f"{what} {mask_credentials(value)}: {CREDENTIALS_REFUSED}")


@dataclass(frozen=True)
class ScoringConfig:
    """Parameters of the scoring methods; names follow docs/METHOD.md."""

    method: str = "lgca"  # clip | ensemble | descriptors | wca | lgca
    crops: int = 60  # N: local crops per image (wca, lgca)
    crop_scale: tuple[float, float] | None = None  # (alpha, beta): crop side as a fraction of min(W, H); None: the method's default
    crop_layout: str = "random"  # random: seeded uniform crops; grid: sqrt(N) x sqrt(N) tiles at one scale
    letterbox: str = "off"  # detect: lay crops out inside a letter box's picture (img2dataset's border padding)
    saliency: str = "class"  # class: the region's best class similarity | margin: its top-1 minus top-2 probability | global | agreement
    steps: int = 3  # T: expansion steps (lgca)
    regions: int = 2  # K: regions selected and grown per step (lgca)
    growth: float = 2.0  # gamma: growth of a selected region's side, capped at min(W, H)
    growth_target: float | None = None  # if set, lineages grow geometrically to this fraction of min(W, H) at step T
    overlap_iou: float = 0.5  # a selected region overlaps earlier selections (its ancestors aside) at most this much
    image_scale: float = 4.0  # region weights: softmax(exp(image_scale) * <f(b), f(x)>)
    text_scale: float = 2.0  # description weights: softmax(exp(text_scale) * <t_cj, t_c>)
    expand_weight: float = 1.0  # extra weight of grown boxes among the regions, before renormalising
    global_weight: float | None = None  # lambda: S = lambda <f(x), T_c> + (1 - lambda) R; None: the method's default
    # lgca's region term (docs/METHOD.md, step 5). lineages: the selected crops and the boxes grown from them, one
    # region embedding per expansion level, averaged over the levels | all: revision 2, every crop and grown box
    # with WCA's weights (and `expand_weight`)
    region_pool: str = "lineages"
    selection: str = "pool"  # pool: each step grows the K most salient regions of the pool | lineages: K crops once, grown every step
    level_aggregation: str = "embedding"  # per level: embedding, <normalise(sum u_b f(b)), T_c> | similarity, sum u_b <f(b), T_c>
    lineage_weights: str = "saliency"  # u_b within a level: saliency, softmax(saliency_scale * sigma(b)) | uniform
    saliency_scale: float = 20.0  # temperature of saliency lineage weights
    level0: str = "selected"  # level 0 of the lineage term: the selected crops | all local crops, with WCA's weights
    # fixed: lambda for every image | confidence: lambda + (1 - lambda) * m, m the global view's top-1 minus top-2
    # probability, so a confident whole image keeps its say and an unsure one defers to its lineages
    global_weight_rule: str = "confidence"
    # confidence cascade (lgca): an image whose global view alone gives a top-1 minus top-2 probability of at
    # least this keeps that (descriptors) result; only the others get crops and expansion. None: off
    cascade_margin: float | None = None
    seed: int = 0  # crop sampling seed, combined with a stable hash of each image key
    topk: int = 5  # labels kept per image in the output
    micro_batch: int = 256  # views per image-encoder call
    descriptor_weights: str = "softmax"  # descriptors method: softmax (METHOD.md) | mean (CuPL's plain mean, WCA's baseline)

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        require(self.method in METHODS, f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        require(self.saliency in SALIENCY_RULES, f"saliency {self.saliency!r} is unknown; choose one of {', '.join(SALIENCY_RULES)}")
        require(self.crop_layout in CROP_LAYOUTS, f"crop layout {self.crop_layout!r} is unknown; choose random or grid")
        require(self.letterbox in LETTERBOX_RULES, f"letterbox {self.letterbox!r} is unknown; choose {' or '.join(LETTERBOX_RULES)}")
        require(self.crops >= 0, f"crops must be >= 0, got {self.crops}")
        require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        require(self.regions >= 0, f"regions must be >= 0, got {self.regions}")
        require(
            self.crop_scale is None or (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1),
            f"crop scale must be two numbers 0 < alpha <= beta <= 1, got {self.crop_scale}",
        )
        require(self.growth >= 1.0, f"growth must be >= 1 (a grown region contains its parent), got {self.growth}")
        require(0 <= self.overlap_iou <= 1, f"overlap IoU must lie in [0, 1], got {self.overlap_iou}")
        require(self.expand_weight >= 0, f"expand weight must be >= 0, got {self.expand_weight}")
        for name, choices in (
            ("region_pool", REGION_POOLS),
            ("selection", SELECTIONS),
            ("level_aggregation", LEVEL_AGGREGATIONS),
            ("lineage_weights", LINEAGE_WEIGHTS),
            ("level0", LEVEL0_BOXES),
            ("global_weight_rule", GLOBAL_WEIGHT_RULES),
        ):
            value = getattr(self, name)
            require(value in choices, f"{name.replace('_', ' ')} {value!r} is unknown; choose one of {', '.join(choices)}")
        require(
            math.isfinite(self.saliency_scale) and 0 <= self.saliency_scale <= 100,
            f"saliency scale must lie in [0, 100] (softmax temperature of saliency lineage weights), got {self.saliency_scale}",
        )
        for name in ("global_weight", "growth_target", "cascade_margin"):  # optional numbers: a string here is a parsing slip
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                f"{name.replace('_', ' ')} must be a number or None, got {value!r}",
            )
        require(
            self.global_weight is None or 0 <= self.global_weight <= 1,
            f"global weight must lie in [0, 1], got {self.global_weight}",
        )
        require(
            self.cascade_margin is None or self.cascade_margin >= 0,
            f"cascade margin must be >= 0 (0: every image keeps its global-view result; above 1: every image escalates), "
            f"got {self.cascade_margin}",
        )
        require(
            self.cascade_margin is None or self.method == "lgca",
            f"the confidence cascade escalates to lgca; use --method lgca with --cascade-margin, not {self.method}",
        )
        require(
            self.growth_target is None or 0 < self.growth_target <= 1,
            f"growth target must lie in (0, 1] (a fraction of the shorter side), got {self.growth_target}",
        )
        for name in ("image_scale", "text_scale"):
            value = getattr(self, name)
            require(
                math.isfinite(value) and abs(value) <= MAX_SCALE,
                f"{name.replace('_', ' ')} must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (it is used as exp(scale); WCA's value is "
                f"{4.0 if name == 'image_scale' else 2.0}), got {value}",
            )
        require(
            self.descriptor_weights in DESCRIPTOR_WEIGHTS,
            f"descriptor weights {self.descriptor_weights!r} are unknown; choose one of {', '.join(DESCRIPTOR_WEIGHTS)}",
        )
        require(self.topk >= 1, f"topk must be >= 1, got {self.topk}")
        require(self.micro_batch >= 1, f"micro batch must be >= 1, got {self.micro_batch}")
        if self.crop_layout == "grid" and self.crops:
            side = math.isqrt(self.crops)
            require(side * side == self.crops, f"the grid layout needs a square number of crops (e.g. 49, 64), got {self.crops}")
        if self.method == "lgca" and self.regions and self.steps:
            require(
                self.crops >= self.regions,
                f"lgca grows {self.regions} regions a step but has only {self.crops} crops; use --crops >= --regions",
            )

    @property
    def uses_crops(self) -> bool:
        return self.method in CROP_METHODS

    @property
    def view_global_weight(self) -> float:
        """lambda of the configured method: `global_weight`, or the method's default when it is None."""
        return self.global_weight_for(self.method)

    def global_weight_for(self, method: str) -> float:
        """lambda with which `method` scores: 1 for the global-only methods; for wca and lgca `global_weight`,
        else their default (0 for wca, as WCA's code; LGCA_GLOBAL_WEIGHT for lgca)."""
        if method not in CROP_METHODS:
            return 1.0
        if self.global_weight is not None:
            return self.global_weight
        return LGCA_GLOBAL_WEIGHT if method == "lgca" else 0.0

    @property
    def view_crop_scale(self) -> tuple[float, float]:
        """(alpha, beta) of the configured method: `crop_scale`, or the method's default when it is None."""
        return self.crop_scale_for(self.method)

    def crop_scale_for(self, method: str) -> tuple[float, float]:
        """(alpha, beta) with which `method` cuts its crops: `crop_scale`, else WCA_CROP_SCALE for wca (and the
        global-only methods, which cut none) and LGCA_CROP_SCALE for lgca."""
        if self.crop_scale is not None:
            return self.crop_scale
        return LGCA_CROP_SCALE if method == "lgca" else WCA_CROP_SCALE

    @property
    def grown_views(self) -> int:
        """K * T for lgca, else 0."""
        return self.regions * self.steps if self.method == "lgca" else 0

    @property
    def encoder_passes(self) -> int:
        """Image-encoder passes per image: 1 + N + K*T for lgca, 1 + N for wca, 1 otherwise."""
        return 1 + (self.crops if self.uses_crops else 0) + self.grown_views

    def to_dict(self) -> dict[str, Any]:
        """The parameters as recorded in provenance: lambda and the crop scale are the values the method scores
        with, never None."""
        out = asdict(self)
        if self.letterbox == "off" or not self.uses_crops:
            del out["letterbox"]  # recorded where it decides crops: plans of global-view methods resume as they are
        out["crop_scale"] = list(self.view_crop_scale)
        out["global_weight"] = self.view_global_weight
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Which open_clip model to load, from where, and how to run it."""

    name: str = "ViT-B-32"  # open_clip architecture, or a path to an open_clip model-config JSON
    pretrained: str = "laion2b_s34b_b79k"  # open_clip tag, local file, fsspec URI (s3://...), or "random"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    cache_dir: str | None = None  # weights and text-embedding cache; default ~/.cache/lgca-label
    random_seed: int = 0  # seed of --pretrained random weights
    compile: bool = False  # torch.compile the image encoder: slower start-up, possibly faster encoding
    # Preprocessing and activation of weights from a file or URI (a tag carries its own): the open_clip tag the
    # weights were exported from, and/or explicit values, which win over the tag's.
    weights_tag: str | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    interpolation: str | None = None  # bicubic | bilinear | nearest
    resize_mode: str | None = None  # shortest | longest | squash
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                require(
                    len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                    f"{name.replace('_', ' ')} must be three numbers (R, G, B), got {value!r}",
                )
                object.__setattr__(self, name, tuple(float(v) for v in value))
        require(self.image_std is None or all(v > 0 for v in self.image_std), f"image std must be > 0 per channel, got {self.image_std}")
        require(
            self.interpolation is None or self.interpolation in INTERPOLATIONS,
            f"interpolation {self.interpolation!r} is unknown; choose one of {', '.join(INTERPOLATIONS)}",
        )
        require(
            self.resize_mode is None or self.resize_mode in RESIZE_MODES,
            f"resize mode {self.resize_mode!r} is unknown; choose one of {', '.join(RESIZE_MODES)}",
        )
        require(bool(self.name), "model name is empty; pass --model, e.g. ViT-B-32")
        _refuse_credentials("--model", self.name)
        _refuse_credentials("--pretrained", self.pretrained)
        _refuse_credentials("--cache-dir", self.cache_dir)
        require(bool(self.pretrained), "pretrained is empty; pass an open_clip tag, a weights file, a URI or 'random'")
        require(self.precision in PRECISIONS, f"precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N",
        )


@dataclass(frozen=True)
class VocabularyConfig:
    """Where the label vocabulary and prompt templates come from."""

    labels: str = ""  # labels file: .txt (one per line), .json/.yaml list, or descriptors {class: [sentences]}
    templates: str | None = None  # templates file, one per line with {} for the class; default: OpenAI ImageNet set
    prompt: str = DEFAULT_PROMPT  # the label prompt p_c of the clip method and of description weighting

    def __post_init__(self) -> None:
        require(bool(self.labels), "no labels given; pass --labels FILE (one class per line, or a descriptors JSON)")
        require("{}" in self.prompt, f"prompt {self.prompt!r} needs a {{}} where the class name goes")
        _refuse_credentials("--labels", self.labels)
        _refuse_credentials("--templates", self.templates)


@dataclass(frozen=True)
class DecodeConfig:
    """How inputs are read, and how their bytes become pixels: on the CPU workers, or (JPEGs) on the scoring GPU."""

    # Bounds on reading one file, before any decoding: the largest real photos (100-megapixel JPEGs, 50-megapixel
    # PNGs) stay under 64 MiB, and a decode task holds several files at once.
    max_bytes: int = 64 * 1024 * 1024
    read_timeout_s: float = 120.0  # a read (retries included) still running then becomes a read_error
    # URL schemes inputs and manifest rows may use: a manifest must not make workers fetch any address it names
    allowed_schemes: tuple[str, ...] = ("file", "s3")
    max_pixels: int = 178_956_970  # declared width * height above this is refused (decompression bombs)
    min_short_side: int = 224  # decode at the smallest scale whose shorter side is still at least this
    timeout_s: float = 30.0  # per-image decode budget on the CPU; a slower image becomes a decode_error
    device: str = "cpu"  # cpu | gpu: JPEGs decoded by nvJPEG on the scoring GPU | auto: gpu when scoring runs on CUDA

    def __post_init__(self) -> None:
        require(self.device in DECODE_DEVICES, f"decode device {self.device!r} is unknown; choose one of {', '.join(DECODE_DEVICES)}")
        object.__setattr__(self, "allowed_schemes", tuple(str(scheme).lower().removesuffix("://") for scheme in self.allowed_schemes))
        require(bool(self.allowed_schemes), "no URL scheme allowed; keep the defaults (file, s3) or add --allow-scheme")
        require(self.max_bytes > 0, f"max bytes must be > 0, got {self.max_bytes}")
        require(self.read_timeout_s > 0, f"read timeout must be > 0, got {self.read_timeout_s}")
        require(self.max_pixels > 0, f"max pixels must be > 0, got {self.max_pixels}")
        require(self.min_short_side > 0, f"min short side must be > 0, got {self.min_short_side}")
        require(self.timeout_s > 0, f"decode timeout must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the job is spread over a Ray cluster."""

    address: str | None = None  # existing Ray cluster: HOST:PORT of its GCS, or auto on a node; None starts a local one
    batch_size: int = 32  # images per scoring call
    concurrency: int | None = None  # scoring actors; default: one per GPU, or 1 on CPU
    num_gpus: float | None = None  # GPUs per actor, fractional allowed; default: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float = 1.0  # CPUs reserved per scoring actor
    decode_batch_size: int = 16  # images per read-and-decode task call
    rows_per_file: int = 10_000  # output rows per committed Parquet file

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.concurrency is None or self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")
        require(self.num_gpus is None or self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus}")
        require(self.num_cpus_per_actor > 0, f"num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}")
        require(self.decode_batch_size >= 1, f"decode_batch_size must be >= 1, got {self.decode_batch_size}")
        require(self.rows_per_file >= 1, f"rows_per_file must be >= 1, got {self.rows_per_file}")


@dataclass(frozen=True)
class JobConfig:
    """Everything one labelling run needs; storage credentials stay out of it (see StorageOptions)."""

    inputs: tuple[str, ...]  # directories, globs, s3:// prefixes, or manifests (.parquet / .csv with a path column)
    output: str  # output directory, local or s3://
    vocabulary: VocabularyConfig
    model: ModelConfig = ModelConfig()
    scoring: ScoringConfig = ScoringConfig()
    decode: DecodeConfig = DecodeConfig()
    execution: ExecutionConfig = ExecutionConfig()
    resume: bool = False  # skip inputs that already have a committed output row
    retry_failed: bool = False  # with resume: label again the rows of committed shards that failed
    overwrite: bool = False  # delete an existing output first
    embeddings: bool = False  # write each ok row's normalised global-view embedding (`embedding`, float16)
    image_column: str | None = None  # Parquet inputs holding the images: the column (default: detected)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        require(bool(self.inputs), "no inputs given; pass one or more directories, globs, s3:// prefixes or manifests")
        require(bool(self.output), "no output given; pass --output DIR")
        _refuse_credentials("--output", self.output)
        for given in self.inputs:
            _refuse_credentials("input", given)
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other; pick one")
        require(self.resume or not self.retry_failed, "--retry-failed works on an existing output; add --resume")
        if self.model.device == "cpu":  # known before any cluster work; `auto` is decided where actors are placed
            decodes_on_device(self.decode.device, self.model.device)


__all__ = [
    "CROP_LAYOUTS",
    "LETTERBOX_RULES",
    "ConfigError",
    "decodes_on_device",
    "DECODE_DEVICES",
    "DESCRIPTOR_WEIGHTS",
    "INTERPOLATIONS",
    "MAX_SCALE",
    "RESIZE_MODES",
    "DecodeConfig",
    "LGCA_GLOBAL_WEIGHT",
    "ExecutionConfig",
    "JobConfig",
    "DEFAULT_PROMPT",
    "METHODS",
    "ModelConfig",
    "SALIENCY_RULES",
    "ScoringConfig",
    "VocabularyConfig",
]
