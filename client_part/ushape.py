"""The client's side of a U-shaped cut: it holds the bottom, the head and the loss; labels never leave it.

Per step, on the one training stream: the IV goes out (no labels) and the middle's outputs come back; the head
runs forward, loss and backward here (with its own optimizer), dLoss/d(middle outputs) goes out and dLoss/dIV
comes back for the bottom. The head's math is exactly the standard server part's (`LossTrainer`: a compiled
Keras step with Keras's own loss, loss tracker and metrics), run in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from client_part.transport import Transport
from splitlearning.contract import Spec
from splitlearning.leakage import LabelLeakMeter
from splitlearning.models import ModelSource
from splitlearning.training.loss_trainer import LossTrainer


class UShapeLink:
    """A `Link` that finishes the model locally: `transport` reaches the server's middle, `head` is local."""

    def __init__(
        self,
        transport: Transport,
        head: LossTrainer,
        protect: Callable[[np.ndarray, np.ndarray, Sequence[int]], np.ndarray] | None = None,
        label_meter: LabelLeakMeter | None = None,
    ) -> None:
        self._transport = transport
        self.head = head
        # The label defence (splitlearning/label_defences.py) and meter, on the gradients sent to the server.
        self._protect = protect
        self.label_meter = label_meter
        # The head's update of the step in flight: a retried step (its backward exchange failed) runs the
        # middle's forward again but must not update the head, or count its batch in the metrics, twice.
        self._head_step: tuple[int, np.ndarray, list[float]] | None = None

    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        outputs = self._checked(self._transport.train_forward(step, iv))
        if self._head_step is None or self._head_step[0] != step:
            output_gradient, metrics = self.head.train(outputs, labels, reset)
            if self._protect is not None:  # once per step: a resend sends the same gradient again
                output_gradient = self._protect(output_gradient, labels, (step,))
            if self.label_meter is not None:
                self.label_meter.add(output_gradient, labels)
            self._head_step = (step, output_gradient, metrics)
        _, output_gradient, metrics = self._head_step
        return self._transport.train_backward(step, output_gradient), metrics

    def forget(self) -> None:
        """Step numbers start over (a restored checkpoint, a group's new round): no step is in flight."""
        self._head_step = None

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        return self.head.evaluate(self._checked(self._transport.predict(iv, step)), labels, reset)

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        return self.head.predict(self._checked(self._transport.predict(iv, step)))

    def _checked(self, outputs: np.ndarray) -> np.ndarray:
        self.head.contract.iv.check_batch(outputs, "the middle's outputs")
        return outputs


def build_head(
    head: ModelSource,
    loss: Any,
    optimizer: Any,
    metrics: Sequence[Any] | None,
    device: str,
    label_spec: Spec | None,
) -> LossTrainer:
    """The head part compiled with its loss and metrics, and an optimizer of its own (a copy of `optimizer`)."""
    return LossTrainer(head, loss, _own_copy(optimizer), metrics, device, label_spec)


def _own_copy(optimizer: Any) -> Any:
    """A Keras optimizer instance serves one set of variables: the head gets a fresh one of the same config."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return type(optimizer).from_config(optimizer.get_config())
    return keras.optimizers.get(optimizer or "sgd")
