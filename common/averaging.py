"""Weight averaging of the global models of the last rounds (SWA, Izmailov et al. 2018; SWAD,
Cha et al. 2021), on the server, with no extra communication.

Floating-point arrays, BatchNorm running means and variances included, are averaged with equal
weights; integer arrays (step counters such as ``num_batches_tracked``) are taken from the
newest model. SWA and SWAD recompute BatchNorm statistics for the averaged weights with a pass
over the training data; in a federation that pass would cost every site a forward pass over its
images and a round of messages, so the running statistics are averaged instead. Over the last
few rounds of a converging run the weights, and with them the statistics, change little, so the
average is close to the statistics of the averaged weights; a GroupNorm model has none to fix.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.weights import load_weights, save_weights

State = Mapping[str, np.ndarray]
WINDOW_FILE = "average-window.safetensors"  # the window, in the run directory


def average_states(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Equal-weight mean of floating-point arrays; integer arrays from the last state.

    Every state must have the same keys, shapes and dtypes (ValueError naming the key if not);
    the mean is accumulated in float64 and returned in each array's own dtype.
    """
    if not states:
        raise ValueError("no model states to average")
    newest = states[-1]
    for index, state in enumerate(states[:-1]):
        if set(state) != set(newest):
            raise ValueError(f"model state {index} has keys "
                             f"{sorted(set(state) ^ set(newest))[:5]} that state "
                             f"{len(states) - 1} does not share")
        for key, array in state.items():
            if array.shape != newest[key].shape or array.dtype != newest[key].dtype:
                raise ValueError(f"model state {index}: {key} is {array.dtype} "
                                 f"{array.shape}, the newest state {newest[key].dtype} "
                                 f"{newest[key].shape}")
    return {key: (np.mean([state[key] for state in states], axis=0, dtype=np.float64)
                  .astype(array.dtype) if np.issubdtype(array.dtype, np.floating)
                  else array.copy())
            for key, array in newest.items()}


class WeightAverager:
    """The average of the last ``window`` global models handed to :meth:`update`.

    Holds at most ``window`` copies of the model (a few times 14 MB for EfficientNet-Lite0).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"weight averaging window must be at least 1, got {window}")
        self.window = window
        self.states: deque[dict[str, np.ndarray]] = deque(maxlen=window)

    def update(self, state: State) -> dict[str, np.ndarray]:
        """Add the newest global model; return the average over the window so far."""
        self.add(state)
        return self.average()

    def add(self, state: State) -> None:
        """Add the newest global model (a copy), dropping the oldest beyond the window."""
        self.states.append({key: np.array(array, copy=True) for key, array in state.items()})

    def average(self) -> dict[str, np.ndarray]:
        """The average of the models held (see :func:`average_states`)."""
        return average_states(list(self.states))


class ExportedModels:
    """What a run validates, scores, selects and exports after each round: the average of the
    global models of its last ``window`` rounds (run config ``average-last-rounds``; 0: the
    global model itself), while training continues from the plain global model.

    The window is kept in the run directory (:data:`WINDOW_FILE`, written before the round's
    checkpoint), so a resumed run restores it: ``completed`` is the last round the run
    recorded; models of later rounds in the file are dropped.
    """

    def __init__(self, window: int, run_dir: Path, completed: int = 0) -> None:
        self.window, self.path = window, Path(run_dir) / WINDOW_FILE
        self.averager = WeightAverager(window) if window else None
        self.rounds: deque[int] = deque(maxlen=max(window, 1))
        if self.averager is not None and self.path.is_file():
            arrays, metadata = load_weights(self.path)
            for index, held in enumerate(metadata["rounds"]):
                if held <= completed:
                    prefix = f"{index}/"
                    self.averager.add({key.removeprefix(prefix): value
                                       for key, value in arrays.items()
                                       if key.startswith(prefix)})
                    self.rounds.append(held)

    def preview(self, state: State) -> State:
        """The exported model if ``state`` is the newest global model: its average with the
        window's newest ``window - 1`` models."""
        if self.averager is None:
            return state
        held = list(self.averager.states)
        kept = held[max(0, len(held) - (self.window - 1)):]
        return average_states([*kept, state])

    def commit(self, server_round: int, state: State) -> None:
        """Add round ``server_round``'s global model to the window and persist it."""
        if self.averager is None:
            return
        self.averager.add(state)
        self.rounds.append(server_round)
        arrays = {f"{index}/{key}": value for index, held in enumerate(self.averager.states)
                  for key, value in held.items()}
        temporary = self.path.with_name(self.path.name + ".tmp")
        save_weights(temporary, arrays, {"rounds": list(self.rounds)})
        os.replace(temporary, self.path)

    def current(self, state: State) -> State:
        """The exported model after the last committed round whose global model is ``state``."""
        return self.averager.average() if self.averager and self.averager.states else state
