"""The middle of a U-shaped cut: the server's training math when the client holds the head and the loss.

A step is two calls within one exchange on the training stream: `forward(iv)` runs the middle under a tape and
returns its outputs with the pending step (tape, IV, outputs); `backward(pending, grad)` takes dLoss/d(outputs)
from the client, back-propagates through that same recorded forward (`tape.gradient(outputs, [*weights, iv],
output_gradients=grad)`), applies the update and returns dLoss/dIV. The forward runs once per step, as a
compiled `tf.function` recorded by an eager tape, so layers with state (BatchNormalization's moving statistics,
dropout masks) see exactly one training forward, as in `keras.Model.fit`. The update is XLA-compiled unless
`exact` (a plain graph, as `fit` runs it: see `LossTrainer`). No gRPC here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from splitlearning.compiled import Compiled
from splitlearning.contract import CutContract, CutMode, Spec
from splitlearning.devices import describe_placement
from splitlearning.errors import PreconditionFailed
from splitlearning.models import ModelSource, materialize
from splitlearning.training.loss_trainer import fresh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingStep:
    """One step between its forward and its backward: lives only inside one training stream's handler."""

    tape: tf.GradientTape
    iv: tf.Tensor
    outputs: tf.Tensor
    # The non-trainable variables (BatchNormalization's moving statistics) as they were before the forward,
    # so a step abandoned before its backward can be undone completely.
    before: list[np.ndarray]


class MiddleTrainer:
    """Holds the middle part of a U-shaped model and its optimizer, on one device; it never sees a label."""

    mode = CutMode.USHAPE

    metric_names: list[str] = []  # noqa: RUF012 (read-only: the loss and metrics live on the client)
    num_classes: int | None = None

    def __init__(self, model: ModelSource, optimizer: Any, device: str = "/CPU:0", exact: bool = False) -> None:
        self.device = device
        self.exact = exact
        with tf.device(device):
            self.model: keras.Model = materialize(model)
            if not self.model.inputs or not self.model.outputs:
                raise ValueError("the middle part needs a known input shape: start it with keras.Input(...)")
            if self.model.losses:
                raise ValueError(
                    "the middle of a U-shaped cut cannot carry regularisation penalties (its loss lives on the "
                    "client); move kernel_regularizer/activity_regularizer to the client's bottom or head"
                )
            self.optimizer: keras.optimizers.Optimizer = keras.optimizers.get(optimizer or "sgd")
            self.optimizer.build(self.model.trainable_variables)
            self.contract = CutContract(
                _spec(self.model.inputs[0], "input"), None, _spec(self.model.outputs[0], "output")
            )
            iv_sig = tf.TensorSpec([None, *self.contract.iv.shape], self.contract.iv.dtype)
            self._forward_fn = Compiled(lambda iv: self.model(iv, training=True), input_signature=[iv_sig])
            self._predict_fn = Compiled(lambda iv: self.model(iv, training=False), input_signature=[iv_sig])
            # Compiled: an eager Adam update is several times slower than the whole rest of the step. XLA fuses
            # it further unless `exact` (then it runs as a plain graph, as in `fit`).
            self._apply_fn = Compiled(self._apply, open_batch=False, jit_compile=not exact)
        variables = [getattr(v, "value", v) for h in (self.model, self.optimizer) for v in h.variables]
        log.info("middle part on %s: %s", device, describe_placement(variables))

    @property
    def output_spec(self) -> Spec:
        """One sample of the middle's outputs (what Train's first reply and Predict carry)."""
        assert self.contract.output is not None
        return self.contract.output

    @property
    def iterations(self) -> int:
        return int(self.optimizer.iterations.numpy())

    reusable = True  # nothing here can break a trainer for good

    def copy(self, model: ModelSource, device: str) -> MiddleTrainer:
        """A new trainer of `model` set up as this one: a new optimizer configured as its own (none of its state),
        updates applied alike."""
        return MiddleTrainer(model, fresh(self.optimizer), device, exact=self.exact)

    def reset(self, variables: Sequence[np.ndarray], optimizer: Sequence[np.ndarray]) -> None:
        """Back to where a new session starts, keeping the traced steps: the model's `variables` (weights, seed
        states) and the optimizer's as given (a new copy's)."""
        with tf.device(self.device):
            for variable, value in zip(self.model.variables, variables, strict=True):
                variable.assign(value)
            for variable, value in zip(self.optimizer.variables, optimizer, strict=True):
                variable.assign(value)

    def settle(self) -> bool:
        """Nothing is ever pending here: `backward` applies its step's update before it returns."""
        return False

    def forward(self, iv: np.ndarray) -> tuple[np.ndarray, PendingStep]:
        """The middle's training forward under a tape; the tape is kept for this step's `backward`."""
        before = [v.numpy() for v in self.model.non_trainable_variables]
        with tf.device(self.device):
            iv_tensor = tf.convert_to_tensor(iv)
            with tf.GradientTape() as tape:
                tape.watch(iv_tensor)
                outputs = self._forward_fn(iv_tensor)
        return outputs.numpy(), PendingStep(tape, iv_tensor, outputs, before)

    def undo_forward(self, pending: PendingStep) -> None:
        """Put back what the forward of an abandoned step changed (no weight or optimizer slot: only the
        statistics a training forward updates), so the step can run again as if it never had."""
        for variable, value in zip(self.model.non_trainable_variables, pending.before, strict=True):
            variable.assign(value)

    def backward(self, pending: PendingStep, output_gradient: np.ndarray) -> np.ndarray:
        """Apply the update for `pending` given dLoss/d(outputs); return dLoss/dIV."""
        weights = self.model.trainable_variables
        with tf.device(self.device):
            grad = tf.convert_to_tensor(output_gradient, dtype=pending.outputs.dtype)
            *grads, iv_grad = pending.tape.gradient(pending.outputs, [*weights, pending.iv], output_gradients=grad)
            self._apply_fn(*grads)
        return iv_grad.numpy()

    def _apply(self, *grads: tf.Tensor) -> None:
        self.optimizer.apply(list(grads), self.model.trainable_variables)

    def predict(self, iv: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return self._predict_fn(iv).numpy()

    # The standard cut's calls: refused, with what to do instead.

    def train(self, iv: np.ndarray, labels: np.ndarray, reset_metrics: bool) -> tuple[np.ndarray, list[float]]:
        raise PreconditionFailed(NOT_STANDARD)

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset_metrics: bool) -> list[float]:
        raise PreconditionFailed(NOT_STANDARD)


NOT_STANDARD = (
    "this server holds the middle of a U-shaped cut: it takes no labels and computes no loss; "
    "train with a U-shaped client (SplitClient(head=...), split-client --cut ushape)"
)


def _spec(tensor: Any, what: str) -> Spec:
    shape = tensor.shape[1:]
    if any(d is None for d in shape):
        raise ValueError(f"the middle part's {what} shape must be fully known after the batch, got {tensor.shape}")
    return Spec(tuple(int(d) for d in shape), np.dtype(tensor.dtype))
