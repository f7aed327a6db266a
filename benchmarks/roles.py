"""The benchmark's worker processes, each pinned to its cores: `python -m benchmarks.roles ROLE JSON`.

Roles: `uncut` (Keras `fit` on the whole model), `server` and `client` (the split run, timed per phase),
`wan-client` (several split runs in turn, the compute floor timed around each: benchmarks/wan.py),
`echo-server` and `echo-client` (a bare gRPC stream echoing the same payload), `accuracy` (the digits model
per wire encoding), `compute-floor` (the parts' compiled steps alone). Each writes its figures as JSON to
`out`; timers wrap functions from outside, so the code under test is the project's own, unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from splitlearning import devices

ECHO_METHOD = "/bench.Echo/Echo"


class Timers:
    """Per-call durations and start/end times of wrapped functions."""

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.sent: list[float] = []
        self.parsed: list[float] = []
        self._patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), to put back

    def _patch(self, owner: Any, attribute: str, replacement: Any) -> None:
        self._patched.append((owner, attribute, owner.__dict__.get(attribute, getattr(owner, attribute))))
        setattr(owner, attribute, replacement)

    def restore(self) -> None:
        """Put back what `wrap` and `wire` replaced (a process that runs several clients in turn)."""
        while self._patched:
            owner, attribute, original = self._patched.pop()
            setattr(owner, attribute, original)

    def wrap(
        self, owner: Any, attribute: str, key: str, sizes: Callable[[Any, tuple[Any, ...]], int] | None = None
    ) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.durations[key].append(end - start)
                self.spans[key].append((start, end))
            if sizes is not None:
                self.durations[key + "_bytes"].append(sizes(result, args))
            return result

        self._patch(owner, attribute, timed)

    def reset(self) -> None:
        self.durations.clear()
        self.spans.clear()
        self.sent.clear()
        self.parsed.clear()

    def wire(self) -> None:
        """Record when each Train message goes to gRPC (`sent`: the end of its last serialisation; the
        server's telemetry serialises a reply once before gRPC asks, and the second call returns the same
        bytes) and when each received one reaches the parser (`parsed`). Both processes read the same
        monotonic clock, so one side's `sent` and the other's `parsed` give a message's time in transit.
        Must run before the server registers its serializer."""
        from splitlearning import framing

        serialize, parse = framing.Outgoing.serialize, framing.parse
        last: list[int] = [0]  # id of the message serialised last

        def timed_serialize(message: Any) -> bytes:
            data = serialize(message)
            if self.sent and last[0] == id(message):
                self.sent[-1] = time.perf_counter()
            else:
                self.sent.append(time.perf_counter())
            last[0] = id(message)
            return data

        def timed_parse(message_type: Any, data: bytes) -> Any:
            self.parsed.append(time.perf_counter())
            return parse(message_type, data)

        self._patch(framing.Outgoing, "serialize", timed_serialize)
        self._patch(framing, "parse", timed_parse)

    def with_wire(self) -> dict[str, list[float]]:
        return {**self.durations, "sent": list(self.sent), "parsed": list(self.parsed)}


def _data(spec: dict[str, Any]) -> tuple[Any, Any]:
    from benchmarks.workloads import synthetic_mnist

    return synthetic_mnist(spec["samples"], spec["seed"])


def _optimizer(spec: dict[str, Any]) -> Any:
    from splitlearning.models import make_optimizer

    return make_optimizer(spec.get("optimizer", "adam"), spec.get("learning_rate", 1e-3))


def _with_options(factory: Callable[..., Any], extra: Callable[[], list[list[Any]]]) -> Callable[..., Any]:
    """`factory` (grpc.server, grpc.insecure_channel) with the gRPC options `extra()` gives at each call in place
    of its caller's own of the same names: how the benchmarks try settings that the product does not expose."""

    def build(*args: Any, **kwargs: Any) -> Any:
        added = [(k, v) for k, v in extra()]
        names = {name for name, _ in added}
        options = [(k, v) for k, v in kwargs.pop("options", None) or () if k not in names]
        return factory(*args, options=[*options, *added], **kwargs)

    return build


def _grpc_options(spec: dict[str, Any]) -> None:
    """Apply the spec's `server_options` / `channel_options` to every gRPC server / channel of this process."""
    import grpc

    if spec.get("server_options"):
        grpc.server = _with_options(grpc.server, lambda: spec["server_options"])
    if spec.get("channel_options"):
        grpc.insecure_channel = _with_options(grpc.insecure_channel, lambda: spec["channel_options"])


