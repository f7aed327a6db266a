"""`SplitClient`: the first part of a split model, trained against a `SplitServer` with Keras habits."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np
import tensorflow as tf

from client_part import batches, retry
from client_part.callbacks import Callbacks
from client_part.checkpoints import ClientCheckpoints
from client_part.link import Link
from client_part.privacy import GaussianNoise, NoisyLink
from client_part.retry import RetryPolicy
from client_part.stopping import Stopped
from client_part.telemetry import ClientMeter, EpochLog
from client_part.trainer import ClientTrainer, Pipeline
from client_part.transport import RemoteError, Transport
from client_part.ushape import UShapeLink, build_head
from splitlearning import encodings, keepalive, part_state
from splitlearning.contract import Agreement, CutMode, Spec
from splitlearning.devices import resolve_device
from splitlearning.groups import Membership
from splitlearning.models import ModelSource
from splitlearning.part_state import PartState
from splitlearning.security import Secret, TlsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class Rollback(RuntimeError):
    """The server resumed at an earlier step than this client's (it restarted from an older checkpoint)."""

    def __init__(self, step: int, current: int) -> None:
        self.step = step
        super().__init__(f"the server resumed at step {step}, behind this client's step {current}")


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
    ) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        if micro_batches > 1 and (head is not None or noise is not None):
            raise ValueError("micro-batch pipelining applies to the standard cut without noise")
        self.device = resolve_device(device)
        self.micro_batches = micro_batches
        pipeline = Pipeline(micro_batches, self._send_micro, self._receive_micro)
        self.trainer = ClientTrainer(model, optimizer, self.device, self._exchange, pipeline)
        self.max_batch_size = max_batch_size
        self.label_spec = label_spec
        self.connect_timeout = connect_timeout
        self.retry = retry or RetryPolicy()
        self._session_id = session_id
        self._client_id = client_id or uuid.uuid4().hex
        self.wire_encoding = encodings.parse(wire_encoding)
        self.head = None
        if head is not None:
            self.head = build_head(head, loss, head_optimizer or optimizer, metrics, self.device, label_spec)
        elif loss is not None or metrics is not None or head_optimizer is not None:
            raise ValueError("loss, metrics and head_optimizer belong to a U-shaped client's head: pass head=...")
        self.mode = CutMode.USHAPE if self.head is not None else CutMode.STANDARD
        token = Secret(auth_token) if isinstance(auth_token, str) else auth_token
        sample_bytes = max(self.trainer.iv_spec.sample_bytes, self.head.contract.iv.sample_bytes if self.head else 0)
        self._transport = Transport(target, max_batch_size * sample_bytes * 4, rpc_timeout, tls, token, keepalive_ms)
        self._noise = noise
        self._link = self._link_over(self._transport)
        self._membership: Membership | None = None  # the group round the next new session trains
        self._agreement: Agreement | None = None
        self._step = self.trainer.iterations
        self._reset_metrics = False
        self._in_step = False  # True once this connection has checked that both sides agree on the step
        self._last_metrics: list[float] = []
        self._sent: list[bool] = []  # per micro-batch of the step in flight: was it sent (not empty)?
        self._parts: list[tuple[Any, ...]] = []  # the step in flight's sent micro-batches: `Transport.send`'s args
        self._step_started: tuple[int, int, float] = (0, 0, 0.0)  # bytes sent, received, time at its first send
        self.meter = ClientMeter()  # per-step time and bytes, for logs, TensorBoard and the summary
        self._stale = False  # a call failed: rejoin (handshake again) before the next attempt
        self._rolling_back = False  # a call that handles `Rollback` runs (fit's validation leaves it to fit)
        self._stop = threading.Event()
        self._epoch0_step = 0  # the step at which epoch 0 of the running fit began (the data position)
        self._resume = False  # restored from a checkpoint: the next fit carries on from its data position
        self.checkpoints: ClientCheckpoints | None = None
        if checkpoint_dir is not None:
            self._open_checkpoints(Path(checkpoint_dir), checkpoint_every, checkpoint_keep)

    def _link_over(self, transport: Transport) -> Link:
        self._ushape_link = UShapeLink(transport, self.head) if self.head is not None else None
        link: Link = self._ushape_link if self._ushape_link is not None else transport
        if self._noise is not None:  # outermost: every IV is clipped and noised before it leaves this process
            link = NoisyLink(link, self._noise)
        return link

    @property
    def model(self) -> keras.Model:
        return self.trainer.model

    @property
    def agreement(self) -> Agreement:
        return self._agreement or self.connect()

    @property
    def target(self) -> str:
        return self._transport.target

    @property
    def step(self) -> int:
        """Number of training steps this client has completed in the session."""
        return self._step

    def connect(self) -> Agreement:
        """Wait for the server (bounded by `connect_timeout`) and agree on the cut; idempotent."""
        if self._agreement is None:
            if not self._transport.was_ready:
                log.info("waiting up to %g s for the server at %s", self.connect_timeout, self.target)
            self._transport.wait_ready(self.connect_timeout, self._stop.is_set)
            self._agreement = retry.call(self.retry, "handshake", lambda _: self._handshake(), stop=self._stop.is_set)
            if self._agreement.encoding != self.wire_encoding:
                log.warning(
                    "asked for wire encoding %s, the server chose %s (start it with --wire-encodings %s to allow it)",
                    encodings.name(self.wire_encoding),
                    encodings.name(self._agreement.encoding),
                    encodings.name(self.wire_encoding),
                )
            log.info(
                "joined session %s at step %d; cut: %s; wire encoding %s",
                self._agreement.session_id,
                self._agreement.next_step,
                self._agreement.contract,
                encodings.name(self._agreement.encoding),
            )
            if self._agreement.next_step != self._step and self._can_restore(self._agreement.next_step):
                self._restore(self._agreement.next_step)
            self._in_step = self._agreement.next_step == self._step
        return self._agreement

    @property
    def session_id(self) -> str:
        """The session this client trains in: the one it was given or found in its checkpoints, else the one the
        server opened for it at `connect` ("" before that)."""
        return self._session_id

    def end_session(self, contribute_samples: int = 0) -> None:
        """Tell the server this run is over: it applies its last update, saves a checkpoint of the final step (if
        it keeps checkpoints) and frees the session's memory. This client saves its own final checkpoint first.
        Call it once training and evaluation are done (`split-client` does at the end of a run); a session that
        is never ended stays on the server until it expires for idleness. In a group round (`start_round`),
        `contribute_samples` > 0 leaves the server's part as this member's contribution to the round."""
        if self._agreement is None:
            return
        if self.checkpoints is not None:
            self.checkpoints.save(self._step, self._epoch0_step)
        close = self._transport.close_session
        _, checkpointed = retry.call(
            self.retry,
            "closing the session",
            lambda _: close(self._client_id, contribute_samples),
            stop=self._stop.is_set,
        )
        log.info(
            "ended session %s at step %d%s",
            self._session_id,
            self._step,
            " (the server kept a checkpoint of it)" if checkpointed else "",
        )
        self._agreement = None

    def start_round(self, membership: Membership, state: PartState) -> None:
        """Multi-client training (client_part/group.py): leave the current session (without closing it) and
        train the next `connect` in a new session for `membership`'s group round, this part (and the U-shape's
        head) starting from `state`: its weights, and its optimizers' variables when it carries them."""
        if self.checkpoints is not None:
            raise ValueError("group rounds restart from the aggregator's state: use no client checkpoints with them")
        self._transport.end_stream()  # the last round's session, finished or abandoned
        self._agreement = None
        self._session_id = ""
        self._membership = membership
        self._settle()
        part_state.apply_parts(state, self._part_pairs(with_optimizer=bool(state.optimizer)))
        self._forget_step_in_flight()
        self._step = self.trainer.iterations
        self._epoch0_step = self._step
        self._in_step = self._stale = self._resume = False
        self._reset_metrics = True

    def part_state(self, with_optimizer: bool) -> PartState:
        """This client's part (and the U-shape's head) as it travels to the aggregator."""
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
            raise Stopped(f"stopped on request while {what} (after training step {self._step})")

    def _with_head(self, agreement: Agreement) -> Agreement:
        """The U-shape's agreement as this client uses it: the head's label contract and metric names."""
        assert self.head is not None
        if agreement.contract.output != self.head.contract.iv:
            self._transport.close()
            raise ValueError(
                f"U-shape mismatch: the server's middle outputs {agreement.contract.output}, "
                f"the client's head takes {self.head.contract.iv}"
            )
        contract = replace(agreement.contract, label=self.head.label_spec)
        return replace(agreement, contract=contract, metric_names=self.head.metric_names)

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
        agreement = self.agreement
        self._check_batch_size(batch_size)
        if not self._in_step and agreement.next_step != self._step:
            raise RuntimeError(
                f"the server's session is at step {agreement.next_step} but this client is at step {self._step}: "
                "restore the client from the matching checkpoint, or train in a new session (name none)"
            )
        self._in_step = True
        steps_per_epoch = batches.num_batches(x, batch_size)
        if not self._resume:
            self._epoch0_step = self._step - initial_epoch * (steps_per_epoch or 0)
        self._resume = False
        history = keras.callbacks.History()
        history.set_model(self.model)
        history.on_train_begin()
        history.set_params({"epochs": epochs, "steps": steps_per_epoch, "verbose": verbose})
        hooks = Callbacks([EpochLog(self), *(callbacks or [])], self.model, history.params)
        hooks.on_train_begin()
        run = _FitRun(x, y, batch_size, epochs, shuffle, validation_data, verbose, seed, steps_per_epoch)
        try:
            # After a rollback the epochs carry on from the restored step's data position.
            self._after_rollbacks(lambda: self._fit_epochs(run, max(initial_epoch, 0), history, hooks))
        finally:
            self._settle()  # the user's own model objects hold every step applied, however fit ends
        if self.checkpoints is not None:  # the final step too, so a finished run resumes as finished
            self.checkpoints.save(self._step, self._epoch0_step)
        hooks.on_train_end({})
        return history

    def _settle(self) -> None:
        """Apply the U-shape head's deferred update (see `ServerTrainer.settle`): the head's last step is
        otherwise applied only when something next reads it, and `head.get_weights()` after `fit` lagged."""
        if self.head is not None:
            self.head.settle()

    def _fit_epochs(self, run: _FitRun, initial_epoch: int, history: Any, hooks: Callbacks) -> None:
        """Train from the current step (which gives the epoch and the batch) to the end of the last epoch."""
        position = self._step - self._epoch0_step
        spe = run.steps_per_epoch
        if position and not spe:
            raise ValueError("resuming mid-fit needs a dataset of known length (its cardinality)")
        first_epoch, start = (position // spe, position % spe) if spe else (initial_epoch, 0)
        names = self.agreement.metric_names
        for epoch in range(max(first_epoch, initial_epoch), run.epochs):
            hooks.on_epoch_begin(epoch)
            x, y = run.x, run.y
            order = None if _is_dataset(x) else batches.epoch_order(len(x), run.seed, epoch, run.shuffle)
            progress = keras.utils.Progbar(spe, verbose=run.verbose, stateful_metrics=[*names, "samples/s"])
            if run.verbose:
                print(f"Epoch {epoch + 1}/{run.epochs}")
            self._reset_metrics = True
            self._transport.epoch = epoch  # the server numbers its epochs as this client does
            self.trainer.regularization.reset_state()
            started, samples, logs, index = time.perf_counter(), 0, {}, start - 1
            # The next batch is gathered and made a tensor on the client's device while this step runs.
            ready = batches.prefetch(batches.iterate(x, y, run.batch_size, order, start), self._as_tensors)
            for index, (xb, yb) in enumerate(ready, start):
                step_started = time.perf_counter()
                penalty = self.trainer.train(xb, yb)
                self.meter.step(len(xb), time.perf_counter() - step_started)
                self._after_step()
                samples += len(xb)
                logs = self._logs(self._last_metrics, penalty)
                hooks.on_train_batch_end(index, logs)
                logs["samples/s"] = samples / max(time.perf_counter() - started, 1e-9)
                progress.update(index + 1, list(logs.items()), finalize=False)
            if index < 0:
                raise ValueError("fit got no data: the training set is empty")
            start = 0
            logs.pop("samples/s", None)
            if run.validation_data is not None:
                val = self.evaluate(*_unpack(run.validation_data), batch_size=run.batch_size, verbose=0)
                logs.update({f"val_{k}": v for k, v in val.items()})
            progress.update(index + 1, list(logs.items()), finalize=True)
            history.on_epoch_end(epoch, logs)
            hooks.on_epoch_end(epoch, logs)

    def _after_step(self) -> None:
        if self.checkpoints is not None and (self.checkpoints.due(self._step) or self._stop.is_set()):
            self.checkpoints.save(self._step, self._epoch0_step)
        if self._stop.is_set():
            if self.checkpoints is None:
                raise Stopped(
                    f"stopped on request after step {self._step}; no checkpoint was saved "
                    "(start with --checkpoint-dir to be able to resume)"
                )
            raise Stopped(
                f"stopped on request after step {self._step}; a checkpoint of it is saved in "
                f"{self.checkpoints.directory}: run again with the same flags to resume"
            )

    def evaluate(self, x: Any, y: Any = None, batch_size: int = 32, verbose: int = 0) -> dict[str, float]:
        """Loss and metrics over all of (x, y), accumulated exactly as `keras.Model.evaluate` does."""
        agreement = self.agreement
        self._check_batch_size(batch_size)
        progress = keras.utils.Progbar(batches.num_batches(x, batch_size), verbose=verbose)

        def attempt(retrying: bool) -> list[float]:  # a retry starts over from the first batch (reset)
            self._rejoin_if_stale(self._step)
            values: list[float] = []
            for index, (xb, yb) in enumerate(batches.iterate(x, y, batch_size)):
                iv, labels = self.trainer.forward(xb), self._labels(yb)
                values = self._guarded(self._link.evaluate, iv, labels, not values, self._partner_step())
                progress.update(index + 1)
                self._check_stop("evaluating")
            return values

        values = self._after_rollbacks(lambda: retry.call(self.retry, "evaluate", attempt, stop=self._stop.is_set))
        if not values:
            raise ValueError("evaluate got no data")
        penalty = self.trainer.penalty()
        return self._logs(values, penalty, agreement.metric_names)

    def predict(self, x: Any, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        """Outputs of the whole (uncut) model for `x`."""
        self.agreement  # noqa: B018 (connect first)
        self._check_batch_size(batch_size)
        outputs = self._after_rollbacks(lambda: [self._predict_one(xb) for xb in batches.iterate_inputs(x, batch_size)])
        if not outputs:
            raise ValueError("predict got no data")
        return np.concatenate(outputs)

    # -- the step's exchange, called from inside the compiled step -----------------------------------------

    def _exchange(self, iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
        transport = self._transport
        sent, received, started = transport.bytes_sent, transport.bytes_received, time.perf_counter()
        step = self._step

        def attempt(retrying: bool) -> tuple[np.ndarray, list[float]]:
            self._rejoin_if_stale(step)
            return self._guarded(self._link.train, step, iv, labels, self._reset_metrics)

        grad, self._last_metrics = retry.call(self.retry, f"step {step}", attempt, stop=self._stop.is_set)
        seconds = time.perf_counter() - started
        self.meter.exchange(seconds, transport.bytes_sent - sent, transport.bytes_received - received)
        self._reset_metrics = False
        self._step += 1
        return grad

    def _send_micro(self, index: np.ndarray, iv: np.ndarray, labels: np.ndarray, size: np.ndarray) -> np.ndarray:
        transport = self._transport
        if int(index) == 0:
            self._sent, self._parts = [], []
            self._step_started = (transport.bytes_sent, transport.bytes_received, time.perf_counter())
        batch = int(size)
        self._sent.append(len(iv) > 0)  # a batch smaller than micro_batches leaves some parts empty
        if len(iv):
            parts = min(self.micro_batches, batch)
            part = sum(self._sent) - 1
            # The arrays are views of the step's tensors, alive until the step ends: kept to send again.
            self._parts.append((iv, labels, self._reset_metrics and part == 0, part, parts, batch))
            transport.send(self._step, *self._parts[-1])
        return np.zeros((), np.int64)

    def _receive_micro(self, index: np.ndarray) -> np.ndarray:
        k = int(index)
        if not self._sent[k]:
            return np.zeros((0, *self.trainer.iv_spec.shape), self.trainer.iv_spec.dtype)
        transport = self._transport
        answered = sum(self._sent[:k])  # micro-batches of this step answered so far

        def attempt(retrying: bool) -> tuple[np.ndarray, list[float]]:
            if retrying:  # a new stream: the whole step again, the answers already used are dropped
                self._rejoin_if_stale(self._step)
                for part in self._parts:
                    transport.send(self._step, *part)
                for _ in range(answered):
                    self._guarded(transport.receive, self._step)
            return self._guarded(transport.receive, self._step)

        grad, self._last_metrics = retry.call(
            self.retry, f"step {self._step}, micro-batch {answered}", attempt, stop=self._stop.is_set
        )
        if k == max(i for i, sent in enumerate(self._sent) if sent):  # the step's last answer
            sent, received, started = self._step_started
            seconds = time.perf_counter() - started
            self.meter.exchange(seconds, transport.bytes_sent - sent, transport.bytes_received - received)
            self._reset_metrics = False
            self._step += 1
        return grad

    def _predict_one(self, xb: Any) -> np.ndarray:
        self._check_stop("predicting")
        return self._predict_batch(self.trainer.forward(xb))

    def _predict_batch(self, iv: np.ndarray) -> np.ndarray:
        def attempt(retrying: bool) -> np.ndarray:
            self._rejoin_if_stale(self._step)
            return self._guarded(self._link.predict, iv, self._partner_step())

        return retry.call(self.retry, "predict", attempt, stop=self._stop.is_set)

    # -- faults: rejoin, restore ---------------------------------------------------------------------------

    def _guarded(self, call: Callable[..., T], *args: Any) -> T:
        """Run one RPC; after a retryable failure the next attempt rejoins the session first."""
        try:
            return call(*args)
        except (RemoteError, ConnectionError) as error:
            if retry.is_retryable(error):
                self._stale = True
            raise

    def _partner_step(self) -> int | None:
        """This client's step, for the server to check that both parts are at it, once the two have agreed on
        a step on this connection (a client that only brings weights for inference sends none). It stays sent
        after a failed rejoin, so the server keeps refusing a pair that is no longer one model."""
        return self._step if self._in_step else None

    def _after_rollbacks(self, run: Callable[[], T]) -> T:
        """`run()`, again from the top each time the server turns out to have resumed at an earlier step than
        this client's (`Rollback`: it restarted from an older checkpoint), after restoring this client's
        checkpoint of that step, so both parts are one model again. Steps after it are lost on both sides;
        `fit` trains them again. Nested calls (`fit`'s validation) leave it to the outermost."""
        if self._rolling_back:
            return run()
        self._rolling_back = True
        try:
            while True:
                try:
                    return run()
                except Rollback as rollback:
                    log.warning("%s: restoring this client's checkpoint of step %d", rollback, rollback.step)
                    self._restore(rollback.step)
        finally:
            self._rolling_back = False

    def _rejoin_if_stale(self, step: int) -> None:
        """After a failure the server may have restarted: handshake again and agree on the step."""
        if not self._stale:
            return
        agreement = self._guarded(self._handshake)
        self._stale = False
        self._agreement = agreement
        if agreement.next_step < step and self._can_restore(agreement.next_step):
            raise Rollback(agreement.next_step, step)
        if agreement.next_step != step:
            raise RuntimeError(
                f"after reconnecting, the server's session is at step {agreement.next_step} but this client is at "
                f"step {step}, and neither side holds a checkpoint of the other's step"
            )

    def _handshake(self) -> Agreement:
        label = self.label_spec if self.head is None else None  # the U-shape's server sees no label
        wanted = () if self.wire_encoding == encodings.RAW else (self.wire_encoding,)
        agreement = self._transport.handshake(
            self.trainer.iv_spec,
            label,
            self.max_batch_size,
            self._session_id,
            self.mode,
            wanted,
            restorable_steps=[self._step, *(self.checkpoints.steps() if self.checkpoints else [])],
            client_id=self._client_id,
            group=self._membership if not self._session_id else None,
        )
        if agreement.session_id != self._session_id:
            self._session_id = agreement.session_id
            if self.checkpoints is not None:
                self.checkpoints.record(self._session_id, self._client_id)
        return agreement if self.head is None else self._with_head(agreement)

    def _open_checkpoints(self, directory: Path, every: int, keep: int) -> None:
        self.checkpoints = ClientCheckpoints(directory, self.trainer, every, keep, self.head)
        session_id, client_id = self.checkpoints.identity()
        self._session_id = self._session_id or session_id
        self._client_id = client_id
        latest = self.checkpoints.latest()
        if latest is None:
            self.checkpoints.save(self._step, self._epoch0_step)
        else:
            self._restore(latest)
            self._resume = True

    def _forget_step_in_flight(self) -> None:
        """After a restore or a new round the step numbers go back: the U-shape's head must train every step
        again (its record of the step in flight would otherwise answer a later step of the same number)."""
        if self._ushape_link is not None:
            self._ushape_link.forget()

    def _can_restore(self, step: int) -> bool:
        return self.checkpoints is not None and step in self.checkpoints.steps()

    def _restore(self, step: int) -> None:
        assert self.checkpoints is not None
        self._epoch0_step = self.checkpoints.restore(step)
        self._forget_step_in_flight()
        self._step = step
        self._reset_metrics = True
        log.info("restored this client's checkpoint of step %d", step)

    # -- helpers -------------------------------------------------------------------------------------------

    def _logs(self, values: list[float], penalty: float, names: list[str] | None = None) -> dict[str, float]:
        logs = dict(zip(names or self.agreement.metric_names, values, strict=True))
        logs["loss"] += penalty
        return logs

    def _as_tensors(self, batch: batches.Batch) -> tuple[tf.Tensor, tf.Tensor]:
        xb, yb = batch
        with tf.device(self.trainer.device):
            return tf.convert_to_tensor(xb), tf.convert_to_tensor(self._labels(yb))

    def _labels(self, y: Any) -> np.ndarray:
        spec = self.agreement.contract.label
        if spec is None:
            raise RuntimeError("the agreed contract names no label")
        labels = np.asarray(y)
        if labels.ndim == len(spec.shape) + 2 and labels.shape[-1] == 1:  # sparse labels as a column, as Keras takes
            labels = labels.reshape(labels.shape[:-1])
        if labels.dtype != spec.dtype:
            if not np.can_cast(labels.dtype, spec.dtype, casting="same_kind"):
                raise TypeError(
                    f"labels of dtype {labels.dtype.name} cannot become {spec.dtype.name}, "
                    f"the server's label dtype ({spec})"
                )
            labels = labels.astype(spec.dtype)
        return labels

    def _check_batch_size(self, batch_size: int) -> None:
        if not 0 < batch_size <= min(self.max_batch_size, self.agreement.max_batch_size):
            raise ValueError(
                f"batch_size must lie in [1, {min(self.max_batch_size, self.agreement.max_batch_size)}], "
                f"got {batch_size}"
            )


@dataclass(frozen=True)
class _FitRun:
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


def _is_dataset(x: Any) -> bool:
    return isinstance(x, tf.data.Dataset)


def _unpack(data: Any) -> tuple[Any, Any]:
    if isinstance(data, tuple):
        return data[0], data[1]
    return data, None
