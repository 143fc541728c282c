"""``cytofed bench --sites 3,10,30``: how a federation's cost grows with its number of sites.

For each site count N, in a fresh process: N synthetic sites (image files cut from the default
clinics A, B and C, in turn, listed in one CSV manifest; clinic D is the held-out centre) train
a few rounds of the app on Flower's simulation engine with small images and a few local steps.
Reported per N: round wall time and Flower's overhead over rounds 2.. (round 1 apart, see
:func:`simulations.bench.round_timing`; with fewer workers than sites the critical path counts
the sites' summed compute spread evenly over the workers), and the server's memory: the peak
resident memory of the process running the ServerApp (in simulation it also holds Flower's
in-memory SuperLink state) above what it held before the federation started, in bytes and in
model updates (``update-bytes`` of one site). It should grow with the model, not with N.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image

from common.config import RunConfig
from common.pipeline import cache_dir
from common.synthetic import CLASSES, default_clinics, load_clinic

HELD_OUT = "held-out"
IMAGES_PER_SITE = 40
HELD_OUT_IMAGES_PER_SITE = 2
# The run config of every site count; `--flower-config` overrides it.
SITES_RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 3, "model": "resnet10t", "image-size": 32, "batch-size": 16,
    "local-epochs": 1, "min-train-nodes": 2, "held-out": HELD_OUT}
MEMORY_SAMPLE_SECONDS = 0.02


def parse_site_counts(text: str) -> list[int]:
    """``"3,10,30"`` -> [3, 10, 30]; every count at least 2 (FedAvg needs two sites)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--sites expects comma-separated integers such as 3,10,30, got "
                         f"{text!r}") from error
    if not counts or min(counts) < 2:
        raise ValueError(f"--sites expects site counts of at least 2, got {text!r}")
    return counts


