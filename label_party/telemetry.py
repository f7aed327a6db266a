"""The label party's Prometheus series (`split-label-party --metrics-port`; docs/observability.md): where
training stands, each epoch's metrics, and the label-leakage meters per feature party and attack."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from label_party.coordinator import EpochRecord


class LabelPartyTelemetry:
    """Gauges in `registry`, set at the end of each epoch (`epoch`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.step = Gauge("split_vertical_step", "Training steps the label party has applied", registry=registry)
        self.epoch_done = Gauge("split_vertical_epochs", "Epochs the label party has completed", registry=registry)
        self.metric = Gauge(
            "split_vertical_epoch_metric",
            "The last epoch's metrics at the label party (training's running values, test_* the held-out ones)",
            ["name"],
            registry=registry,
        )
        self.leak = Gauge(
            "split_vertical_label_leak_auc",
            "The last epoch's label-leakage meter: the attack's AUC on the gradients sent to the party "
            "(max(AUC, 1 - AUC); 0.5: no better than a coin)",
            ["party", "attack"],
            registry=registry,
        )

    def epoch(self, record: EpochRecord) -> None:
        self.step.set(record.step)
        self.epoch_done.set(record.epoch + 1)
        for name, value in {**record.metrics, **record.test}.items():
            self.metric.labels(name).set(value)
        for key, value in record.leakage.items():
            attack, _, party = key.partition("/")
            self.leak.labels(party, attack.removeprefix("leak_").removesuffix("_auc")).set(value)
