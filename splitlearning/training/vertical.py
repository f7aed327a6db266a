"""The label party's training math in vertical split learning: compiled TensorFlow calls, numpy in and out, no
gRPC (docs/vertical.md, "Training").

The same samples, their columns in several places. Each of k feature parties sends the IV of its rows of the
batch; the label party fuses them with the IV of its own bottom part, if it has one, runs the top model, the
loss and the metrics against its labels, and returns each feature party only dLoss/dIV of its own IV.

The fused vector is, in this order: the label party's own bottom's IV (if any), then the feature parties' IVs
in party order (index 0 first). `concat` joins them along the last axis (`keras.layers.Concatenate`), `sum`
adds them (`keras.layers.Add`) and `mean` averages them (`keras.layers.Average`); the latter two need equal IV
shapes. With a single part there is nothing to fuse and the part is the fused vector.

As in `LossTrainer`, every received IV is watched by the tape and `tape.gradient(loss, [*weights, *ivs])`
yields the weight gradients and every party's dLoss/dIV from one forward pass; loss, regularisation (the top's
and the own bottom's) and metrics are Keras's own, so the running metrics mean what they mean in `fit`; the
reply comes first and the optimizer's update is left pending until `settle`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from splitlearning.compiled import Compiled
from splitlearning.contract import Spec
from splitlearning.devices import describe_placement
from splitlearning.errors import InvalidRequest
from splitlearning.models import ModelSource, materialize
from splitlearning.training import keras_setup
from splitlearning.training.deferred import DeferredUpdate
from splitlearning.training.loss_trainer import fresh

log = logging.getLogger(__name__)


class Fuse(enum.Enum):
    """How the label party joins the parts' IVs into the top model's input."""

    CONCAT = "concat"  # along the last axis, in the order of the parts
    SUM = "sum"  # elementwise; equal shapes
    MEAN = "mean"  # elementwise; equal shapes

    def layer(self) -> keras.layers.Layer:
        """The Keras layer that fuses (the one an uncut model of the same parties would use)."""
        if self is Fuse.CONCAT:
            return keras.layers.Concatenate(axis=-1, name="fuse")
        if self is Fuse.SUM:
            return keras.layers.Add(name="fuse")
        return keras.layers.Average(name="fuse")


class FuseTrainer:
    """Holds the label party's part of a vertical split: the top model (taking the fused vector) and
    optionally a bottom part over the label party's own columns, one optimizer over both, the loss and the
    metrics, on one device.

    `model` is the label party's whole part as one Keras model: inputs `[own columns (with a bottom), IV of
    party 0, ..., IV of party k-1]`, output the top's. Its weights are `top`'s and `bottom`'s own (the model
    shares their layers), and `optimizer` updates them; read them after `settle` (or `iterations`), as with
    `LossTrainer`.
    """

    def __init__(
        self,
        top: ModelSource,
        loss: Any,
        optimizer: Any,
        metrics: Sequence[Any] | None = None,
        *,
        iv_specs: Sequence[Spec],
        fuse: Fuse | str = Fuse.CONCAT,
        bottom: ModelSource | None = None,
        device: str = "/CPU:0",
        label_spec: Spec | None = None,
        exact: bool = False,
    ) -> None:
        if not iv_specs:
            raise ValueError("a vertical split needs at least one feature party (one IV spec each)")
        if loss is None:
            raise ValueError("no loss: the label party trains the top against its labels with loss=...")
        self.device = device
        self.fuse = Fuse(fuse)
        self.iv_specs = [Spec(tuple(s.shape), np.dtype(s.dtype)) for s in iv_specs]
        with tf.device(device):
            self.top: keras.Model = materialize(top)
            self.bottom: keras.Model | None = None if bottom is None else materialize(bottom)
            self.own_spec: Spec | None = None
            self.model = self._join()
            self.model.compile(optimizer=optimizer or "sgd", loss=loss, metrics=list(metrics or []))
            self.loss, self.metric_settings = loss, list(metrics or [])
            self.optimizer: keras.optimizers.Optimizer = self.model.optimizer
            self.optimizer.build(self.model.trainable_variables)
            output = self.model.outputs[0]
            self.label_spec: Spec = label_spec or keras_setup.label_spec(output, loss)
            self.output_spec = keras_setup.spec(output, "top model's output")
            self.num_classes = keras_setup.sparse_classes(output, loss)
            label_sig = tf.TensorSpec([None, *self.label_spec.shape], self.label_spec.dtype)
            self._train_fn = Compiled(self._train_step, input_signature=[*self._input_signature(), label_sig])
            # The optimizer's update: XLA-fused, or with `exact` a plain graph as in `fit` (docs/vertical.md).
            self._apply_fn: Callable[..., object] = Compiled(self._apply_step, open_batch=False, jit_compile=not exact)
            self._test_fn = Compiled(self._test_step, input_signature=[*self._input_signature(), label_sig])
            self._predict_fn = Compiled(self._predict_step, input_signature=self._input_signature())
            zeros = [keras_setup.zeros(s) for s in self._input_specs()]
            self.metric_names = keras_setup.metric_names(self.model, zeros, keras_setup.zeros(self.label_spec))
            # Evaluation's own loss tracker and metrics (the same layers, so the same weights), as LossTrainer's.
            self._eval_model = keras.Model(self.model.inputs, self.model.outputs, name=f"{self.model.name}_eval")
            self._eval_model.compile(loss=fresh(loss), metrics=[fresh(m) for m in self.metric_settings])
            if keras_setup.metric_names(self._eval_model, zeros, keras_setup.zeros(self.label_spec)) != (
                self.metric_names
            ):
                raise AssertionError("evaluation's metrics are named unlike training's")
        self._updates = DeferredUpdate(device, "the label party's weights no longer follow the feature parties'")
        placement = describe_placement(keras_setup.tf_variables(self.model, self.optimizer))
        log.info("label party's part on %s: %s", device, placement)

    @property
    def parties(self) -> int:
        """The number of feature parties (k)."""
        return len(self.iv_specs)

    @property
    def iterations(self) -> int:
        """Number of updates the optimizer has applied (the pending one included)."""
        self.settle()
        return int(self.optimizer.iterations.numpy())

    def settle(self) -> bool:
        """Apply the pending update, if any (safe from any thread; it runs once). True if one was applied.
        After a failed update every later call raises (see `DeferredUpdate`)."""
        return self._updates.settle()

    @property
    def reusable(self) -> bool:
        return self._updates.failed is None

    def train(
        self,
        ivs: Sequence[np.ndarray],
        labels: np.ndarray,
        own_x: np.ndarray | None = None,
        reset_metrics: bool = False,
    ) -> tuple[list[np.ndarray], list[float]]:
        """One step on one batch: `ivs[i]` is feature party i's IV of the batch's rows, `own_x` the label
        party's own columns of them (with a bottom). Returns dLoss/dIV for each feature party, in party order,
        and the running metrics (in `metric_names` order, loss first); the update is left pending until
        `settle`. A batch that does not fit the specs raises InvalidRequest, naming the party, before anything
        changes."""
        inputs = self._checked(ivs, own_x, labels)
        self.settle()
        if reset_metrics:
            self.model.reset_metrics()
        with tf.device(self.device):
            iv_grads, grads, values = self._train_fn(*inputs, labels)
        self._updates.defer(lambda: self._apply_fn(*grads))
        return [g.numpy() for g in iv_grads], [float(v) for v in values]

    def evaluate(
        self,
        ivs: Sequence[np.ndarray],
        labels: np.ndarray,
        own_x: np.ndarray | None = None,
        reset_metrics: bool = False,
    ) -> list[float]:
        """Accumulate loss and metrics on one batch with no update; return the running values."""
        inputs = self._checked(ivs, own_x, labels)
        self.settle()
        if reset_metrics:
            self._eval_model.reset_metrics()
        with tf.device(self.device):
            values = self._test_fn(*inputs, labels)
        return [float(v) for v in values]

    def predict(self, ivs: Sequence[np.ndarray], own_x: np.ndarray | None = None) -> np.ndarray:
        """The top's outputs for one batch, in inference mode."""
        inputs = self._checked(ivs, own_x, None)
        self.settle()
        with tf.device(self.device):
            return self._predict_fn(*inputs).numpy()

    # -- checks ----------------------------------------------------------------------------------------------

    def _checked(
        self, ivs: Sequence[np.ndarray], own_x: np.ndarray | None, labels: np.ndarray | None
    ) -> list[np.ndarray]:
        """The model's inputs in order, once every part fits its spec and all have the same rows."""
        if len(ivs) != self.parties:
            raise InvalidRequest(f"expected {self.parties} IVs (one per feature party), got {len(ivs)}")
        named: list[tuple[str, np.ndarray, Spec]] = []
        if self.own_spec is not None:
            if own_x is None:
                raise InvalidRequest("own_x: the label party's bottom needs its own columns of the batch")
            named.append(("own_x", np.asarray(own_x), self.own_spec))
        elif own_x is not None:
            raise InvalidRequest("own_x: the label party has no bottom part to take its own columns")
        for i, (iv, spec) in enumerate(zip(ivs, self.iv_specs, strict=True)):  # counted above
            named.append((f"party {i} iv", np.asarray(iv), spec))
        if labels is not None:
            named.append(("labels", np.asarray(labels), self.label_spec))
        rows = [spec.check_batch(array, name) for name, array, spec in named]
        if rows[0] == 0:
            raise InvalidRequest(f"{named[0][0]}: an empty batch")
        for (name, _, _), count in zip(named, rows, strict=True):
            if count != rows[0]:
                raise InvalidRequest(
                    f"{name}: {count} rows, but {named[0][0]} has {rows[0]}: every part of a batch holds the "
                    "same samples"
                )
        return [array for name, array, _ in named if name != "labels"]

    # -- compiled bodies -------------------------------------------------------------------------------------

    def _train_step(self, *tensors: tf.Tensor) -> tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]]:
        *inputs, labels = tensors
        ivs = inputs[len(inputs) - self.parties :]
        model = self.model
        with tf.GradientTape() as tape:
            for iv in ivs:
                tape.watch(iv)
            y_pred = model(inputs, training=True)
            loss = model.compute_loss(x=inputs, y=labels, y_pred=y_pred, training=True)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(inputs[0])[0])
        gradients = tape.gradient(loss, [*model.trainable_variables, *ivs])
        grads, iv_grads = gradients[: len(gradients) - len(ivs)], gradients[len(gradients) - len(ivs) :]
        return iv_grads, grads, self._results(model.compute_metrics(inputs, labels, y_pred))

    def _apply_step(self, *grads: tf.Tensor) -> None:
        self.optimizer.apply(list(grads), self.model.trainable_variables)

    def _test_step(self, *tensors: tf.Tensor) -> list[tf.Tensor]:
        *inputs, labels = tensors
        model = self._eval_model
        y_pred = model(inputs, training=False)
        loss = model.compute_loss(x=inputs, y=labels, y_pred=y_pred, training=False)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(inputs[0])[0])
        return self._results(model.compute_metrics(inputs, labels, y_pred))

    def _predict_step(self, *inputs: tf.Tensor) -> tf.Tensor:
        return self.model(list(inputs), training=False)

    def _results(self, results: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        return [tf.cast(results[n], tf.float64) for n in self.metric_names]

    # -- set-up ----------------------------------------------------------------------------------------------

    def _join(self) -> keras.Model:
        """The label party's part as one functional model: own bottom, fuse, top."""
        unbuilt = isinstance(self.top, keras.Sequential) and not self.top.built  # no Input: takes the fused width
        if not unbuilt and (len(self.top.inputs) != 1 or len(self.top.outputs) != 1):
            raise ValueError("the top model takes the fused vector and gives one output: start it with keras.Input")
        inputs = [keras.Input(s.shape, dtype=s.dtype.name, name=f"party_{i}_iv") for i, s in enumerate(self.iv_specs)]
        parts: list[Any] = list(inputs)
        named = [f"party {i}" for i in range(len(inputs))]
        if self.bottom is not None:
            if len(self.bottom.inputs) != 1 or len(self.bottom.outputs) != 1:
                raise ValueError("the label party's bottom takes its own columns as one input and gives one IV")
            self.own_spec = keras_setup.spec(self.bottom.inputs[0], "label party's bottom's input")
            own = keras.Input(self.own_spec.shape, dtype=self.own_spec.dtype.name, name="own_columns")
            inputs.insert(0, own)
            parts.insert(0, self.bottom(own))
            named.insert(0, "the label party's bottom")
        if self.fuse is not Fuse.CONCAT:
            shapes = {name: tuple(part.shape[1:]) for name, part in zip(named, parts, strict=True)}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"fuse={self.fuse.value} needs equal IV shapes, got {shapes}")
        fused = parts[0] if len(parts) == 1 else self.fuse.layer()(parts)
        expected = tuple(fused.shape[1:]) if unbuilt else tuple(self.top.inputs[0].shape[1:])
        if tuple(fused.shape[1:]) != expected:
            raise ValueError(
                f"the fused vector ({self.fuse.value} of {', '.join(named)}) is shaped {list(fused.shape[1:])}, "
                f"but the top model takes {list(expected)}"
            )
        return keras.Model(inputs, self.top(fused), name="label_party")

    def _input_specs(self) -> list[Spec]:
        return ([self.own_spec] if self.own_spec is not None else []) + self.iv_specs

    def _input_signature(self) -> list[tf.TensorSpec]:
        return [tf.TensorSpec([None, *s.shape], s.dtype) for s in self._input_specs()]
