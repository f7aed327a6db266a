"""`SplitClient`: the first part of a split model, trained against a `SplitServer` with Keras habits."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from client_part import batches, link_probe, retry
from client_part.callbacks import Callbacks
from client_part.checkpoints import ClientCheckpoints
from client_part.exchange import StepExchange
from client_part.leakage import ClientLeakage, MeteredLink
from client_part.link import Link
from client_part.link_probe import LinkEstimate
from client_part.loop import EpochLoop, FitRun, logs_of
from client_part.position import Position
from client_part.privacy import GaussianNoise, NoisyLink
from client_part.retry import RetryPolicy
from client_part.session import Offer, Rollback, Session
from client_part.stopping import Stopped
from client_part.telemetry import ClientMeter, EpochLog
from client_part.transport import RemoteError, Transport
from client_part.ushape import UShapeLink, build_head
from client_part.window import WINDOW, LocalLossWindow
from splitlearning import codec, encodings, keepalive, part_state
from splitlearning.approximations import NONE, Approximations
from splitlearning.contract import Agreement, CutMode, Spec
from splitlearning.devices import resolve_device
from splitlearning.groups import Membership
from splitlearning.label_defences import LabelDefence
from splitlearning.leakage import LabelLeakMeter
from splitlearning.models import ModelSource
from splitlearning.optimizers import OptimizerSettings
from splitlearning.part_state import PartState
from splitlearning.security import Secret, TlsConfig
from splitlearning.top_k_layer import with_top_k
from splitlearning.training.first_part import ClientTrainer
from splitlearning.training.local_loss import LocalHead, classes_of
from splitlearning.v1 import split_learning_pb2 as pb

__all__ = ["RemoteError", "Rollback", "SplitClient"]


class SplitClient:
    """Trains the first part of a split model; the server at `target` holds the rest and the loss.

    Use it as a context manager, or call `connect()` and `close()`. `fit`, `evaluate` and `predict` take
    numpy arrays or batched `tf.data.Dataset`s and mean what they mean on a `keras.Model`.

    `tls` connects over TLS (its `ca` checks the server; its `cert`/`key` answer a server that asks for a
    client certificate); `auth_token` is sent as `authorization: Bearer <token>` on every call.

    `head` makes the cut U-shaped: this client also holds the last layers (`head`, compiled here with `loss`
    and `metrics`, trained with a copy of `optimizer` or with `head_optimizer`), the server holds only the
    middle, and labels never leave this process. `noise` clips each sample's IV and adds Gaussian noise to
    it before it is sent (client_part/privacy.py).

    Privacy meters and defences (docs/security.md): `leakage_meters` (on by default) adds to each epoch's logs
    the distance correlation between the inputs and the IVs sent of the first `leakage_samples` batches
    (`input_dcor`) and, in the U-shape, the label attacks' AUCs on the gradients sent (`leak_norm_auc`,
    `leak_direction_auc`, for class `leak_positive` against the rest). `label_defence` (U-shape) noises those
    gradients before they leave; `nopeek_alpha` adds alpha · dCor(input, IV) to this part's loss (NoPeek).

    `wire_encoding` ('raw', 'float16', 'bfloat16', 'int8') asks the server to narrow the IV and its gradient
    on the wire; the server chooses in the handshake (raw unless it allows the one asked for).
    `micro_batches` > 1 pipelines each step (standard cut, no noise): its batch streams out in that many
    parts, so forward passes, transfers and the server's work overlap; both sides still apply one update per
    batch, equal to the unpipelined one for losses that average over the batch (not with layers that depend
    on the batch's statistics, such as BatchNormalization, whose statistics are then per micro-batch).

    Faults: a step that fails with UNAVAILABLE or DEADLINE_EXCEEDED (or on a cut stream) is resent, after a
    new handshake, with exponential backoff and jitter bounded by `retry` (the server answers a resend without
    a second update). A pipelined step is sent again whole, from its first micro-batch: the server starts an
    unfinished one over, or answers an applied one from its stored replies. With `checkpoint_dir`, the client
    restores its latest checkpoint at start, saves every `checkpoint_every` steps and on `request_stop()`, and
    resumes where both sides agree after either process restarts; `fit` then carries on from the saved data
    position.

    `approximations` (agreed in the handshake; the server must allow each: docs/performance.md, "Beyond exact").
    With `local_loss` this part trains on an auxiliary head of its own at the cut (`local_head`: a Keras model, or
    a builder of one from the IV spec; default Flatten + Dense(classes), the classes from `local_classes` or from
    the first `fit`'s labels) and `local_head_loss` (default sparse categorical cross-entropy from logits), with a
    copy of `optimizer`; each step's IV (from the weights before the step's update) and labels go to the server
    without waiting for its reply, at most `local_window` unanswered (client_part/window.py); `step` counts the
    steps sent, and equals the server's wherever the replies are drained (each epoch's end, checkpoints, a stop,
    evaluate, predict, `end_session`).

    A facade with Keras habits over small objects, each holding its own facts once: the session (its id, the
    agreement, rejoining, rollback and restore: client_part/session.py), the step exchange (exchange.py), the
    epoch loop (loop.py) and where training stands (position.py). `agreement` is a plain accessor: it is set by
    `connect()`, which `fit`, `evaluate` and `predict` call on first use.
    """

    def __init__(
        self,
        model: ModelSource,
        optimizer: Any = "sgd",
        target: str = "127.0.0.1:50051",
        device: str = "/CPU:0",
        max_batch_size: int = 1024,
        label_spec: Spec | None = None,
        connect_timeout: float = 30.0,
        rpc_timeout: float = 60.0,
        session_id: str = "",
        tls: TlsConfig | None = None,
        auth_token: Secret | str | None = None,
        head: ModelSource | None = None,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        head_optimizer: Any = None,
        noise: GaussianNoise | None = None,
        wire_encoding: str = "raw",
        micro_batches: int = 1,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        checkpoint_keep: int = 5,
        retry: RetryPolicy | None = None,
        client_id: str = "",
        keepalive_ms: int = keepalive.CLIENT_PING_MS,
        nopeek_alpha: float = 0.0,
        label_defence: LabelDefence | None = None,
        leakage_meters: bool = True,
        leakage_samples: int = 4,
        leak_positive: int = 1,
        approximations: Approximations = NONE,
        local_head: Any = None,
        local_head_loss: Any = None,
        local_classes: int | None = None,
        local_window: int = WINDOW,
    ) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        _check_approximations(approximations, micro_batches, head is not None, noise is not None)
        if micro_batches > 1 and (head is not None or noise is not None):
            raise ValueError("micro-batch pipelining applies to the standard cut without noise")
        self.device = resolve_device(device)
        self.trainer = ClientTrainer(model, optimizer, self.device, nopeek_alpha=nopeek_alpha)
        local = None  # a local loss's head, built here when it can be (else by the first fit, from its labels)
        if approximations.local_loss and (local_head is not None or local_classes is not None):
            local = self._local_head(local_head, local_head_loss, local_classes)
        elif approximations.local_loss and checkpoint_dir is not None:
            raise ValueError(
                "a local loss with checkpoints needs its head from the start, to save it: give local_classes=... "
                "(the default head's class count) or local_head=..."
            )
        self.retry = retry or RetryPolicy()
        wanted_encoding = encodings.parse(wire_encoding)
        if approximations.top_k:  # top-k's tensors travel sparse
            if wanted_encoding not in (encodings.RAW, pb.ENCODING_SPARSE):
                raise ValueError(f"top-k sends its tensors in the sparse encoding, not {wire_encoding}: leave it raw")
            wanted_encoding = pb.ENCODING_SPARSE
        self.head = None
        if head is not None:
            self.head = build_head(head, loss, head_optimizer or optimizer, metrics, self.device, label_spec)
        elif loss is not None or metrics is not None or head_optimizer is not None:
            raise ValueError("loss, metrics and head_optimizer belong to a U-shaped client's head: pass head=...")
        token = Secret(auth_token) if isinstance(auth_token, str) else auth_token
        sample_bytes = max(self.trainer.iv_spec.sample_bytes, self.head.contract.iv.sample_bytes if self.head else 0)
        self._transport = Transport(target, max_batch_size * sample_bytes * 4, rpc_timeout, tls, token, keepalive_ms)
        if label_defence is not None and label_defence.active and self.head is None:
            raise ValueError(
                "a label defence protects the gradients a U-shaped client sends about its labels (head=...); "
                "in the standard cut the labels themselves go to the server"
            )
        label_meter = LabelLeakMeter(leak_positive) if leakage_meters and self.head is not None else None
        self.leakage = ClientLeakage(leakage_samples if leakage_meters else 0, label_meter)
        ushape_link = None
        if self.head is not None:
            protect = label_defence.apply if label_defence is not None and label_defence.active else None
            ushape_link = UShapeLink(self._transport, self.head, protect, label_meter)
        base: Link = ushape_link or self._transport
        self._link = _link_over(MeteredLink(base, self.leakage) if self.leakage.input else base, noise)
        self.meter = ClientMeter()  # per-step time and bytes, for logs, TensorBoard and the summary
        self._stop = threading.Event()
        self._position = Position(step=self.trainer.iterations)
        checkpoints = None
        if checkpoint_dir is not None:
            checkpoints = ClientCheckpoints(
                Path(checkpoint_dir), self.trainer, checkpoint_every, checkpoint_keep, self.head or local
            )
        mode = CutMode.USHAPE if self.head is not None else CutMode.STANDARD
        offer = Offer(
            self.trainer.iv_spec,
            label_spec if self.head is None else None,  # the U-shape's server sees no label
            max_batch_size,
            mode,
            wanted_encoding,
            self.head,
            OptimizerSettings.of(self.trainer.optimizer),
            approximations,
        )
        self._session = Session(
            self._transport,
            offer,
            self._position,
            self.retry,
            self._stop,
            connect_timeout,
            session_id,
            client_id,
            checkpoints,
            ushape_link.forget if ushape_link is not None else self._forget_in_flight,
        )
        self._steps = StepExchange(
            self._session,
            self._link,
            self._transport,
            self._position,
            self.meter,
            self.retry,
            self._stop.is_set,
            micro_batches,
            self.trainer.iv_spec,
            self.leakage.sent if self.leakage.input is not None else None,
        )
        self.trainer.exchange_with(self._steps.train, self._steps.pipeline())
        self._window: LocalLossWindow | None = None
        if approximations.local_loss:
            self._window = LocalLossWindow(
                self._session,
                self._transport,
                self._position,
                self.meter,
                self.retry,
                self._stop.is_set,
                self._steps.sparsified,
                self.leakage.sent if self.leakage.input is not None else None,
                local_window,
            )
        elif local_head is not None or local_head_loss is not None or local_classes is not None:
            raise ValueError(
                "local_head, local_head_loss and local_classes belong to the local loss: pass "
                "approximations=Approximations(local_loss=True)"
            )
        self._local_source = (local_head, local_head_loss)
        if local is not None and self._window is not None:
            self.trainer.use_local_head(local, self._window.send)
        if approximations.stale_gradients:
            self.trainer.stale_with(self._steps.stale())
        self._loop = EpochLoop(
            self.trainer,
            self._steps,
            self._session,
            self._position,
            self.meter,
            self._stop,
            lambda x, y, batch_size: self.evaluate(x, y, batch_size=batch_size, verbose=0),
            self.leakage,
            self._window,
        )
        if checkpoints is not None:
            self._session.restore_latest()

    def _local_head(self, head: Any, loss: Any, classes: int | None) -> LocalHead:
        with tf.device(self.device):
            return LocalHead(head, loss, self.trainer.optimizer, self.trainer.iv_spec, classes)

    def _ensure_local_head(self, y: Any) -> None:
        """A local loss's default head, built by the first `fit` from its labels' class count."""
        if self._window is None or self.trainer.local is not None:
            return
        if y is None:
            raise ValueError(
                "the local loss's default head needs the number of classes, which a dataset does not tell: give "
                "SplitClient local_classes=..., or local_head=..."
            )
        head, loss = self._local_source
        self.trainer.use_local_head(self._local_head(head, loss, classes_of(y)), self._window.send)

    @property
    def local_head(self) -> keras.Model | None:
        """The local loss's head at the cut (None without a local loss, or before the first `fit` built it)."""
        return self.trainer.local.model if self.trainer.local is not None else None

    @property
    def model(self) -> keras.Model:
        return self.trainer.model

    @property
    def inference_model(self) -> keras.Model:
        """The first part as it runs at inference: `model`, followed by top-k's `TopK` layer when this client
        trains with top-k (splitlearning/top_k_layer.py). What `split-client --save-model` writes, so that the
        saved part gives the IVs the server's part learned from."""
        fraction = self.approximations.top_k
        return with_top_k(self.model, fraction) if fraction else self.model

    @property
    def checkpoints(self) -> ClientCheckpoints | None:
        """This client's checkpoints (None without `checkpoint_dir`)."""
        return self._session.checkpoints

    @property
    def micro_batches(self) -> int:
        """Parts each training step's batch is pipelined in (1: not pipelined)."""
        return self._steps.micro_batches

    @property
    def max_batch_size(self) -> int:
        return self._session.offer.max_batch_size

    @property
    def wire_encoding(self) -> codec.EncodingCode:
        """The wire encoding this client asks for (`agreement.encoding`: the one the server chose)."""
        return self._session.offer.wire_encoding

    @property
    def approximations(self) -> Approximations:
        """What this client trains with beyond the exact split: what it asked for, which every handshake it
        trained after agreed to (a server that did not was refused)."""
        return self._session.offer.approximations

    @property
    def mode(self) -> CutMode:
        return self._session.offer.mode

    @property
    def agreement(self) -> Agreement:
        """What the handshake settled (the cut, the session, the metric names, the wire encoding). A plain
        accessor: after `connect()` (which `fit`, `evaluate` and `predict` call on first use), else a
        `RuntimeError`."""
        return self._session.agreement

    @property
    def target(self) -> str:
        return self._transport.target

    @property
    def step(self) -> int:
        """Number of training steps this client has completed in the session."""
        return self._position.step

    @property
    def session_id(self) -> str:
        """The session this client trains in: the one it was given or found in its checkpoints, else the one the
        server opened for it at `connect` ("" before that)."""
        return self._session.session_id

    def connect(self) -> Agreement:
        """Wait for the server (bounded by `connect_timeout`) and agree on the cut; idempotent."""
        return self._session.connect()

    def measure_link(self, size: int = 1 << 20, rounds: int = 5) -> LinkEstimate:
        """The round trip and the throughput each way to the server, from `Probe` calls on this client's channel
        (client_part/link_probe.py); `size` is capped by what the agreed batch limit lets the server send back."""
        agreement = self.connect()
        spec = self.trainer.iv_spec
        cap = min(self.max_batch_size, agreement.max_batch_size) * spec.sample_bytes
        return link_probe.measure(self._transport.probe, max(min(size, cap), 1), rounds)

    def end_session(self, contribute_samples: int = 0) -> None:
        """Tell the server this run is over: it applies its last update, saves a checkpoint of the final step (if
        it keeps checkpoints) and frees the session's memory. This client saves its own final checkpoint first.
        Call it once training and evaluation are done (`split-client` does at the end of a run); a session that
        is never ended stays on the server until it expires for idleness. In a group round (`start_round`),
        `contribute_samples` > 0 leaves the server's part as this member's contribution to the round."""
        self._drain()
        self._session.end(contribute_samples)

    def start_round(self, membership: Membership, state: PartState) -> None:
        """Multi-client training (client_part/group.py): leave the current session (without closing it) and
        train the next `connect` in a new session for `membership`'s group round, this part (and the U-shape's
        head) starting from `state`: its weights, and its optimizers' variables when it carries them."""
        if self.checkpoints is not None:
            raise ValueError("group rounds restart from the aggregator's state: use no client checkpoints with them")
        self._session.leave(membership)
        self._settle()
        part_state.apply_parts(state, self._part_pairs(with_optimizer=bool(state.optimizer)))
        self._session.start_at(self.trainer.iterations)

    def part_state(self, with_optimizer: bool) -> PartState:
        """This client's part (and the U-shape's head) as it travels to the aggregator."""
        self._drain()
        self._settle()
        return part_state.capture_parts(self._part_pairs(with_optimizer))

    def _part_pairs(self, with_optimizer: bool) -> list[tuple[Any, Any]]:
        parts = [(self.model, self.trainer.optimizer if with_optimizer else None)]
        if self.head is not None:
            parts.append((self.head.model, self.head.optimizer if with_optimizer else None))
        return parts

    def request_stop(self) -> None:
        """Stop as soon as possible (signal-safe): `fit` after the step in flight (saving a checkpoint where it
        keeps them), waits for the server and between retries at once, `evaluate` and `predict` after the batch
        in flight. The interrupted call raises `Stopped`."""
        self._stop.set()

    def _check_stop(self, what: str) -> None:
        if self._stop.is_set():
            raise Stopped(f"stopped on request while {what} (after training step {self.step})")

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> SplitClient:
        try:
            self.connect()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ fails
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Keras-style API -----------------------------------------------------------------------------------

    def fit(
        self,
        x: Any,
        y: Any = None,
        batch_size: int = 32,
        epochs: int = 1,
        shuffle: bool = True,
        validation_data: Any = None,
        verbose: int = 1,
        seed: int = 0,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
    ) -> keras.callbacks.History:
        """Train for `epochs`; the returned `History.history` holds per-epoch loss and metrics as in Keras.

        `callbacks` get `on_train_begin/end`, `on_epoch_begin/end` and `on_train_batch_end` with the logs.
        """
        self.connect()
        self._check_batch_size(batch_size)
        self._ensure_local_head(y)
        self._session.agree_on_step()
        position = self._position
        steps_per_epoch = batches.num_batches(x, batch_size)
        if not position.resume:
            position.epoch0_step = position.step - initial_epoch * (steps_per_epoch or 0)
        position.resume = False
        history = keras.callbacks.History()
        history.set_model(self.model)
        history.on_train_begin()
        history.set_params({"epochs": epochs, "steps": steps_per_epoch, "verbose": verbose})
        hooks = Callbacks([EpochLog(self), *(callbacks or [])], self.model, history.params)
        hooks.on_train_begin()
        run = FitRun(x, y, batch_size, epochs, shuffle, validation_data, verbose, seed, steps_per_epoch)
        try:
            # After a rollback the epochs carry on from the restored step's data position.
            self._session.after_rollbacks(lambda: self._loop.run(run, max(initial_epoch, 0), history, hooks))
        except BaseException:
            self._forget_in_flight()  # stale gradients: a step sent and never applied is not this client's
            raise
        finally:
            self._settle()  # the user's own model objects hold every step applied, however fit ends
        if self.checkpoints is not None:  # the final step too, so a finished run resumes as finished
            self.checkpoints.save(position.step, position.epoch0_step)
        hooks.on_train_end({})
        return history

    def _forward(self, x: Any) -> np.ndarray:
        """The IV the server's part is given for `x` in evaluate and predict: the first part's, with top-k each
        sample's largest entries, as in training (the server's part learned from those)."""
        return self._steps.sparsified(self.trainer.forward(x))

    def _forget_in_flight(self) -> None:
        """The standard cut's steps in flight dropped (stale gradients, a local loss's window; nothing otherwise):
        a restore trains them again, and a failed `fit` never applied them."""
        self.trainer.forget()
        self._steps.forget()
        window: LocalLossWindow | None = getattr(self, "_window", None)
        if window is not None:
            window.forget()

    def _drain(self) -> None:
        """Before reading the weights or evaluating: stale gradients' step in flight applied, a local loss's
        replies still due read (nothing otherwise), so both parts are at `step`."""
        if self.trainer.in_flight:
            self._session.after_rollbacks(self.trainer.drain)
        if self._window is not None and self._window.in_flight:
            self._session.after_rollbacks(self._window.drain)

    def _settle(self) -> None:
        """Apply the U-shape head's deferred update (see `LossTrainer.settle`): the head's last step is
        otherwise applied only when something next reads it, and `head.get_weights()` after `fit` lagged."""
        if self.head is not None:
            self.head.settle()

    def evaluate(self, x: Any, y: Any = None, batch_size: int = 32, verbose: int = 0) -> dict[str, float]:
        """Loss and metrics over all of (x, y), accumulated exactly as `keras.Model.evaluate` does."""
        agreement = self.connect()
        self._drain()
        self._check_batch_size(batch_size)
        progress = keras.utils.Progbar(batches.num_batches(x, batch_size), verbose=verbose)
        session = self._session

        def attempt(retrying: bool) -> list[float]:  # a retry starts over from the first batch (reset)
            session.rejoin_if_stale(self.step)
            values: list[float] = []
            for index, (xb, yb) in enumerate(batches.iterate(x, y, batch_size)):
                iv, labels = self._forward(xb), batches.labels(yb, session.agreement.contract.label)
                values = session.guarded(self._link.evaluate, iv, labels, not values, session.partner_step())
                progress.update(index + 1)
                self._check_stop("evaluating")
            return values

        values = session.after_rollbacks(lambda: retry.call(self.retry, "evaluate", attempt, stop=self._stop.is_set))
        if not values:
            raise ValueError("evaluate got no data")
        return logs_of(agreement.metric_names, values, self.trainer.penalty())

    def predict(self, x: Any, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        """Outputs of the whole (uncut) model for `x`; `verbose` 1 shows a progress bar, as Keras's does."""
        self.connect()
        self._drain()
        self._check_batch_size(batch_size)
        progress = keras.utils.Progbar(batches.num_batches(x, batch_size), verbose=verbose)

        def run() -> list[np.ndarray]:
            outputs = []
            for index, xb in enumerate(batches.iterate_inputs(x, batch_size)):
                outputs.append(self._predict_one(xb))
                progress.update(index + 1)
            return outputs

        outputs = self._session.after_rollbacks(run)
        if not outputs:
            raise ValueError("predict got no data")
        return np.concatenate(outputs)

    def _predict_one(self, xb: Any) -> np.ndarray:
        self._check_stop("predicting")
        iv, session = self._forward(xb), self._session

        def attempt(retrying: bool) -> np.ndarray:
            session.rejoin_if_stale(self.step)
            return session.guarded(self._link.predict, iv, session.partner_step())

        return retry.call(self.retry, "predict", attempt, stop=self._stop.is_set)

    def _check_batch_size(self, batch_size: int) -> None:
        largest = min(self.max_batch_size, self.agreement.max_batch_size)
        if not 0 < batch_size <= largest:
            raise ValueError(f"batch_size must lie in [1, {largest}], got {batch_size}")


def _link_over(link: Link, noise: GaussianNoise | None) -> Link:
    """The link every batch goes through: noise outermost, so every IV is clipped and noised before it leaves."""
    return NoisyLink(link, noise) if noise is not None else link


def _check_approximations(approximations: Approximations, micro_batches: int, ushape: bool, noise: bool) -> None:
    """The approximations apply to the standard cut's plain step: one message per step, no noise."""
    if approximations.exact:
        return
    if ushape:
        raise ValueError(f"{approximations.describe()}: approximations apply to the standard cut, not the U-shape")
    if (approximations.stale_gradients or approximations.local_loss) and micro_batches > 1:
        raise ValueError(
            f"{approximations.describe()} overlaps steps already: leave micro-batches at 1 (got {micro_batches})"
        )
    if noise:
        raise ValueError(
            f"{approximations.describe()} does not go with noise on the IV (--noise-multiplier): choose one"
        )
