"""`splitlearning.devices`: naming the device a part runs on, and CPU core lists."""

from __future__ import annotations

import pytest
import tensorflow as tf

from client_part import SplitClient
from server_part import SplitServer
from splitlearning.devices import describe_placement, parse_cpus, resolve_device
from tests.conftest import build_bottom, build_top, make_loss

CPU = "/device:CPU:0"


@pytest.mark.parametrize("name", ["/CPU:0", "CPU:0", "cpu:0", "/cpu:0", "/device:CPU:0", "CPU", " /CPU:0 "])
def test_resolve_cpu(name: str) -> None:
    assert resolve_device(name) == CPU


def test_resolved_name_is_usable_by_tensorflow() -> None:
    with tf.device(resolve_device("/CPU:0")):
        value = tf.constant([1.0, 2.0]) * 2
    assert value.device.endswith("CPU:0")


@pytest.mark.parametrize("name", ["/GPU:7", "gpu:7", "/CPU:5", "/TPU:0"])
def test_missing_device_names_the_available_ones(name: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    text = str(info.value)
    assert repr(name) in text
    assert "available" in text
    assert CPU in text
    for device in tf.config.list_logical_devices():
        assert device.name in text


def test_server_on_a_missing_device_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"'/GPU:3' does not exist.*available: .*CPU:0"):
        SplitServer(build_top(), make_loss(), device="/GPU:3")


def test_client_on_a_missing_device_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"'/GPU:3' does not exist.*available: .*CPU:0"):
        SplitClient(build_bottom(), device="/GPU:3", target="127.0.0.1:1")


def test_server_variables_live_on_its_device() -> None:
    server = SplitServer(build_top(), make_loss(), device="/CPU:0")
    assert server.device == CPU
    for variable in server.model.variables:
        assert "CPU:0" in variable.value.device
    assert "CPU:0" in describe_placement(v.value for v in server.model.variables)


def test_describe_placement_counts() -> None:
    class Var:
        def __init__(self, device: str) -> None:
            self.device = device

    text = describe_placement([Var("/cpu:0"), Var("/cpu:0"), Var("/gpu:0"), Var("")])
    assert text == "/cpu:0: 2 variables, /gpu:0: 1 variables, unplaced: 1 variables"
    assert describe_placement([]) == "no variables"


@pytest.mark.parametrize(
    ("spec", "cores"),
    [
        ("0", {0}),
        ("3", {3}),
        ("0,2", {0, 2}),
        ("0-3", {0, 1, 2, 3}),
        ("0-1,4", {0, 1, 4}),
        (" 0 - 1 , 4 ", {0, 1, 4}),
        ("2-2", {2}),
        ("1,1,0-1", {0, 1}),
        ("0,", {0}),
    ],
)
def test_parse_cpus(spec: str, cores: set[int]) -> None:
    assert parse_cpus(spec) == cores


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "no cores"),
        (",", "no cores"),
        ("a", "expected core numbers"),
        ("0-x", "expected core numbers"),
        ("-1", "expected core numbers"),
        ("1-2-3", "expected core numbers"),
        ("3-1", "bad core range '3-1'"),
    ],
)
def test_parse_cpus_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="--cpus") as info:
        parse_cpus(spec)
    assert fragment in str(info.value)
