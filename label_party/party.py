"""`LabelParty`: the label party of a vertical split as a Python API in Keras habits (docs/vertical.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from label_party.coordinator import Coordinator, EpochRecord, LabelData, Plan
from label_party.servicer import VerticalMount
from label_party.telemetry import LabelPartyTelemetry
from splitlearning import links
from splitlearning.checkpoint import StepCheckpoints
from splitlearning.contract import Spec
from splitlearning.devices import resolve_device
from splitlearning.label_defences import LabelDefence
from splitlearning.models import ModelSource
from splitlearning.security import Secret, TlsConfig
from splitlearning.serving.host import Host, HostConfig
from splitlearning.training.vertical import Fuse, FuseTrainer

log = logging.getLogger(__name__)


class LabelCheckpoints:
    """The label party's part (top, own bottom, optimizer) every `every` steps under `directory`."""

    def __init__(self, directory: Path, trainer: FuseTrainer, max_to_keep: int = 5) -> None:
        self._trainer = trainer
        self._store = StepCheckpoints(
            directory, {"model": trainer.model.variables, "optimizer": trainer.optimizer.variables}, max_to_keep
        )
        if not self._store.steps():
            self._store.save(0)  # the start, so a run interrupted before its first checkpoint resumes exactly

    def steps(self) -> list[int]:
        return self._store.steps()

    def save(self, step: int) -> None:
        self._trainer.settle()  # the checkpoint of step N holds N's update
        self._store.save(step)

    def restore(self, step: int) -> None:
        self._trainer.settle()  # a pending update must not land on the restored weights afterwards
        self._store.restore(step)


