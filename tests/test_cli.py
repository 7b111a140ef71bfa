"""The `lgca` command line: help texts, and the README's example command run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .support import LGCA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_RIGHT_MIN = 0.6  # share of the 20 demo scenes the example must label right (measured: 13 of 20)


def _readme_example() -> list[str]:
    """The `lgca run` command shown in the README (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^\.venv/bin/lgca run examples/fashion/scenes.*?(?<!\\)$", text, flags=re.M | re.S)
    assert match, "the README shows no `.venv/bin/lgca run examples/fashion/scenes ...` command"
    return shlex.split(match.group(0).replace("\\\n", " "))


@pytest.mark.integration
def test_help_explains_the_commands():
    result = subprocess.run([LGCA, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "run" in result.stdout and "LGCA" in result.stdout


@pytest.mark.integration
def test_the_command_line_loads_no_torch_ray_or_pandas_until_a_command_runs():
    # `lgca --help` must stay fast: every heavy import happens inside the command that needs it
    code = (
        "import sys; from pipeline.cli.main import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'pandas', 'open_clip', 'fsspec', 'PIL'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.integration
def test_run_help_lists_every_scoring_option():
    result = subprocess.run([LGCA, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in (
        "--method",
        "--model",
        "--pretrained",
        "--crops",
        "--crop-scale",
        "--crop-layout",
        "--steps",
        "--regions",
        "--saliency",
        "--growth",
        "--seed",
        "--topk",
        "--resume",
        "--overwrite",
        "--num-gpus",
        "--concurrency",
        "--batch-size",
        "--address",
        "--storage-option",
        "--max-pixels",
    ):
        assert flag in result.stdout, flag


@pytest.mark.integration
def test_no_command_prints_help_and_exits_2():
    result = subprocess.run([LGCA], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "COMMAND" in result.stdout


def test_makefile_example_runs_the_readme_command():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ").replace("\t", " ")
    readme = _readme_example()
    assert " ".join(["$(BIN)/lgca", *readme[1:]]) in " ".join(makefile.split())


@pytest.mark.slow
@pytest.mark.integration
def test_readme_example_labels_the_demo_scenes_mostly_right(tmp_path):
    """The README's example, as written: the committed learned model on the committed demo scenes, offline."""
    command = _readme_example()
    command[0] = LGCA
    command[command.index("--output") + 1] = str(tmp_path / "example")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights" not in result.stderr
    scenes = sorted(str(p.relative_to(ROOT / "examples/fashion/scenes")) for p in (ROOT / "examples/fashion/scenes").rglob("*.jpg"))
    table = pq.read_table(tmp_path / "example").sort_by("key")
    assert table.column("key").to_pylist() == scenes
    assert set(table.column("status").to_pylist()) == {"ok"}
    right = sum(key.split("/")[0] == label for key, label in zip(table.column("key").to_pylist(), table.column("label").to_pylist()))
    assert right >= EXAMPLE_RIGHT_MIN * len(scenes), f"{right} of {len(scenes)} demo scenes right"
    shown = subprocess.run(
        [sys.executable, "jobs/show_example.py", str(tmp_path / "example")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and f"{right} of {len(scenes)} scenes labelled with their true class" in shown.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_the_cascade_labels_each_row_with_the_pass_that_scored_it(tmp_path):
    """`--cascade-margin`: confident scenes keep their global-view (descriptors) result without boxes, the others
    are lgca rows with boxes; `_manifest.json` and `lgca summary` give the threshold and the share escalated."""
    import json

    command = _readme_example()
    command[0] = LGCA
    output = tmp_path / "cascade"
    command[command.index("--output") + 1] = str(output)
    result = subprocess.run([*command, "--cascade-margin", "0.3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(output).to_pylist()
    by_method = {method: [row for row in table if row["method"] == method] for method in ("descriptors", "lgca")}
    assert by_method["descriptors"] and by_method["lgca"] and len(table) == 20
    assert all(row["margin"] >= 0.3 and not row["boxes"] for row in by_method["descriptors"])
    assert all(row["margin"] is not None and row["boxes"] for row in by_method["lgca"])
    manifest = json.loads((output / "_manifest.json").read_text())
    escalated = len(by_method["lgca"]) / 20
    assert manifest["scoring"]["cascade_margin"] == 0.3
    assert manifest["cascade"] == {
        "margin": 0.3,
        "rows_by_method": {"descriptors": len(by_method["descriptors"]), "lgca": len(by_method["lgca"])},
        "escalated_share": escalated,
    }
    summary = subprocess.run([LGCA, "summary", str(output)], capture_output=True, text=True, timeout=120)
    assert f"margin 0.3: {100 * escalated:.1f}% of ok rows escalated to lgca" in summary.stdout


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, first_line, usage",
    [
        (
            ["run", "photos/", "--labels", "labels.txt", "--outptu", "out/"],
            "lgca run: error: unrecognized argument --outptu (did you mean --output?)",
            "usage: lgca run INPUT [INPUT ...] --output OUTPUT --labels LABELS [options]",
        ),
        (
            ["report", "out/", "--thumbnail-sise", "64"],
            "lgca report: error: unrecognized argument --thumbnail-sise (did you mean --thumbnail-size?)",
            "usage: lgca report OUTPUT_DIR [options]",
        ),
        (
            ["export", "out/", "--format", "cocoo", "--out", "x.json"],
            "lgca export: error: argument --format: invalid choice: 'cocoo' (choose from 'labelstudio', 'coco', 'fiftyone', 'csv') "
            "(did you mean 'coco'?)",
            "usage: lgca export OUTPUT_DIR --format FORMAT --out FILE [options]",
        ),
        (
            ["run", "--labels", "labels.txt"],
            "lgca run: error: the following arguments are required: INPUT, --output",
            "usage: lgca run INPUT [INPUT ...] --output OUTPUT --labels LABELS [options]",
        ),
        (["summray", "out/"], None, "usage: lgca COMMAND [options]"),
        (["rnu", "--inputs", "a", "--output", "b"], None, "usage: lgca COMMAND [options]"),  # the command, not its flags
    ],
)
def test_usage_errors_are_three_lines_naming_the_likely_fix(argv, first_line, usage, capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and lines[1] == usage and lines[2].startswith("see 'lgca")
    if first_line:
        assert lines[0] == first_line
    else:
        typed, meant = {"summray": ("summray", "summary"), "rnu": ("rnu", "run")}[argv[0]]
        assert f"invalid choice: '{typed}'" in lines[0] and lines[0].endswith(f"(did you mean '{meant}'?)")


def test_an_abbreviated_flag_is_not_mistaken_for_an_unknown_one(capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit):
        main(["run", "photos/", "--out", "o/"])  # --out abbreviates --output; --labels is what is missing
    assert capsys.readouterr().err.splitlines()[0] == "lgca run: error: the following arguments are required: --labels"
