"""`cytofed bench`: local training against the chip's ceiling and a peer, Flower's overhead.

One run prints five figures, and a sixth with ``--peer``:

(a) ceiling: images/s of the same model, loss and optimiser (bf16 autocast on CUDA, channels
    last) on a random float batch already on the device in the model's input layout;
(b) pipeline: images/s of the local training every site runs (:func:`common.pipeline.fit`, that
    is :func:`common.train.train_local`) on real decoded images with the ``domain``
    augmentation, from uint8 on the device (or pinned host memory) to the optimiser step;
(c) pipeline / ceiling;
(d) Flower: the app on Flower's simulation engine (or, with ``--flower-engine deployment``,
    on a local SuperLink and SuperNode processes) at the default run config, one SuperNode per
    training centre, all sites running at once. A round runs three phases one after another:
    site training, site validation, the server's held-out evaluation. Its critical-path compute
    is the slowest site's ``train_seconds`` + the slowest site's ``eval_seconds`` + the
    server's ``held_out_seconds``; its overhead ratio is (wall time - critical-path compute) /
    wall time: Flower's scheduling and messaging, weight (de)serialisation, per-message site
    setup (config, model construction, data upload) and aggregation. Round 1 (Ray start,
    imports, first data load) is reported apart; the ratio is over rounds 2..N;
(e) bytes one site sends per round: the model's ArrayRecord in fp32, bf16 and fp16;
(f) with ``--peer``: the usual PyTorch pipeline on the same images, model, batch and device
    (:mod:`simulations.bench_peer`: PIL decoding, torchvision transforms v2, ``DataLoader``
    workers) and (b) over its images/s.

Throughputs (a), (b) and (f) are timed in interleaved blocks (a, b, f, a, b, f, ...) after one
warm-up block each, so load from other processes hits all alike; each figure is the best of its
blocks (as ``timeit`` takes the minimum: slower blocks measure interference, not the code), and
every block is kept in the JSON output. ``--sites`` measures how a federation's cost grows with
its number of sites instead (:mod:`simulations.bench_sites`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from common.centres import read_centres
from common.config import (
    RunConfig,
    parse_run_config,
    resolve_centres,
    training_centres,
)
from common.data import CentreData, CentreSpec
from common.losses import create_loss
from common.pipeline import cache_dir, fit, load_centre_data, new_model
from common.train import (
    TrainSettings,
    make_optimizer,
    prepare_model,
    resolve_device,
    train_step,
)
from common.weights import WIRE_PRECISIONS, model_state, to_wire
from simulations.bench_peer import PeerPipeline, default_workers, peer_files

ROOT = Path(__file__).resolve().parents[1]
SHARED_CENTRES = ROOT / "simulations" / "centres" / "shared-wbc.toml"
FALLBACK_CLINIC = "clinic-a"
# Per device type: (image size, batch size, timed steps per block) when not given.
DEFAULTS = {"cuda": (224, 256, 30), "cpu": (64, 64, 8)}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_bench_data(config: RunConfig, data_source: Path,
                    centre: str) -> tuple[CentreData, str, CentreSpec | None]:
    """The centre's decoded images, or a synthetic clinic when its data are absent; the second
    value says which, the third is the centre (None for the synthetic clinic)."""
    try:
        spec = next((s for s in read_centres(data_source) if s.name == centre), None)
        if spec is None:
            raise ValueError(f"no centre {centre!r} in {data_source}")
        data = load_centre_data(spec, config)
        return data, f"{centre}: {len(data)} real decoded images ({data_source})", spec
    except FileNotFoundError as error:
        data = load_centre_data(CentreSpec(name=FALLBACK_CLINIC, format="synthetic"), config)
        return data, (f"{FALLBACK_CLINIC}: {len(data)} synthetic images (real data missing: "
                      f"{error})"), None


class Ceiling:
    """The model-only ceiling: one training step on a fixed random batch on the device."""

    def __init__(self, config: RunConfig, num_classes: int, class_counts: np.ndarray) -> None:
        self.device = resolve_device(config.device)
        self.model = prepare_model(new_model(config, num_classes), self.device, config.compile)
        self.model.train()
        self.loss_fn = create_loss(config.loss, class_counts, progress=1.0).to(self.device)
        settings = TrainSettings(learning_rate=config.learning_rate,
                                 weight_decay=config.weight_decay)
        self.optimizer = make_optimizer(self.model, settings, self.device)
        size, batch = config.image_size, config.batch_size
        self.inputs = torch.randn(batch, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last)
        self.targets = torch.randint(num_classes, (batch,), device=self.device)

    def images_per_second(self, steps: int) -> float:
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            train_step(self.model, self.inputs, self.targets, self.loss_fn, self.optimizer,
                       self.device)
        synchronize(self.device)
        return steps * len(self.inputs) / (time.perf_counter() - started)


def pipeline_images_per_second(model: torch.nn.Module, data: CentreData, config: RunConfig,
                               steps: int, rng: np.random.Generator, seed: int) -> float:
    """Throughput of one local-training call on ``steps`` random batches of ``data``."""
    count = steps * config.batch_size
    index = rng.choice(len(data), count, replace=len(data) < count)
    metrics = fit(model, data.subset(index), config, data.class_counts(), progress=1.0,
                  seed=seed)
    return metrics["images_per_second"]


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the peer's ``DataLoader`` workers)."""
    process = psutil.Process()
    children = sum(sum(child.cpu_times()[:2]) for child in process.children(recursive=True))
    return time.process_time() + children


