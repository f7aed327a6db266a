"""The first part's training math: one compiled TensorFlow call per step, no gRPC.

The step runs the forward pass under a tape, hands the IV (and labels) to `exchange` (a plain Python
function: in a `SplitClient` it is the gRPC round trip) through `tf.numpy_function`, and back-propagates the
returned dLoss/dIV with `tape.gradient(iv, weights, output_gradients=grad)`. No forward pass is repeated.

With one-step-stale gradients (`Stale`) a step is two compiled calls instead: the forward pass of step s runs on
the current weights and stashes them (and the non-trainable state: batch-norm statistics, dropout's seed state),
its IV goes out at once, and then step s-1's dLoss/dIV is back-propagated through step s-1's forward as it ran, by
running that forward again from its stash (`model.stateless_call`), and applied to the current weights
(PipeDream-2BW's weight stashing). The repeated forward is the price of keeping no tape between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from splitlearning.compiled import Compiled
from splitlearning.contract import Spec
from splitlearning.devices import describe_placement
from splitlearning.models import ModelSource, materialize
from splitlearning.training.local_loss import LocalHead
from splitlearning.training.nopeek import distance_correlation

log = logging.getLogger(__name__)

Exchange = Callable[[np.ndarray, np.ndarray], np.ndarray]
Send = Callable[[np.ndarray, np.ndarray], np.ndarray]  # a local loss's: the IV and labels out, no answer awaited


@dataclass(frozen=True)
class Pipeline:
    """Micro-batch pipelining: the step's batch goes out in `micro_batches` parts, each sent as soon as its
    forward pass is done (`send(index, iv, labels, batch_size)`), so the next part's forward overlaps the
    transfer and the server's work; then `receive(index)` collects each part's dLoss/dIV, and one
    back-propagation and one update follow, as without pipelining."""

    micro_batches: int
    send: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    receive: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Stale:
    """One-step-stale gradients: `send(iv, labels)` sends a step without waiting for its answer; `receive()`
    reads the answer to the oldest step sent and not yet received (its dLoss/dIV)."""

    send: Callable[[np.ndarray, np.ndarray], None]
    receive: Callable[[], np.ndarray]


Stash = tuple[tf.Tensor, list[tf.Tensor], list[tf.Tensor]]  # a step's input, trainable and non-trainable values


class ClientTrainer:
    """Holds the first part of the model and its optimizer on one device."""

    def __init__(
        self,
        model: ModelSource,
        optimizer: Any,
        device: str,
        exchange: Exchange | None = None,
        pipeline: Pipeline | None = None,
        nopeek_alpha: float = 0.0,
    ) -> None:
        if not nopeek_alpha >= 0:
            raise ValueError(f"the NoPeek weight alpha must be >= 0, got {nopeek_alpha}")
        self.nopeek_alpha = float(nopeek_alpha)
        self.device = device
        self._exchange: Exchange = _unbound
        self.pipeline: Pipeline | None = None
        self.stale: Stale | None = None
        self._pending: Stash | None = None  # with stale gradients: the step sent and not yet applied
        if exchange is not None:
            self.exchange_with(exchange, pipeline)
        self._error: BaseException | None = None
        self.local: LocalHead | None = None  # the local loss's head, once `use_local_head` set it
        self._send: Send = _unbound
        with tf.device(device):
            self.model: keras.Model = materialize(model)
            if not self.model.inputs or not self.model.outputs:
                raise ValueError("the client part needs a known input shape: start it with keras.Input(...)")
            self.optimizer: keras.optimizers.Optimizer = keras.optimizers.get(optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.regularization = keras.metrics.Mean(name="regularization")
            self.local_loss = keras.metrics.Mean(name="local_loss")  # this epoch's local loss so far
        self.iv_spec = _spec(self.model.outputs[0])
        self._train_fn = Compiled(self._train_step)
        self._forward_fn = Compiled(self._forward)
        self._stale_forward_fn = Compiled(self._stale_forward)
        self._stale_backward_fn = Compiled(self._stale_backward)
        variables = [getattr(v, "value", v) for h in (self.model, self.optimizer) for v in h.variables]
        log.info("client part on %s: %s", device, describe_placement(variables))

    def exchange_with(self, exchange: Exchange, pipeline: Pipeline | None = None) -> None:
        """Set what each step calls across the cut (before the first step): `exchange`, or `pipeline`'s
        send and receive when it has more than one micro-batch. A `SplitClient` sets its `StepExchange`'s here,
        which needs this trainer's cut (`iv_spec`) to be made."""
        self._exchange = exchange
        self.pipeline = pipeline if pipeline is not None and pipeline.micro_batches > 1 else None

    def use_local_head(self, head: LocalHead, send: Send) -> None:
        """Train on a local auxiliary loss from now on (before the first step): each step runs the forward, the
        head, the local loss, the backward and one update of this part and the head, and hands the forward's IV
        and the labels to `send` (which does not wait for any answer); no dLoss/dIV comes back. The IV sent is
        the one the forward computed, with the weights from before this step's update."""
        self.local, self._send = head, send
        self._train_fn = Compiled(self._train_step)

    def stale_with(self, stale: Stale | None) -> None:
        """Train with one-step-stale gradients through `stale`'s send and receive (None: exactly, one step in
        flight). NoPeek's penalty needs the IV and the input of the same step under one tape: not with it."""
        if stale is not None and self.nopeek_alpha:
            raise ValueError("NoPeek (nopeek_alpha) does not go with stale gradients: choose one")
        self._pending = None
        self.stale = stale

    @property
    def in_flight(self) -> int:
        """Steps sent whose update is not applied yet (0 or 1 beyond the one `train` is running)."""
        return int(self._pending is not None)

    def drain(self) -> None:
        """With stale gradients: receive and apply the step still in flight, if any (at the end of an epoch, before
        a checkpoint, evaluation or a stop), so the weights hold every step sent."""
        if self.stale is None or self._pending is None:
            return
        pending, self._pending = self._pending, None
        self._apply_stale(self.stale, pending)

    def forget(self) -> None:
        """Drop the step in flight unapplied (a restore or a failed exchange: it is to be sent again or lost)."""
        self._pending = None

    @property
    def iterations(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def train(self, x: Any, labels: Any) -> float:
        """Run one step; return the mean regularisation penalty of this part so far (0.0 without one). With stale
        gradients: send this step and apply the one before it (see `drain`)."""
        self._error = None
        if self.stale is not None:
            self._train_stale(self.stale, x, labels)
            return self.penalty_so_far()
        try:
            with tf.device(self.device):
                self._train_fn(x, labels)
        except tf.errors.OpError:
            if self._error is not None:  # the exchange failed: raise its own error, not TensorFlow's wrapper
                raise self._error from None
            raise
        return self.penalty_so_far()

    def penalty_so_far(self) -> float:
        """The mean regularisation penalty of the steps applied since it was last reset (0.0 without one)."""
        return float(self.regularization.result()) if self.model.losses else 0.0

    def penalty(self) -> float:
        """This part's regularisation penalty at the current weights (0.0 without one)."""
        return float(sum(float(loss) for loss in self.model.losses))

    def forward(self, x: Any) -> np.ndarray:
        """The IV for `x`, in inference mode (for evaluate and predict)."""
        with tf.device(self.device):
            return self._forward_fn(x).numpy()

    def _guarded(self, function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def call(*args: np.ndarray) -> np.ndarray:
            try:
                return function(*args)
            except BaseException as error:
                self._error = error
                raise

        return call

    def _exchange_guarded(self, iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self._guarded(self._exchange)(iv, labels)

    def _train_step(self, x: tf.Tensor, labels: tf.Tensor) -> None:
        if self.local is not None:
            self._local_step(x, labels, self.local)
            return
        model = self.model
        weights = model.trainable_variables
        with tf.GradientTape() as tape:
            if self.pipeline is None:
                ivs = [model(x, training=True)]
            else:
                ivs = self._pipelined_forward(x, labels, self.pipeline)
            regularization = tf.add_n(model.losses) if model.losses else None
            penalty = regularization
            if self.nopeek_alpha:  # NoPeek: alpha · dCor(input, IV) joins this part's own loss
                nopeek = self.nopeek_alpha * distance_correlation(x, tf.concat(ivs, axis=0))
                penalty = nopeek if penalty is None else penalty + nopeek
        if self.pipeline is None:
            grad = tf.numpy_function(self._exchange_guarded, [ivs[0], labels], Tout=ivs[0].dtype, stateful=True)
            grads_iv = [tf.ensure_shape(grad, ivs[0].shape)]
        else:
            receive = self._guarded(self.pipeline.receive)
            grads_iv = [
                tf.ensure_shape(tf.numpy_function(receive, [k], Tout=iv.dtype, stateful=True), iv.shape)
                for k, iv in enumerate(ivs)
            ]
        if penalty is None:
            grads = tape.gradient(ivs, weights, output_gradients=grads_iv)
        else:
            if regularization is not None:
                self.regularization.update_state(regularization, sample_weight=tf.shape(x)[0])
            grads = tape.gradient([*ivs, penalty], weights, output_gradients=[*grads_iv, tf.ones_like(penalty)])
        # Every op of the update waits for the gradients from across the cut: without this, the optimizer's step
        # count (whose increment reads no gradient) ran even when the exchange failed, and a step redone after a
        # rejoin then saw one iteration too many (Adam's bias correction, a schedule's learning rate).
        with tf.control_dependencies(grads_iv):
            self.optimizer.apply(grads, weights)

    def _local_step(self, x: tf.Tensor, labels: tf.Tensor, local: LocalHead) -> None:
        """The local loss's step: the IV goes out (not waited for), and this part and the head learn from the
        head's loss alone (plus this part's regularisation and NoPeek)."""
        model, head = self.model, local.model
        weights, head_weights = model.trainable_variables, head.trainable_variables
        with tf.GradientTape() as tape:
            iv = model(x, training=True)
            outputs = head(iv, training=True)
            loss = local.loss(labels, outputs)
            total = loss
            if head.losses:
                total = total + tf.add_n(head.losses)
            if model.losses:
                regularization = tf.add_n(model.losses)
                self.regularization.update_state(regularization, sample_weight=tf.shape(x)[0])
                total = total + regularization
            if self.nopeek_alpha:
                total = total + self.nopeek_alpha * distance_correlation(x, iv)
        self.local_loss.update_state(loss, sample_weight=tf.shape(x)[0])
        grads = tape.gradient(total, [*weights, *head_weights])
        sent = tf.numpy_function(self._guarded(self._send), [iv, labels], Tout=tf.int64, stateful=True)
        # The update waits for the send: a send that fails (its retries spent) leaves both parts as they were,
        # so the step can be done again (the optimizers' step counts included).
        with tf.control_dependencies([sent]):
            self.optimizer.apply(grads[: len(weights)], weights)
            local.optimizer.apply(grads[len(weights) :], head_weights)

    def _pipelined_forward(self, x: tf.Tensor, labels: tf.Tensor, pipeline: Pipeline) -> list[tf.Tensor]:
        """Forward each micro-batch and send it before the next one's forward starts (a control dependency)."""
        size, parts = tf.shape(x)[0], pipeline.micro_batches
        send = self._guarded(pipeline.send)
        ivs: list[tf.Tensor] = []
        sent: list[tf.Tensor] = []
        for k in range(parts):
            begin, end = (size * k) // parts, (size * (k + 1)) // parts
            with tf.control_dependencies(sent):
                part = tf.identity(x[begin:end])
            iv = self.model(part, training=True)
            ivs.append(iv)
            sent = [tf.numpy_function(send, [k, iv, labels[begin:end], size], Tout=tf.int64, stateful=True)]
        return ivs

    def _train_stale(self, stale: Stale, x: Any, labels: Any) -> None:
        """Forward this step on the current weights and send it; then apply the step before it (if any)."""
        with tf.device(self.device):
            x = tf.convert_to_tensor(x)
            iv, *values = self._stale_forward_fn(x)
        count = len(self.model.trainable_variables)
        stash: Stash = (x, list(values[:count]), list(values[count:]))
        stale.send(np.asarray(iv), np.asarray(labels))
        previous, self._pending = self._pending, stash
        if previous is not None:
            self._apply_stale(stale, previous)

    def _apply_stale(self, stale: Stale, stash: Stash) -> None:
        grad = stale.receive()
        x, trainable, non_trainable = stash
        with tf.device(self.device):
            self._stale_backward_fn(x, grad, *trainable, *non_trainable)

    def _stale_forward(self, x: tf.Tensor) -> list[tf.Tensor]:
        """The IV on the current weights, then those weights and the non-trainable state as they were (the
        stash); the non-trainable variables take their new values (batch-norm statistics, seed state)."""
        model = self.model
        trainable = [tf.identity(_value(v)) for v in model.trainable_variables]
        non_trainable = [tf.identity(_value(v)) for v in model.non_trainable_variables]
        iv, updated = model.stateless_call(trainable, non_trainable, x, training=True)
        for variable, value in zip(model.non_trainable_variables, updated, strict=True):
            variable.assign(value)
        return [iv, *trainable, *non_trainable]

    def _stale_backward(self, x: tf.Tensor, grad_iv: tf.Tensor, *values: tf.Tensor) -> None:
        """Back-propagate `grad_iv` through the stashed forward (run again: the same weights and seed state give
        the same IV as was sent) and apply the gradient, this part's regularisation included, to the current
        weights."""
        model = self.model
        count = len(model.trainable_variables)
        # `Compiled` leaves every argument's first dimension open; the stash has the variables' own shapes.
        stashed = [
            tf.ensure_shape(value, v.shape)
            for value, v in zip(values, [*model.trainable_variables, *model.non_trainable_variables], strict=True)
        ]
        trainable, non_trainable = stashed[:count], stashed[count:]
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            iv, _, losses = model.stateless_call(trainable, non_trainable, x, training=True, return_losses=True)
            regularization = tf.add_n(losses) if losses else None
        grad_iv = tf.ensure_shape(tf.convert_to_tensor(grad_iv, iv.dtype), iv.shape)
        if regularization is None:
            grads = tape.gradient(iv, trainable, output_gradients=grad_iv)
        else:
            self.regularization.update_state(regularization, sample_weight=tf.shape(x)[0])
            grads = tape.gradient(
                [iv, regularization], trainable, output_gradients=[grad_iv, tf.ones_like(regularization)]
            )
        self.optimizer.apply(grads, model.trainable_variables)

    def _forward(self, x: tf.Tensor) -> tf.Tensor:
        return self.model(x, training=False)


def _unbound(iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
    raise RuntimeError("this trainer has no exchange: give it one (ClientTrainer.exchange_with) before training")


def _value(variable: Any) -> Any:
    """A Keras variable's backing TensorFlow variable (`tf.identity` reads it)."""
    return getattr(variable, "value", variable)


def _spec(tensor: Any) -> Spec:
    shape = tensor.shape[1:]
    if any(d is None for d in shape):
        raise ValueError(f"the client part's output (the cut) must have a fully known shape, got {tensor.shape}")
    return Spec(tuple(int(d) for d in shape), np.dtype(tensor.dtype))
