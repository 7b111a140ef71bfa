"""Weights files: read without executing pickled code, checked cheaply, fetched from a URI into a local cache once."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.models.errors import ModelError

log = logging.getLogger(__name__)


def check_weights_file(path: Path) -> None:
    """Open a local weights file the way workers will (a safetensors header, or a torch checkpoint memory-mapped).

    Raises:
        ModelError: not a weights file, or a checkpoint that would run pickled code.
    """
    if path.suffix == ".safetensors":
        _check_safetensors_header(path)
    else:  # safetensors cannot hold code; a torch checkpoint can
        read_state_dict(path, mmap=True)


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # reads the header only
            handle.keys()
    except Exception as error:
        raise ModelError(f"cannot read weights {path}: it is not a valid safetensors file ({error})") from None


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
