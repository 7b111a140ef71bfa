"""The image preprocessing and activation that fit the weights in use, resolved from open_clip's configurations.

open_clip's pretrained configuration of a tag says how its weights were trained to see images (mean, std,
interpolation, resize mode) and whether the model uses QuickGELU. Weights from a file or URI carry no such
record, so the user names the tag they were exported from (`weights_tag`) or gives the values; without either,
the architecture's own default is used, with a loud warning where its tags disagree among themselves.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ModelConfig
from pipeline.models.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """How images become encoder input, and the activation the weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # bicubic | bilinear | nearest
    resize_mode: str  # shortest: shorter side to S, centre crop | longest: longer side to S, pad | squash: to S x S
    fill_color: int  # pixel value of the padding of the `longest` mode
    quick_gelu: bool
    origin: str  # where these values came from, in words: recorded in the manifest and shown by `lgca summary`

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def _settings(cfg: dict[str, Any]) -> tuple[Any, ...]:
    """(mean, std, interpolation, resize mode, quick_gelu) of `cfg` over open_clip's own defaults (`PreprocessCfg`)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = merge_preprocess_dict(PreprocessCfg(), cfg)
    return (
        tuple(merged["mean"]),
        tuple(merged["std"]),
        merged["interpolation"],
        merged["resize_mode"],
        bool(cfg.get("quick_gelu", False)),
    )


def tag_settings(architecture: str) -> dict[tuple[Any, ...], list[str]]:
    """The distinct (mean, std, interpolation, resize mode, quick_gelu) of the architecture's tags, with their tags."""
    import open_clip

    groups: dict[tuple[Any, ...], list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(architecture):
        groups.setdefault(_settings(open_clip.get_pretrained_cfg(architecture, tag)), []).append(tag)
    return groups


def resolve_preprocessing(
    architecture: str, source_kind: str, config: ModelConfig, warn: bool = True, model_preprocess: dict[str, Any] | None = None
) -> Preprocessing:
    """The preprocessing for `config`'s weights: tag configuration, then explicit values on top.

    Args:
        architecture: the open_clip architecture (registered already if it came from a JSON file).
        source_kind: "tag", "file", "uri" or "random", from `parse_weights_source`.
        config: `pretrained`, `weights_tag` and the explicit `image_mean`, `image_std`, `interpolation`,
            `resize_mode`, `quick_gelu`.
        warn: warn when file weights give no hint and the architecture's tags disagree.
        model_preprocess: a model-config JSON's own `preprocess_cfg` (`spec.Architecture`), under everything else.

    Raises:
        ConfigError (ModelError): `weights_tag` is no tag of the architecture, or is given with a tag as `pretrained`.
    """
    import open_clip

    base = dict(model_preprocess or {})
    quick_gelu_default = bool((open_clip.get_model_config(architecture) or {}).get("quick_gelu", False))
    tag = config.pretrained if source_kind == "tag" else config.weights_tag
    if config.weights_tag and source_kind == "tag":
        raise ModelError(
            f"--weights-tag {config.weights_tag} is for weights from a file or URI; --pretrained {config.pretrained} is a tag already"
        )
    groups = tag_settings(architecture)
    if tag:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        if tag not in tags:
            raise ModelError(f"--weights-tag {tag!r} is not an open_clip tag of {architecture}; valid tags: {', '.join(tags) or 'none'}")
        base.update(open_clip.get_pretrained_cfg(architecture, tag))
        origin = f"open_clip configuration of tag {tag}"
    elif len(groups) == 1 and source_kind != "random":
        base.update(dict(zip(("mean", "std", "interpolation", "resize_mode", "quick_gelu"), next(iter(groups)))))
        origin = f"open_clip configuration shared by every tag of {architecture}"
    elif model_preprocess is not None:
        origin = f"preprocess_cfg of the {architecture} model config"
    else:
        origin = f"{architecture} architecture default"
    explicit = {
        "mean": config.image_mean,
        "std": config.image_std,
        "interpolation": config.interpolation,
        "resize_mode": config.resize_mode,
        "quick_gelu": config.quick_gelu,
    }
    given = {name: value for name, value in explicit.items() if value is not None}
    base.update(given)
    if given:
        origin += f", with {', '.join(sorted(given))} given explicitly"
    mean, std, interpolation, resize_mode, quick_gelu = _settings({"quick_gelu": quick_gelu_default, **base})
    unhinted = source_kind in ("file", "uri") and not tag and len(given) < len(explicit)
    if warn and unhinted and len(groups) > 1:
        described = "; ".join(
            f"{', '.join(tags[:3])}{' ...' if len(tags) > 3 else ''}: mean {s[0]}, std {s[1]}, {s[2]}, {s[3]}, quick_gelu {s[4]}"
            for s, tags in groups.items()
        )
        message = (
            f"weights {config.pretrained} come with no preprocessing hint, and the tags of {architecture} disagree ({described}). "
            f"Using the architecture default ({origin}); labels may be silently worse. Pass --weights-tag TAG (the open_clip "
            "tag the weights were exported from), or --image-mean, --image-std, --interpolation, --resize-mode and --quick-gelu."
        )
        log.warning(message)
        warnings.warn(message, stacklevel=2)
    return Preprocessing(
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=str(interpolation),
        resize_mode=str(resize_mode),
        fill_color=int(base.get("fill_color", 0)),
        quick_gelu=bool(quick_gelu),
        origin=origin,
    )
