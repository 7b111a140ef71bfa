#!/usr/bin/env python3
"""A Markdown table of one method's acc1 per group in every setting of an `lgca eval --sweep ... --output` JSON,
with the paired difference against the baseline method (default: clip) and its 95% interval.

    .venv/bin/python jobs/sweep_table.py bench-out/sweep-combine.json --method lgca [--sort cut]

Columns: the swept values, then per group `acc1 (difference [low, high])` in percent and points; "cut" is the mean
of the differences at scales 0.6 and 0.4 (where random crops cut the object), "small" at 0.3 and 0.2, "whole" at
full frame and 1.0 (the groups of docs/EVALUATION.md's goals).
"""

from __future__ import annotations

import argparse
import json
import sys

GOALS = {"cut": ("scale-0.60", "scale-0.40"), "small": ("scale-0.30", "scale-0.20"), "whole": ("full-frame", "scale-1.00")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON of lgca eval --output")
    parser.add_argument("--method", default="lgca")
    parser.add_argument("--sort", choices=(*GOALS, "none"), default="none", help="order the rows by this goal group's gain")
    parser.add_argument("--top", type=int, default=0, help="show only this many rows (0: all)")
    args = parser.parse_args(argv)
    with open(args.results) as handle:
        records = [r for r in json.load(handle)["results"] if r["method"] == args.method]
    if not records:
        raise SystemExit(f"no {args.method} results in {args.results}")
    groups = list(records[0]["groups"])
    fields = list(records[0].get("setting", {}))
    rows = []
    for record in records:
        gains = {name: _mean_gain(record, members) for name, members in GOALS.items()}
        rows.append((record, gains))
    if args.sort != "none":
        rows.sort(key=lambda row: -row[1][args.sort])
    if args.top:
        rows = rows[: args.top]
    baseline = records[0]["groups"][groups[0]].get("paired", {}).get("baseline", "baseline")
    print(f"| {' | '.join(fields)} | " + " | ".join(groups) + " | " + " | ".join(f"{g} (mean gain)" for g in GOALS) + " |")
    print("|" + "---|" * (len(fields) + len(groups) + len(GOALS)))
    for record, gains in rows:
        cells = [str(record.get("setting", {}).get(f)) for f in fields]
        for group in groups:
            entry = record["groups"][group]
            paired = entry.get("paired")
            text = f"{100 * entry['acc1']:.1f}"
            if paired:
                text += f" ({100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}])"
            cells.append(text)
        cells += [f"{gain:+.1f}" for gain in gains.values()]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nacc1 % (difference against {baseline}, points [paired 95% interval]); {records[0]['images']} images, {records[0]['runs']} run(s)"
    )
    return 0


def _mean_gain(record: dict, members: tuple[str, ...]) -> float:
    values = [100 * record["groups"][g]["paired"]["difference"] for g in members if "paired" in record["groups"].get(g, {})]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    sys.exit(main())
