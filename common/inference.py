"""Apply an exported model without Flower: metrics on a labelled centre, predictions on a folder.

``MODEL`` is a model card, a run directory or a weights file beside its card (see
``common.modelcard``). Images are decoded exactly as in training (``common.imagecache``), into
a temporary cache unless a cache folder is given, so the training cache is never written
unasked, then placed and normalised as the card says (``common.model_input``), and every
probability is taken at the card's temperature. BatchNorm statistics are adapted to the
scored images only when asked (``--adapt``); the card's ``adapt_batchnorm`` is a hint.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.centres import load_centre, read_centre
from common.imagecache import LoadedImages, load_images
from common.metrics import confident_share
from common.modelcard import ModelCard, load_exported_model
from common.models import batchnorm_keys
from common.progress import progress_bar
from common.train import (
    adapt_batchnorm,
    evaluate_model,
    predict_probabilities,
    prepare_model,
    resolve_device,
)

CHUNK = 256  # image files decoded, predicted and written at a time


@contextmanager
def decoding_cache(cache_dir: Path | None) -> Iterator[Path]:
    """``cache_dir`` if given, else a temporary folder removed afterwards."""
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="cytofed-decode-") as temporary:
        yield Path(temporary)


def check_adaptable(model: nn.Module, card: ModelCard, model_path: Path) -> None:
    """Raise ValueError when ``--adapt`` is asked of a model without BatchNorm statistics."""
    if not batchnorm_keys(model):
        raise ValueError(f"--adapt: model {model_path} (norm {card.norm!r}) has no BatchNorm "
                         "statistics to adapt")


def adaptation_hint(card: ModelCard, adapt: bool) -> str | None:
    """The line that says the card recommends ``--adapt`` when it was not given."""
    if card.adapt_batchnorm and not adapt:
        return ("hint: this model was validated after test-time BatchNorm adaptation (its "
                "card recommends it); add --adapt to adapt its BatchNorm statistics to these "
                "images first")
    return None


def scored(model: nn.Module, images: torch.Tensor, labels: np.ndarray, card: ModelCard,
           device: torch.device) -> dict:
    """Metrics of ``model`` on placed images at the card's temperature, with the coverage and
    error rate at the card's ``uncertain`` threshold."""
    metrics = evaluate_model(model, images, labels, card.classes, device,
                             card.preprocessing.model_input(), card.temperature)
    if card.threshold is not None:
        histogram = metrics["confidence_histogram"]
        metrics["uncertain"] = {"threshold": card.threshold, **confident_share(
            histogram["correct"], histogram["wrong"], card.threshold)}
    return metrics


def evaluate_centre(model_path: Path, centre_path: Path, cache_dir: Path | None = None,
                    device: str = "auto", adapt: bool = False) -> dict:
    """Metrics of an exported model on the labelled centre of a centre TOML file.

    ``common.metrics.classification_metrics`` at the card's temperature plus loss, the
    centre, and the coverage and error rate at the card's ``uncertain`` threshold. With
    ``adapt``, also ``bn_adapted``: the same after test-time BatchNorm adaptation on the
    centre's (unlabelled) images, reported apart from the plain metrics.
    """
    model, card = load_exported_model(model_path)
    if adapt:
        check_adaptable(model, card, model_path)
    spec = read_centre(centre_path)
    if spec.taxonomy != card.taxonomy:
        raise ValueError(f"centre {spec.name!r} uses taxonomy {spec.taxonomy!r}, the model "
                         f"predicts {card.taxonomy!r}")
    with decoding_cache(cache_dir) as cache:
        data = load_centre(spec, card.preprocessing.image_size, cache,
                           mode=card.preprocessing.field_of_view)
    torch_device = resolve_device(device)
    inputs = card.preprocessing.model_input()
    model = prepare_model(model, torch_device)
    images = inputs.place(data.images, torch_device)
    result = {"centre": spec.name, "model": str(model_path), "temperature": card.temperature,
              "stain_normalisation": inputs.stain_normalisation,
              **scored(model, images, data.labels, card, torch_device)}
    if adapt:
        adapted = adapt_batchnorm(copy.deepcopy(model), images, torch_device, inputs)
        result["bn_adapted"] = {"adapted_on": len(data),
                                **scored(adapted, images, data.labels, card, torch_device)}
    return {**result, "hint": adaptation_hint(card, adapt)}


