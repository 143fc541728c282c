# Sourced by gpu_loco.sh and gpu_bench.sh on the GPU machine. Installs Flower from the carried
# wheels (gpu_bundle/wheels, `gpu_loco.sh deps`) when the machine's Python lacks it, checks the
# two packages Flower takes from the machine with a version floor (grpcio, for Flower's
# generated gRPC code), and runs federated runs on Flower's deployment engine: a local
# SuperLink and SuperNode processes (simulations/local_deployment.py), as the machine has no
# Ray. Expects PYTHON to be set.
WHEELS=${WHEELS:-gpu_bundle/wheels}
SITE=/tmp/site
if ! "$PYTHON" -c "import flwr" 2>/dev/null && [[ ! -d $SITE/flwr ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
if [[ -d $SITE/flwr ]]; then
  export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CYTOFED_CACHE_DIR=${CYTOFED_CACHE_DIR:-/tmp/cytofed-cache} CYTOFED_FLOWER_ENGINE=deployment
"$PYTHON" - <<'CHECK' || exit 3
import grpc
from packaging.version import Version
if Version(grpc.__version__) < Version("1.70"):
    raise SystemExit(f"grpcio {grpc.__version__} is older than Flower 1.42 needs (1.70): carry "
                     "its wheel in gpu_bundle/wheels (see simulations/results/README.md)")
import flwr.supernode.cli.flower_supernode  # everything a SuperNode imports is there
print(f"Flower {flwr.__version__} on grpcio {grpc.__version__}")
CHECK
