#!/usr/bin/env bash
# Label quality on the learned model: the sweeps that chose the scoring defaults (method revision 3), then every
# method at the defaults on held-out scenes with paired 95% intervals and the cascade's accuracy against encoder
# passes (docs/EVALUATION.md, "Label quality on a learned model"). About 75 minutes on 2 cores.
#   bash jobs/bench_quality.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
py=.venv/bin/python
export PYTHONWARNINGS=ignore
mkdir -p "$out"
tune="$out/scenes-1k"        # seed 0: 1,000 scenes per group (100 per class), and its first 50 per class
held_out="$out/scenes-1k-seed1"  # seed 1: the scenes the final table is measured on, never tuned on
[ -f "$tune/manifest.csv" ] || $py jobs/make_scenes.py --output "$tune" --per-class 100 --subset 50
[ -f "$held_out/manifest.csv" ] || $py jobs/make_scenes.py --output "$held_out" --per-class 100 --seed 1
fashion=examples/fashion
ev() {  # a sweep with lgca eval; its JSON becomes a Markdown table (jobs/sweep_table.py)
    name=$1; data=$2; shift 2
    .venv/bin/lgca eval --data "$data" --labels $fashion/descriptors.json --templates $fashion/templates.txt \
        --model $fashion/fashion-clip.json --pretrained $fashion/fashion-clip.safetensors --no-progress --batch-size 64 \
        "$@" --output "$out/sweep-$name.json" > "$out/sweep-$name.txt"
    $py jobs/sweep_table.py "$out/sweep-$name.json" --sort cut | tee "$out/sweep-$name.md"
}
# 1. How the regions combine (one set of views for every setting): 6,000 scenes, 2 seeds, the rest as revision 2
ev combine "$tune/manifest.csv" --methods clip,wca,lgca --runs 2 --saliency margin --growth 1.4 --crop-scale 0.5 0.9 \
    --sweep region_pool=all,lineages level_aggregation=embedding,similarity lineage_weights=uniform,saliency \
    level0=selected,all global_weight=0,0.1,0.3,0.5 global_weight_rule=fixed,confidence
# 2. Which regions are salient, and which lineages grow (each setting its own views): 3,000 scenes, 1 seed
ev saliency "$tune/manifest-50.csv" --methods clip,lgca --growth 1.4 --crop-scale 0.5 0.9 \
    --sweep saliency=margin,class,global selection=pool,lineages lineage_weights=uniform,saliency global_weight=0.3,0.5 \
    global_weight_rule=fixed,confidence
# 3. How many regions and steps, and how sharply saliency weighs a level's boxes
ev kt "$tune/manifest-50.csv" --methods clip,lgca --saliency class --lineage-weights saliency --growth 1.4 --crop-scale 0.5 0.9 \
    --sweep regions=1,2,4 steps=1,3 global_weight=0.3,0.4,0.5 global_weight_rule=fixed,confidence saliency_scale=10,20,40
# 4. lgca's own crop scale, and how its lineages grow
ev scale "$tune/manifest-50.csv" --methods clip,lgca --saliency class --lineage-weights saliency \
    --sweep crop_scale=0.5:0.9,0.3:0.7 growth=1.4,2 global_weight=0.3,0.4,0.5 global_weight_rule=fixed,confidence
# 5. Every method at the defaults on the held-out scenes, 2 seeds, with the cascade at six thresholds
$py jobs/bench_quality.py --scenes "$held_out" --runs 2 --cascade 0.05 0.1 0.2 0.3 0.4 0.5 \
    --output "$out/quality-final.json" | tee "$out/quality-final.txt"