def measure_throughput(config: RunConfig, data: CentreData, steps: int, repeats: int,
                       peer: Callable[[], float] | None = None) -> dict[str, Any]:
    """(a) ceiling, (b) pipeline, (c) their ratio and, given ``peer`` (one timed epoch of
    ``steps`` batches), the peer's throughput, from interleaved timed blocks.

    Each block also records the CPU seconds per image it took (this process and its children):
    unlike images/s, that hardly moves when other processes compete for the cores.
    """
    num_classes, counts = len(data.classes), data.class_counts()
    ceiling = Ceiling(config, num_classes, counts)
    model = new_model(config, num_classes)
    rng = np.random.default_rng(config.seed)
    timed: dict[str, Callable[[int], float]] = {
        "ceiling": lambda block: ceiling.images_per_second(steps),
        "pipeline": lambda block: pipeline_images_per_second(model, data, config, steps, rng,
                                                             seed=block)}
    if peer is not None:
        timed["peer"] = lambda block: peer()
    for run in timed.values():  # warm-up blocks, discarded
        run(0)
    blocks: dict[str, list[float]] = {name: [] for name in timed}
    cpu: dict[str, list[float]] = {name: [] for name in timed}
    for block in range(1, repeats + 1):
        for name, run in timed.items():
            started = cpu_seconds()
            blocks[name].append(run(block))
            cpu[name].append((cpu_seconds() - started) / (steps * config.batch_size))
    best = {name: max(values) for name, values in blocks.items()}
    least_cpu = {name: min(values) for name, values in cpu.items()}
    result = {"ceiling_images_per_second": best["ceiling"],
              "pipeline_images_per_second": best["pipeline"],
              "ratio": best["pipeline"] / best["ceiling"], "ceiling_blocks": blocks["ceiling"],
              "pipeline_blocks": blocks["pipeline"],
              "cpu_seconds_per_image": least_cpu, "cpu_blocks": cpu}
    if peer is not None:
        result["peer"] = {"images_per_second": best["peer"], "blocks": blocks["peer"],
                          "speedup": best["pipeline"] / best["peer"],
                          "cpu_ratio": least_cpu["peer"] / least_cpu["pipeline"]}
    return result


def open_peer(config: RunConfig, data: CentreData, spec: CentreSpec | None, workers: int,
              steps: int, stack: contextlib.ExitStack) -> tuple[PeerPipeline, str]:
    """The peer on ``data``'s files (:mod:`simulations.bench_peer`), closed with ``stack``,
    and which files those are."""
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cytofed-peer-")))
    paths, labels, files = peer_files(spec, data, config, scratch)
    peer = PeerPipeline(paths, labels, config, len(data.classes), data.class_counts(), workers,
                        steps)
    return stack.enter_context(peer), files


def wire_bytes(config: RunConfig, num_classes: int) -> dict[str, int]:
    """(e) Bytes of the ArrayRecord one site sends per round, per wire precision."""
    from server.strategies import state_to_record

    state = model_state(new_model(config, num_classes))
    return {precision: state_to_record(to_wire(state, precision)).count_bytes()
            for precision in WIRE_PRECISIONS}


def round_timing(round_result: dict, workers: int | None = None) -> dict[str, float]:
    """Wall time, critical-path compute and summed site compute of one round of a report.

    The critical path of a phase is its slowest site or, when ``workers`` run fewer sites at
    once than there are, at least the phase's summed site compute spread over the workers.
    """
    train = [c.get("train_seconds", 0.0) for c in round_result.get("clients", [])]
    evaluate = round_result.get("site_eval_seconds", [])
    held_out = round_result.get("held_out_seconds", 0.0)

    def phase(seconds: list[float]) -> float:
        spread = sum(seconds) / workers if workers else 0.0
        return max(max(seconds, default=0.0), spread)

    return {"seconds": round_result["seconds"],
            "compute": phase(train) + phase(evaluate) + held_out,
            "summed_site_compute": sum(train) + sum(evaluate)}


