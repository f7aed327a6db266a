"""`fit`'s epochs: from the step training stands at to the end of the last epoch, as Keras runs them.

The step gives the epoch and the batch (with the data position, `Position.epoch0_step`), so a restored or rolled
back client carries on where its checkpoint was taken. Checkpoints are saved when due and on a stop request, which
ends the loop after the step in flight. With stale gradients the last step sent is received and applied (the
trainer drains) at the end of each epoch and before a checkpoint or a stop, so the weights, `Position.step` and the
server's step agree there; a batch's logs are then those of the step before it (the last answer read).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from client_part import batches
from client_part.callbacks import Callbacks
from client_part.checkpoints import ClientCheckpoints
from client_part.exchange import StepExchange
from client_part.leakage import ClientLeakage
from client_part.position import Position
from client_part.session import Session
from client_part.stopping import Stopped
from client_part.telemetry import ClientMeter
from client_part.window import LocalLossWindow
from splitlearning.training.first_part import ClientTrainer


@dataclass(frozen=True)
class FitRun:
    """The arguments of one `fit` call."""

    x: Any
    y: Any
    batch_size: int
    epochs: int
    shuffle: bool
    validation_data: Any
    verbose: int
    seed: int
    steps_per_epoch: int | None


def logs_of(names: list[str], values: list[float], penalty: float) -> dict[str, float]:
    """Keras's logs: the server's running metrics by name, the loss with this part's regularisation penalty."""
    logs = dict(zip(names, values, strict=True))
    logs["loss"] += penalty
    return logs


def unpack(data: Any) -> tuple[Any, Any]:
    """`validation_data` as (x, y): a tuple's first two, else a dataset of pairs and no y."""
    if isinstance(data, tuple):
        return data[0], data[1]
    return data, None


