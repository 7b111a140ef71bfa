#!/usr/bin/env bash
# Label one fixed corpus with every method (and lgca's cascade), then write the summary, the report and every
# export format, and print a SHA-256 per file. Run it before and after a restructure: the two listings must match.
#
#   bash jobs/snapshot_outputs.sh /tmp/snapshot > before.txt     # ... change the code ...
#   bash jobs/snapshot_outputs.sh /tmp/snapshot > after.txt && diff before.txt after.txt
#
# Use the same DIR both times: rows and exports hold the images' absolute paths.
# The corpus is the demo scenes plus three inputs that fail (a truncated JPEG, text named .png, an empty file), so
# error rows are covered too. Files that record time or the host (_manifest.json, _plan/, the lease) are left out;
# in the text files, times, run ids, durations and the code version are masked before hashing.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: snapshot_outputs.sh DIR}
lgca=.venv/bin/lgca
fashion=examples/fashion
rm -rf "$work" && mkdir -p "$work/corpus"
cp -r $fashion/scenes/. "$work/corpus/"
head -c 700 "$(find $fashion/scenes -name '*.jpg' | sort | head -1)" > "$work/corpus/truncated.jpg"
echo "not an image" > "$work/corpus/text.png"
: > "$work/corpus/empty.jpg"
model=(--labels $fashion/descriptors.json --templates $fashion/templates.txt --model $fashion/fashion-clip.json
  --pretrained $fashion/fashion-clip.safetensors --crops 12 --concurrency 1)
run() {  # NAME, then extra flags
  local name=$1 && shift
  $lgca run "$work/corpus" "${model[@]}" --output "$work/$name" "$@" > "$work/$name.log" 2>&1
  $lgca summary "$work/$name" > "$work/$name.summary.txt"
  $lgca report "$work/$name" --out "$work/$name.report.html" > /dev/null
  for format in labelstudio coco csv; do
    $lgca export "$work/$name" --format $format --out "$work/$name.$format.out" > /dev/null
  done
  $lgca export "$work/$name" --format fiftyone --out "$work/$name.fiftyone" > /dev/null
}
for method in clip ensemble descriptors wca lgca; do run $method --method $method; done
run lgca-cascade --method lgca --cascade-margin 0.3
cd "$work"
mask='s/[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(\+00:00|Z)?/TIME/g; s/[0-9a-f]{32}/RUN_ID/g; s/[0-9]+\.[0-9]+\.[0-9]+\+[0-9a-f]{7,}/VERSION/g'
mask+='; s/[0-9.]+ (s|images\/s)\b/N \1/g; s/"(seconds|listing_seconds)": ?[0-9.]+/"\1": N/g'
find . -type f ! -path './corpus/*' ! -name '*.log' ! -name '_manifest.json' ! -name '_lease.lock' ! -path '*/_plan/*' |
  sort | while read -r file; do
    case "$file" in
      *.html | *.txt | *.out | *.js | *.json | *.xml) digest=$(sed -E "$mask" "$file" | sha256sum) ;;
      *) digest=$(sha256sum < "$file") ;;
    esac
    echo "${digest%% *}  $file"
  done
