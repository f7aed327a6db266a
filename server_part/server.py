"""`SplitServer`: the second part of a split model, served over gRPC with standard health checking."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server_part.checkpoints import SessionStore
from server_part.contributions import Contributions
from server_part.interceptor import TelemetryInterceptor
from server_part.middle_trainer import MiddleTrainer
from server_part.parts import PartFactory, Trainer
from server_part.servicer import SessionsMount
from server_part.session import Limits, Session
from server_part.sessions import SessionRegistry
from server_part.telemetry import ServerTelemetry
from splitlearning import approximations, encodings, keepalive, links
from splitlearning.aggregation import FEDAVG, Aggregation
from splitlearning.contract import CutMode, Spec
from splitlearning.devices import resolve_device
from splitlearning.models import ModelSource
from splitlearning.protocol import MESSAGE_OVERHEAD, SPLIT_SERVICE
from splitlearning.security import Secret, TlsConfig, describe
from splitlearning.serving.host import Host, HostConfig, Mount
from splitlearning.telemetry import learning_rate_of
from splitlearning.training.loss_trainer import LossTrainer
from splitlearning.v1 import split_learning_pb2 as pb

log = logging.getLogger(__name__)

# Under --checkpoint-dir, beside the sessions' folders (no session id has a '.').
CONTRIBUTIONS_FOLDER = "contributions.d"
MAX_STREAMS_PER_CONNECTION = 100


class SplitServer:
    """Serves the second part of a split model.

    `model` is a Keras model whose input is the cut (or a function building one, called on `device`);
    it is compiled here with `loss`, `optimizer` (default SGD) and `metrics`, as `keras.Model.compile` takes
    them. A model that comes compiled, given no `loss`, trains with what it was compiled with.

    Telemetry (docs/observability.md): `metrics_port` serves Prometheus metrics over HTTP on `metrics_host`
    (default: the host `start` binds; port 0 picks a free one, see the `metrics_port` property); `log_dir`
    gets TensorBoard scalars under `log_dir/server`, per step every `log_every` steps.

    `tls` serves TLS (its `ca` set: mutual TLS, client certificates required); `auth_token` requires every
    RPC but health checks to carry it as `authorization: Bearer <token>` metadata.

    `cut="ushape"` serves the middle of a U-shaped cut: `model` maps the client's IV to the IV its head takes;
    there is no loss, label or metric here (the client keeps them), only `optimizer`.

    `wire_encodings` are the encodings of the IV and its gradient a client may choose ('raw', 'float16',
    'bfloat16', 'int8', 'sparse'); raw is always allowed, and is all that is allowed by default.
    `allow_approximations` names those a client may ask for beyond the exact split ('stale-gradients',
    'local-loss', 'top-k', or 'all'; docs/performance.md, "Beyond exact"): none by default.

    `exact=True` applies the optimizer's updates as a plain graph, as `keras.Model.fit` does on a CPU, so the
    split equals `fit` bit for bit where the kernels are the same (TF_ENABLE_ONEDNN_OPTS=0); by default they
    are XLA-compiled (faster for large parts), which keeps the weights within float32 round-off of `fit`'s
    but not bit for bit (docs/design.md, "Exactness").

    `serve_only=True` serves a trained part (a `.keras` file, say): handshakes, `Evaluate` and `Predict` are
    answered, a training stream is refused (FAILED_PRECONDITION), so no client can change the part.

    `aggregation` combines a SplitFed round's second parts (docs/multi_client.md, "Robust averaging"); a member's
    handshake stating another rule (the aggregator's) is refused (FAILED_PRECONDITION, naming both).
    """

    def __init__(
        self,
        model: ModelSource,
        loss: Any = None,
        optimizer: Any = None,
        metrics: Sequence[Any] | None = None,
        device: str = "/CPU:0",
        max_batch_size: int = 1024,
        label_spec: Spec | None = None,
        max_workers: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        log_dir: str | Path | None = None,
        log_every: int = 1,
        tls: TlsConfig | None = None,
        auth_token: Secret | str | None = None,
        cut: CutMode | str = CutMode.STANDARD,
        wire_encodings: Sequence[str | int] = ("raw",),
        allow_approximations: str | Sequence[str] = (),
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        checkpoint_keep: int = 5,
        min_ping_interval_ms: int = keepalive.SERVER_MIN_PING_MS,
        max_sessions: int = 16,
        session_idle_timeout: float = 3600.0,
        session_unused_timeout: float = 60.0,
        on_session_end: Callable[[Session], None] | None = None,
        aggregator: Mount | None = None,
        exact: bool = False,
        serve_only: bool = False,
        aggregation: Aggregation = FEDAVG,
    ) -> None:
        self.device = resolve_device(device)
        self.trainer: Trainer
        if CutMode(cut) is CutMode.USHAPE:
            if loss is not None or metrics or label_spec is not None:
                raise ValueError("a U-shaped middle takes no loss, metrics or label_spec: the client's head owns them")
            self.trainer = MiddleTrainer(model, optimizer, self.device, exact=exact)
        else:
            self.trainer = LossTrainer(model, loss, optimizer, metrics, self.device, label_spec, exact=exact)
        store = SessionStore(Path(checkpoint_dir), checkpoint_every, checkpoint_keep) if checkpoint_dir else None
        self.telemetry = ServerTelemetry(self.trainer.metric_names, log_dir, log_every, self._learning_rate)
        self.sessions = SessionRegistry(
            PartFactory(model, self.trainer, self.device),
            self.trainer,
            Limits(
                max_batch_size,
                (encodings.RAW, *encodings.parse_list(wire_encodings)),
                trains=not serve_only,
                approximations=approximations.parse_allowed(allow_approximations),
            ),
            store,
            max_sessions=max_sessions,
            idle_timeout=session_idle_timeout,
            unused_timeout=session_unused_timeout,
            on_close=self._session_closed,
            contributions=Contributions(
                Path(checkpoint_dir) / CONTRIBUTIONS_FOLDER if checkpoint_dir else None, aggregation
            ),
        )
        # Multi-client training's rounds served here too (docs/multi_client.md): the model owner then sees the
        # members' first parts. Its metrics join the server's.
        self.aggregator = aggregator
        self.on_session_end = on_session_end  # called with each session that leaves memory
        self.telemetry.sessions.set_function(lambda: len(self.sessions.sessions()))
        self._min_ping_interval_ms = min_ping_interval_ms
        # Each training client holds its stream and at most one unary call (validation) at a time.
        self._max_workers = max_workers if max_workers is not None else 2 * max_sessions + 2
        self._metrics_request = (metrics_host, metrics_port)
        self.host: Host | None = None  # while serving, and after
        self.tls = tls
        self._auth_token = Secret(auth_token) if isinstance(auth_token, str) else auth_token

    @property
    def cut(self) -> CutMode:
        """The cut this server's part is made for (its trainer's)."""
        return self.trainer.mode

    @property
    def model(self) -> Any:
        """The model this server was given, with every step answered so far applied: the part of the first
        session opened (later sessions train copies of it, see `session`)."""
        self.trainer.settle()
        return self.trainer.model

    def session(self, session_id: str | None = None) -> Session:
        """A session in memory: `session_id`'s, or by default the first one opened (which trains `model`)."""
        if session_id is None:
            if self.sessions.first is None:
                raise LookupError("no session has been opened on this server yet")
            return self.sessions.first
        session = self.sessions.find(session_id)
        if session is None:
            held = sorted(session.id for session in self.sessions.sessions())
            raise LookupError(f"no session {session_id} in memory (have {held})")
        return session

    def _learning_rate(self, session_id: str) -> float:
        session = self.sessions.find(session_id)  # read per TensorBoard step: no list of every session
        return learning_rate_of(session.trainer.optimizer) if session is not None else float("nan")

    def _session_closed(self, session: Session) -> None:
        self.telemetry.forget(session.id)
        if self.on_session_end is not None:
            self.on_session_end(session)

    @property
    def max_message_bytes(self) -> int:
        """Largest message the contract allows: a full batch of IVs and labels (or middle outputs), plus framing."""
        contract = self.trainer.contract
        # Requests carry IV + labels (standard cut) or IV / dLoss/d(middle outputs) (U-shape): never both.
        iv = contract.iv.sample_bytes * self._sparse_factor
        sample = iv + (_bytes(contract.label) if contract.label else _bytes(contract.output))
        return self.sessions.limits.max_batch_size * sample + MESSAGE_OVERHEAD

    @property
    def max_reply_bytes(self) -> int:
        """Largest reply: a full batch of dLoss/dIV (Train) or of the model's outputs (Predict), plus framing."""
        iv = self.trainer.contract.iv.sample_bytes * self._sparse_factor
        per_sample = max(iv, self.trainer.output_spec.sample_bytes)
        return self.sessions.limits.max_batch_size * per_sample + MESSAGE_OVERHEAD

    @property
    def _sparse_factor(self) -> int:
        """How much larger than raw the IV and its gradient may travel: a sparse tensor with no zero in it takes
        an index (4 bytes) beside each value."""
        limits = self.sessions.limits
        if pb.ENCODING_SPARSE in limits.wire_encodings or approximations.TOP_K in limits.approximations:
            return 1 + -(-4 // self.trainer.contract.iv.dtype.itemsize)
        return 1

    @property
    def admission_threads(self) -> int:
        """The most threads the server's calls use: a slot each of every budget, and a few for refusals."""
        return self._host_config().threads

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the Prometheus endpoint while serving, else None."""
        return self.host.metrics_port if self.host is not None else None

    def _host_config(self) -> HostConfig:
        metrics_host, metrics_port = self._metrics_request
        return HostConfig(
            "split-rpc",
            self._max_workers,
            clear_text="activations, gradients",
            tls=self.tls,
            auth_token=self._auth_token,
            max_receive_bytes=self.max_message_bytes,
            max_send_bytes=self.max_reply_bytes,
            min_ping_interval_ms=self._min_ping_interval_ms,
            # Calls one connection may have open: a client needs a few.
            max_concurrent_streams=MAX_STREAMS_PER_CONNECTION,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
        )

    def start(self, address: str = "127.0.0.1:0") -> int:
        """Bind `address` and start serving; return the bound port (useful with port 0)."""
        if self.host is not None and self.host.serving:
            raise RuntimeError("this server is already started")
        compute_seconds = lambda: self.sessions.compute_seconds  # noqa: E731
        self.host = Host(
            self._host_config(),
            # The aggregator first: it stops (no more rounds) before the sessions are unloaded.
            [
                *([self.aggregator] if self.aggregator is not None else []),
                SessionsMount(self.sessions, self.max_reply_bytes - MESSAGE_OVERHEAD),
            ],
            self.telemetry.registry,
            [TelemetryInterceptor(SPLIT_SERVICE, self.telemetry, compute_seconds)],
        )
        port = self.host.start(address)
        log.info(
            "serving %s on %s (port %d, %s cut, %s), up to %d sessions%s",
            SPLIT_SERVICE,
            address,
            port,
            self.cut.value,
            describe(self.tls, self._auth_token),
            self.sessions.max_sessions,
            f", checkpoints in {self.sessions.store.root}" if self.sessions.store is not None else "",
        )
        if self.aggregator is not None:
            log.info(
                "aggregating multi-client rounds here too (%s): the members' first parts reach this server",
                self.aggregator.describe(),
            )
        self.host.warn_if_insecure(address)
        links.hint_once(address)  # a step's replies on a long link: what the host's TCP makes of them
        return port

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True if it stopped."""
        if self.host is None:
            raise RuntimeError("this server is not started")
        return self.host.wait(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving: health turns NOT_SERVING, the step in flight finishes, later steps are refused
        (UNAVAILABLE: the client retries), a checkpoint is saved, then RPCs get `grace` seconds to finish."""
        if self.host is None or not self.host.stop(grace):
            return
        self.telemetry.close()
        log.info("stopped")

    def __enter__(self) -> SplitServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bytes(spec: Spec | None) -> int:
    return spec.sample_bytes if spec is not None else 0