class EpochLoop:
    """Runs `trainer`'s steps, through `steps`, epoch by epoch; `validate(x, y, batch_size)` scores an epoch."""

    def __init__(
        self,
        trainer: ClientTrainer,
        steps: StepExchange,
        session: Session,
        position: Position,
        meter: ClientMeter,
        stop: threading.Event,
        validate: Callable[[Any, Any, int], dict[str, float]],
        leakage: ClientLeakage | None = None,
        window: LocalLossWindow | None = None,
    ) -> None:
        self._trainer = trainer
        self._steps = steps
        self._session = session
        self._position = position
        self._meter = meter
        self._stop = stop
        self._validate = validate
        self._leakage = leakage
        self._window = window  # a local loss's: steps not waited for, drained at the epoch's end and checkpoints

    def run(self, run: FitRun, initial_epoch: int, history: keras.callbacks.History, hooks: Callbacks) -> None:
        """Train from the current step (which gives the epoch and the batch) to the end of the last epoch."""
        done = self._position.step - self._position.epoch0_step  # steps since epoch 0 began: the data position
        spe = run.steps_per_epoch
        if done and not spe:
            raise ValueError("resuming mid-fit needs a dataset of known length (its cardinality)")
        first_epoch, start = (done // spe, done % spe) if spe else (initial_epoch, 0)
        names = self._session.agreement.metric_names
        for epoch in range(max(first_epoch, initial_epoch), run.epochs):
            hooks.on_epoch_begin(epoch)
            progress = keras.utils.Progbar(spe, verbose=run.verbose, stateful_metrics=[*names, "samples/s"])
            if run.verbose:
                print(f"Epoch {epoch + 1}/{run.epochs}")
            if self._leakage is not None:
                self._leakage.start_epoch()
            logs, index = self._epoch(run, epoch, start, names, hooks, progress)
            start = 0
            logs.pop("samples/s", None)
            if self._leakage is not None:
                logs.update(self._leakage.epoch_logs())
            if run.validation_data is not None:
                val = self._validate(*unpack(run.validation_data), run.batch_size)
                logs.update({f"val_{k}": v for k, v in val.items()})
            progress.update(index + 1, list(logs.items()), finalize=True)
            history.on_epoch_end(epoch, logs)
            hooks.on_epoch_end(epoch, logs)

    def _epoch(
        self, run: FitRun, epoch: int, start: int, names: list[str], hooks: Callbacks, progress: keras.utils.Progbar
    ) -> tuple[dict[str, float], int]:
        """The steps of one epoch from batch `start`: its last logs and the index of its last batch."""
        trainer, meter = self._trainer, self._meter
        x, y = run.x, run.y
        order = None if isinstance(x, tf.data.Dataset) else batches.epoch_order(len(x), run.seed, epoch, run.shuffle)
        self._session.start_epoch(epoch)
        trainer.regularization.reset_state()
        trainer.local_loss.reset_state()
        started, samples, logs, index = time.perf_counter(), 0, {}, start - 1
        # The next batch is gathered and made a tensor on the client's device while this step runs.
        ready = batches.prefetch(batches.iterate(x, y, run.batch_size, order, start), self._as_tensors)
        for index, (xb, yb) in enumerate(ready, start):
            step_started = time.perf_counter()
            if self._leakage is not None:
                self._leakage.batch(xb)
            penalty = trainer.train(xb, yb)
            meter.step(len(xb), time.perf_counter() - step_started)
            self._after_step()
            samples += len(xb)
            logs = self._logs(names, penalty)
            hooks.on_train_batch_end(index, logs)
            logs["samples/s"] = samples / max(time.perf_counter() - started, 1e-9)
            progress.update(index + 1, list(logs.items()), finalize=False)
        if index < 0:
            raise ValueError("fit got no data: the training set is empty")
        if self._window is not None or trainer.in_flight:  # the epoch ends with both parts at the same step
            self._drain()
            logs = self._logs(names, trainer.penalty_so_far())
        return logs, index

    def _drain(self) -> None:
        """Every step sent settled: stale gradients' last step applied, a local loss's replies read."""
        self._trainer.drain()
        if self._window is not None:
            self._window.drain()

    def _logs(self, names: list[str], penalty: float) -> dict[str, float]:
        """The step's logs: the server's running metrics (with a local loss, of the last reply read; none
        before the first) and, with a local loss, this epoch's mean local loss (`local_loss`)."""
        if self._window is None:  # stale gradients: none before the first reply is read
            return logs_of(names, self._steps.last_metrics, penalty) if self._steps.last_metrics else {}
        values = self._window.last_metrics
        logs = logs_of(names, values, penalty) if values else {}
        logs["local_loss"] = float(self._trainer.local_loss.result())
        return logs

    def _after_step(self) -> None:
        checkpoints: ClientCheckpoints | None = self._session.checkpoints
        sent = self._position.step + self._trainer.in_flight  # the steps applied once the trainer drains
        due = checkpoints is not None and checkpoints.due(sent)
        if due or self._stop.is_set():
            self._drain()  # a checkpoint or a stop holds every step sent, both parts at `step`
        step = self._position.step
        if checkpoints is not None and (due or self._stop.is_set()):
            checkpoints.save(step, self._position.epoch0_step)
        if self._stop.is_set():
            if checkpoints is None:
                raise Stopped(
                    f"stopped on request after step {step}; no checkpoint was saved "
                    "(start with --checkpoint-dir to be able to resume)"
                )
            raise Stopped(
                f"stopped on request after step {step}; a checkpoint of it is saved in "
                f"{checkpoints.directory}: run again with the same flags to resume"
            )

    def _as_tensors(self, batch: batches.Batch) -> tuple[tf.Tensor, tf.Tensor]:
        xb, yb = batch
        labels = batches.labels(yb, self._session.agreement.contract.label)
        with tf.device(self._trainer.device):
            return tf.convert_to_tensor(xb), tf.convert_to_tensor(labels)