def uncut(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from splitlearning.devices import resolve_device
    from splitlearning.models import BUILTIN

    pair = BUILTIN[spec["model"]]
    x, y = _data(spec)
    ends: list[float] = []
    with tf.device(resolve_device(spec.get("device", "/CPU:0"))):
        model = keras.Sequential([pair.client(spec["seed"]), pair.server(spec["seed"])])
        model.compile(optimizer=_optimizer(spec), loss=pair.loss, metrics=["accuracy"], jit_compile=False)
        batch, warm = spec["batch_size"], spec["warmup_steps"] * spec["batch_size"]
        model.fit(x[:warm], y[:warm], batch_size=batch, epochs=1, verbose=0)
        stamp = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: ends.append(time.perf_counter()))
        started = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0, callbacks=[stamp])
        elapsed = time.perf_counter() - started
    return {
        "samples_per_s": steady_rate(ends, batch),
        "fit_samples_per_s": len(x) / elapsed,
        "seconds": elapsed,
        "median_step_s": statistics.median(b - a for a, b in itertools.pairwise(ends)),
    }


def steady_rate(ends: list[float], batch: int) -> float:
    """Samples/s from the end of the first timed step to the end of the last: no per-`fit` set-up in it."""
    return (len(ends) - 1) * batch / (ends[-1] - ends[0])


def server(spec: dict[str, Any]) -> dict[str, Any]:
    import server_part.servicer as servicer
    from server_part import SplitServer
    from server_part.session import Session
    from splitlearning import codec
    from splitlearning.models import BUILTIN

    _grpc_options(spec)
    timers = Timers()
    timers.wire()
    timers.wrap(codec, "encode", "encode")
    timers.wrap(codec, "decode", "decode")
    timers.wrap(servicer.SplitLearningServicer, "_train", "servicer")
    pair = BUILTIN[spec["model"]]
    split = SplitServer(
        pair.server(spec["seed"]),
        pair.loss,
        _optimizer(spec),
        ["accuracy"],
        max_batch_size=spec["batch_size"],
        wire_encodings=["raw", "float16", "bfloat16", "int8"],
        device=spec.get("device", "/CPU:0"),
        allow_approximations="all",  # only what a client asks for applies
    )
    timers.wrap(split.trainer, "train", "step")
    # Sessions are opened by the client's handshake: time every session's methods (the one this role serves).
    timers.wrap(Session, "train", "state")
    timers.wrap(split.trainer, "train_micro", "step")
    timers.wrap(Session, "train_micro", "state")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    port = split.start(spec["address"])
    Path(spec["port_file"]).write_text(f"{port}\n")
    stop.wait()
    split.stop(grace=1.0)
    starts = {key: [start for start, _ in spans] for key, spans in timers.spans.items()}
    return {"durations": timers.with_wire(), "starts": starts, "servicer": timers.spans["servicer"]}


def client(spec: dict[str, Any]) -> dict[str, Any]:
    _grpc_options(spec)
    return _split_client(spec, *_data(spec))


def _split_client(spec: dict[str, Any], x: Any, y: Any, floor: Any = None) -> dict[str, Any]:
    """One split run: warm-up steps, then the timed epoch. `floor` (a `compute_floor.ComputeFloor`): also time
    the compute floor in this process just before the warm-up and just after the timed epoch."""
    from client_part import SplitClient
    from splitlearning import codec
    from splitlearning.approximations import Approximations
    from splitlearning.models import BUILTIN

    pair = BUILTIN[spec["model"]]
    batch, warm = spec["batch_size"], spec["warmup_steps"] * spec["batch_size"]
    split = SplitClient(
        pair.client(spec["seed"]),
        _optimizer(spec),
        target=spec["target"],
        max_batch_size=batch,
        connect_timeout=120,
        rpc_timeout=600,
        wire_encoding=spec["encoding"],
        micro_batches=spec.get("micro_batches", 1),
        device=spec.get("device", "/CPU:0"),
        approximations=Approximations(**spec.get("approximations", {})),
    )
    timers = Timers()
    timers.wire()
    timers.wrap(codec, "encode", "encode", lambda payload, _: payload.nbytes)
    timers.wrap(codec, "decode", "decode", lambda _, args: len(args[1]))
    timers.wrap(split.trainer, "train", "step")
    timers.wrap(split._transport, "train", "exchange")
    timers.wrap(split._transport, "send", "send")
    timers.wrap(split._transport, "receive", "receive")
    # Before the warm-up (an idle minute between it and the timed steps would restart TCP's slow start and
    # cool the caches) and after the timed steps.
    floor_ms = [floor.measure(spec["floor_rounds"], warmup=3)] if floor is not None else []
    with split:
        split.fit(x[:warm], y[:warm], batch_size=batch, epochs=1, verbose=0)
        warm_steps = [end - start for start, end in timers.spans["step"]]  # a fresh connection's first steps
        timers.reset()
        started = time.perf_counter()
        split.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0)
        elapsed = time.perf_counter() - started
        if floor is not None:
            floor_ms.append(floor.measure(spec["floor_rounds"], warmup=3))
    timers.restore()
    steps, exchanges = timers.spans["step"], timers.spans["exchange"]
    if not exchanges:  # pipelined: the phases overlap, so only their sums per step are reported
        exchanges = [(s[0], s[0]) for s in steps]
    forward = [e[0] - s[0] for s, e in zip(steps, exchanges, strict=True)]
    backward = [s[1] - e[1] for s, e in zip(steps, exchanges, strict=True)]
    return {
        "samples_per_s": steady_rate([end for _, end in steps], batch),
        "fit_samples_per_s": len(x) / elapsed,
        "seconds": elapsed,
        "steps": len(steps),
        "window": [steps[0][0], steps[-1][1]],
        "warmup_step_s": warm_steps,
        "spans": {key: timers.spans[key] for key in ("exchange", "send", "receive")},
        "durations": {**timers.with_wire(), "forward": forward, "backward": backward},
        "floor_ms": floor_ms,
    }


