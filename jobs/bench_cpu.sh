#!/usr/bin/env bash
# Every CPU benchmark in one run, each printing its table (and JSON under OUT_DIR): scorer efficiency, pipeline
# overhead, JPEG draft decoding, and throughput/memory by job size. About 25 minutes on 2 cores.
#
#   bash jobs/bench_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
mkdir -p "$out"
py=.venv/bin/python
export PYTHONWARNINGS=ignore
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$out/machine.txt"

$py jobs/bench_scorer.py --images 8 --batch 4 --encoder-seconds 20 --json "$out/scorer.json"
$py jobs/bench_scorer.py --images 8 --batch 4 --encoder-seconds 20 --compile --json "$out/scorer-compiled.json"
$py jobs/bench_pipeline.py --json "$out/overhead-lgca-default.json" overhead --images 48 --method lgca \
    --batch-size 4 --in-process-images 8
$py jobs/bench_pipeline.py --json "$out/overhead-lgca-small.json" overhead --images 96 --method lgca \
    --crops 8 --regions 1 --steps 2 --batch-size 8 --in-process-images 32
$py jobs/bench_pipeline.py --json "$out/overhead-clip.json" overhead --images 2048 --method clip
$py jobs/bench_decode.py --images 12 --device cpu --json "$out/decode.json"
$py jobs/bench_pipeline.py --json "$out/scaling.json" scaling --sizes 1000 10000 100000 --workdir "$out/scaling-images"
