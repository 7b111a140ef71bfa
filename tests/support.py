"""What many test modules share: the `lgca` program, the argument lists of `lgca run` and `lgca eval`, the tiny
model's config, scikit-image's photos and label files.

Light to import (no torch, Ray or scikit-image until a photo is asked for), so any test module may use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LGCA = str(Path(sys.executable).with_name("lgca"))  # the console script installed beside this interpreter
TINY_MODEL = str(Path(__file__).parent / "fixtures" / "lgca-tiny-vit.json")  # a real open_clip architecture, tiny

PathLike = str | os.PathLike[str]
Inputs = PathLike | Sequence[PathLike]  # one input or several, in order

# name: the scikit-image function that returns it (bundled with the package: no download)
_PHOTOS = {
    "astronaut": "astronaut",
    "cat": "cat",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble": "hubble_deep_field",
    "ihc": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",
}


def run_args(
    inputs: Inputs,
    labels: PathLike,
    output: PathLike,
    *flags: str,
    model: str = TINY_MODEL,
    pretrained: str = "random",
    command: str = "run",
) -> list[str]:
    """The arguments of `lgca run` after the program's name (what `pipeline.cli.main.main` takes).

    Args:
        inputs: one input (folder, glob, manifest, URI) or several, in order.
        labels: the --labels file or URI.
        output: the --output folder or URI.
        flags: further options, after the model's.
        model: --model (default: the tiny architecture of tests/fixtures).
        pretrained: --pretrained (default: seeded random weights).
        command: "run", or "plan" (`lgca plan` takes the arguments of `lgca run`).

    Returns:
        `[command, *inputs, "--labels", labels, "--output", output, "--model", model, "--pretrained", pretrained, *flags]`.
    """
    listed = [inputs] if isinstance(inputs, str | os.PathLike) else inputs
    named = ["--labels", str(labels), "--output", str(output), "--model", model, "--pretrained", pretrained]
    return [command, *map(str, listed), *named, *flags]


def lgca_run(
    inputs: Inputs, labels: PathLike, output: PathLike, *flags: str, model: str = TINY_MODEL, pretrained: str = "random"
) -> list[str]:
    """The `lgca run` command line for a subprocess: the program, then `run_args(...)`."""
    return [LGCA, *run_args(inputs, labels, output, *flags, model=model, pretrained=pretrained)]


def eval_args(data: PathLike, labels: PathLike, *flags: str, model: str = TINY_MODEL, pretrained: str | None = "random") -> list[str]:
    """The arguments of `lgca eval` after the program's name, on the CPU and without a progress bar.

    Args:
        data: --data, a class-per-folder tree or a manifest.
        labels: the --labels file or URI.
        flags: further options.
        model: --model (default: the tiny architecture).
        pretrained: --pretrained (default: seeded random weights); None leaves the option out.
    """
    weights = ["--pretrained", pretrained] if pretrained is not None else []
    return ["eval", "--data", str(data), "--labels", str(labels), "--model", model, *weights, "--device", "cpu", "--no-progress", *flags]


def photo(name: str) -> np.ndarray:
    """A colour photograph bundled with scikit-image (no download): (H, W, 3) uint8, C-contiguous.

    Names: astronaut, cat, chelsea (a cat too), coffee, rocket, hubble, ihc, motorcycle.
    """
    import skimage.data

    pixels = getattr(skimage.data, _PHOTOS[name])()
    if name == "motorcycle":
        pixels = pixels[0]  # the left view of the stereo pair
    return np.ascontiguousarray(pixels)


def labels_file(directory: Path, classes: Sequence[str], name: str = "labels.txt") -> Path:
    """Write `classes` one per line to `directory / name` (the folder is created); returns the file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(f"{c}\n" for c in classes))
    return path