def simulated_report(values: dict[str, Any], sites: int, workers: int,
                     device: torch.device) -> dict:
    """report.json of the app on Flower's simulation engine (Ray), ``workers`` sites at once,
    each with ``cpus / workers`` CPUs."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    cpus, gpus = os.cpu_count() or 1, int(device.type == "cuda")
    backend = {"init_args": {"num_cpus": cpus, "num_gpus": gpus},
               "client_resources": {"num_cpus": cpus / workers, "num_gpus": gpus / workers}}
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the bench's result
        run_simulation(build_server_app(values), build_client_app(values),
                       num_supernodes=sites, backend_config=backend)
    reports = list(Path(values["output-dir"]).glob("*/report.json"))
    if len(reports) != 1:
        raise RuntimeError(f"the Flower simulation wrote {len(reports)} reports, not one")
    return json.loads(reports[0].read_text())


def deployed_report(values: dict[str, Any], sites: int) -> dict:
    """report.json of the app on Flower's deployment engine: a local SuperLink and one
    SuperNode process per site (:mod:`simulations.local_deployment`), every site at once.
    A real SuperLink refuses the synthetic clinics unless asked: this benchmark asks."""
    from simulations.local_deployment import run_deployed

    return json.loads(run_deployed({**values, "allow-synthetic": True}, sites).read_text())


def flower_overhead(overrides: dict[str, Any], device: torch.device,
                    workers: int | None = None, engine: str = "simulation") -> dict[str, Any]:
    """(d) Round wall time against site compute on Flower's ``simulation`` engine (every site
    at once, or at most ``workers`` at once) or its ``deployment`` engine (every site at once,
    each message in a fresh ClientApp process)."""
    with tempfile.TemporaryDirectory(prefix="cytofed-bench-") as output_dir:
        values = {**overrides, "device": device.type, "output-dir": output_dir,
                  "cache-dir": str(cache_dir(RunConfig()).resolve())}
        config = parse_run_config(values)
        sites = len(training_centres(config, resolve_centres(config)))
        if engine == "deployment":
            workers = sites
            report = deployed_report(values, sites)
        else:
            workers = min(workers or sites, sites)
            report = simulated_report(values, sites, workers, device)
    timings = [round_timing(r, workers) for r in report["rounds"]]
    first, steady = timings[0], timings[1:] or timings[:1]
    wall = sum(t["seconds"] for t in steady)
    compute = sum(t["compute"] for t in steady)
    return {
        "engine": engine, "rounds": len(timings), "sites": sites, "workers": workers,
        "overrides": overrides,
        "round_seconds": wall / len(steady),
        "critical_path_compute_seconds": compute / len(steady),
        "summed_site_compute_seconds": sum(t["summed_site_compute"] for t in steady)
        / len(steady),
        "overhead_ratio": (wall - compute) / wall,
        "first_round_seconds": first["seconds"],
        "first_round_overhead_ratio": (first["seconds"] - first["compute"]) / first["seconds"],
        "update_bytes": report["rounds"][-1]["clients"][0].get("update-bytes"),
        "held_out_macro_f1": report["held_out_macro_f1"],
    }


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    from simulations.loco import machine as describe_machine

    return {"device": device.type, "name": describe_machine(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """All five figures (six with ``--peer``) as one dict."""
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--repeats and --steps must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size, batch, steps = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    steps = args.steps or steps
    config = parse_run_config({
        "model": args.model, "image-size": args.image_size or size,
        "batch-size": args.batch_size or batch, "augment": args.augment,
        "device": device.type, "local-epochs": 1, "compile": args.compile})
    data, source, spec = load_bench_data(config, args.data_source, args.centre)
    result: dict[str, Any] = {
        "machine": machine(device),
        "config": {"model": config.model, "image_size": config.image_size,
                   "batch_size": config.batch_size, "augment": config.augment,
                   "compile": config.compile, "steps": steps,
                   "repeats": args.repeats},
        "data": source,
    }
    with contextlib.ExitStack() as stack:
        peer, files = (open_peer(config, data, spec, args.peer_workers or default_workers(),
                                 steps, stack) if args.peer else (None, ""))
        result.update(measure_throughput(config, data, steps, args.repeats,
                                         peer.images_per_second if peer else None))
        if peer is not None:
            result["peer"].update({**peer.describe(), "files": files})
    result["wire_bytes"] = wire_bytes(config, len(data.classes))
    result["flower"] = None
    if not args.skip_flower:
        from flwr.common.config import parse_config_args

        overrides = parse_config_args([args.flower_config]) if args.flower_config else {}
        result["flower"] = flower_overhead(overrides, device, engine=args.flower_engine)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The five figures for people."""
    cfg, where = result["config"], result["machine"]
    wire = result["wire_bytes"]
    lines = [
        f"cytofed bench: {cfg['model']} at {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['augment']} augmentation{', compiled' if cfg['compile'] else ''}; "
        f"{where['device']} ({where['name']}, {where['torch_threads']} threads), "
        f"torch {where['torch']}",
        f"data: {result['data']}",
        f"(a) model-only ceiling       {result['ceiling_images_per_second']:10.1f} images/s",
        f"(b) local-training pipeline  {result['pipeline_images_per_second']:10.1f} images/s",
        f"(c) pipeline / ceiling       {result['ratio']:10.3f}   (CPU ms per image: "
        + ", ".join(f"{name} {1000 * seconds:.1f}"
                    for name, seconds in result["cpu_seconds_per_image"].items()) + ")",
    ]
    flower = result["flower"]
    if flower is None:
        lines.append("(d) Flower round overhead    skipped (--skip-flower)")
    else:
        lines.append(
            f"(d) Flower round overhead    {flower['overhead_ratio']:10.1%} of round time "
            f"({flower['engine']} engine, rounds 2-{flower['rounds']}: "
            f"{flower['round_seconds']:.2f} s per round, "
            f"critical-path compute {flower['critical_path_compute_seconds']:.2f} s, summed "
            f"site compute {flower['summed_site_compute_seconds']:.2f} s; round 1 "
            f"{flower['first_round_seconds']:.1f} s, {flower['first_round_overhead_ratio']:.0%}"
            f" overhead)")
    lines.append("(e) bytes per client/round   " + ", ".join(
        f"{name} {count:,} ({count / wire['fp32']:.2f})" for name, count in wire.items()))
    peer = result.get("peer")
    if peer:
        lines.append(f"(f) usual PyTorch pipeline   {peer['images_per_second']:10.1f} images/s "
                     f"({peer['pipeline']}; {peer['files']})")
        lines.append(f"    (b) / (f)                {peer['speedup']:10.2f}x   (the peer uses "
                     f"{peer['cpu_ratio']:.2f}x our CPU time per image)")
    return "\n".join(lines)


