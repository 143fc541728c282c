"""Central differential privacy: Flower's clipping wrapper, equal weights and an RDP accountant.

With ``dp-noise-multiplier`` z > 0 each site clips its update to the L2 norm
``dp-clipping-norm`` C before it leaves the site (Flower's ``fixedclipping_mod``, see
``client.privacy``); the server validates the updates as always, averages the accepted ones
with equal weights and adds Gaussian noise of standard deviation z·C/n to the average, n being
the number of training sites (Flower's ``DifferentialPrivacyClientSideFixedClipping``).

The mean of m accepted updates moves by at most C/m when one site's update changes, so a
round that releases an average is a Gaussian mechanism with noise multiplier z·m/n. Flower's
``RdpAccountant`` composes these rounds (client-level neighbours that add or remove one site,
no subsampling amplification since every site takes part in every round) and reports epsilon at
``dp-delta``. A round whose aggregation Flower skips (a site replied with an error) releases
nothing and costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from common.config import ConfigError, RunConfig
from common.methods import METHODS
from server.strategies import MethodStrategy

ACCOUNTING = ("RDP (Flower RdpAccountant), client-level add-or-remove-one neighbours, "
              "no subsampling amplification")


class PrivateUpdates(DifferentialPrivacyClientSideFixedClipping):
    """A validated strategy whose aggregate is noised and whose privacy loss is accounted."""

    def __init__(self, strategy: MethodStrategy, config: RunConfig, num_sites: int) -> None:
        super().__init__(strategy, config.dp_noise_multiplier, config.dp_clipping_norm,
                         num_sites)
        self.delta = config.dp_delta
        self.rdp = RdpAccountant(PrivacyConfig(
            target_delta=config.dp_delta, population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        self.released: float | None = None  # noise multiplier of the last round's release

    @property
    def rejected(self) -> list[dict]:
        """Updates the validated strategy refused in the current round."""
        return self.strategy.rejected

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, average with equal weights, add noise and account for the release."""
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():  # equal weights: one site moves the mean by <= C/m
                reply.content["metrics"] = MetricRecord({
                    **reply.content["metrics"], self.strategy.weighted_by_key: 1})
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.released = None
        if arrays is not None:
            accepted = sum(not r.has_error() for r in replies) - len(self.strategy.rejected)
            self.account(self.noise_multiplier * accepted / self.num_sampled_clients)
        return arrays, metrics

    def account(self, noise_multiplier: float) -> None:
        """Compose one released average with this effective noise multiplier."""
        self.rdp.compose(GaussianPrivacyEvent(
            noise_multiplier=noise_multiplier, sample_size=self.num_sampled_clients,
            population_size=self.num_sampled_clients))
        self.released = noise_multiplier

    def restore(self, rounds: list[dict]) -> None:
        """Re-compose the releases of completed rounds (a resumed run)."""
        for completed in rounds:
            released = completed.get("privacy", {}).get("released_noise_multiplier")
            if released is not None:
                self.account(released)

    def round_privacy(self) -> dict:
        """This round's release and the privacy spent so far, for the round's report."""
        spent = self.rdp.get_privacy_spent(self.delta) if self.rdp.num_releases else None
        return {"released_noise_multiplier": self.released, "releases": self.rdp.num_releases,
                "epsilon": spent.epsilon if spent else 0.0, "delta": self.delta}


def private_updates(strategy: MethodStrategy, config: RunConfig,
                    num_sites: int) -> PrivateUpdates | None:
    """``strategy`` wrapped for differential privacy, or None when ``dp-noise-multiplier`` is 0.

    Raises ConfigError when the run's method or wire precision cannot be made private.
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
    return PrivateUpdates(strategy, config, num_sites)


def privacy_summary(config: RunConfig, rounds: list[dict]) -> dict | None:
    """The run's differential-privacy settings and final epsilon, or None without DP."""
    if config.dp_noise_multiplier == 0 or not rounds:
        return None
    last = rounds[-1]["privacy"]
    return {"noise_multiplier": config.dp_noise_multiplier,
            "clipping_norm": config.dp_clipping_norm, "epsilon": last["epsilon"],
            "delta": last["delta"], "releases": last["releases"], "accounting": ACCOUNTING}
