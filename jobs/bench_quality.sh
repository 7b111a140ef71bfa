#!/usr/bin/env bash
# Label quality on the learned model: the sweeps that chose the scoring defaults, then every method at the
# defaults, per object scale (docs/EVALUATION.md, "Label quality on a learned model"). About 25 minutes on 2 cores.
#   bash jobs/bench_quality.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
py=.venv/bin/python
export PYTHONWARNINGS=ignore
mkdir -p "$out"
scenes="$out/scenes"
[ -f "$scenes/manifest.csv" ] || $py jobs/make_scenes.py --output "$scenes" --per-class 20

q() { name=$1; shift; $py jobs/bench_quality.py --scenes "$scenes" --methods clip,descriptors,wca,lgca "$@" \
        --output "$out/quality-sweep-$name.json" | tee "$out/quality-sweep-$name.txt"; }
# how views combine, and which regions are salient
q weights --sweep saliency=class,global,margin global_weight=0,0.1,0.3,0.5 expand_weight=1,4
q agreement --sweep saliency=agreement global_weight=0.1,0.3
# how many regions and steps (class saliency, as when the defaults were chosen)
q kt --set saliency=class --sweep regions=1,2,4 steps=1,3 global_weight=0.1,0.3
# how regions grow: a fixed factor per step, or a schedule that reaches a share of the shorter side at step T
q growth --sweep growth=1.2,1.4,2 global_weight=0.1,0.3
q target --sweep growth_target=0.7,1 global_weight=0.1,0.3
# every method at the defaults: three seeds for wca and lgca, then the CLI's own per-scale table
$py jobs/bench_quality.py --scenes "$scenes" --runs 3 --output "$out/quality-defaults.json" | tee "$out/quality-defaults.txt"
.venv/bin/lgca eval --data "$scenes/manifest.csv" --labels examples/fashion/descriptors.json \
    --templates examples/fashion/templates.txt --model examples/fashion/fashion-clip.json \
    --pretrained examples/fashion/fashion-clip.safetensors --no-progress \
    --output "$out/quality-eval.json" | tee "$out/quality-eval.txt"