def register_bench_command(parser: argparse.ArgumentParser) -> None:
    """``cytofed bench``: add the arguments and the handler."""
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument("--image-size", type=int, help="pixels (default 224 on CUDA, 64 on CPU)")
    parser.add_argument("--batch-size", type=int, help="default 256 on CUDA, 64 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps per block (default 30 / 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of (a), (b) and (f)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of this process (default: torch's)")
    parser.add_argument("--augment", default="domain", help="augmentation preset or op list")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--data-source", type=Path, default=SHARED_CENTRES,
                        help="centres TOML of the real images")
    parser.add_argument("--centre", default="barcelona", help="centre of --data-source")
    parser.add_argument("--skip-flower", action="store_true", help="skip (d)")
    parser.add_argument("--peer", action="store_true",
                        help="(f): also time the usual PyTorch pipeline (PIL, torchvision v2, "
                             "DataLoader) on the same images, model, batch and device")
    parser.add_argument("--peer-workers", type=int,
                        help="DataLoader workers of the peer (default: one per core, at most 8)")
    parser.add_argument("--flower-engine", choices=("simulation", "deployment"),
                        default="simulation",
                        help="(d) on Flower's simulation engine (Ray) or its deployment engine "
                             "(a local SuperLink and SuperNode processes, no Ray)")
    parser.add_argument("--flower-config", default="",
                        help="run-config overrides of the simulation, 'key=value ...'")
    parser.add_argument("--sites", metavar="N,N,...",
                        help="instead of (a)-(f): round time, Flower overhead and the server's "
                             "peak memory with N synthetic sites each (e.g. 3,10,30), the run "
                             "config being that of simulations.bench_sites with --flower-config "
                             "over it")
    parser.add_argument("--figure", type=Path, help="with --sites: draw the results (PNG)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.sites:
        from flwr.common.config import parse_config_args

        from simulations.bench_sites import sites_main

        overrides = parse_config_args([args.flower_config]) if args.flower_config else {}
        return sites_main(args.sites, overrides, resolve_device(args.device).type, args.json,
                          args.figure)
    result = run_bench(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.bench``: the same as ``cytofed bench`` without the other
    sub-commands' imports (for a machine that has torch and timm but not all of them)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench")
    register_bench_command(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
