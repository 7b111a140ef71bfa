"""Model sources (open_clip tag, local file, fsspec URI, random) to encoders and preprocessing, loaded safely."""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, ModelConfig
from pipeline.models.preprocess import Preprocessing, resolve_preprocessing
from pipeline.scoring.views import ViewFormat

log = logging.getLogger(__name__)

RANDOM = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_WEIGHTS_WARNING = (
    "pretrained=random: the model has RANDOM weights, so its labels are MEANINGLESS. "
    "Use it only for tests and speed measurements; pass an open_clip tag, a weights file or an s3:// URI for real labels."
)


class ModelError(ConfigError):
    """The model or its weights cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: kind is "random", "tag", "file" or "uri"."""

    kind: str
    value: str


def default_cache_dir(config: ModelConfig) -> Path:
    """The cache directory for fetched weights and text embeddings."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("LGCA_CACHE_DIR", Path.home() / ".cache" / "lgca-label")).expanduser()


def architecture_name(name: str) -> str:
    """The open_clip architecture `name` designates, registering it first if it is a model-config JSON file.

    Raises:
        ModelError: an unknown architecture, with the closest valid names and the full list.
    """
    import open_clip

    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model config file {name} does not exist; pass an open_clip name such as ViT-B-32")
        _register_model_config(open_clip, path)
        return path.stem
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown open_clip architecture {name!r}.{hint} Valid names: {', '.join(known)}")
    return name


# `preprocess_cfg` of model-config JSON files by architecture: how the model was trained to see images (as in
# open_clip's hub configs); open_clip's model classes do not accept the key, so it is kept here instead
JSON_PREPROCESS: dict[str, dict[str, Any]] = {}
REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # open_clip ignores a file without them


def _register_model_config(open_clip: Any, path: Path) -> None:
    """Register a model-config JSON with open_clip, keeping its optional `preprocess_cfg` for the preprocessing."""
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"model config file {path} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ModelError(f"model config file {path} holds {type(config).__name__}, not a mapping with embed_dim, vision_cfg and text_cfg")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ModelError(
            f"model config file {path} lacks {', '.join(missing)}; an open_clip model config needs embed_dim, vision_cfg and "
            "text_cfg (see open_clip's model_configs/ for examples)"
        )
    preprocess = config.pop("preprocess_cfg", None)
    if preprocess is None:
        open_clip.add_model_config(path)
        return
    if not isinstance(preprocess, dict):
        raise ModelError(f"model config file {path}: `preprocess_cfg` must be a mapping (mean, std, interpolation, resize_mode)")
    JSON_PREPROCESS[path.stem] = dict(preprocess)
    with tempfile.TemporaryDirectory() as folder:  # open_clip registers by file stem, so the name is kept
        stripped = Path(folder) / path.name
        stripped.write_text(json.dumps(config))
        open_clip.add_model_config(stripped)


def parse_weights_source(architecture: str, pretrained: str) -> WeightsSource:
    """Classify `pretrained` for `architecture` without loading anything.

    Raises:
        ModelError: a missing local file, or a name that is no tag of this architecture.
    """
    import open_clip

    if pretrained == RANDOM:
        return WeightsSource("random", pretrained)
    if "://" in pretrained:
        if pretrained.startswith("file://"):
            return parse_weights_source(architecture, pretrained[len("file://") :])
        return WeightsSource("uri", pretrained)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource("file", str(path.resolve()))
    looks_like_path = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        raise ModelError(f"weights file {pretrained} does not exist; check the path")
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained not in tags:
        valid = ", ".join(tags) if tags else "none (pass a weights file, an s3:// URI or 'random')"
        raise ModelError(
            f"{pretrained!r} is not a weights file, a URI, 'random' or an open_clip tag of {architecture}; valid tags: {valid}"
        )
    return WeightsSource("tag", pretrained)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; an explicit CUDA device without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device} asked for but CUDA is not available here; use --device cpu or auto")
    return resolved


def read_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint, never executing pickled code.

    `mmap` maps a torch checkpoint's tensors instead of reading them (a cheap validity check).

    Raises:
        ModelError: the file is not a weights file, or a pickle asks for anything beyond plain tensors.
    """
    state: Any  # a checkpoint is any object until checked below
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not (mmap and "mmap" in str(error)):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) checkpoint
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({str(error).splitlines()[0]}). "
            "Convert it to safetensors with a trusted tool."
        ) from None
    except Exception as error:  # safetensors and torch raise many types for corrupt files
        raise ModelError(f"cannot read weights {path}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(uri: str, cache_dir: Path, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Copy weights at an fsspec URI into the local cache once; later calls reuse the copy.

    The copy is written to a temporary name and renamed, so a crash never leaves a partial file that
    a later run would trust.

    Raises:
        ModelError: the URI cannot be read.
    """
    import fsspec

    name = Path(uri.rstrip("/").rsplit("/", 1)[-1]).name or "weights"
    target = cache_dir / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:24] / name
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        try:
            remote_size = fs.size(path)
        except Exception as error:
            if not target.is_file():
                raise
            # the remote is gone or unreachable: the copy fetched earlier still serves (its sha256 is recorded)
            log.warning("cannot check weights %s (%s); using the cached copy %s", uri, error, target)
            return target
        if target.is_file() and target.stat().st_size == remote_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        os.close(handle)
        try:
            fs.get_file(path, temporary)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except FileNotFoundError:
        raise ModelError(f"weights {uri} do not exist; check the URI") from None
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"cannot fetch weights {uri}: {error}; check the URI and storage credentials") from None
    return target


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
            mean=_channels(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=_channels(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))),
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


def check_model(config: ModelConfig) -> WeightsSource:
    """Validate architecture and weights source quickly, before any cluster work. Returns the source.

    A local weights file is opened the way the workers will open it (tensors memory-mapped, not read), so
    a file that would run pickled code is refused here, before a cluster starts.
    """
    architecture = architecture_name(config.name)
    if config.name.endswith(".json"):
        _build_on_meta(architecture, config.name)
    source = parse_weights_source(architecture, config.pretrained)
    resolve_preprocessing(architecture, source.kind, config)  # a bad --weights-tag fails here; a missing hint warns
    if source.kind == "random":  # said once, here on the driver: the workers load with warn=False
        log.warning(RANDOM_WEIGHTS_WARNING)
    if source.kind == "file" and source.value.endswith(".safetensors"):
        _check_safetensors_header(Path(source.value))
    elif source.kind == "file":  # safetensors cannot hold code; a torch checkpoint can
        read_state_dict(Path(source.value), mmap=True)
    return source


def _build_on_meta(architecture: str, path: str) -> None:
    """Build a model-config JSON's model without memory (the meta device): a bad value fails here, not in every actor."""
    import open_clip

    try:
        with torch.device("meta"), _quiet_open_clip():
            open_clip.create_model(architecture, pretrained=None, device="meta")
    except Exception as error:
        raise ModelError(f"model config file {path} does not build an open_clip model: {type(error).__name__}: {error}") from None


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # reads the header only
            handle.keys()
    except Exception as error:
        raise ModelError(f"cannot read weights {path}: it is not a valid safetensors file ({error})") from None


def load_model(config: ModelConfig, storage_options: Mapping[str, Any] | None = None, warn: bool = True) -> LoadedModel:
    """Load the model `config` names, with the preprocessing and activation its weights were trained with.

    Args:
        config: architecture, weights source, preprocessing hints, device and precision.
        storage_options: fsspec options for a weights URI (credentials stay out of logs).
        warn: warn about random weights and about file weights without a preprocessing hint (a job's driver warned already).

    Returns:
        A LoadedModel in eval mode on its device.

    Raises:
        ModelError: unknown architecture or tag, unreadable or mismatched weights, an unavailable device.
    """
    import open_clip

    architecture = architecture_name(config.name)
    source = parse_weights_source(architecture, config.pretrained)
    device = resolve_device(config.device)
    cache_dir = default_cache_dir(config)
    identity = {"model": architecture, "pretrained": config.pretrained, "weights_sha256": ""}
    preprocessing = resolve_preprocessing(architecture, source.kind, config, warn=warn)
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
        model = _create_from_tag(open_clip, architecture, source.value, cache_dir, build)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.random_seed)
            with warnings.catch_warnings(), _quiet_open_clip():
                warnings.simplefilter("ignore")
                model = open_clip.create_model(architecture, pretrained=None, **build)
        if source.kind == "random":
            if warn:
                log.warning(RANDOM_WEIGHTS_WARNING)
            identity["pretrained"] = f"random(seed={config.random_seed})"
        else:
            path = Path(source.value) if source.kind == "file" else fetch_weights(source.value, cache_dir, storage_options)
            _load_weights(model, path, architecture)
            identity["weights_sha256"] = file_sha256(path)
    loaded = LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(architecture),
        device=device,
        autocast_dtype=_autocast_dtype(config.precision, device),
        identity=identity,
        compile_encoder=config.compile,
        preprocessing=preprocessing,
    )
    if config.name.endswith(".json"):  # the architecture is the file's content, not its name (text-vector cache key)
        loaded.config_sha256 = file_sha256(Path(config.name).expanduser())
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


class _quiet_open_clip:
    """Silence open_clip's 'no pretrained weights loaded' log line: we load or announce weights ourselves."""

    def __enter__(self) -> None:
        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._root.setLevel(self._level)


def model_image_size(config: ModelConfig) -> int:
    """The image tower's input side S, read from the architecture config without building the model."""
    import open_clip

    vision = (open_clip.get_model_config(architecture_name(config.name)) or {}).get("vision_cfg", {})
    size = vision.get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)