def write_federation(folder: Path, sites: int, image_size: int, cache: Path,
                     images_per_site: int = IMAGES_PER_SITE) -> None:
    """PNG files of ``sites`` training sites and the held-out centre, and ``manifest.csv``
    (``path,label,centre``). Site ``i`` takes the next ``images_per_site`` images of clinic
    A, B or C (``i % 3``); the held-out centre takes ``HELD_OUT_IMAGES_PER_SITE`` times as many
    of clinic D's, whatever the number of sites."""
    training, held_out = default_clinics()[:3], default_clinics()[3]
    counts = {style.name: images_per_site * math.ceil(sites / len(training))
              for style in training}
    counts[held_out.name] = HELD_OUT_IMAGES_PER_SITE * images_per_site
    clinics = {name: load_clinic(name, image_size, cache, n_images=count)
               for name, count in counts.items()}
    rows = []

    def add(centre: str, clinic: str, start: int, count: int) -> None:
        images, labels = clinics[clinic]
        (folder / centre).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + count):
            path = f"{centre}/{index:05d}.png"
            Image.fromarray(images[index]).save(folder / path)
            rows.append((path, CLASSES[labels[index]], centre))

    for site in range(sites):
        add(site_name(site), training[site % len(training)].name,
            images_per_site * (site // len(training)), images_per_site)
    add(HELD_OUT, held_out.name, 0, counts[held_out.name])
    with (folder / "manifest.csv").open("w", newline="") as manifest:
        csv.writer(manifest).writerows([("path", "label", "centre"), *rows])


def site_name(index: int) -> str:
    """The name of training site ``index``."""
    return f"site-{index:02d}"


def centres_file(folder: Path, sites: int) -> Path:
    """A centres TOML of the first ``sites`` sites of :func:`write_federation` and the
    held-out centre."""
    path = folder / f"centres-{sites}.toml"
    names = [*map(site_name, range(sites)), HELD_OUT]
    path.write_text("".join(f'[[centre]]\nname = "{name}"\npath = "manifest.csv"\n'
                            'format = "manifest"\n\n' for name in names))
    return path


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_resident_bytes() -> Iterator[dict[str, int]]:
    """Samples this process's resident memory every ``MEMORY_SAMPLE_SECONDS`` while the block
    runs; the yielded dict gets ``baseline`` (at entry) and ``peak``."""
    memory = {"baseline": resident_bytes()}
    memory["peak"] = memory["baseline"]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(MEMORY_SAMPLE_SECONDS):
            memory["peak"] = max(memory["peak"], resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield memory
    finally:
        done.set()
        sampler.join()
        memory["peak"] = max(memory["peak"], resident_bytes())


def measure_sites(sites: int, overrides: dict[str, Any], device: str,
                  workers: int) -> dict[str, Any]:
    """One federation of ``sites`` sites (run in a fresh process: its memory is the server's)."""
    import torch

    from simulations.bench import flower_overhead

    with peak_resident_bytes() as memory:
        result = flower_overhead(overrides, torch.device(device), workers)
    if result["sites"] != sites:
        raise RuntimeError(f"asked for {sites} sites, the run had {result['sites']}")
    growth = memory["peak"] - memory["baseline"]
    return {**result, "server_baseline_bytes": memory["baseline"],
            "server_peak_bytes": memory["peak"], "server_growth_bytes": growth,
            "server_growth_in_updates": growth / result["update_bytes"]}


def run_sites_bench(counts: Sequence[int], overrides: dict[str, Any], device: str,
                    scratch: Path) -> list[dict[str, Any]]:
    """:func:`measure_sites` for every count, each in its own process, one after another."""
    config = RunConfig(image_size=int({**SITES_RUN_CONFIG, **overrides}["image-size"]))
    write_federation(scratch, max(counts), config.image_size, cache_dir(config).resolve())
    workers = min(os.cpu_count() or 1, max(counts))
    results = []
    for sites in counts:
        values = {**SITES_RUN_CONFIG, **overrides,
                  "data-source": str(centres_file(scratch, sites))}
        started = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(measure_sites, sites, values, device, workers).result()
        results.append({**result, "wall_seconds": time.perf_counter() - started})
        print(f"[bench --sites] {sites} sites: {result['round_seconds']:.2f} s per round, "
              f"overhead {result['overhead_ratio']:.1%}, server peak +"
              f"{result['server_growth_bytes'] / 2**20:.0f} MiB "
              f"({result['server_growth_in_updates']:.1f} updates)", file=sys.stderr,
              flush=True)
    return results


def format_sites_table(results: list[dict[str, Any]]) -> str:
    """One line per site count."""
    lines = ["| sites | workers | round s | critical-path s | overhead | round 1 s | "
             "server peak above baseline | in updates of one site |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['sites']} | {r['workers']} | {r['round_seconds']:.2f} | "
            f"{r['critical_path_compute_seconds']:.2f} | {r['overhead_ratio']:.1%} | "
            f"{r['first_round_seconds']:.1f} | {r['server_growth_bytes'] / 2**20:.0f} MiB | "
            f"{r['server_growth_in_updates']:.1f} |")
    return "\n".join(lines)


def plot_sites(results: list[dict[str, Any]], path: Path) -> Path:
    """Round time and overhead, and the server's peak memory, against the number of sites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [r["sites"] for r in results]
    update_mib = results[0]["update_bytes"] / 2**20
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    time_axis.plot(sites, [r["round_seconds"] for r in results], "o-", label="round")
    time_axis.plot(sites, [r["critical_path_compute_seconds"] for r in results], "s--",
                   label="critical-path compute")
    time_axis.set(xlabel="sites", ylabel="seconds per round (rounds 2..)",
                  title="round time")
    time_axis.legend()
    memory_axis.plot(sites, [r["server_growth_bytes"] / 2**20 for r in results], "o-",
                     label="server peak above baseline")
    memory_axis.plot(sites, [n * update_mib for n in sites], ":", color="grey",
                     label="one update per site")
    memory_axis.set(xlabel="sites", ylabel="MiB", title="server memory")
    memory_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def sites_main(counts_text: str, overrides: dict[str, Any], device: str, as_json: bool,
               figure: Path | None) -> int:
    """``cytofed bench --sites``: run, print the table (or JSON), draw the figure if asked."""
    import tempfile

    counts = parse_site_counts(counts_text)
    with tempfile.TemporaryDirectory(prefix="cytofed-sites-") as scratch:
        results = run_sites_bench(counts, overrides, device, Path(scratch))
    if figure is not None:
        plot_sites(results, figure)
    print(json.dumps(results, indent=2) if as_json else format_sites_table(results), flush=True)
    return 0
