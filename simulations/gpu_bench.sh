#!/usr/bin/env bash
# The GPU throughput targets of `cytofed bench` (pipeline >= 0.9 of the model-only ceiling for
# resnet18 and tf_efficientnet_lite0 at 224 px, batch 256), on the GPU machine of the device
# tool, results as JSON in $OUT:
#
#   $OUT/bench-resnet18.json               (a)-(e), with (d): Flower at the default run config
#   $OUT/bench-tf_efficientnet_lite0.json  (a)-(c), (e)
#   $OUT/bench-resnet18-compiled.json      the same as the first with torch.compile (COMPILE=1)
#   $OUT/bench.log                         everything printed
#
# Real images: the Barcelona centre of gpu_bundle/data (packed by `simulations/gpu_loco.sh
# pack`, 128 px WebP, resized to 224 px on load) when it was carried; else the bench falls back
# to a synthetic clinic and says so in each JSON's "data". Flower and Ray come from
# gpu_bundle/deps-{a,b} as for gpu_loco.sh (the GPU image has neither); the same three device
# calls as in simulations/results/README.md, the third one being
#
#   carry ["gpu_bundle/data"], command `bash simulations/gpu_bench.sh`
#
# Settings (environment): SIZE (224), BATCH (256), STEPS (30), PYTHON (python3), COMPILE (0).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder for the results}"
PYTHON=${PYTHON:-python3}
DEPS=gpu_bundle/deps
BUNDLE=gpu_bundle/data/centres.toml

# shellcheck source=simulations/gpu_env.sh
source simulations/gpu_env.sh
data=()
[[ -f $BUNDLE ]] && data=(--data-source "$BUNDLE" --centre barcelona)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/bench.log"

bench() {  # bench NAME ARGS...: one JSON result in $OUT/bench-NAME.json
  local name=$1
  shift
  "$PYTHON" -m simulations.bench --device cuda --image-size "${SIZE:-224}" \
    --batch-size "${BATCH:-256}" --steps "${STEPS:-30}" "${data[@]}" --json "$@" \
    > "$OUT/bench-$name.json" 2>> "$OUT/bench.log"
  "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], \
'ceiling', round(r['ceiling_images_per_second']), 'pipeline', \
round(r['pipeline_images_per_second']), 'ratio', round(r['ratio'], 3), 'flower', \
r['flower'] and round(r['flower']['overhead_ratio'], 4), r['data'])" \
    "$OUT/bench-$name.json" "$name" | tee -a "$OUT/bench.log"
}

bench resnet18 --model resnet18
bench tf_efficientnet_lite0 --model tf_efficientnet_lite0 --skip-flower
if [[ ${COMPILE:-0} == 1 ]]; then
  bench resnet18-compiled --model resnet18 --compile --skip-flower
fi
