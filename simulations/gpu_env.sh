# Sourced by gpu_loco.sh and gpu_bench.sh on the GPU machine: installs Flower and Ray from the
# carried wheels when the machine lacks them, and points Python at the checkout and a cache.
# Expects DEPS (gpu_bundle/deps) and PYTHON to be set.
if ! "$PYTHON" -c "import flwr, ray" 2>/dev/null; then
  ray=/tmp/ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl
  cat "$DEPS"-a/ray.whl.part-* "$DEPS"-b/ray.whl.part-* > "$ray"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$DEPS"-a/*.whl "$ray"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CYTOFED_CACHE_DIR=/tmp/cytofed-cache
