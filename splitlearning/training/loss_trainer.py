"""The training math of a part that ends in the loss (the server's part of a standard cut, the U-shaped client's
head): compiled TensorFlow calls, numpy in and out, no gRPC.

The received IV is watched by the tape and `tape.gradient(loss, [*weights, iv])` yields the weight gradients
and dLoss/dIV from one forward pass. Loss, regularisation and metrics are Keras's own (the model is compiled
here), so they mean exactly what they mean in `keras.Model.fit`.

Reply first, update after: `train` returns dLoss/dIV as soon as the gradients are known and leaves the
optimizer's update pending; `settle` applies it (the servicer calls it once the reply is on its way, so the
update runs while the client back-propagates). Every method that reads or writes the weights settles first,
so nothing ever sees a step half applied; the update itself is the same one `fit` makes.

The update (and a pipelined step's accumulated one) is XLA-compiled unless `exact`: XLA fuses it into one pass
per weight (docs/performance.md) but may contract and reorder its arithmetic, so the weights can differ from
`fit`'s in the last bits from the first steps on. With `exact=True` it runs as a plain graph, as `fit` runs it
on a CPU: the same ops in the same order (docs/design.md, "Exactness").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from splitlearning.compiled import Compiled
from splitlearning.contract import CutContract, CutMode, Spec
from splitlearning.devices import describe_placement
from splitlearning.models import ModelSource, materialize
from splitlearning.training import keras_setup
from splitlearning.training.deferred import DeferredUpdate

log = logging.getLogger(__name__)


class LossTrainer:
    """Holds the second part of the model, its loss, optimizer and metrics, on one device."""

    mode = CutMode.STANDARD  # served by a server, the top of a standard cut (it gets labels)

    def __init__(
        self,
        model: ModelSource,
        loss: Any,
        optimizer: Any,
        metrics: Sequence[Any] | None = None,
        device: str = "/CPU:0",
        label_spec: Spec | None = None,
        exact: bool = False,
    ) -> None:
        self.device = device
        self.exact = exact
        with tf.device(device):
            self.model: keras.Model = materialize(model)
            if not self.model.inputs:
                raise ValueError("the server part needs a known input shape: start it with keras.Input(...)")
            if loss is None:  # the part came compiled: train it with what it was compiled with
                if not self.model.compiled:
                    raise ValueError("no loss: pass loss=..., or give a model compiled with one")
                config = self.model.get_compile_config()
                loss, metrics = self.model.loss, metrics if metrics is not None else config.get("metrics")
                optimizer = optimizer if optimizer is not None else self.model.optimizer
            self.model.compile(optimizer=optimizer or "sgd", loss=loss, metrics=list(metrics or []))
            # As compiled, so another session's part can be made alike (server_part/parts.py).
            self.loss, self.metric_settings = loss, list(metrics or [])
            self.optimizer: keras.optimizers.Optimizer = self.model.optimizer
            self.optimizer.build(self.model.trainable_variables)
            self.label_spec: Spec = label_spec or keras_setup.label_spec(self.model.outputs[0], loss)
            self.output_spec = keras_setup.spec(self.model.outputs[0], "server part's output")
            self.contract = CutContract(self._iv_spec(), self.label_spec, self.output_spec)
            self._num_classes = keras_setup.sparse_classes(self.model.outputs[0], loss)
            iv_sig = tf.TensorSpec([None, *self.contract.iv.shape], self.contract.iv.dtype)
            label_sig = tf.TensorSpec([None, *self.label_spec.shape], self.label_spec.dtype)
            self._train_fn = Compiled(self._train_step, input_signature=[iv_sig, label_sig])
            # A step whose client trains on a loss of its own (local loss): no dLoss/dIV is computed.
            self._train_top_fn = Compiled(self._train_top_step, input_signature=[iv_sig, label_sig])
            xla = not exact  # the optimizer's updates: XLA-fused, or a plain graph as in `fit`
            self._apply_fn: Callable[..., object] = Compiled(self._apply_step, open_batch=False, jit_compile=xla)
            # Micro-batch pipelining: gradients of a step's micro-batches add up here until the last one.
            self._accumulators = [
                tf.Variable(tf.zeros_like(w), trainable=False) for w in self.model.trainable_variables
            ]
            micro_sig = [iv_sig, label_sig, tf.TensorSpec([], tf.float32)]
            self._micro_fn = Compiled(self._micro_step, input_signature=micro_sig)
            self._apply_accumulated_fn = Compiled(self._apply_accumulated, input_signature=[], jit_compile=xla)
            self._test_fn = Compiled(self._test_step, input_signature=[iv_sig, label_sig])
            self._predict_fn = Compiled(self._predict_step, input_signature=[iv_sig])
            self.metric_names = self._build_metrics(self.model)
            # Evaluation's own loss tracker and metrics: the same layers (so the same weights) in a model of
            # its own, compiled alike, so an Evaluate between two steps leaves the training's running values
            # (and their denominators) alone.
            self._eval_model = keras.Model(self.model.inputs[0], self.model.outputs[0], name=f"{self.model.name}_eval")
            self._eval_model.compile(loss=fresh(loss), metrics=[fresh(m) for m in self.metric_settings])
            if self._build_metrics(self._eval_model) != self.metric_names:
                raise AssertionError("evaluation's metrics are named unlike training's")
        self._metrics_before: list[tf.Tensor] | None = None  # running metrics before an unfinished step
        self._no_gradient: set[int] = set()  # indices of weights the loss does not reach (set when tracing)
        self._updates = DeferredUpdate(device)  # the last step's update, not yet applied
        placement = describe_placement(keras_setup.tf_variables(self.model, self.optimizer))
        log.info("server part on %s: %s", device, placement)

    @property
    def iterations(self) -> int:
        """Number of updates the optimizer has applied (the pending one included)."""
        self.settle()
        return int(self.optimizer.iterations.numpy())

    def settle(self) -> bool:
        """Apply the pending update, if any (safe from any thread; it runs once). True if one was applied.

        An update that fails leaves this trainer refusing every later call: the client already holds that
        step's reply, so training on would silently diverge from `fit`; restart from a checkpoint instead.
        """
        return self._updates.settle()

    @property
    def reusable(self) -> bool:
        """Whether a later session may take this trainer over (`reset`): not after a failed update."""
        return self._updates.failed is None

    def copy(self, model: ModelSource, device: str) -> LossTrainer:
        """A new trainer of `model` set up as this one: new objects configured as its loss, optimizer and
        metrics (none of their state), the same label contract, its updates applied alike (`exact`)."""
        metrics = [fresh(metric) for metric in self.metric_settings]
        return LossTrainer(
            model, fresh(self.loss), fresh(self.optimizer), metrics, device, self.label_spec, exact=self.exact
        )

    def reset(self, variables: Sequence[np.ndarray], optimizer: Sequence[np.ndarray]) -> None:
        """Back to where a new session starts, keeping the traced steps: the model's `variables` (weights, seed
        states) and the optimizer's as given (a new copy's), every metric and accumulator at zero, nothing
        pending."""
        self.settle()
        with tf.device(self.device):
            for variable, value in zip(self.model.variables, variables, strict=True):
                variable.assign(value)
            for variable, value in zip(self.optimizer.variables, optimizer, strict=True):
                variable.assign(value)
            for accumulator in self._accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
        self.model.reset_metrics()
        self._eval_model.reset_metrics()
        self._metrics_before = None

    @property
    def num_classes(self) -> int | None:
        """For sparse categorical losses, labels must lie in [0, num_classes)."""
        return self._num_classes

    def train(self, iv: np.ndarray, labels: np.ndarray, reset_metrics: bool) -> tuple[np.ndarray, list[float]]:
        """One step: return dLoss/dIV and the running metrics (loss first); its update is left pending until
        `settle` (or the next call that needs the weights)."""
        self.settle()
        if reset_metrics:
            self.model.reset_metrics()
        with tf.device(self.device):
            grad, grads, values = self._train_fn(iv, labels)
        self._defer(lambda: self._apply_fn(*grads))
        return grad.numpy(), [float(v) for v in values]

    def train_top(self, iv: np.ndarray, labels: np.ndarray, reset_metrics: bool) -> list[float]:
        """`train` without dLoss/dIV (the client trains its part on a loss of its own): the weights' gradients
        alone, the same as `train`'s, so the first layer's backward to its input is skipped; the running
        metrics."""
        self.settle()
        if reset_metrics:
            self.model.reset_metrics()
        with tf.device(self.device):
            grads, values = self._train_top_fn(iv, labels)
        self._defer(lambda: self._apply_fn(*grads))
        return [float(v) for v in values]

    def train_micro(
        self, iv: np.ndarray, labels: np.ndarray, share: float, last: bool, reset_metrics: bool, first: bool = False
    ) -> tuple[np.ndarray, list[float]]:
        """One micro-batch of a step: its gradients, weighted by `share` (its samples / the step's), are added
        to the step's; the `last` one applies them in one update. Returns dLoss/dIV (of the whole step's loss)
        and the running metrics. For losses that average over the batch the update equals `train` on the
        whole batch. The `first` one notes the running metrics, which `discard_micro` puts back."""
        self.settle()
        with tf.device(self.device):
            if first:  # copies on the device: reading them to the host would wait for the device every step
                self._metrics_before = [tf.identity(v.value) for v in self.model.metrics_variables]
            if reset_metrics:
                self.model.reset_metrics()
            grad, values = self._micro_fn(iv, labels, np.float32(share))
        if last:
            self._defer(self._apply_accumulated_fn)
            self._metrics_before = None
        return grad.numpy(), [float(v) for v in values]

    def _defer(self, update: Callable[[], object]) -> None:
        self._updates.defer(update)

    def discard_micro(self) -> None:
        """Forget an unfinished step: the gradients accumulated for it, and what its micro-batches added to the
        running metrics (so a step started over counts its samples once)."""
        self.settle()
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        if self._metrics_before is not None:
            with tf.device(self.device):
                for variable, value in zip(self.model.metrics_variables, self._metrics_before, strict=True):
                    variable.assign(value)
            self._metrics_before = None

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset_metrics: bool) -> list[float]:
        """Accumulate loss and metrics on one batch with no update; return the running values."""
        self.settle()
        if reset_metrics:
            self._eval_model.reset_metrics()
        with tf.device(self.device):
            values = self._test_fn(iv, labels)
        return [float(v) for v in values]

    def predict(self, iv: np.ndarray) -> np.ndarray:
        self.settle()
        with tf.device(self.device):
            return self._predict_fn(iv).numpy()

    # -- compiled bodies -----------------------------------------------------------------------------------

    def _train_step(self, iv: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor], list[tf.Tensor]]:
        grads, iv_grad, y_pred = self._gradients(iv, labels)
        return iv_grad, grads, self._results(self.model.compute_metrics(iv, labels, y_pred))

    def _train_top_step(self, iv: tf.Tensor, labels: tf.Tensor) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        grads, _, y_pred = self._gradients(iv, labels, watch_iv=False)
        return grads, self._results(self.model.compute_metrics(iv, labels, y_pred))

    def _apply_step(self, *grads: tf.Tensor) -> None:
        self.optimizer.apply(list(grads), self.model.trainable_variables)

    def _micro_step(self, iv: tf.Tensor, labels: tf.Tensor, share: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        grads, iv_grad, y_pred = self._gradients(iv, labels, share)
        # A weight the loss does not reach gets no gradient (known when this is traced): its accumulator stays
        # out of the update, so the optimizer skips that weight as `fit` does.
        self._no_gradient = {index for index, grad in enumerate(grads) if grad is None}
        for accumulator, grad in zip(self._accumulators, grads, strict=True):
            if grad is not None:
                accumulator.assign_add(grad)
        return iv_grad, self._results(self.model.compute_metrics(iv, labels, y_pred))

    def _apply_accumulated(self) -> None:
        grads = [None if i in self._no_gradient else a.read_value() for i, a in enumerate(self._accumulators)]
        self.optimizer.apply(grads, self.model.trainable_variables)
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))

    def _gradients(
        self, iv: tf.Tensor, labels: tf.Tensor, share: tf.Tensor | None = None, watch_iv: bool = True
    ) -> tuple[list[tf.Tensor], tf.Tensor | None, tf.Tensor]:
        """One training forward with the IV watched: the weights' gradients and dLoss/dIV from one pass (of
        the loss times `share`, a micro-batch's part of its batch), and the predictions for the metrics.
        `watch_iv` False: no dLoss/dIV (None), and no backward to the IV."""
        model = self.model
        with tf.GradientTape() as tape:
            if watch_iv:
                tape.watch(iv)
            y_pred = model(iv, training=True)
            loss = model.compute_loss(x=iv, y=labels, y_pred=y_pred, training=True)
            scaled = loss if share is None else loss * share
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(iv)[0])
        if not watch_iv:
            return tape.gradient(scaled, model.trainable_variables), None, y_pred
        *grads, iv_grad = tape.gradient(scaled, [*model.trainable_variables, iv])
        return grads, iv_grad, y_pred

    def _test_step(self, iv: tf.Tensor, labels: tf.Tensor) -> list[tf.Tensor]:
        model = self._eval_model  # its own metric objects (see __init__)
        y_pred = model(iv, training=False)
        loss = model.compute_loss(x=iv, y=labels, y_pred=y_pred, training=False)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(iv)[0])
        return self._results(model.compute_metrics(iv, labels, y_pred))

    def _predict_step(self, iv: tf.Tensor) -> tf.Tensor:
        return self.model(iv, training=False)

    def _results(self, results: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        return [tf.cast(results[n], tf.float64) for n in self.metric_names]

    # -- set-up ------------------------------------------------------------------------------------------

    def _build_metrics(self, model: keras.Model) -> list[str]:
        """Run the metrics once on zeros (no update) so their names are known before the first request."""
        return keras_setup.metric_names(model, keras_setup.zeros(self.contract.iv), keras_setup.zeros(self.label_spec))

    def _iv_spec(self) -> Spec:
        return keras_setup.spec(self.model.inputs[0], "server part's input")


def fresh(setting: Any) -> Any:
    """A new object configured as `setting` (an optimizer, a metric, a loss), so two users share no state.
    Names ("adam") and plain functions are returned as they are: each use makes its own object."""
    if setting is None or isinstance(setting, str) or not hasattr(setting, "get_config"):
        return setting
    if isinstance(setting, keras.optimizers.Optimizer):
        return keras.optimizers.deserialize(keras.optimizers.serialize(setting))
    return type(setting).from_config(setting.get_config())
