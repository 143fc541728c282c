"""Central differential privacy: clipped updates, a fixed denominator, Gaussian noise, a ledger.

With ``dp-noise-multiplier`` z > 0 every round releases

    global + (sum of the accepted sites' updates, each clipped to L2 norm C) / n + N(0, (z C / n)^2)

over the trained tensors, n being the number of training sites, fixed by the run's centres
before any round. A site that fails, is missing or whose update is rejected contributes zero,
so adding or removing one site moves the release by at most C / n whatever the others do:
every round is a Gaussian mechanism with noise multiplier z. Sites clip their update
(``client.privacy``) and the server clips it again, so a site that does not clip cannot spend
more. Flower's ``RdpAccountant`` composes the releases (client-level add-or-remove-one
neighbours, no subsampling amplification since every site is asked every round) and reports
epsilon at ``dp-delta``.

Buffers (BatchNorm running statistics, see ``common.privacy``) are averaged over the accepted
sites in clear, neither clipped nor noised, and are not covered by epsilon; nor are the
metrics, counts and histograms that sites send beside their update. A model without buffers
(``norm='group'``) releases only covered tensors.

Every release is appended to the run's privacy ledger (``privacy-ledger.jsonl``, one fsync'd
JSON line per release) before the noised model leaves this module, and the accountant is
rebuilt from the ledger when a run resumes: a round released before a crash and released
again after the resume counts twice, as it was released twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import ConfigError, RunConfig
from common.methods import METHODS
from common.privacy import BUFFERS_KEY, clip_factor
from server.strategies import MethodStrategy, non_finite, record_to_state, state_to_record

LEDGER_FILE = "privacy-ledger.jsonl"
ACCOUNTING = ("RDP (Flower RdpAccountant), client-level add-or-remove-one neighbours, "
              "sensitivity C/n with a fixed denominator n (the training sites), "
              "no subsampling amplification")
COVERS = ("the trained weights of every global model the server released (sent to the sites, "
          "evaluated, checkpointed, exported)")
NOT_COVERED = ("BatchNorm running statistics (averaged over the accepted sites in clear)",
               "training and validation metrics, example counts, update sizes and timings",
               "class counts of the sites whose centre shares them",
               "stain statistics of the sites whose centre shares them (stain-sharing)",
               "the sites' validation confidence histograms",
               "the sites' validation NLL curves over the temperature grid",
               "which sites answered, failed or were rejected")


class PrivacyLedger:
    """An append-only JSON-lines file with one line per noised release, fsync'd on append.

    A line that does not end in a newline was being written when the server stopped; its
    release never left the server, so it is ignored and cut off by the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def releases(self) -> list[dict]:
        """Every recorded release, oldest first."""
        if not self.path.is_file():
            return []
        *lines, _torn = self.path.read_text().split("\n")
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"privacy ledger {self.path}, line {number}: not a JSON "
                                 f"release record ({error}); epsilon cannot be recomputed"
                                 ) from error
        return entries

    def append(self, entry: dict) -> None:
        """Add ``entry`` and return only once it is on disk."""
        created = not self.path.exists()
        with self.path.open("a+b") as ledger:
            ledger.seek(0)
            content = ledger.read()
            if content and not content.endswith(b"\n"):
                ledger.truncate(content.rfind(b"\n") + 1)
            ledger.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            ledger.flush()
            os.fsync(ledger.fileno())
        if created:  # the new directory entry must survive a crash too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class PrivateUpdates(Strategy):
    """A validated method (FedAvg, FedProx) whose releases are noised, ledgered and accounted.

    The wrapped strategy validates the replies (its ``rejected`` list) and aggregates the
    metrics; this class computes the release from the accepted updates.
    """

    def __init__(self, strategy: MethodStrategy, config: RunConfig, num_sites: int,
                 buffers: Collection[str]) -> None:
        self.strategy = strategy
        self.noise_multiplier = config.dp_noise_multiplier
        self.clipping_norm = config.dp_clipping_norm
        self.delta = config.dp_delta
        self.num_sites = num_sites
        self.buffers = frozenset(buffers)
        self.rng = np.random.default_rng()  # seeded by the OS, never by the run's seed
        self.ledger: PrivacyLedger | None = None
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=config.dp_delta, population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        self.last_release: dict | None = None
        self.global_state: dict[str, np.ndarray] = {}

    @property
    def sensitivity(self) -> float:
        """How far adding or removing one site moves a release (L2 norm)."""
        return self.clipping_norm / self.num_sites

    @property
    def rejected(self) -> list[dict]:
        """Replies refused in the current round (see ``MethodStrategy``)."""
        return self.strategy.rejected

    @property
    def clients(self) -> list[dict]:
        return self.strategy.clients

    @property
    def eval_seconds(self) -> list[float]:
        return self.strategy.eval_seconds

    def use_ledger(self, ledger: PrivacyLedger, rounds: list[dict]) -> None:
        """Record releases in ``ledger``, first composing those it already holds (a resume).

        ``rounds`` are the run's completed rounds: a ledger holding fewer releases than they
        counted was truncated or removed, and the run is refused rather than under-counted.
        """
        entries = ledger.releases()
        counted = rounds[-1].get("privacy", {}).get("releases", 0) if rounds else 0
        if len(entries) < counted:
            raise ValueError(f"privacy ledger {ledger.path} records {len(entries)} releases but "
                             f"the run's completed rounds counted {counted}: it was truncated "
                             "or removed, so epsilon cannot be recomputed")
        for entry in entries:
            self._compose(entry)
        self.ledger = ledger

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, asking sites to clip their trained tensors."""
        self.global_state = record_to_state(arrays)
        config = ConfigRecord({**config, KEY_CLIPPING_NORM: self.clipping_norm,
                               BUFFERS_KEY: sorted(self.buffers & set(self.global_state))})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, sum the clipped updates over n, add noise, ledger and account;
        the round always releases, even when no update was accepted (no arrays, and no
        release, only if the noised model is not finite: the previous one is kept)."""
        if self.ledger is None:
            raise RuntimeError("differential privacy needs a privacy ledger before any release")
        accepted = self.strategy.accept_train(replies)
        metrics = self.strategy.train_metrics(accepted) if accepted else None
        released = self._noised_sum([self.strategy.update(m) for m in accepted])
        if (key := non_finite(released)) is not None:
            self.strategy.reject_aggregate(f"{key} of the noised aggregate is not finite: "
                                           "the round keeps the previous global model")
            return None, metrics
        # The noise multiplier is relative to the sensitivity C/n: what the accountant needs.
        entry = {"round": server_round, "noise_multiplier": self.noise_multiplier,
                 "noise_std": self.noise_multiplier * self.sensitivity,
                 "clipping_norm": self.clipping_norm, "denominator": self.num_sites,
                 "contributions": len(accepted), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.ledger.append(entry)
        self._compose(entry)
        return state_to_record(released), metrics

    def _noised_sum(self, updates: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The release from the accepted updates, read one tensor at a time: each update's
        trained tensors clipped together to C and summed, over n, plus noise; buffers
        averaged over the updates in clear."""
        trained = [key for key in self.global_state if key not in self.buffers]
        total = {key: np.zeros(value.shape) for key, value in self.global_state.items()}
        for update in updates:
            scale = clip_factor(update, self.global_state, self.clipping_norm, trained)
            for key, reference in self.global_state.items():
                if key in self.buffers:
                    total[key] += update[key]
                else:
                    total[key] += scale * np.subtract(update[key], reference, dtype=np.float64)
        std = self.noise_multiplier * self.sensitivity
        released = {}
        for key, reference in self.global_state.items():
            if key in self.buffers:
                value = total[key] / len(updates) if updates else reference
            else:
                value = (reference + total[key] / self.num_sites
                         + self.rng.normal(0.0, std, reference.shape))
            released[key] = np.asarray(value, dtype=reference.dtype)
        return released

    def _compose(self, entry: dict) -> None:
        self.accountant.compose(GaussianPrivacyEvent(
            noise_multiplier=entry["noise_multiplier"], sample_size=self.num_sites,
            population_size=self.num_sites))
        self.last_release = entry

    def epsilon(self) -> float:
        """Epsilon at ``dp-delta`` of every release so far (0 before the first)."""
        if not self.accountant.num_releases:
            return 0.0
        return self.accountant.get_privacy_spent(self.delta).epsilon

    def round_privacy(self) -> dict:
        """The round's release and the privacy spent so far, for the round's report."""
        release = self.last_release or {}
        return {"noise_multiplier": release.get("noise_multiplier"),
                "contributions": release.get("contributions"), "denominator": self.num_sites,
                "releases": self.accountant.num_releases, "epsilon": self.epsilon(),
                "delta": self.delta}

    def privacy_report(self) -> dict:
        """The run's privacy settings, epsilon, and what epsilon does and does not cover."""
        return {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "denominator": self.num_sites, "noise_std": self.noise_multiplier
                * self.sensitivity, "epsilon": self.epsilon(), "delta": self.delta,
                "releases": self.accountant.num_releases, "ledger": LEDGER_FILE,
                "accounting": ACCOUNTING, "covers": COVERS, "not_covered": list(NOT_COVERED)}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def site_reports(self, replies: Iterable[Message], split: str) -> list[dict]:
        return self.strategy.site_reports(replies, split)

    def summary(self) -> None:
        self.strategy.summary()


def private_updates(strategy: MethodStrategy, config: RunConfig, num_sites: int,
                    buffers: Collection[str]) -> PrivateUpdates | None:
    """``strategy`` wrapped for differential privacy, or None when ``dp-noise-multiplier`` is 0.

    ``buffers`` are the model's untrained tensors (``common.privacy.untrained_keys``). Raises
    ConfigError when the run's strategy or wire precision cannot be made private. Attach a
    ledger (:meth:`PrivateUpdates.use_ledger`) before the first round.
    """
    if config.dp_noise_multiplier == 0:
        return None
    if not strategy.method.allows_central_dp:
        private = [name for name, method in METHODS.items() if method.allows_central_dp]
        raise ConfigError("dp-noise-multiplier", f"0 with strategy {config.strategy!r} "
                          f"(differential privacy needs one of {private})",
                          config.dp_noise_multiplier)
    if config.wire_precision != "fp32":
        raise ConfigError("dp-noise-multiplier", f"0 with wire-precision "
                          f"{config.wire_precision!r} (differential privacy clips fp32 updates)",
                          config.dp_noise_multiplier)
    return PrivateUpdates(strategy, config, num_sites, buffers)
