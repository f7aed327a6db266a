"""`split-client` measures its link (round trip, throughput each way) with `Probe` calls: through a proxy that
delays every byte, the round trip it reports is at least the delay added; on loopback it is far below."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from client_part import link_probe, summary
from client_part.client import SplitClient
from client_part.telemetry import StepTotals
from server_part import SplitServer
from tests.conftest import build_bottom, build_top, make_loss

DELAY = 0.05  # seconds added each way


class DelayingProxy:
    """Forwards 127.0.0.1:`port` to `target`, holding every chunk `delay` seconds in each direction."""

    def __init__(self, target: int, delay: float) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.delay = target, delay
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                time.sleep(self.delay)  # a crude delay: each chunk waits (enough for a lower bound)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server_port() -> Iterator[int]:
    server = SplitServer(build_top(), make_loss(), "sgd", ["accuracy"], max_batch_size=64)
    yield server.start("127.0.0.1:0")
    server.stop(grace=1.0)


def test_the_round_trip_is_measured(server_port: int) -> None:
    with SplitClient(build_bottom(), "sgd", target=f"127.0.0.1:{server_port}", max_batch_size=64) as client:
        direct = client.measure_link(rounds=3)
    proxy = DelayingProxy(server_port, DELAY)
    try:
        with SplitClient(build_bottom(), "sgd", target=f"127.0.0.1:{proxy.port}", max_batch_size=64) as client:
            delayed = client.measure_link(rounds=3)
    finally:
        proxy.close()
    assert delayed.rtt_ms >= 2 * DELAY * 1e3 > direct.rtt_ms
    assert delayed.probe_bytes == direct.probe_bytes == 64 * 5 * 4  # capped by the batch limit's reply
    assert "round trip" in delayed.describe()


def test_throughput_from_transfer_time() -> None:
    times = {(0, 0): 0.010, (1000, 0): 0.018, (0, 1000): 0.0105}
    estimate = link_probe.measure(lambda up, down: times[(up, down)], 1000, rounds=3)
    assert estimate.rtt_ms == pytest.approx(10.0)
    assert estimate.up_mbit_s == pytest.approx(1000 * 8 / 0.008 / 1e6)
    assert estimate.down_mbit_s is None  # 0.5 ms of transfer: under a tenth of the round trip, not told


def test_the_summary_shows_the_link() -> None:
    link = link_probe.LinkEstimate(20.5, 94.0, None, 1 << 20).as_dict()
    result = summary.summarize(
        {"loss": [1.0]}, {}, StepTotals(steps=1, samples=4, seconds=1.0), [0], 1.0, 1, 1, 0, link
    )
    text = summary.table(result)
    assert "link round trip" in text and "20.50 ms" in text and "94 Mbit/s" in text
    assert result["link"]["up_mbit_s"] == 94.0
