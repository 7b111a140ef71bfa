"""A model resolved once, on the driver: architecture, weights source, preprocessing, image size and identity.

`resolve_model` checks everything a worker would otherwise find wrong minutes later (an unknown architecture or
tag, a weights file that would run pickled code, a model-config JSON that does not build) and returns a small
`ModelSpec`: the scoring actors load exactly that (`load.load_model`), and the manifest records it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.models.errors import ModelError
from pipeline.models.preprocess import Preprocessing, resolve_preprocessing
from pipeline.models.weights import check_weights_file, file_sha256

log = logging.getLogger(__name__)

RANDOM = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_WEIGHTS_WARNING = (
    "pretrained=random: the model has RANDOM weights, so its labels are MEANINGLESS. "
    "Use it only for tests and speed measurements; pass an open_clip tag, a weights file or an s3:// URI for real labels."
)
REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # open_clip ignores a file without them


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: kind is "random", "tag", "file" or "uri"."""

    kind: str
    value: str


@dataclass(frozen=True)
class Architecture:
    """An open_clip architecture; for a model-config JSON, its content (registered again on each worker)."""

    name: str
    config: dict[str, Any] | None = None  # the JSON's model config, without `preprocess_cfg`
    preprocess: dict[str, Any] | None = None  # the JSON's `preprocess_cfg`: how the model was trained to see images
    sha256: str = ""  # of the JSON file: the architecture is its content, not its name


@dataclass(frozen=True)
class ModelSpec:
    """Everything about the model that is decided before it is loaded; small, so actors are handed it as it is."""

    config: ModelConfig
    architecture: Architecture
    source: WeightsSource
    preprocessing: Preprocessing
    image_size: int  # the image tower's input side S
    embed_dim: int  # D, the side of the embeddings both towers project to
    weights_sha256: str = ""  # of a weights file (a URI's is known once fetched)
    record: dict[str, Any] = field(default_factory=dict)  # the manifest's `model` entry

    def on_device(self, device: str) -> ModelSpec:
        """The same model, loaded on `device` (the execution decides where actors score)."""
        return replace(self, config=replace(self.config, device=device))


def resolve_model(config: ModelConfig, warn: bool = True) -> ModelSpec:
    """Resolve and check `config` without loading weights or building the model in memory.

    A model-config JSON is built on the meta device, a local weights file is opened the way workers will open it
    (a safetensors header, or a torch checkpoint memory-mapped), so a file that would run pickled code is refused
    here. `warn` warns about random weights and about file weights without a preprocessing hint.

    Raises:
        ModelError: an unknown architecture or tag, a missing or unsafe weights file, a JSON that does not build.
    """
    architecture = register_architecture(config.name)
    if architecture.config is not None:
        _build_on_meta(architecture.name, config.name)
    source = parse_weights_source(architecture.name, config.pretrained)
    preprocessing = resolve_preprocessing(architecture.name, source.kind, config, warn=warn, model_preprocess=architecture.preprocess)
    if source.kind == "random" and warn:
        log.warning(RANDOM_WEIGHTS_WARNING)
    weights_sha256 = ""
    if source.kind == "file":
        check_weights_file(Path(source.value))
        weights_sha256 = file_sha256(Path(source.value))
    image_size, embed_dim = _sizes(architecture.name)
    spec = ModelSpec(config, architecture, source, preprocessing, image_size, embed_dim, weights_sha256)
    return replace(spec, record=_record(spec))


def _record(spec: ModelSpec) -> dict[str, Any]:
    config = spec.config
    record: dict[str, Any] = {
        "name": spec.architecture.name,
        "pretrained": config.pretrained,
        "source": spec.source.kind,
        "weights_sha256": spec.weights_sha256 or None,
        "preprocess": spec.preprocessing.to_dict(),
        "precision": config.precision,
    }
    if spec.source.kind == "random":
        record["random_seed"] = config.random_seed
    if spec.architecture.sha256:
        record["config_sha256"] = spec.architecture.sha256
    return record


def register_architecture(name: str) -> Architecture:
    """The open_clip architecture `name` designates, registering it first if it is a model-config JSON file.

    Raises:
        ModelError: an unknown architecture, with the closest valid names and the full list; an unusable JSON.
    """
    import open_clip

    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model config file {name} does not exist; pass an open_clip name such as ViT-B-32")
        architecture = _read_model_config(path)
        register_model_config(architecture)
        return architecture
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown open_clip architecture {name!r}.{hint} Valid names: {', '.join(known)}")
    return Architecture(name)


def architecture_name(name: str) -> str:
    """The open_clip name of `name` (registered with open_clip if it is a model-config JSON)."""
    return register_architecture(name).name


def register_model_config(architecture: Architecture) -> None:
    """Register a model-config JSON's content with open_clip under its name (a no-op for built-in architectures)."""
    import open_clip

    if architecture.config is None:
        return
    with tempfile.TemporaryDirectory() as folder:  # open_clip registers by file stem, so the name is kept
        path = Path(folder) / f"{architecture.name}.json"
        path.write_text(json.dumps(architecture.config))
        open_clip.add_model_config(path)


def _read_model_config(path: Path) -> Architecture:
    content = b""
    try:
        content = path.read_bytes()
        config = json.loads(content)
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
    # open_clip's model classes do not accept `preprocess_cfg`: it is kept apart, for the preprocessing
    preprocess = config.pop("preprocess_cfg", None)
    if preprocess is not None and not isinstance(preprocess, dict):
        raise ModelError(f"model config file {path}: `preprocess_cfg` must be a mapping (mean, std, interpolation, resize_mode)")
    return Architecture(path.stem, config, preprocess, hashlib.sha256(content).hexdigest())


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


def _build_on_meta(architecture: str, path: str) -> None:
    """Build a model-config JSON's model without memory (the meta device): a bad value fails here, not in every actor."""
    import open_clip
    import torch

    try:
        with torch.device("meta"), quiet_open_clip():
            open_clip.create_model(architecture, pretrained=None, device="meta")
    except Exception as error:
        raise ModelError(f"model config file {path} does not build an open_clip model: {type(error).__name__}: {error}") from None


def _sizes(architecture: str) -> tuple[int, int]:
    """The image tower's input side S and the embedding dimension D, read from the architecture config without
    building the model."""
    import open_clip

    config = open_clip.get_model_config(architecture) or {}
    size = config.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size), int(config.get("embed_dim", 0))


class quiet_open_clip:
    """Silence open_clip's 'no pretrained weights loaded' log line: weights are loaded, or announced, here."""

    def __enter__(self) -> None:
        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._root.setLevel(self._level)
