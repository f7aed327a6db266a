"""Micro-benchmark: bare gRPC round trips of one payload (no protobuf, no TensorFlow), for each way this
project could drive them: a synchronous or an asyncio (`grpc.aio`) server, and on the client a synchronous
stream fed from a queue with replies read by a thread (as `client_part.transport` does) or on the calling
thread, a synchronous unary call, an asyncio stream or an asyncio unary call driven from a plain thread.
Prints the median round trip of each, per server, `--repeats` times alternating.

    PYTHONPATH=. python benchmarks/transport_micro.py [--bytes 102400] [--rounds 600] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE, WARM_UP = "bench.Transport", 20


def _options(size: int) -> list[tuple[str, int]]:
    limit = size + 64 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def _handlers(reply: bytes, asynchronous: bool) -> grpc.GenericRpcHandler:
    if asynchronous:

        async def stream_async(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for _ in requests:
                yield reply

        async def unary_async(request: bytes, context: Any) -> bytes:
            return reply

        stream: Callable[..., Any] = stream_async
        unary: Callable[..., Any] = unary_async
    else:

        def stream_sync(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            for _ in requests:
                yield reply

        def unary_sync(request: bytes, context: Any) -> bytes:
            return reply

        stream, unary = stream_sync, unary_sync
    methods = {
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def serve(kind: str, size: int, port_file: Path) -> None:
    """Run until killed: `kind` is "sync" or "aio"; the bound port is written to `port_file`."""
    reply = bytes(size)
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_options(size))
        server.add_generic_rpc_handlers((_handlers(reply, asynchronous=False),))
        port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server(options=_options(size))
        server.add_generic_rpc_handlers((_handlers(reply, asynchronous=True),))
        port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _median_ms(seconds: list[float]) -> float:
    timed = sorted(seconds[WARM_UP:])
    return timed[len(timed) // 2] * 1000


def _sync_stream(target: str, size: int, rounds: int, reader_thread: bool) -> float:
    channel = grpc.insecure_channel(target, options=_options(size))
    requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def feed() -> Iterator[bytes]:
        while (item := requests.get()) is not None:
            yield item

    call = channel.stream_stream(f"/{SERVICE}/Stream")(feed())
    replies: queue.SimpleQueue[object] = queue.SimpleQueue()

    def read() -> None:
        try:
            for reply in call:
                replies.put(reply)
        except grpc.RpcError:
            pass  # cancelled at the end

    if reader_thread:
        threading.Thread(target=read, daemon=True).start()
    receive: Callable[[], object] = replies.get if reader_thread else lambda: next(call)
    payload, seconds = bytes(size), []
    for _ in range(rounds + WARM_UP):
        started = time.perf_counter()
        requests.put(payload)
        receive()
        seconds.append(time.perf_counter() - started)
    requests.put(None)
    call.cancel()
    channel.close()
    return _median_ms(seconds)


def _sync_unary(target: str, size: int, rounds: int) -> float:
    channel = grpc.insecure_channel(target, options=_options(size))
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    payload, seconds = bytes(size), []
    for _ in range(rounds + WARM_UP):
        started = time.perf_counter()
        call(payload, timeout=30)
        seconds.append(time.perf_counter() - started)
    channel.close()
    return _median_ms(seconds)


_LOOP = asyncio.new_event_loop()  # one for every asyncio client: grpc.aio's poller stays bound to the first


def _aio(target: str, size: int, rounds: int, stream: bool) -> float:
    """Each round trip is `run_until_complete` on the loop from a plain thread (as a compiled step's
    `numpy_function` would have to drive it)."""
    payload, seconds = bytes(size), []

    async def open_() -> tuple[grpc.aio.Channel, Any]:
        channel = grpc.aio.insecure_channel(target, options=_options(size))
        if stream:
            return channel, channel.stream_stream(f"/{SERVICE}/Stream")()
        return channel, channel.unary_unary(f"/{SERVICE}/Unary")

    async def round_trip(call: Any) -> object:
        if not stream:
            return await call(payload, timeout=30)
        await call.write(payload)
        return await call.read()

    async def close(channel: grpc.aio.Channel, call: Any) -> None:
        if stream:
            await call.done_writing()
            await call.code()
        await channel.close()

    def work() -> None:
        channel, call = _LOOP.run_until_complete(open_())
        for _ in range(rounds + WARM_UP):
            started = time.perf_counter()
            _LOOP.run_until_complete(round_trip(call))
            seconds.append(time.perf_counter() - started)
        _LOOP.run_until_complete(close(channel, call))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return _median_ms(seconds)


CLIENTS: dict[str, Callable[[str, int, int], float]] = {
    "sync stream, reader thread": lambda t, s, r: _sync_stream(t, s, r, reader_thread=True),
    "sync stream, calling thread": lambda t, s, r: _sync_stream(t, s, r, reader_thread=False),
    "sync unary": _sync_unary,
    "aio stream": lambda t, s, r: _aio(t, s, r, stream=True),
    "aio unary": lambda t, s, r: _aio(t, s, r, stream=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=102_400, help="payload each way (cnn at batch 16: 102,400)")
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serve", choices=["sync", "aio"], help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.bytes, args.port_file)
        return
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("sync", "aio"):
            port_file = Path(folder) / kind
            command = [sys.executable, __file__, "--serve", kind, "--bytes", str(args.bytes), "--port-file"]
            server = subprocess.Popen([*command, str(port_file)])
            try:
                while not (port_file.exists() and port_file.read_text()):
                    time.sleep(0.05)
                target = f"127.0.0.1:{port_file.read_text()}"
                for _ in range(args.repeats):
                    for name, client in CLIENTS.items():
                        results.setdefault((kind, name), []).append(client(target, args.bytes, args.rounds))
            finally:
                server.kill()
                server.wait()
    print(f"round trip of {args.bytes:,} bytes each way, median of {args.rounds} (ms), {args.repeats} runs each")
    print("| server | client | ms |\n| --- | --- | --- |")
    for (kind, name), values in results.items():
        print(f"| {kind} | {name} | {' / '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
