"""The aggregator's Prometheus series, per group: the open round, the last closed round's members, samples and
wall time, and the members that missed a deadline."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from aggregator.rounds import Closed


class AggregatorTelemetry:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.round = Gauge(
            "split_aggregator_round", "The group's open round (round-robin: turn)", ["group"], registry=registry
        )
        self.members = Gauge(
            "split_aggregator_round_members", "Members counted in the last closed round", ["group"], registry=registry
        )
        self.samples = Gauge(
            "split_aggregator_round_samples",
            "Samples trained on in the last closed round",
            ["group"],
            registry=registry,
        )
        self.seconds = Gauge(
            "split_aggregator_round_seconds",
            "Wall time of the last closed round, from its opening to its close",
            ["group"],
            registry=registry,
        )
        self.missed = Counter(
            "split_aggregator_missed_members",
            "Members a round closed without (their deadline passed)",
            ["group"],
            registry=registry,
        )
        self.member_round = Gauge(
            "split_aggregator_member_round",
            "The last round (round-robin: turn) the member handed in",
            ["group", "member"],
            registry=registry,
        )
        self.closed = Counter(
            "split_aggregator_rounds", "Rounds (round-robin: turns) closed", ["group"], registry=registry
        )

    def submitted(self, group: str, member: int, round_: int) -> None:
        self.member_round.labels(group, str(member)).set(round_)

    def round_opened(self, group: str, round_: int) -> None:
        self.round.labels(group).set(round_)

    def round_closed(self, group: str, closed: Closed) -> None:
        self.members.labels(group).set(len(closed.members))
        self.samples.labels(group).set(closed.samples)
        self.seconds.labels(group).set(closed.seconds)
        self.missed.labels(group).inc(len(closed.missed))
        self.closed.labels(group).inc()