class LabelParty:
    """Holds the labels, the top model (and optionally a bottom over its own columns) and serves the feature
    parties named in `parties` (the fuse order) until training ends.

    `ids`, `y` and `x` are the label party's table (x: its own columns, with `bottom`). `top` takes the fused
    vector; it is compiled here with `loss`, `optimizer` and `metrics` as `keras.Model.compile` takes them.
    `fit` serves, waits for the alignment and every step, and returns the per-epoch history; `predictions`
    then holds the held-out rows' outputs (ids: `test_ids`).

    `party_tokens` maps each party to its bearer token: a call is then accepted only with its own party's token
    (UNAUTHENTICATED without one of them, PERMISSION_DENIED with another party's). `state_dir` keeps the
    alignment and, every `checkpoint_every` steps, the part's checkpoints, so a restarted label party resumes.
    `leakage_meters` (on by default) scores, per epoch and per feature party, the label attacks on the gradients
    sent to it (`EpochRecord.leakage`); `label_defence` noises those gradients first (docs/security.md).
    `metrics_port` serves Prometheus series (label_party/telemetry.py) on `metrics_host` (default: the host
    `start` binds; 0: any free port, see `metrics_port`).
    `exact=True` applies the optimizer's updates as a plain graph, as `fit` does (bit for bit with the uncut
    model where the kernels are the same); by default they are XLA-compiled (within float32 round-off).
    """

    def __init__(
        self,
        top: ModelSource,
        loss: Any,
        optimizer: Any = None,
        metrics: Sequence[Any] | None = None,
        *,
        parties: Sequence[str],
        ids: Sequence[Any],
        y: np.ndarray,
        x: np.ndarray | None = None,
        bottom: ModelSource | None = None,
        fuse: Fuse | str = Fuse.CONCAT,
        batch_size: int = 32,
        epochs: int = 1,
        seed: int = 0,
        test_fraction: float = 0.2,
        deadline: float = 60.0,
        device: str = "/CPU:0",
        tls: TlsConfig | None = None,
        party_tokens: dict[str, Secret | str] | None = None,
        state_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        checkpoint_keep: int = 5,
        max_ids: int = 1_000_000,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        exact: bool = False,
        label_defence: LabelDefence | None = None,
        leakage_meters: bool = True,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        if (x is None) != (bottom is None):
            raise ValueError("the label party's own columns (x) and its bottom part go together: give both or neither")
        if len(ids) != len(y) or (x is not None and len(x) != len(y)):
            raise ValueError(f"ids, y (and x) must have one row per sample: {len(ids)} ids, {len(y)} labels")
        tokens = {name: Secret(t) if isinstance(t, str) else t for name, t in (party_tokens or {}).items()}
        if tokens and set(tokens) != set(parties):
            raise ValueError(f"party_tokens must name every party: {sorted(tokens)} against {sorted(parties)}")
        if len(ids) > max_ids:
            raise ValueError(f"{len(ids):,} ids, more than max_ids={max_ids:,}")
        self.device = resolve_device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        plan = Plan(tuple(parties), batch_size, epochs, seed, Fuse(fuse), test_fraction, deadline, checkpoint_every)

        def make_trainer(specs: list[Spec]) -> FuseTrainer:
            return FuseTrainer(
                top,
                loss,
                optimizer,
                metrics,
                iv_specs=specs,
                fuse=plan.fuse,
                bottom=bottom,
                device=self.device,
                exact=exact,
            )

        def checkpoints(trainer: FuseTrainer) -> LabelCheckpoints | None:
            if self.state_dir is None:
                return None
            return LabelCheckpoints(self.state_dir / "checkpoints", trainer, checkpoint_keep)

        registry = CollectorRegistry()
        self.telemetry = LabelPartyTelemetry(registry)

        def epoch_ended(record: EpochRecord) -> None:
            self.telemetry.epoch(record)
            if on_epoch is not None:
                on_epoch(record)

        self.coordinator = Coordinator(
            LabelData(list(ids), np.asarray(y), None if x is None else np.asarray(x)),
            plan,
            make_trainer,
            self.state_dir,
            checkpoints,
            epoch_ended,
        )
        self.host = Host(
            HostConfig(
                "label party",
                max_workers=max(8, 4 * len(parties)),
                clear_text="blinded ids, IVs and their gradients",
                tls=tls,
                metrics_host=metrics_host,
                metrics_port=metrics_port,
            ),
            [VerticalMount(self.coordinator, tokens or None, max_ids)],
            registry,
        )

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the Prometheus endpoint while serving (`metrics_port` given), else None."""
        return self.host.metrics_port

    @property
    def history(self) -> list[EpochRecord]:
        return self.coordinator.history

    @property
    def trainer(self) -> FuseTrainer | None:
        return self.coordinator.trainer

    @property
    def predictions(self) -> np.ndarray:
        """The held-out rows' outputs of the last evaluation (rows: `test_ids()`)."""
        parts = self.coordinator.predictions
        return np.concatenate(parts) if parts else np.zeros((0,))

    def test_ids(self) -> list[Any]:
        return self.coordinator.test_ids()

    def start(self, address: str = "127.0.0.1:0") -> int:
        """Serve on `address`; return the bound port."""
        port = self.host.start(address)
        self.host.warn_if_insecure(address)
        links.hint_once(address)  # a step's replies on a long link: what the host's TCP makes of them
        return port

    def wait(self, timeout: float | None = None) -> bool:
        """Block until training has ended (every step, and the last evaluation) or cannot go on (`failed`: no
        id common to every party, say); True if either happened."""
        return self.coordinator.finished.wait(timeout)

    @property
    def failed(self) -> Exception | None:
        """Why the run cannot go on (it then never trains), or None."""
        return self.coordinator.failed

    def stop(self, grace: float | None = 5.0) -> None:
        self.host.stop(grace)

    def fit(self, address: str = "127.0.0.1:0", timeout: float | None = None) -> list[EpochRecord]:
        """Serve until training ends (or `timeout` passes: TimeoutError), then stop; the per-epoch history."""
        if not self.host.serving:
            self.start(address)
        try:
            if not self.wait(timeout):
                raise TimeoutError(f"training did not end within {timeout} s")
        finally:
            self.stop()
        if self.failed is not None:
            raise RuntimeError(f"the run cannot go on: {self.failed}")
        return self.history
