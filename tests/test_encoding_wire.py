"""Wire encodings: the codec's error bounds, the handshake's choice, and their effect on training."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import pytest

from client_part import SplitClient
from client_part.cli import parse_args as client_args
from server_part import SplitServer
from server_part.cli import parse_args as server_args
from splitlearning import codec, data, encodings
from splitlearning.models import BUILTIN
from splitlearning.v1 import split_learning_pb2 as pb
from tests.conftest import StartServer, make_data

NARROW = ("float16", "bfloat16", "int8")


def sample(shape: tuple[int, ...] = (64, 40), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * 3).astype("float32")


@pytest.mark.parametrize(
    ("name", "itemsize", "rtol"), [("raw", 4, 0.0), ("float16", 2, 2.0**-11), ("bfloat16", 2, 2.0**-8)]
)
def test_float_encodings_round_trip_within_their_precision(name: str, itemsize: int, rtol: float) -> None:
    array = sample()
    message = codec.to_proto(array, encodings.parse(name))
    assert message.encoding == encodings.parse(name)
    assert len(message.content) == array.size * itemsize
    decoded = codec.from_proto(message)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    np.testing.assert_allclose(decoded, array, rtol=rtol, atol=0)
    if name != "raw":
        assert not np.array_equal(decoded, array)  # it really was narrowed


def test_int8_uses_one_byte_and_a_per_tensor_scale() -> None:
    array = sample()
    message = codec.to_proto(array, pb.ENCODING_INT8)
    assert len(message.content) == array.size
    peak = float(np.abs(array).max())
    assert message.scale == pytest.approx(peak / 127, rel=1e-6)
    decoded = codec.from_proto(message)
    assert np.abs(decoded - array).max() <= message.scale / 2 * (1 + 1e-5)
    assert float(np.abs(decoded).max()) == pytest.approx(peak, rel=1e-6)  # the peak is exact
    zeros = codec.from_proto(codec.to_proto(np.zeros((3, 4), "float32"), pb.ENCODING_INT8))
    np.testing.assert_array_equal(zeros, 0.0)


def test_narrow_encodings_leave_integer_tensors_raw() -> None:
    labels = np.arange(10, dtype="int64")
    for name in NARROW:
        message = codec.to_proto(labels, encodings.parse(name))
        assert message.encoding == pb.ENCODING_RAW
        np.testing.assert_array_equal(codec.from_proto(message), labels)


def test_negotiation_takes_the_clients_first_allowed_choice() -> None:
    f16, bf16, int8, raw = (encodings.parse(n) for n in ("float16", "bfloat16", "int8", "raw"))
    assert encodings.negotiate([f16, raw], {raw}) == raw
    assert encodings.negotiate([f16, raw], {raw, f16}) == f16
    assert encodings.negotiate([int8, bf16, raw], {raw, bf16, f16}) == bf16
    assert encodings.negotiate([], {raw, f16}) == raw
    assert encodings.negotiate([pb.ENCODING_UNSPECIFIED], {raw}) == raw
    assert encodings.parse_list("raw, float16,float16,int8") == (raw, f16, int8)
    with pytest.raises(ValueError, match="unknown wire encoding 'fp8'"):
        encodings.parse("fp8")


def test_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_args([]).wire_encodings == "raw"
    assert client_args([]).wire_encoding == "raw"
    monkeypatch.setenv("SPLIT_WIRE_ENCODINGS", "raw,bfloat16")
    monkeypatch.setenv("SPLIT_WIRE_ENCODING", "bfloat16")
    assert server_args([]).wire_encodings == "raw,bfloat16"
    assert client_args([]).wire_encoding == "bfloat16"
    with pytest.raises(SystemExit):
        client_args(["--wire-encoding", "fp8"])


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[tuple[int, int, int]]]]:
    """Every tensor decoded in this process (server and client alike): field -> (encoding, bytes, elements)."""
    record: dict[str, list[tuple[int, int, int]]] = {}
    decode = codec.decode

    def recording(
        message: pb.Tensor, content: bytes | memoryview, field: str = "tensor", max_entries: int | None = None
    ) -> np.ndarray:
        record.setdefault(field, []).append((message.encoding, len(content), int(np.prod(message.shape))))
        return decode(message, content, field, max_entries)

    monkeypatch.setattr(codec, "decode", recording)
    yield record


def train(split_pair: StartServer, allowed: tuple[str, ...], wanted: str) -> tuple[SplitClient, list[np.ndarray]]:
    split = split_pair("plain", 3, optimizer=keras.optimizers.SGD(0.1), wire_encodings=allowed)
    x, y = make_data(n=48)
    client = SplitClient(
        split.bottom, keras.optimizers.SGD(0.1), target=split.target, connect_timeout=10, wire_encoding=wanted
    )
    with client:
        client.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    # server.model settles the last step's update, which the server applies after its reply (top would race it)
    return client, [*split.bottom.get_weights(), *split.server.model.get_weights()]


def test_server_allows_only_raw_unless_it_opts_in(split_pair: StartServer, seen: dict[str, Any]) -> None:
    client, _ = train(split_pair, ("raw",), "float16")
    assert client.agreement.encoding == pb.ENCODING_RAW
    assert {e for e, _, _ in seen["iv"]} == {pb.ENCODING_RAW}
    assert {e for e, _, _ in seen["iv_gradient"]} == {pb.ENCODING_RAW}
    # The default server (no wire_encodings argument) is the same.
    assert SplitServer.__init__.__defaults__ is not None and ("raw",) in SplitServer.__init__.__defaults__


@pytest.mark.parametrize("name", NARROW)
def test_chosen_encoding_narrows_the_iv_and_the_gradient(
    split_pair: StartServer, seen: dict[str, Any], name: str
) -> None:
    _, exact = train(split_pair, ("raw",), "raw")
    seen.clear()
    client, narrowed = train(split_pair, ("raw", "float16", "bfloat16", "int8"), name)
    code = encodings.parse(name)
    assert client.agreement.encoding == code
    width = 1 if name == "int8" else 2
    for field in ("iv", "iv_gradient"):
        assert len(seen[field]) == 6  # three steps per epoch, two epochs
        for encoding, size, elements in seen[field]:
            assert encoding == code
            assert size == elements * width
    # Close to the exact run, but not equal: the narrowing really changed the numbers.
    for a, b in zip(narrowed, exact, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2)
    assert any(not np.array_equal(a, b) for a, b in zip(narrowed, exact, strict=True))


def digits_accuracy(name: str) -> float:
    pair = BUILTIN["digits-cnn"]
    digits = data.digits(seed=0)
    server = SplitServer(pair.server(0), pair.loss, keras.optimizers.Adam(3e-3), ["accuracy"], wire_encodings=[name])
    port = server.start("127.0.0.1:0")
    try:
        client = SplitClient(
            pair.client(0), keras.optimizers.Adam(3e-3), f"127.0.0.1:{port}", connect_timeout=10, wire_encoding=name
        )
        with client:
            client.fit(digits.x_train, digits.y_train, batch_size=64, epochs=4, seed=0, verbose=0)
            return client.evaluate(digits.x_test, digits.y_test, batch_size=128)["accuracy"]
    finally:
        server.stop(grace=1.0)


def test_narrow_encodings_keep_the_digits_accuracy() -> None:
    exact = digits_accuracy("raw")
    assert exact > 0.85  # the model does learn, so the comparison means something
    for name in NARROW:
        assert digits_accuracy(name) >= exact - 0.03, name