def wan_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Several split runs in turn, one process (benchmarks/wan.py): each of `runs` (target, encoding,
    micro_batches, channel_options) with a client of its own, and the compute floor timed around each."""
    import grpc

    from benchmarks.compute_floor import ComputeFloor

    options: list[list[Any]] = []
    grpc.insecure_channel = _with_options(grpc.insecure_channel, lambda: options)
    x, y = _data(spec)
    floor = ComputeFloor(spec["model"], spec["batch_size"], spec.get("optimizer", "adam"))
    results = []
    for run in spec["runs"]:
        options[:] = run.get("channel_options", [])
        results.append(_split_client({**spec, **run}, x, y, floor))
    return {"runs": results}


def echo_server(spec: dict[str, Any]) -> dict[str, Any]:
    from concurrent import futures

    import grpc

    reply = bytes(spec["reply_bytes"])
    limit = max(spec["request_bytes"], spec["reply_bytes"]) + 64 * 1024

    def echo(requests: Any, context: Any) -> Any:
        for _ in requests:
            yield reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(spec["address"])
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(spec["port_file"]).write_text(f"{port}\n")
    stop.wait()
    server.stop(grace=0.5)
    return {}


def echo_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Round trips of a request-sized payload and a reply-sized answer on one stream, fed like the transport."""
    import queue

    import grpc

    limit = max(spec["request_bytes"], spec["reply_bytes"]) + 64 * 1024
    channel = grpc.insecure_channel(
        spec["target"], options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    )
    grpc.channel_ready_future(channel).result(timeout=120)
    call = channel.stream_stream(ECHO_METHOD)
    requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def feed() -> Any:
        while (item := requests.get()) is not None:
            yield item

    responses = call(iter(feed()))
    payload = bytes(spec["request_bytes"])
    times = []
    for index in range(spec["rounds"] + 10):
        started = time.perf_counter()
        requests.put(payload)
        next(responses)
        if index >= 10:
            times.append(time.perf_counter() - started)
    requests.put(None)
    channel.close()
    times.sort()
    return {"median_s": times[len(times) // 2], "mean_s": sum(times) / len(times)}


def accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """Digits (the real 8x8 images) with the digits-cnn pair, trained over loopback per wire encoding."""
    import tensorflow as tf

    from client_part import SplitClient
    from server_part import SplitServer
    from splitlearning import codec, data
    from splitlearning.models import BUILTIN

    tf.get_logger().setLevel("ERROR")  # each encoding's fresh client traces its own functions: expected here
    digits = data.digits(seed=0)
    pair = BUILTIN["digits-cnn"]
    results = {}
    timers = Timers()  # server and client share this process: it counts the IV, labels and gradient
    timers.wrap(codec, "encode", "encode", lambda payload, _: payload.nbytes)
    for name in spec["encodings"]:
        timers.reset()
        server_part = SplitServer(pair.server(0), pair.loss, _optimizer(spec), ["accuracy"], wire_encodings=[name])
        port = server_part.start("127.0.0.1:0")
        try:
            with SplitClient(pair.client(0), _optimizer(spec), f"127.0.0.1:{port}", wire_encoding=name) as split:
                split.fit(digits.x_train, digits.y_train, batch_size=64, epochs=spec["epochs"], verbose=0)
                steps, sent = split.step, sum(timers.durations["encode_bytes"])
                test = split.evaluate(digits.x_test, digits.y_test, batch_size=128)
        finally:
            server_part.stop(grace=1.0)
        results[name] = {"accuracy": test["accuracy"], "loss": test["loss"], "bytes_per_step": sent / max(steps, 1)}
    return results


def compute_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts' compiled steps in one process, no gRPC (benchmarks/compute_floor.py's `measure_parts`)."""
    from benchmarks.compute_floor import measure_parts

    return measure_parts(spec["model"], spec["batch_size"], spec["rounds"], spec.get("optimizer", "adam"))


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "uncut": uncut,
    "server": server,
    "client": client,
    "echo-server": echo_server,
    "echo-client": echo_client,
    "accuracy": accuracy,
    "compute-floor": compute_floor,
    "wan-client": wan_client,
}


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    devices.setup_process(spec.get("cpus"), spec.get("threads"))
    result = ROLES[role](spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
