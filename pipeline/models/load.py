"""A resolved model (`spec.ModelSpec`: open_clip tag, local file, fsspec URI, random) to encoders on a device."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pipeline.config import ModelConfig
from pipeline.models.errors import ModelError
from pipeline.models.preprocess import Preprocessing
from pipeline.models.spec import ModelSpec, quiet_open_clip, register_model_config, resolve_model
from pipeline.models.weights import fetch_weights, file_sha256, read_state_dict
from pipeline.scoring.views import ViewFormat

log = logging.getLogger(__name__)


def default_cache_dir(config: ModelConfig) -> Path:
    """The cache directory for fetched weights and text embeddings."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("LGCA_CACHE_DIR", Path.home() / ".cache" / "lgca-label")).expanduser()


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; an explicit CUDA device without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device} asked for but CUDA is not available here; use --device cpu or auto")
    return resolved


class LoadedModel:
    """An open_clip model ready for inference: normalised encoders, preprocessing facts, identity."""

    def __init__(
        self,
        model: Any,  # an open_clip CLIP model: encode_image, encode_text, visual, logit_scale
        tokenizer: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        identity: dict[str, str],
        compile_encoder: bool = False,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.model = model.eval().to(device)
        # channels-last lets cuDNN pick its faster NHWC kernels for the patch (or ResNet) convolutions
        self._memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model.visual.to(memory_format=self._memory_format)
        self._encode_image = self.model.encode_image
        if compile_encoder:
            # dynamic: the last micro-batch of a call is smaller, and must not trigger a recompilation each time
            self._encode_image = torch.compile(self.model.encode_image, dynamic=True)
        self.tokenizer = tokenizer
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.identity = identity
        self.config_sha256 = ""  # of a model-config JSON, when the architecture came from one
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = preprocess.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.preprocessing = preprocessing or Preprocessing(
            mean=_channels(preprocess.get("mean", OPENAI_DATASET_MEAN)),
            std=_channels(preprocess.get("std", OPENAI_DATASET_STD)),
            interpolation=str(preprocess.get("interpolation", "bicubic")),
            resize_mode=str(preprocess.get("resize_mode", "shortest")),
            fill_color=int(preprocess.get("fill_color", 0)),
            quick_gelu=False,
            origin="the model's own preprocessing configuration",
        )
        self.mean, self.std = self.preprocessing.mean, self.preprocessing.std
        self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        if not math.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise ModelError(
                f"the weights' logit_scale gives a temperature of {self.logit_scale}: they are corrupt or not CLIP weights; check --pretrained"
            )

    @property
    def view(self) -> ViewFormat:
        """The encoder's input format: side, normalisation, interpolation and resize mode of its preprocessing."""
        p = self.preprocessing
        return ViewFormat(self.image_size, p.mean, p.std, p.interpolation, p.resize_mode, p.fill_color)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised views to (B, D) normalised float32 embeddings."""
        with torch.inference_mode(), self._autocast():
            features = self._encode_image(pixels.to(self.device, non_blocking=True).contiguous(memory_format=self._memory_format))
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences to (n, D) normalised float32 embeddings, always computed in fp32 (METHOD.md: once per job,
        so precision costs nothing there, and class vectors must not depend on the image side's autocast)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)


def _channels(values: Sequence[float]) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def load_model(model: ModelSpec | ModelConfig, storage_options: Mapping[str, Any] | None = None, warn: bool = True) -> LoadedModel:
    """Load a model with the preprocessing and activation its weights were trained with.

    Args:
        model: a spec resolved once (`spec.resolve_model`: what a job's actors get), or a configuration to resolve.
        storage_options: fsspec options for a weights URI (credentials stay out of logs).
        warn: warn about random weights and about file weights without a preprocessing hint (a job's driver warned already).

    Returns:
        A LoadedModel in eval mode on its device.

    Raises:
        ModelError: unknown architecture or tag, unreadable or mismatched weights, an unavailable device.
    """
    import open_clip

    spec = model if isinstance(model, ModelSpec) else resolve_model(model, warn=warn)
    config, architecture, source, preprocessing = spec.config, spec.architecture.name, spec.source, spec.preprocessing
    register_model_config(spec.architecture)  # a model-config JSON's content, on whichever process loads it
    device = resolve_device(config.device)
    cache_dir = default_cache_dir(config)
    identity = {"model": architecture, "pretrained": config.pretrained, "weights_sha256": ""}
    build = {
        "force_quick_gelu": preprocessing.quick_gelu,
        "force_preprocess_cfg": {
            "mean": preprocessing.mean,
            "std": preprocessing.std,
            "interpolation": preprocessing.interpolation,
            "resize_mode": preprocessing.resize_mode,
            "fill_color": preprocessing.fill_color,
        },
    }
    if source.kind == "tag":
        loaded_model = _create_from_tag(open_clip, architecture, source.value, cache_dir, build)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.random_seed)
            with warnings.catch_warnings(), quiet_open_clip():
                warnings.simplefilter("ignore")
                loaded_model = open_clip.create_model(architecture, pretrained=None, **build)
        if source.kind == "random":
            identity["pretrained"] = f"random(seed={config.random_seed})"
        else:
            path = Path(source.value) if source.kind == "file" else fetch_weights(source.value, cache_dir, storage_options)
            _load_weights(loaded_model, path, architecture)
            identity["weights_sha256"] = spec.weights_sha256 or file_sha256(path)
    loaded = LoadedModel(
        model=loaded_model,
        tokenizer=open_clip.get_tokenizer(architecture),
        device=device,
        autocast_dtype=_autocast_dtype(config.precision, device),
        identity=identity,
        compile_encoder=config.compile,
        preprocessing=preprocessing,
    )
    loaded.config_sha256 = spec.architecture.sha256  # the text-vector cache key: a JSON architecture is its content
    return loaded


def _create_from_tag(open_clip: Any, architecture: str, tag: str, cache_dir: Path, build: Mapping[str, Any]) -> torch.nn.Module:
    try:
        # force_quick_gelu: open_clip builds the architecture's activation and only warns when the tag (e.g. openai)
        # was trained with QuickGELU; the tag's preprocessing comes in through `build` as well
        return open_clip.create_model(
            architecture, pretrained=tag, cache_dir=str(cache_dir / "open_clip"), weights_only=True, require_pretrained=True, **build
        )
    except Exception as error:
        raise ModelError(
            f"cannot fetch open_clip weights {architecture}/{tag}: {str(error).splitlines()[0] if str(error) else error!r}. "
            "Without internet, download the weights elsewhere and pass --pretrained /path/to/weights.safetensors "
            "or an s3:// URI."
        ) from None


def _load_weights(model: Any, path: Path, architecture: str) -> None:
    state = read_state_dict(path)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ModelError(f"weights {path} do not fit architecture {architecture}: {str(error)[:500]}; check --model") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights {path} do not fit architecture {architecture}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); check --model"
        )


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16
