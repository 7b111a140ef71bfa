#!/usr/bin/env bash
# The whole GPU benchmark in one run (a GPU machine's time is scarce): scorer efficiency, end-to-end clip
# (JPEGs decoded on the CPU, then by nvJPEG) and LGCA throughput of `lgca run` from local JPEGs, and scorer
# efficiency with a compiled encoder; GPU utilisation sampled by nvidia-smi throughout.
#
#   bash jobs/bench_gpu.sh [OUT_DIR]
#
# Needs CUDA, the package installed (make setup), and scikit-image for the sample photos. Random weights:
# speed does not depend on the weights' values.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 >"$out/utilisation.csv" &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT

$py jobs/bench_scorer.py --device cuda --images 256 --batch 64 --micro-batch 1024 --encoder-seconds 20 \
    --json "$out/scorer.json" | tee "$out/scorer.txt"
$py jobs/bench_scorer.py --device cuda --hot-path --classes 10 21000 --batch 64 --repeats 5 | tee "$out/scorer-hot-path.txt"
$py jobs/bench_decode.py --images 64 --device cuda --json "$out/decode.json" | tee "$out/decode.txt"
$py jobs/bench_pipeline.py --json "$out/pipeline-clip.json" overhead --images 20000 --method clip \
    --batch-size 512 | tee "$out/pipeline-clip.txt"
$py jobs/bench_pipeline.py --json "$out/pipeline-clip-nvjpeg.json" overhead --images 20000 --method clip \
    --batch-size 512 --decode gpu | tee "$out/pipeline-clip-nvjpeg.txt"
$py jobs/bench_pipeline.py --json "$out/pipeline-lgca.json" overhead --images 2000 --method lgca \
    --batch-size 64 | tee "$out/pipeline-lgca.txt"
$py jobs/bench_scorer.py --device cuda --images 256 --batch 64 --micro-batch 1024 --encoder-seconds 20 --compile \
    --json "$out/scorer-compiled.json" | tee "$out/scorer-compiled.txt"

kill $sampler 2>/dev/null || true
awk -F', ' '{gsub(/ %/, "", $2); if ($2 + 0 > 0) {sum += $2; n++}} END {if (n) printf "mean GPU utilisation while busy: %.0f%% over %d samples\n", sum / n, n}' \
    "$out/utilisation.csv" | tee "$out/utilisation.txt"
