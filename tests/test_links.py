"""The host's TCP hint (splitlearning/links.py): said once, where a long link would pay for BBR's pacing, by
every client channel and by the servers that answer steps; and the WAN benchmark's parsing and per-hop
arithmetic (benchmarks/wan.py, benchmarks/wanlink.py), which need no root. No timing is asserted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from benchmarks import wan, wanlink
from splitlearning import channels, links


@pytest.fixture(autouse=True)
def _fresh_hints() -> None:
    links._hinted.clear()


@pytest.fixture
def bbr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tcp_congestion_control"
    path.write_text("bbr\n")
    monkeypatch.setattr(links, "CONGESTION_CONTROL", path)
    return path


def test_bbr_towards_a_remote_peer_is_hinted_with_the_fix() -> None:
    hint = links.pacing_hint("10.0.0.2:50051", "bbr")
    assert hint is not None
    assert "cubic" in hint and "congctl" in hint and "docs/performance.md" in hint


@pytest.mark.parametrize(
    ("address", "congestion"),
    [("127.0.0.1:50051", "bbr"), ("localhost:1", "bbr"), ("[::1]:1", "bbr"), ("10.0.0.2:1", "cubic"), ("h:1", None)],
)
def test_no_hint_on_loopback_or_without_bbr(address: str, congestion: str | None) -> None:
    assert links.pacing_hint(address, congestion) is None


def test_the_congestion_control_is_read_from_the_file_or_none(tmp_path: Path) -> None:
    path = tmp_path / "cc"
    assert links.congestion_control(path) is None
    path.write_text("cubic\n")
    assert links.congestion_control(path) == "cubic"


def test_the_hint_is_logged_once_per_process(bbr: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="splitlearning.links"):
        hint = links.hint_once("10.0.0.2:50051", bbr)
        assert hint is not None
        assert links.hint_once("10.0.0.3:50051", bbr) is None
    assert [r.getMessage() for r in caplog.records] == [hint]


def test_opening_a_channel_to_a_remote_peer_gives_the_hint(bbr: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="splitlearning.links"):
        channels.open_channel("127.0.0.1:1", 1024, None).close()
        assert not caplog.records
        channels.open_channel("10.255.255.1:1", 1024, None).close()  # gRPC connects lazily: nothing is dialled
    assert len(caplog.records) == 1 and "bbr" in caplog.records[0].getMessage()


def test_a_split_server_gives_the_hint_for_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from server_part import server as server_module

    seen: list[str] = []
    monkeypatch.setattr(server_module.links, "hint_once", seen.append)
    split = server_module.SplitServer(_server_part(), "sparse_categorical_crossentropy", "sgd")
    split.start("127.0.0.1:0")
    split.stop(grace=0)
    assert seen == ["127.0.0.1:0"]


def _server_part() -> object:
    import keras

    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def test_wan_links_cases_and_grpc_option_sets_parse() -> None:
    parsed = wan.parse_links("20ms@100mbit,80ms@1gbit/cubic,loopback", "host,reno")
    assert [(link.name, link.rtt_ms, link.rate, link.congestion) for link in parsed] == [
        ("20ms@100mbit", 20.0, "100mbit", None),
        ("20ms@100mbit/reno", 20.0, "100mbit", "reno"),
        ("80ms@1gbit/cubic", 80.0, "1gbit", "cubic"),
        ("loopback", 0.0, "", None),
    ]
    assert [link.name for link in wan._in_turn(parsed, 1)] == [
        "20ms@100mbit/reno",
        "20ms@100mbit",
        "80ms@1gbit/cubic",
        "loopback",
    ]
    assert wan.parse_grpc([]) == {"default": []}
    assert wan.parse_grpc(["A:", "B:grpc.http2.lookahead_bytes=4194304;grpc.x=y"]) == {
        "A": [],
        "B": [["grpc.http2.lookahead_bytes", 4194304], ["grpc.x", "y"]],
    }
    with pytest.raises(SystemExit):
        wan.parse_links("20@100mbit")


def test_wanlink_rates_parse_and_the_bulk_rate_is_the_slope_past_the_ramp() -> None:
    assert wanlink.parse_rate("100mbit") == 100_000_000
    assert wanlink.parse_rate("1gbit") == 1_000_000_000
    assert wanlink.parse_rate("1.5gbit") == 1_500_000_000
    # 1 MB/s after a slow first quarter: the slope ignores the ramp.
    marks = [(0.0, 1000), (1.0, 250_000)] + [(1.0 + t / 10, 250_000 + 100_000 * t) for t in range(1, 8)]
    assert wanlink._rate(marks) == pytest.approx(8e6)


def test_hops_split_a_round_trip_between_the_two_processes_timestamps() -> None:
    # Two steps; every hop's length is known: 1, 10, 2, 5, 1, 10, 3 ms.
    def stamps(start: float) -> dict[str, float]:
        t = [start]
        for gap in (1, 10, 2, 5, 1, 10, 3):
            t.append(t[-1] + gap / 1e3)
        return dict(zip(("begin", "sent", "parsed", "servicer", "done", "reply", "got", "end"), t, strict=True))

    steps = [stamps(0.0), stamps(1.0)]
    result = {
        "spans": {"exchange": [(s["begin"], s["end"]) for s in steps], "send": [], "receive": []},
        "durations": {"sent": [s["sent"] for s in steps], "parsed": [s["got"] for s in steps]},
        "server": {
            "sent": [s["reply"] for s in steps],
            "parsed": [s["parsed"] for s in steps],
            "servicer_spans": [(s["servicer"], s["done"]) for s in steps],
        },
    }
    hops = wan.hops(result)
    expected = {"to_grpc": 1, "up": 10, "to_servicer": 2, "servicer": 5, "to_wire": 1, "down": 10, "to_step": 3}
    assert {key: round(hops[key], 6) for key in expected} == expected
    assert round(hops["round_trip"], 6) == 32
