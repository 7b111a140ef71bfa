#!/usr/bin/env python3
"""Label quality of every method on scenes where location matters, measured with the project's learned model.

    .venv/bin/python jobs/bench_quality.py --output bench-out/quality.json
    .venv/bin/python jobs/bench_quality.py --sweep global_weight=0,0.25,0.5 saliency=class,global

Renders (once) labelled Fashion-MNIST test-split scenes with `jobs/make_scenes.py`, scores them with
`clip`, `ensemble`, `descriptors`, `wca` and `lgca` through `pipeline.evaluation.runner` (each view encoded once for
all methods), and prints per setting:
- acc1 per method and object scale (`full-frame` is the plain test image);
- for `lgca`, the IoU of the most salient output box (and of the best one) with the object's true box;
- the share of the final score carried by the global view, the local crops and the grown boxes;
- the distribution of crop-to-image cosines <f(b), f(x)>;
- per goal group (objects that crops cut: scales 0.6 and 0.4; small objects: 0.3 and 0.2; whole objects: full
  frame and scale 1.0), acc1 and its paired difference against `clip` with the 95% bootstrap interval;
- with `--cascade T1 T2 ...`, the cascade at each threshold from the same views: share escalated, encoder passes
  and its paired difference against full `lgca` per group.
Random weights measure nothing here: the default model is examples/fashion (jobs/train_fashion_clip.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "jobs"))

from make_scenes import FULL_FRAME, read_truth, write_scenes  # noqa: E402

from pipeline.config import METHODS, ModelConfig, ScoringConfig, VocabularyConfig  # noqa: E402
from pipeline.evaluation.intervals import mean_interval, paired_difference  # noqa: E402
from pipeline.evaluation.labelled import list_labelled  # noqa: E402
from pipeline.evaluation.records import result_records  # noqa: E402
from pipeline.evaluation.runner import ImageModel, Observation, check_methods, embedding_method, evaluate  # noqa: E402
from pipeline.evaluation.sweep import Setting, describe_changes, parse_sweep, sweep_settings  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402
from pipeline.models.text_vectors import text_vectors  # noqa: E402
from pipeline.scoring.regions import box_iou  # noqa: E402
from pipeline.vocab import load_vocabulary  # noqa: E402

FASHION = ROOT / "examples" / "fashion"
SMALL_SCALE = 0.3  # "small objects": tile side at most this share of the shorter side
IOU_GOAL = 0.5
# The goals' groups of scenes: where random crops cut the object, small objects, whole objects
GOAL_GROUPS = {
    "cut (0.6, 0.4)": ("scale-0.60", "scale-0.40"),
    "small (0.3, 0.2)": ("scale-0.30", "scale-0.20"),
    "whole (full, 1.0)": (FULL_FRAME, "scale-1.00"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", default="bench-out/scenes", help="scene folder; rendered first if it has no manifest.csv")
    parser.add_argument("--per-class", type=int, default=20, help="scenes per class and scale when rendering (default: %(default)s)")
    parser.add_argument("--model", default=str(FASHION / "fashion-clip.json"))
    parser.add_argument("--pretrained", default=str(FASHION / "fashion-clip.safetensors"))
    parser.add_argument("--labels", default=str(FASHION / "descriptors.json"))
    parser.add_argument("--templates", default=str(FASHION / "templates.txt"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all five)")
    parser.add_argument("--runs", type=int, default=1, help="seeds per crop method (default: %(default)s)")
    parser.add_argument(
        "--sweep", nargs="+", default=None, metavar="FIELD=V1,V2", help="cartesian sweep of scoring parameters, as `lgca eval --sweep`"
    )
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=V", help="base scoring parameters, e.g. crops=30")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write every figure as JSON here")
    parser.add_argument("--cascade", type=float, nargs="+", default=[], metavar="T", help="cascade thresholds to evaluate (needs lgca)")
    args = parser.parse_args(argv)

    scenes = Path(args.scenes)
    manifest = scenes / "manifest.csv"
    if not manifest.is_file():
        print(f"rendering scenes into {scenes} ...", flush=True)
        write_scenes(scenes, args.per_class)
    truth = read_truth(manifest)
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    base = _base_config(methods, args.set)
    settings = sweep_settings(base, parse_sweep(args.sweep, methods))[0] if args.sweep else [Setting({}, base)]

    model = load_model(ModelConfig(name=args.model, pretrained=args.pretrained, device="cpu"))
    vocabulary = load_vocabulary(VocabularyConfig(labels=args.labels, templates=args.templates))
    images = list_labelled(str(manifest), {})
    collector = _Collector(truth, len(settings), methods)
    started = time.monotonic()
    evaluation = evaluate(
        images,
        vocabulary.classes,
        lambda method, scoring: text_vectors(model, vocabulary, dataclasses.replace(scoring, method=method)),
        ImageModel(model.encode_image, model.logit_scale, model.view, model.device),
        methods,
        settings,
        runs=args.runs,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        observe=collector,
        cascade=args.cascade,
    )
    seconds = time.monotonic() - started
    records = result_records(evaluation, {"dataset": scenes.name, "model": args.model, "pretrained": args.pretrained}, "clip")
    report = [_setting_report(i, setting, records, collector) for i, setting in enumerate(settings)]
    for entry, result in zip(report, evaluation.results):
        entry["goals"] = _goal_groups(result.methods, np.asarray(evaluation.groups, dtype=object))
    print(
        f"{evaluation.scored} images, {len(settings)} setting(s), {evaluation.encoder_rows} views encoded in {seconds:.0f} s "
        f"({torch.get_num_threads()} threads)"
    )
    for entry in report:
        _print_setting(entry, methods)
        _print_goals(entry["goals"])
    if len(report) > 1:
        _print_sweep(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"settings": report, "records": records}, indent=2) + "\n")
        print(f"results: {args.output}")
    return 0


def _goal_groups(results: dict, groups: np.ndarray) -> dict:
    """Per method and goal group: acc1, its 95% interval, and the paired difference against clip (against full
    lgca too, for a cascade), in points."""
    out: dict = {}
    for name, members in GOAL_GROUPS.items():
        inside = np.isin(groups, members)
        for method, result in results.items():
            acc = mean_interval(result.correct[inside])
            entry = {"acc1": 100 * acc.mean, "acc1_low": 100 * acc.low, "acc1_high": 100 * acc.high, "passes": result.encoder_passes}
            for baseline in ("clip", "lgca"):
                if baseline in results and baseline != method and (baseline == "clip" or result.cascade is not None):
                    d = paired_difference(result.correct[inside], results[baseline].correct[inside])
                    entry[f"vs_{baseline}"] = [100 * d.mean, 100 * d.low, 100 * d.high]
            if result.cascade is not None:
                entry["escalated"] = result.cascade.escalated
            out.setdefault(method, {})[name] = entry
    return out


def _print_goals(goals: dict) -> None:
    print("acc1 % per goal group [95% interval]; paired difference against clip, points [95% interval]:")
    print(f"{'method':<14}{'passes':>7}" + "".join(f"{name:>36}" for name in GOAL_GROUPS))
    for method, by_group in goals.items():
        cells = []
        for name in GOAL_GROUPS:
            g = by_group[name]
            text = f"{g['acc1']:.1f}"
            if "vs_clip" in g:
                d = g["vs_clip"]
                text += f" {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]"
            cells.append(f"{text:>36}")
        passes = next(iter(by_group.values()))["passes"]
        print(f"{method:<14}{passes:>7.1f}" + "".join(cells))
    cascades = [m for m, by_group in goals.items() if "vs_lgca" in next(iter(by_group.values()))]
    if cascades:
        print("cascade against full lgca, points [paired 95% interval], and share escalated:")
        for method in cascades:
            by_group = goals[method]
            escalated = next(iter(by_group.values()))["escalated"]
            against = [by_group[name]["vs_lgca"] for name in GOAL_GROUPS]
            line = "".join(f"{f'{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]':>36}" for d in against)
            print(f"{method:<14}{100 * escalated:>6.0f}%" + line)


def _base_config(methods: tuple[str, ...], items: list[str]) -> ScoringConfig:
    values = {}
    for item in items:
        grid = parse_sweep([item], methods)
        ((name, choices),) = grid.items()
        if len(choices) != 1:
            raise SystemExit(f"--set {item}: give one value")
        values[name] = choices[0]
    return ScoringConfig(method=embedding_method(methods), **values)


def _scale(group: str) -> float | None:
    return float(group.split("-", 1)[1]) if group.startswith("scale-") else None


class _Collector:
    """Per setting, run, method and group: view shares, salient-box IoUs and crop-to-image cosines."""

    def __init__(self, truth: dict[str, tuple[str, np.ndarray]], settings: int, methods: tuple[str, ...]) -> None:
        self.truth = truth
        self.cosine_method = next((m for m in methods if m in ("wca", "lgca")), None)
        self.shares: dict[tuple, list] = defaultdict(list)
        self.top_iou: dict[tuple, list] = defaultdict(list)
        self.best_iou: dict[tuple, list] = defaultdict(list)
        self.cosines: list[list[np.ndarray]] = [[] for _ in range(settings)]

    def __call__(self, seen: Observation) -> None:
        groups = [self.truth[key][0] for key in seen.keys]
        for key, group, score in zip(seen.keys, groups, seen.scores):
            self.shares[(seen.setting, seen.method, group)].append(score.view_shares)
            if score.boxes:
                boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in score.boxes])
                ious = box_iou(boxes, self.truth[key][1])[:, 0]
                top = int(np.argmax([b.saliency for b in score.boxes]))
                self.top_iou[(seen.setting, seen.method, group)].append(float(ious[top]))
                self.best_iou[(seen.setting, seen.method, group)].append(float(ious.max()))
        if seen.method == self.cosine_method and seen.run == 0:  # one method: each batch's crops counted once
            crops = seen.views.region_emb[:, : seen.views.crops]
            if crops.shape[1]:
                cos = torch.einsum("bpd,bd->bp", crops, seen.views.global_emb).float().cpu().numpy()
                self.cosines[seen.setting].append(cos.ravel())


def _setting_report(index: int, setting: Setting, records: list[dict], seen: _Collector) -> dict:
    changes = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in setting.changes.items()}, sort_keys=True)
    mine = [r for r in records if json.dumps(r.get("setting", {}), sort_keys=True) == changes]
    groups = list(mine[0]["groups"]) if mine else []
    accuracy = {r["method"]: {g: r["groups"][g]["acc1"] for g in groups} for r in mine}
    small = [g for g in groups if (_scale(g) or 1.0) <= SMALL_SCALE]
    summary = {
        method: {
            "acc1": r["acc1"],
            "small": float(np.mean([accuracy[method][g] for g in small])) if small else None,
            "scenes": float(np.mean([accuracy[method][g] for g in groups if g != FULL_FRAME])),
            "full_frame": accuracy[method].get(FULL_FRAME),
        }
        for method, r in ((r["method"], r) for r in mine)
    }
    shares = {
        f"{method}/{group}": [float(v) for v in np.mean(values, axis=0)] for (s, method, group), values in seen.shares.items() if s == index
    }
    boxes = {}
    for (s, method, group), values in seen.top_iou.items():
        if s == index:
            best = np.array(seen.best_iou[(s, method, group)])
            top = np.array(values)
            boxes[f"{method}/{group}"] = {
                "top_iou_median": float(np.median(top)),
                "top_iou_at_least_goal": float(np.mean(top >= IOU_GOAL)),
                "best_iou_median": float(np.median(best)),
                "best_iou_at_least_goal": float(np.mean(best >= IOU_GOAL)),
            }
    cos = np.concatenate(seen.cosines[index]) if seen.cosines[index] else np.zeros(0)
    return {
        "setting": setting.changes and {k: list(v) if isinstance(v, tuple) else v for k, v in setting.changes.items()},
        "scoring": setting.scoring.to_dict(),
        "accuracy": accuracy,
        "summary": summary,
        "view_shares": shares,
        "boxes": boxes,
        "crop_cosine_percentiles": {str(p): float(np.percentile(cos, p)) for p in (5, 25, 50, 75, 95)} if cos.size else {},
    }


def _print_setting(entry: dict, methods: tuple[str, ...]) -> None:
    if entry["setting"]:
        print(f"\n== setting {describe_changes(entry['setting'])}")
    groups = list(next(iter(entry["accuracy"].values())))
    print(f"{'acc1 %':<12}" + "".join(f"{g:>13}" for g in groups))
    for method in methods:
        print(f"{method:<12}" + "".join(f"{100 * entry['accuracy'][method][g]:>13.1f}" for g in groups))
    if entry["boxes"]:
        print("lgca salient boxes vs the true box (share with IoU >= 0.5: most salient box / best box):")
        print(
            "  "
            + "  ".join(
                f"{k.split('/')[1]} {v['top_iou_at_least_goal']:.2f}/{v['best_iou_at_least_goal']:.2f}"
                for k, v in entry["boxes"].items()
                if k.startswith("lgca/")
            )
        )
    print("share of the score (global / crops / grown), all scenes:")
    for method in methods:
        rows = [v for k, v in entry["view_shares"].items() if k.startswith(f"{method}/") and not k.endswith(FULL_FRAME)]
        if rows:
            mean = np.mean(rows, axis=0)
            print(f"  {method:<12} {mean[0]:.2f} / {mean[1]:.2f} / {mean[2]:.2f}")
    if entry["crop_cosine_percentiles"]:
        print(
            "crop-to-image cosine percentiles (5/25/50/75/95): " + " / ".join(f"{v:.2f}" for v in entry["crop_cosine_percentiles"].values())
        )


def _print_sweep(report: list[dict]) -> None:
    print("\nsweep summary, acc1 % (scenes = mean over scales; small = scales <= 0.3):")
    print(f"{'setting':<48}{'lgca scenes':>12}{'lgca small':>11}{'lgca full':>10}{'wca small':>10}{'top IoU>=.5':>12}")
    for entry in report:
        s = entry["summary"].get("lgca") or entry["summary"].get("wca")
        w = entry["summary"].get("wca", {})
        small_boxes = [
            v["top_iou_at_least_goal"]
            for k, v in entry["boxes"].items()
            if k.startswith("lgca/") and (_scale(k.split("/")[1]) or 1.0) <= SMALL_SCALE
        ]
        iou = f"{np.mean(small_boxes):.2f}" if small_boxes else "-"
        print(
            f"{describe_changes(entry['setting'] or {}):<48}{100 * s['scenes']:>12.1f}{100 * (s['small'] or 0):>11.1f}"
            f"{100 * (s['full_frame'] or 0):>10.1f}{100 * (w.get('small') or 0):>10.1f}{iou:>12}"
        )


if __name__ == "__main__":
    sys.exit(main())
