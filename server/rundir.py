"""Run directories: per-round checkpoints, resumption after a restart, final weights."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.weights import load_weights, save_weights

PROGRESS_FILE = "progress.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def config_fingerprint(config: dict) -> str:
    """A short hash identifying a run configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


@dataclass
class RunDirectory:
    """``<output-dir>/<time>-<run-name>/`` and the progress of the run it holds."""

    path: Path
    fingerprint: str

    @classmethod
    def open(cls, output_dir: Path, run_name: str, config: dict) -> RunDirectory:
        """The newest unfinished run with the same name and config, else a new directory."""
        fingerprint = config_fingerprint(config)
        for candidate in sorted(output_dir.glob(f"*-{run_name}"), reverse=True):
            progress = candidate / PROGRESS_FILE
            if progress.is_file():
                state = json.loads(progress.read_text())
                if state["fingerprint"] == fingerprint and not state["finished"]:
                    return cls(candidate, fingerprint)
        path = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_name}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_name}-{suffix}"
        path.mkdir(parents=True)
        run = cls(path, fingerprint)
        run.save_progress([], finished=False)
        return run

    def load_progress(self) -> list[dict]:
        """Recorded rounds so far (empty for a new run)."""
        return json.loads((self.path / PROGRESS_FILE).read_text())["rounds"]

    def save_progress(self, rounds: list[dict], finished: bool) -> None:
        _write_json_atomically(self.path / PROGRESS_FILE, {
            "fingerprint": self.fingerprint, "finished": finished, "rounds": rounds})

    def complete_round(self, rounds: list[dict], state: dict[str, np.ndarray]) -> None:
        """Record ``rounds`` (the last one just finished) and the weights after it.

        The metrics are written first: the round counts as complete once its checkpoint is
        in place, so a crash between the two writes re-runs the round rather than losing its
        metrics (:meth:`resume` ignores recorded rounds after the checkpoint's).
        """
        self.save_progress(rounds, finished=False)
        temporary = self.path / (CHECKPOINT_FILE + ".tmp")
        save_weights(temporary, state, {"round": rounds[-1]["round"]})
        os.replace(temporary, self.path / CHECKPOINT_FILE)

    def resume(self) -> tuple[dict[str, np.ndarray] | None, list[dict], int]:
        """The last checkpoint's weights (None for a new run), the recorded rounds up to it
        and its round (0 for a new run)."""
        path = self.path / CHECKPOINT_FILE
        if not path.is_file():
            return None, [], 0
        state, metadata = load_weights(path)
        completed = int(metadata["round"])
        return state, [r for r in self.load_progress() if r["round"] <= completed], completed
