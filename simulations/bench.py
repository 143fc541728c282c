"""`cytofed bench`: local training against the chip's ceiling, Flower's overhead, wire bytes.

One run prints five figures:

(a) ceiling: images/s of the same model, loss and optimiser (bf16 autocast on CUDA, channels
    last) on a random float batch already on the device in the model's input layout;
(b) pipeline: images/s of the local training every site runs (:func:`common.pipeline.fit`, that
    is :func:`common.train.train_local`) on real decoded images with the ``domain``
    augmentation, from uint8 on the device (or pinned host memory) to the optimiser step;
(c) pipeline / ceiling;
(d) Flower: the app on Flower's simulation engine at the default run config, one SuperNode per
    training centre, all sites running at once. A round runs three phases one after another:
    site training, site validation, the server's held-out evaluation. Its critical-path compute
    is the slowest site's ``train_seconds`` + the slowest site's ``eval_seconds`` + the
    server's ``held_out_seconds``; its overhead ratio is (wall time - critical-path compute) /
    wall time: Flower's scheduling and messaging, weight (de)serialisation, per-message site
    setup (config, model construction, data upload) and aggregation. Round 1 (Ray start,
    imports, first data load) is reported apart; the ratio is over rounds 2..N;
(e) bytes one site sends per round: the model's ArrayRecord in fp32, bf16 and fp16.

Throughputs (a) and (b) are timed in interleaved blocks (a, b, a, b, ...) after one warm-up
block each, so load from other processes hits both alike; each figure is the best of its blocks
(as ``timeit`` takes the minimum: slower blocks measure interference, not the code), and every
block is kept in the JSON output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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

ROOT = Path(__file__).resolve().parents[1]
SHARED_CENTRES = ROOT / "simulations" / "centres" / "shared-wbc.toml"
FALLBACK_CLINIC = "clinic-a"
WARMUP_STEPS = 3
# Per device type: (image size, batch size, timed steps per block) when not given.
DEFAULTS = {"cuda": (224, 256, 30), "cpu": (64, 64, 8)}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_bench_data(config: RunConfig, data_source: Path, centre: str) -> tuple[CentreData, str]:
    """The centre's decoded images, or a synthetic clinic when its data are absent; the second
    value says which."""
    try:
        spec = next((s for s in read_centres(data_source) if s.name == centre), None)
        if spec is None:
            raise ValueError(f"no centre {centre!r} in {data_source}")
        data = load_centre_data(spec, config)
        return data, f"{centre}: {len(data)} real decoded images ({data_source})"
    except FileNotFoundError as error:
        data = load_centre_data(CentreSpec(name=FALLBACK_CLINIC, format="synthetic"), config)
        return data, (f"{FALLBACK_CLINIC}: {len(data)} synthetic images (real data missing: "
                      f"{error})")


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


def measure_throughput(config: RunConfig, data: CentreData, steps: int,
                       repeats: int) -> dict[str, Any]:
    """(a) ceiling, (b) pipeline and (c) their ratio, from interleaved timed blocks."""
    num_classes, counts = len(data.classes), data.class_counts()
    ceiling = Ceiling(config, num_classes, counts)
    model = new_model(config, num_classes)
    rng = np.random.default_rng(config.seed)
    ceiling.images_per_second(WARMUP_STEPS)
    pipeline_images_per_second(model, data, config, WARMUP_STEPS, rng, seed=0)
    ceilings, pipelines = [], []
    for repeat in range(1, repeats + 1):
        ceilings.append(ceiling.images_per_second(steps))
        pipelines.append(pipeline_images_per_second(model, data, config, steps, rng, repeat))
    ceiling_ips, pipeline_ips = max(ceilings), max(pipelines)
    return {"ceiling_images_per_second": ceiling_ips, "pipeline_images_per_second": pipeline_ips,
            "ratio": pipeline_ips / ceiling_ips, "ceiling_blocks": ceilings,
            "pipeline_blocks": pipelines}


def wire_bytes(config: RunConfig, num_classes: int) -> dict[str, int]:
    """(e) Bytes of the ArrayRecord one site sends per round, per wire precision."""
    from server.strategies import state_to_record

    state = model_state(new_model(config, num_classes))
    return {precision: state_to_record(to_wire(state, precision)).count_bytes()
            for precision in WIRE_PRECISIONS}


def round_timing(round_result: dict) -> dict[str, float]:
    """Wall time, critical-path compute and summed site compute of one round of a report."""
    train = [c.get("train_seconds", 0.0) for c in round_result.get("clients", [])]
    evaluate = round_result.get("site_eval_seconds", [])
    held_out = round_result.get("held_out_seconds", 0.0)
    return {"seconds": round_result["seconds"],
            "compute": max(train, default=0.0) + max(evaluate, default=0.0) + held_out,
            "summed_site_compute": sum(train) + sum(evaluate)}


def flower_overhead(overrides: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """(d) Round wall time against site compute in a Flower simulation (every site at once)."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    with tempfile.TemporaryDirectory(prefix="cytofed-bench-") as output_dir:
        values = {**overrides, "device": device.type, "output-dir": output_dir,
                  "cache-dir": str(cache_dir(RunConfig()).resolve())}
        config = parse_run_config(values)
        sites = len(training_centres(config, resolve_centres(config)))
        cpus, gpus = os.cpu_count() or 1, int(device.type == "cuda")
        backend = {"init_args": {"num_cpus": cpus, "num_gpus": gpus},
                   "client_resources": {"num_cpus": cpus / sites, "num_gpus": gpus / sites}}
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the bench's result
            run_simulation(build_server_app(values), build_client_app(values),
                           num_supernodes=sites, backend_config=backend)
        reports = list(Path(output_dir).glob("*/report.json"))
        if len(reports) != 1:
            raise RuntimeError(f"the Flower simulation wrote {len(reports)} reports, not one")
        report = json.loads(reports[0].read_text())
    timings = [round_timing(r) for r in report["rounds"]]
    first, steady = timings[0], timings[1:] or timings[:1]
    wall = sum(t["seconds"] for t in steady)
    compute = sum(t["compute"] for t in steady)
    return {
        "rounds": len(timings), "sites": sites, "client_resources": backend["client_resources"],
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
    """All five figures as one dict."""
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--repeats and --steps must be at least 1")
    device = resolve_device(args.device)
    size, batch, steps = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    steps = args.steps or steps
    config = parse_run_config({
        "model": args.model, "image-size": args.image_size or size,
        "batch-size": args.batch_size or batch, "augment": args.augment,
        "device": device.type, "local-epochs": 1, "compile": args.compile})
    data, source = load_bench_data(config, args.data_source, args.centre)
    result: dict[str, Any] = {
        "machine": machine(device),
        "config": {"model": config.model, "image_size": config.image_size,
                   "batch_size": config.batch_size, "augment": config.augment,
                   "compile": config.compile, "steps": steps,
                   "repeats": args.repeats},
        "data": source,
        **measure_throughput(config, data, steps, args.repeats),
        "wire_bytes": wire_bytes(config, len(data.classes)),
        "flower": None,
    }
    if not args.skip_flower:
        from flwr.common.config import parse_config_args

        overrides = parse_config_args([args.flower_config]) if args.flower_config else {}
        result["flower"] = flower_overhead(overrides, device)
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
        f"(c) pipeline / ceiling       {result['ratio']:10.3f}",
    ]
    flower = result["flower"]
    if flower is None:
        lines.append("(d) Flower round overhead    skipped (--skip-flower)")
    else:
        lines.append(
            f"(d) Flower round overhead    {flower['overhead_ratio']:10.1%} of round time "
            f"(rounds 2-{flower['rounds']}: {flower['round_seconds']:.2f} s per round, "
            f"critical-path compute {flower['critical_path_compute_seconds']:.2f} s, summed "
            f"site compute {flower['summed_site_compute_seconds']:.2f} s; round 1 "
            f"{flower['first_round_seconds']:.1f} s, {flower['first_round_overhead_ratio']:.0%}"
            f" overhead)")
    lines.append("(e) bytes per client/round   " + ", ".join(
        f"{name} {count:,} ({count / wire['fp32']:.2f})" for name, count in wire.items()))
    return "\n".join(lines)


def register_bench_command(parser: argparse.ArgumentParser) -> None:
    """``cytofed bench``: add the arguments and the handler."""
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument("--image-size", type=int, help="pixels (default 224 on CUDA, 64 on CPU)")
    parser.add_argument("--batch-size", type=int, help="default 256 on CUDA, 64 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps per block (default 30 / 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of (a) and of (b)")
    parser.add_argument("--augment", default="domain", help="augmentation preset or op list")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--data-source", type=Path, default=SHARED_CENTRES,
                        help="centres TOML of the real images")
    parser.add_argument("--centre", default="barcelona", help="centre of --data-source")
    parser.add_argument("--skip-flower", action="store_true", help="skip (d)")
    parser.add_argument("--flower-config", default="",
                        help="run-config overrides of the simulation, 'key=value ...'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
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
