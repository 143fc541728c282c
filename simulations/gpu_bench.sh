#!/usr/bin/env bash
# The throughput figures of `cytofed bench` on the GPU machine of the device tool (run by
# simulations/gpu_run.sh within one device call, or alone), for resnet18 and
# tf_efficientnet_lite0 at 224 px, batch 256: the local-training pipeline against the
# model-only ceiling (target 0.9) and against the usual PyTorch pipeline (--peer), and, for
# resnet18, Flower's round overhead at the default run config on Flower's deployment engine
# (FLOWER_ROUNDS rounds; the machine has no Ray). JSON results in $OUT:
#
#   $OUT/bench-resnet18.json               (a)-(f), with (d)
#   $OUT/bench-tf_efficientnet_lite0.json  (a)-(c), (e), (f)
#   $OUT/bench-resnet18-compiled.json      (a)-(c), (e) with torch.compile (COMPILE=1)
#   $OUT/bench.log                         everything printed
#
# Real images: the Barcelona centre of gpu_bundle/data (packed by `simulations/gpu_loco.sh
# pack`, 128 px WebP, resized to 224 px on load, and read by the peer as those files) when it
# was carried; else the bench falls back to a synthetic clinic and says so in each JSON's
# "data". Flower comes from gpu_bundle/wheels (simulations/gpu_env.sh).
#
# Settings (environment): SIZE (224), BATCH (256), STEPS (30), PYTHON (python3), COMPILE (0),
# FLOWER_ROUNDS (4), PEER_WORKERS (one per core, at most 8), DEVICE (cuda; cpu for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder for the results}"
PYTHON=${PYTHON:-python3}
BUNDLE=gpu_bundle/data/centres.toml

# shellcheck source=simulations/gpu_env.sh
source simulations/gpu_env.sh
data=()
[[ -f $BUNDLE ]] && data=(--data-source "$BUNDLE" --centre barcelona)
peer=(--peer ${PEER_WORKERS:+--peer-workers "$PEER_WORKERS"})
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no GPU"; } |
  tee -a "$OUT/bench.log"

bench() {  # bench NAME ARGS...: one JSON result in $OUT/bench-NAME.json
  local name=$1
  shift
  # stdout from the JSON's first line on: a library's import message cannot spoil it
  "$PYTHON" -m simulations.bench --device "${DEVICE:-cuda}" --image-size "${SIZE:-224}" \
    --batch-size "${BATCH:-256}" --steps "${STEPS:-30}" "${data[@]}" --json "$@" \
    2>> "$OUT/bench.log" | sed -n '/^{/,$p' > "$OUT/bench-$name.json"
  "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], \
'ceiling', round(r['ceiling_images_per_second']), 'pipeline', \
round(r['pipeline_images_per_second']), 'ratio', round(r['ratio'], 3), 'peer', \
r.get('peer') and round(r['peer']['images_per_second']), 'ours/peer', \
r.get('peer') and round(r['peer']['speedup'], 2), 'flower', \
r['flower'] and round(r['flower']['overhead_ratio'], 4), r['data'])" \
    "$OUT/bench-$name.json" "$name" | tee -a "$OUT/bench.log"
}

failed() { echo "bench $1 failed: see bench.log" | tee -a "$OUT/bench.log"; }
bench resnet18 --model resnet18 "${peer[@]}" --flower-engine deployment \
  --flower-config "num-server-rounds=${FLOWER_ROUNDS:-4}" || failed resnet18
bench tf_efficientnet_lite0 --model tf_efficientnet_lite0 "${peer[@]}" --skip-flower ||
  failed tf_efficientnet_lite0
if [[ ${COMPILE:-0} == 1 ]]; then
  bench resnet18-compiled --model resnet18 --compile --skip-flower || failed resnet18-compiled
fi
