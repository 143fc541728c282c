"""Cost of stain normalisation, re-staining and strong HED jitter against a training step.

    python -m simulations.bench_stain [--size 96] [--batch 64] [--model tf_efficientnet_lite0]
                                      [--threads 1] [--figure stain.png] [--synthetic] [--json]

Per batch of ``--batch`` images at ``--size`` px, each op and one forward + backward + AdamW
step of ``--model`` are timed in the same process, one after another in blocks after a warm-up;
each figure is the process CPU time per batch of the best block (with one thread, time taken by
other processes on a shared machine does not count), and the ratio to the model step is printed.
Images and styles are the shared centres' (cell view) when ``../shared/data/wbc`` is there,
otherwise (or with ``--synthetic``) synthetic clinics, as the output says. ``--figure`` draws
two images of every centre as they are, normalised, re-stained towards every other centre's
style and with HED-strong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from common.augment import AugmentHParams, HedStrongJitter, build_augmenter, to_unit_float
from common.centres import load_centre, read_centres
from common.config import RunConfig
from common.losses import create_loss
from common.pipeline import new_model
from common.stain import (
    RESTAIN_METHODS,
    ReinhardNormaliser,
    Restainer,
    StainStats,
    site_stain_stats,
    style_pool,
)
from common.synthetic import default_clinics, generate_clinic
from common.train import TrainSettings, make_optimizer, prepare_model, train_step

SHARED_CENTRES = Path(__file__).resolve().parent / "centres" / "shared-wbc.toml"


def centre_images(size: int, cache_dir: Path,
                  synthetic: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """uint8 images per centre: the shared centres' cell views, else (or if ``synthetic``)
    synthetic clinics."""
    specs = read_centres(SHARED_CENTRES)
    if not synthetic and all(spec.path is not None and spec.path.is_dir() for spec in specs):
        return ({spec.name: load_centre(spec, size, cache_dir, mode="cell").images
                 for spec in specs}, "shared centres, cell view")
    return ({style.name: generate_clinic(style, 64, size, seed=0)[0]
             for style in default_clinics()}, "synthetic clinics")


def cpu_seconds(function: Callable[[], object], steps: int, repeats: int) -> float:
    """Best-of-``repeats`` process CPU seconds per call, over blocks of ``steps`` calls."""
    function()
    blocks = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(steps):
            function()
        blocks.append((time.process_time() - start) / steps)
    return min(blocks)


def measure(images: dict[str, np.ndarray], styles: dict[str, StainStats],
            args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds per batch of every op and of the model's training step."""
    own = next(iter(images))
    generator = torch.Generator().manual_seed(0)
    pool = images[own]
    index = torch.from_numpy(np.random.default_rng(0).integers(len(pool), size=args.batch))
    batch_u8 = torch.from_numpy(pool)[index]
    batch = to_unit_float(batch_u8)
    pool_styles = style_pool(styles, own)
    restainers = {method: Restainer(styles[own], pool_styles, method, probability=1.0)
                  for method in RESTAIN_METHODS}
    normaliser = ReinhardNormaliser()
    hed_strong = HedStrongJitter(AugmentHParams())
    strong = build_augmenter("domain_strong",
                             restainer=Restainer(styles[own], pool_styles, probability=0.5))
    domain = build_augmenter("domain")
    model = prepare_model(new_model(RunConfig(model=args.model), 5), torch.device("cpu")).train()
    optimizer = make_optimizer(model, TrainSettings(), torch.device("cpu"))
    loss = create_loss("ce", np.ones(5))
    inputs = domain(batch_u8, generator)
    targets = torch.randint(5, (args.batch,), generator=generator)
    ops: dict[str, Callable[[], object]] = {
        "model step (forward + backward + AdamW)":
            lambda: train_step(model, inputs, targets, loss, optimizer, torch.device("cpu")),
        "reinhard normalisation": lambda: normaliser(batch),
        "re-staining, reinhard": lambda: restainers["reinhard"](batch, generator),
        "re-staining, macenko": lambda: restainers["macenko"](batch, generator),
        "hed_strong": lambda: hed_strong(batch, generator),
        "domain augmentation (uint8 in)": lambda: domain(batch_u8, generator),
        "domain_strong + re-staining (p=0.5) + normalisation (uint8 in)":
            lambda: strong(normaliser(batch_u8), generator),
    }
    return {name: cpu_seconds(op, args.steps, args.repeats) for name, op in ops.items()}


def draw_figure(images: dict[str, np.ndarray], styles: dict[str, StainStats], path: Path,
                per_centre: int = 2) -> Path:
    """Per centre, ``per_centre`` images: original, normalised, re-stained towards each other
    centre with each method, and one HED-strong draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    for name, pool in images.items():
        x = to_unit_float(torch.from_numpy(pool[:per_centre]))
        columns = [("original", x), ("reinhard normalised", ReinhardNormaliser()(x))]
        for other in (o for o in images if o != name):
            for method in RESTAIN_METHODS:
                restainer = Restainer(styles[name], [styles[other]], method, probability=1.0)
                columns.append((f"{method} -> {other}", restainer(x, generator)))
        columns.append(("hed_strong", HedStrongJitter(AugmentHParams())(x, generator)))
        rows += [(name, [(title, column[i]) for title, column in columns])
                 for i in range(per_centre)]
    width = len(rows[0][1])
    figure, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.7 * len(rows)),
                                squeeze=False)
    for axes_row, (name, cells) in zip(axes, rows, strict=True):
        for axis, (title, image) in zip(axes_row, cells, strict=True):
            axis.imshow(image.permute(1, 2, 0).numpy())
            axis.set_title(f"{name}: {title}", fontsize=6)
            axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=5, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per figure")
    parser.add_argument("--figure", type=Path, default=None, help="also draw this PNG")
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic clinics even when the shared centres are there")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("CYTOFED_CACHE_DIR", ".cache/cytofed"))
    images, source = centre_images(args.size, cache, args.synthetic)
    styles = {name: site_stain_stats(pool) for name, pool in images.items()}
    if args.figure:
        print(f"figure: {draw_figure(images, styles, args.figure)}", file=sys.stderr)
    seconds = measure(images, styles, args)
    step = seconds["model step (forward + backward + AdamW)"]
    result = {"images": source, "size": args.size, "batch": args.batch, "model": args.model,
              "threads": args.threads, "cpu_seconds_per_batch": seconds,
              "ratio_to_model_step": {name: value / step for name, value in seconds.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{source}; {args.batch} images at {args.size} px; {args.threads} thread(s); "
          f"CPU seconds per batch, best of {args.repeats} blocks of {args.steps}")
    width = max(map(len, seconds))
    for name, value in seconds.items():
        print(f"  {name:<{width}}  {value:7.4f} s  {value / step:6.3f} x model step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
