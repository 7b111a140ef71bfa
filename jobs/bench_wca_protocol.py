#!/usr/bin/env python3
"""How far `--preset wca` is from WCA's released protocol, where the difference can be measured here.

    .venv/bin/python jobs/bench_wca_protocol.py --per-class 10

On Fashion-MNIST scenes (jobs/make_scenes.py) scored with the project's learned model (examples/fashion), every
image's 60 crops are encoded once, then wca's accuracy is computed on the same embeddings:
- `preset`: `--preset wca` as the engine runs it: 60 distinct crops per image, seeded per image key;
- `official resampling`: the released main.py's protocol: per run, 60 indices drawn with replacement from the
  60 cached crops, the same indices for every image; mean and std over 20 runs;
- `crop scale 0.5-0.9`: the crop scale of the config the released code never passes (its `alpha`);
- `fp16` (CUDA only) and `bf16` autocast against fp32, on the same crops.
Accuracy is in percent per object scale. Random weights measure nothing here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "jobs"))

from make_scenes import read_truth, write_scenes  # noqa: E402

from pipeline.cli.args import WCA_PRESET_SCORING  # noqa: E402
from pipeline.config import ModelConfig, ScoringConfig, VocabularyConfig  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402
from pipeline.models.text_vectors import text_vectors  # noqa: E402
from pipeline.run.labeler import to_pixels  # noqa: E402
from pipeline.stages.decode import decode_for_views  # noqa: E402
from pipeline.stages.score_rows import scorer_for  # noqa: E402
from pipeline.vocab import load_vocabulary  # noqa: E402

FASHION = ROOT / "examples" / "fashion"
OFFICIAL_RUNS = 20


def official_accuracy(global_emb, crop_emb, vectors, targets, image_scale: float, seed: int) -> tuple[float, float]:
    """Mean and std of acc1 over OFFICIAL_RUNS runs of the released code's resampling."""
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(OFFICIAL_RUNS):
        index = torch.randint(0, crop_emb.shape[1], (crop_emb.shape[1],), generator=generator)  # shared, with replacement
        crops = crop_emb[:, index]
        weights = (math.exp(image_scale) * torch.einsum("bnd,bd->bn", crops, global_emb)).softmax(-1)
        patch = F.normalize((crops * weights[..., None]).sum(dim=1), dim=-1)
        accuracies.append(float(((patch @ vectors.T).argmax(-1) == targets).float().mean()))
    return float(np.mean(accuracies)) * 100, float(np.std(accuracies)) * 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", default="bench-out/wca-scenes")
    parser.add_argument("--per-class", type=int, default=10, help="scenes per class and scale (default: %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    scenes = Path(args.scenes)
    manifest = scenes / "manifest.csv"
    if not manifest.is_file():
        write_scenes(scenes, args.per_class, tuple(args.scales), full_frame=0)
    truth = read_truth(manifest)
    vocabulary = load_vocabulary(VocabularyConfig(labels=str(FASHION / "descriptors.json"), templates=str(FASHION / "templates.txt")))
    keys = sorted(truth)
    with manifest.open(newline="") as handle:
        labels = {row["key"]: row["label"] for row in csv.DictReader(handle)}
    targets = torch.tensor([vocabulary.classes.index(labels[key]) for key in keys])
    groups = np.array([truth[key][0] for key in keys])

    settings = {
        "preset": ScoringConfig(**WCA_PRESET_SCORING),
        "crop scale 0.5-0.9": ScoringConfig(**{**WCA_PRESET_SCORING, "crop_scale": (0.5, 0.9)}),
    }
    precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    results: dict[str, np.ndarray] = {}
    official: dict[str, dict[str, tuple[float, float]]] = {}
    for precision in precisions:
        model = load_model(
            ModelConfig(name=str(FASHION / "fashion-clip.json"), pretrained=str(FASHION / "fashion-clip.safetensors"), precision=precision)
        )
        for name, scoring in settings.items():
            if precision != "fp32" and name != "preset":
                continue
            vectors = text_vectors(model, vocabulary, dataclasses.replace(scoring, method="wca"))
            scorer = scorer_for(model, vocabulary.classes, vectors, scoring)
            decode = decode_for_views(model.image_size, [scoring])
            predicted: list[int] = []
            global_parts: list[torch.Tensor] = []
            crop_parts: list[torch.Tensor] = []
            for start in range(0, len(keys), args.batch):
                chunk = keys[start : start + args.batch]
                converted = [to_pixels(scenes / key, decode) for key in chunk]
                views = scorer.embed([p for p, _ in converted], chunk, [s for _, s in converted])
                predicted.extend(vocabulary.classes.index(score.label) for score in scorer.combine(views))
                global_parts.append(views.global_emb.cpu())
                crop_parts.append(views.region_emb[:, : views.crops].cpu())
            label = name if precision == "fp32" else f"{name}, {precision} autocast"
            results[label] = (torch.tensor(predicted) == targets).numpy()
            if precision == "fp32" and name == "preset":
                global_emb, crop_emb = torch.cat(global_parts), torch.cat(crop_parts)
                per_group = {}
                for group in sorted(set(groups)):
                    rows = torch.from_numpy(groups == group)
                    per_group[group] = official_accuracy(
                        global_emb[rows], crop_emb[rows], scorer.vectors.cpu(), targets[rows], scoring.image_scale, 0
                    )
                official["official resampling (20 runs)"] = per_group
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {len(keys)} scenes; model examples/fashion"
    )
    ordered = sorted(set(groups), key=lambda g: -float(g.split("-")[-1]) if g.split("-")[-1].replace(".", "").isdigit() else 0)
    print("| setting | " + " | ".join(ordered) + " |")
    print("|---|" + "---|" * len(ordered))
    for label, correct in results.items():
        print(f"| {label} | " + " | ".join(f"{100 * correct[groups == g].mean():.1f}" for g in ordered) + " |")
    for label, per_group in official.items():
        print(f"| {label} | " + " | ".join(f"{per_group[g][0]:.1f} ± {per_group[g][1]:.1f}" for g in ordered) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
