"""`framing`: the Train messages it writes are the protobuf encoding, and it reads any protobuf encoding as
protobuf does, leaving the tensors' bytes in the received buffer."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message

from splitlearning import codec, framing
from splitlearning.v1 import split_learning_pb2 as pb

IV = np.arange(24, dtype="float32").reshape(4, 6) / 7
LABELS = np.array([0, 2, 1, 1], dtype="int64")


def plain_request() -> pb.TrainRequest:
    return pb.TrainRequest(
        session_id="s1",
        step=300,
        reset_metrics=True,
        micro_batches=2,
        micro_batch=1,
        step_samples=8,
        iv=codec.to_proto(IV),
        labels=codec.to_proto(LABELS),
    )


def framed_request(encoding: codec.EncodingCode = pb.ENCODING_RAW) -> framing.Outgoing[pb.TrainRequest]:
    message = pb.TrainRequest(session_id="s1", step=300, reset_metrics=True, micro_batches=2, micro_batch=1)
    message.step_samples = 8
    return framing.Outgoing(message, {"iv": codec.encode(IV, encoding), "labels": codec.encode(LABELS)})


def test_outgoing_serializes_to_what_protobuf_reads_as_the_same_message() -> None:
    wire = framed_request().serialize()
    assert pb.TrainRequest.FromString(wire) == plain_request()
    assert framed_request().wire_size == len(wire) == plain_request().ByteSize()


@pytest.mark.parametrize("encoding", [pb.ENCODING_FLOAT16, pb.ENCODING_BFLOAT16, pb.ENCODING_INT8])
def test_narrow_encodings_match_the_message_codec_writes(encoding: codec.EncodingCode) -> None:
    expected = pb.TrainRequest(session_id="s1", step=300, reset_metrics=True, micro_batches=2, micro_batch=1)
    expected.step_samples = 8
    codec.write(IV, expected.iv, encoding)
    codec.write(LABELS, expected.labels)
    assert pb.TrainRequest.FromString(framed_request(encoding).serialize()) == expected


def test_raw_payload_is_the_array_itself_until_serialized() -> None:
    array = IV.copy()
    payload = codec.encode(array)
    assert np.shares_memory(payload.data, array)


def test_incoming_leaves_the_tensor_bytes_in_the_received_buffer() -> None:
    wire = plain_request().SerializeToString()
    frame = framing.parse(pb.TrainRequest, wire)
    expected = plain_request()
    for name in ("iv", "labels"):
        content = frame.content(name)
        assert isinstance(content, memoryview) and content.obj is wire  # a view, not a copy
        assert bytes(content) == getattr(expected, name).content
        getattr(expected, name).ClearField("content")
    assert frame.message == expected
    assert frame.wire_size == len(wire)
    np.testing.assert_array_equal(codec.decode(frame.message.iv, frame.content("iv"), "iv"), IV)
    np.testing.assert_array_equal(codec.decode(frame.message.labels, frame.content("labels"), "labels"), LABELS)


def _as_protobuf_reads_it(wire: bytes) -> pb.TrainRequest:
    frame = framing.parse(pb.TrainRequest, wire)
    message = pb.TrainRequest()
    message.CopyFrom(frame.message)
    for name, content in frame.payloads.items():
        getattr(message, name).content = bytes(content)
    return message


def _reversed(message: Message) -> bytes:
    """`message` serialized one field at a time, last field first (tensors' fields reversed too)."""
    parts = []
    for descriptor, value in reversed(message.ListFields()):
        single = type(message)()
        if descriptor.message_type is not None:
            parts.append(_wrap(descriptor.number, _reversed(value)))
            continue
        if descriptor.is_repeated:
            getattr(single, descriptor.name).extend(value)
        else:
            setattr(single, descriptor.name, value)
        parts.append(single.SerializeToString())
    return b"".join(parts)


def _wrap(number: int, body: bytes) -> bytes:
    """A length-delimited field, framed by hand."""
    key, length = (number << 3) | 2, len(body)
    out = bytearray([key])
    while length > 0x7F:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out) + body


TWO_CONTENTS = (
    pb.Tensor(content=b"abcd").SerializeToString() + pb.Tensor(content=b"wx", dtype=pb.DTYPE_INT8).SerializeToString()
)


@pytest.mark.parametrize(
    "wire",
    [
        _reversed(plain_request()),
        # A tensor field twice: protobuf merges them (shape appended, content replaced).
        plain_request().SerializeToString() + pb.TrainRequest(iv=codec.to_proto(IV[:2])).SerializeToString(),
        # Content twice inside one tensor: the last wins.
        pb.TrainRequest(step=1).SerializeToString() + _wrap(3, TWO_CONTENTS),
        # An unknown field (a newer peer's) and an empty tensor.
        plain_request().SerializeToString() + b"\xa0\x06\x01" + pb.TrainRequest(labels=pb.Tensor()).SerializeToString(),
        b"",
    ],
    ids=["reversed", "tensor-twice", "content-twice", "unknown-and-empty", "empty"],
)
def test_parse_reads_any_encoding_as_protobuf_does(wire: bytes) -> None:
    try:
        expected = pb.TrainRequest.FromString(wire)
    except DecodeError:
        with pytest.raises(DecodeError):
            framing.parse(pb.TrainRequest, wire)
        return
    assert _as_protobuf_reads_it(wire) == expected


@pytest.mark.parametrize("cut", [1, 5, 17, 40])
def test_truncated_messages_fail_as_protobuf_fails(cut: int) -> None:
    wire = plain_request().SerializeToString()[:-cut]
    with pytest.raises(DecodeError):
        pb.TrainRequest.FromString(wire)
    with pytest.raises(DecodeError):
        framing.parse(pb.TrainRequest, wire)


def test_responses_round_trip_with_metrics_and_outputs() -> None:
    reply = framing.Outgoing(
        pb.TrainResponse(step=7, metrics=[0.25, 0.5]),
        {"iv_gradient": codec.encode(IV), "outputs": codec.encode(IV[:2])},
    )
    frame = framing.parse(pb.TrainResponse, reply.serialize())
    assert frame.message.step == 7 and list(frame.message.metrics) == [0.25, 0.5]
    assert frame.has("outputs") and frame.has("iv_gradient")
    got = codec.decode(frame.message.outputs, frame.content("outputs"), "outputs")
    np.testing.assert_array_equal(got, IV[:2])


def test_a_tensor_given_twice_is_refused() -> None:
    message = pb.TrainRequest(iv=codec.to_proto(IV))
    with pytest.raises(ValueError, match="give each tensor once"):
        framing.Outgoing(message, {"iv": codec.encode(IV)}).serialize()