def image_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, recursively, in sorted path order; one directory's listing is
    held at a time (symbolic links to directories are not followed)."""
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from image_files(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def chunks(paths: Iterable[Path], size: int = CHUNK) -> Iterator[list[Path]]:
    """``paths`` in lists of ``size`` (the last may be shorter)."""
    iterator = iter(paths)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def predict_folder(model_path: Path, images_dir: Path, out: Path,
                   cache_dir: Path | None = None, device: str = "auto",
                   threshold: float | None = None, adapt: bool = False) -> dict:
    """Write one CSV row per readable image file under ``images_dir`` (recursively).

    Columns: file (relative to ``images_dir``), predicted class, confidence, ``uncertain``
    (confidence below the card's calibrated threshold, or ``threshold``), ``bn_adapted`` and
    one probability per class, all at the card's temperature. Unreadable files are listed in
    ``<out stem>.unreadable.txt`` and on stderr. Files are decoded, predicted and written
    :data:`CHUNK` at a time, so memory does not grow with the folder. With ``adapt``, BatchNorm
    statistics are first re-estimated on every readable image of the folder (read twice).
    Returns counts and the paths written.
    """
    model, card = load_exported_model(model_path)
    if adapt:
        check_adaptable(model, card, model_path)
    threshold = card.threshold if threshold is None else threshold
    if threshold is None:
        raise ValueError(f"model {model_path} has no calibrated uncertainty threshold; "
                         "give one with --threshold")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    total = sum(1 for _ in image_files(images_dir))
    if not total:
        raise ValueError(f"no files in {images_dir}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    unreadable_list = out.with_suffix(".unreadable.txt")
    torch_device = resolve_device(device)
    model = prepare_model(model, torch_device)
    inputs = card.preprocessing.model_input()
    counts = {"predictions": 0, "uncertain": 0, "unreadable": 0, "adapted_on": 0}
    with decoding_cache(cache_dir) as cache, out.open("w", newline="") as table, \
            unreadable_list.open("w") as unreadable:

        def decoded(label: str) -> Iterator[tuple[list[Path], LoadedImages]]:
            with progress_bar(total, label) as bar:
                for chunk in chunks(image_files(images_dir)):
                    yield chunk, load_images(chunk, card.preprocessing.image_size, cache,
                                             card.preprocessing.field_of_view)
                    bar.update(len(chunk))

        if adapt:
            def adaptation_set() -> Iterator[torch.Tensor]:
                for _, loaded in decoded("adapting BatchNorm"):
                    if len(loaded.images):
                        counts["adapted_on"] += len(loaded.images)
                        yield inputs.place(loaded.images, torch_device)

            adapt_batchnorm(model, adaptation_set(), torch_device, inputs)
        writer = csv.writer(table)
        writer.writerow(["file", "predicted", "confidence", "uncertain", "bn_adapted",
                         *(f"p_{name}" for name in card.classes)])
        for chunk, loaded in decoded("predicting"):
            for path in loaded.unreadable:
                unreadable.write(f"{path.relative_to(images_dir).as_posix()}\n")
                print(f"unreadable: {path}", file=sys.stderr)
            counts["unreadable"] += len(loaded.unreadable)
            if not len(loaded.images):
                continue
            probabilities = predict_probabilities(
                model, inputs.place(loaded.images, torch_device), torch_device, inputs,
                card.temperature)
            confidence = probabilities.max(axis=1)
            for index, row, top in zip(loaded.readable, probabilities, confidence, strict=True):
                writer.writerow([chunk[index].relative_to(images_dir).as_posix(),
                                 card.classes[int(row.argmax())], f"{top:.4f}",
                                 top < threshold, adapt, *(f"{p:.4f}" for p in row)])
            counts["predictions"] += len(probabilities)
            counts["uncertain"] += int(np.sum(confidence < threshold))
    return {**counts, "threshold": threshold, "temperature": card.temperature,
            "bn_adapted": adapt, "hint": adaptation_hint(card, adapt), "csv": str(out),
            "unreadable_list": str(unreadable_list)}


def format_evaluation(result: dict) -> str:
    """The result of :func:`evaluate_centre` as a short human-readable text: the plain
    metrics, then, apart, those after BatchNorm adaptation (``--adapt``)."""
    lines = [f"{result['model']} on centre {result['centre']} ({result['num_examples']} images, "
             f"temperature {result['temperature']:.3g})", "", "plain (no adaptation):",
             *_metric_lines(result)]
    if "bn_adapted" in result:
        adapted = result["bn_adapted"]
        lines += ["", f"after test-time BatchNorm adaptation on the centre's "
                      f"{adapted['adapted_on']} unlabelled images (--adapt):",
                  *_metric_lines(adapted)]
    if result.get("hint"):
        lines += ["", result["hint"]]
    return "\n".join(lines)


def _metric_lines(metrics: dict) -> list[str]:
    lines = [f"macro-F1 {metrics['macro_f1']:.3f}, balanced accuracy "
             f"{metrics['balanced_accuracy']:.3f}, accuracy {metrics['accuracy']:.3f}, "
             f"ECE {metrics['ece']:.3f}"]
    if "uncertain" in metrics:
        share = metrics["uncertain"]
        error = "n/a" if share["error_rate"] is None else f"{share['error_rate']:.3f}"
        lines.append(f"confidence >= {share['threshold']:.2f}: coverage "
                     f"{share['coverage']:.3f}, error rate {error}")
    classes = list(metrics["per_class_f1"])
    width = max(map(len, classes))
    lines += [f"{'class':<{width}}  F1     confusion (predicted: {' '.join(classes)})"]
    for name, row in zip(classes, metrics["confusion_matrix"], strict=True):
        f1 = metrics["per_class_f1"][name]
        f1_text = "  n/a" if f1 is None else f"{f1:.3f}"
        lines.append(f"{name:<{width}}  {f1_text}  {' '.join(f'{c:>5}' for c in row)}")
    return lines


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="model_card.json, a run directory, or a weights file beside its card")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep decoded images here (default: a temporary folder)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--adapt", action="store_true",
                        help="first re-estimate BatchNorm statistics on these images "
                             "(unlabelled; test-time adaptation), reported as such")


def _run_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_centre(args.model, args.centre, args.cache_dir, args.device, args.adapt)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    summary = predict_folder(args.model, args.images, args.out, args.cache_dir, args.device,
                             args.threshold, args.adapt)
    adapted = (f"BatchNorm statistics adapted on the folder's {summary['adapted_on']} images "
               "(--adapt)" if summary["bn_adapted"] else "no BatchNorm adaptation")
    print(f"{summary['predictions']} predictions ({summary['uncertain']} uncertain at "
          f"confidence < {summary['threshold']:.2f}; temperature "
          f"{summary['temperature']:.3g}; {adapted}) in {summary['csv']}; "
          f"{summary['unreadable']} unreadable files listed in {summary['unreadable_list']}")
    if summary.get("hint"):
        print(summary["hint"])
    return 0


def register_evaluate_command(parser: argparse.ArgumentParser) -> None:
    """``cytofed evaluate --model MODEL --centre CENTRE.toml [--adapt] [--json]``."""
    parser.description = "Metrics of an exported model on a labelled centre."
    _add_common_arguments(parser)
    parser.add_argument("--centre", type=Path, required=True, help="the centre's TOML file")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(func=_run_evaluate)


def register_predict_command(parser: argparse.ArgumentParser) -> None:
    """``cytofed predict --model MODEL --images DIR --out preds.csv [--threshold T]
    [--adapt]``."""
    parser.description = "Predict the class of every image file in a folder (recursively)."
    _add_common_arguments(parser)
    parser.add_argument("--images", type=Path, required=True, help="folder of image files")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--threshold", type=float, default=None,
                        help="flag predictions below this confidence as uncertain "
                             "(default: the threshold calibrated in the model card)")
    parser.set_defaults(func=_run_predict)
