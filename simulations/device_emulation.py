"""A Python like the GPU machine's, for a CPU dry run of its procedure (``gpu_run.sh``).

The device tool's GPU machine has no network and a fixed set of Python packages (torch, timm,
numpy, ... but not Flower). ``python -m simulations.device_emulation DIR`` makes ``DIR/bin/python``:
a fresh virtual environment of this machine's base interpreter that sees, through links,
only those of this environment's packages that the GPU machine has too (``DEVICE_PACKAGES``,
as listed for its image on 2026-11-17). Whatever the procedure needs beyond them must then come
from the carried wheels, as it must there. The interpreter's minor version is this machine's,
not the GPU machine's 3.12: pack the wheels for it (``PYVER``) for the dry run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sysconfig
import venv
from importlib.metadata import distributions
from pathlib import Path

DEVICE_PACKAGE_NAMES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja
numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
"""
DEVICE_PACKAGES = frozenset(DEVICE_PACKAGE_NAMES.split())


def normalise(name: str) -> str:
    """A distribution name as the package index writes it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def device_entries(site_packages: Path) -> dict[str, Path]:
    """Top-level entries of ``site_packages`` (packages, modules, dist-info folders) that
    belong to a distribution the GPU machine has, by name."""
    entries: dict[str, Path] = {}
    for dist in distributions(path=[str(site_packages)]):
        if normalise(dist.metadata["Name"]) not in DEVICE_PACKAGES:
            continue
        for file in dist.files or ():
            top = Path(file).parts[0]
            if top != ".." and (site_packages / top).exists():
                entries[top] = site_packages / top
    return entries


def emulate(target: Path, site_packages: Path | None = None) -> Path:
    """Create the emulated environment in ``target``; returns its Python."""
    site_packages = Path(site_packages or sysconfig.get_paths()["purelib"])
    venv.create(target, with_pip=False)  # from the base interpreter, even inside a venv
    python = target / "bin" / "python"
    own_site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    links = target / "device-site-packages"
    links.mkdir(exist_ok=True)
    for name, path in device_entries(site_packages).items():
        if not (links / name).exists():
            (links / name).symlink_to(path)
    (own_site / "device.pth").write_text(f"{links}\n")
    return python


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.device_emulation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder of the emulated environment")
    args = parser.parse_args()
    print(emulate(args.target))


if __name__ == "__main__":
    main()
