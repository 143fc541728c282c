#!/usr/bin/env bash
# Everything the GPU machine of the device tool is for, in one device call:
#
#   run(carry=["gpu_bundle"], command="bash simulations/gpu_run.sh", timeout_s=420)
#
# gpu_bundle/ (data, weights and wheels from `gpu_loco.sh pack` and `gpu_loco.sh deps`) and the
# tree must stay under the call's 64 MiB. Within BUDGET seconds (330 s, so that the machine's
# start, this call and a rerun fit a session's 15 minutes): the throughput figures
# (simulations/gpu_bench.sh, at most BENCH_LIMIT s), then the LOCO sweep at 128 px on Flower's
# deployment engine (simulations/gpu_loco.sh run) in the time left. Back in $OUT (at most 8
# files): bench-*.json, loco.json, loco.md, comparison.html, reports.tar.gz and logs.tar.gz
# (bench.log, loco.log).
#
# Sweep defaults here (each a setting of gpu_loco.sh): every centre held out, the pooled
# cross-entropy reference, FedAvg and FedBN, SEEDS=1, ROUNDS=6 rounds of 2 local epochs, every
# run at once (JOBS=9). BUDGET and BENCH_LIMIT are seconds; the settings of gpu_bench.sh apply.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder for the results}"
BUDGET=${BUDGET:-330}
BENCH_LIMIT=${BENCH_LIMIT:-150}
RESERVE=20  # seconds kept for packing the results
started=$SECONDS

timeout -s INT -k 15 "$BENCH_LIMIT" bash simulations/gpu_bench.sh
echo "bench exit status $? (124: stopped after $BENCH_LIMIT s)"
LIMIT=$((BUDGET - RESERVE - (SECONDS - started))) ROUNDS=${ROUNDS:-6} SEEDS=${SEEDS:-1} \
  JOBS=${JOBS:-9} bash simulations/gpu_loco.sh run
echo "loco script exit status $?; $((SECONDS - started)) s in all"
(cd "$OUT" && tar -czf logs.tar.gz ./*.log && rm ./*.log)
ls -l "$OUT"
