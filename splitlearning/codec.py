"""Tensors on the wire: `dtype` + `shape` + raw little-endian bytes, never pickle.

`to_proto` / `write` / `from_proto` (and `encode` / `decode`, their halves for `framing`) are the only place
ndarrays meet `splitlearning.v1.Tensor`. Decoding does not copy the payload for the raw encoding: the ndarray
is a read-only view of the received bytes.

The training stream sends `encode`'s payloads through `framing` (no copy into protobuf at all); elsewhere
`write` fills a request's own `Tensor` field in place: building `TrainRequest(iv=tensor)` from a finished
message costs a copy of the payload and, with upb, about ten times as long as the copy.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import ml_dtypes
import numpy as np

from splitlearning.errors import InvalidRequest
from splitlearning.framing import Payload
from splitlearning.v1 import split_learning_pb2 as pb

DTypeCode: TypeAlias = pb.DType.ValueType
EncodingCode: TypeAlias = pb.Encoding.ValueType

_DTYPES: dict[DTypeCode, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_BY_NAME: dict[str, DTypeCode] = {dt.name: code for code, dt in _DTYPES.items()}
# Every message names dtypes as numpy does (float32, bfloat16, int64), never as the proto enum (DTYPE_FLOAT32).
_KNOWN_DTYPES = ", ".join(dt.name for dt in _DTYPES.values())
# Encodings are named as the --wire-encoding flags name them; unspecified is raw.
ENCODING_NAMES: dict[EncodingCode, str] = {
    pb.ENCODING_UNSPECIFIED: "raw",
    pb.ENCODING_RAW: "raw",
    pb.ENCODING_FLOAT16: "float16",
    pb.ENCODING_BFLOAT16: "bfloat16",
    pb.ENCODING_INT8: "int8",
    pb.ENCODING_SPARSE: "sparse",
}
_EXPECTED_ENCODINGS = ", ".join(dict.fromkeys(ENCODING_NAMES.values()))  # raw, float16, ..., sparse

# Wire encodings whose payload is a narrower float than the tensor's own dtype.
_NARROW_FLOATS: dict[EncodingCode, np.dtype] = {
    pb.ENCODING_FLOAT16: np.dtype("<f2"),
    pb.ENCODING_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
# numpy's own limit is 64; no model's cut has more than a handful.
MAX_DIMENSIONS = 32
_SPARSE_MAX_ENTRIES = 1 << 32  # the sparse encoding's indices are uint32
# A sparse tensor's dense size is not bounded by its message's: a receiver bounds it (`decode`'s `max_entries`),
# else by this (256 MiB of float32).
SPARSE_DEFAULT_MAX_ENTRIES = 1 << 26
_FLOAT_CODES = {pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16}


def dtype_to_proto(dtype: np.dtype | str | type) -> DTypeCode:
    """The `DType` enum value for a numpy (or TensorFlow-named) dtype."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _BY_NAME:
        raise InvalidRequest(f"dtype {name!r} cannot go on the wire; supported: {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def dtype_from_proto(code: DTypeCode) -> np.dtype:
    """The numpy dtype for a `DType` enum value."""
    if code not in _DTYPES:
        raise InvalidRequest(f"unknown or unspecified dtype {code}; expected one of {_KNOWN_DTYPES}")
    return _DTYPES[code]


def dtype_name(code: int) -> str:
    """numpy's name of a `DType` value ('float32'): the one vocabulary for dtypes in every message."""
    return _DTYPES[code].name if code in _DTYPES else f"unknown dtype {code}"  # type: ignore[index]


def to_proto(array: np.ndarray, encoding: EncodingCode = pb.ENCODING_RAW) -> pb.Tensor:
    """Encode an ndarray; `encoding` may narrow floating tensors (float16, bfloat16, int8 + scale)."""
    return write(array, pb.Tensor(), encoding)


def write(array: np.ndarray, message: pb.Tensor, encoding: EncodingCode = pb.ENCODING_RAW) -> pb.Tensor:
    """Encode an ndarray into `message` (an empty `Tensor`, e.g. `request.iv`) in place; return it."""
    payload = encode(array, encoding)
    message.MergeFrom(payload.header)
    message.content = payload.data.tobytes()
    return message


def encode(array: np.ndarray, encoding: EncodingCode = pb.ENCODING_RAW) -> Payload:
    """The header and the bytes of an ndarray's `Tensor`, for `framing.Outgoing`; raw bytes are a view of the
    array (no copy): the array must not change until the message is sent."""
    array = np.asarray(array)
    code = dtype_to_proto(array.dtype)
    header = pb.Tensor(dtype=code, shape=array.shape)
    if encoding in (pb.ENCODING_RAW, pb.ENCODING_UNSPECIFIED) or code not in _FLOAT_CODES:
        header.encoding = pb.ENCODING_RAW
        values = np.ascontiguousarray(array, dtype=_DTYPES[code])
    elif encoding in _NARROW_FLOATS:
        header.encoding = encoding
        values = np.ascontiguousarray(array, dtype=_NARROW_FLOATS[encoding])
    elif encoding == pb.ENCODING_INT8:
        header.encoding = encoding
        header.scale, values = _int8(array)
    elif encoding == pb.ENCODING_SPARSE:
        header.encoding = encoding
        values = _sparse(np.ascontiguousarray(array, dtype=_DTYPES[code]))
    else:
        raise InvalidRequest(f"unknown encoding {encoding}; expected one of {_EXPECTED_ENCODINGS}")
    return Payload(header, values.reshape(-1).view(np.uint8))


def _int8(array: np.ndarray) -> tuple[float, np.ndarray]:
    """Symmetric per-tensor quantisation: (scale, int8 values) with value ~= int8 * scale."""
    peak = max(float(array.max()), -float(array.min())) if array.size else 0.0
    if not math.isfinite(peak):  # quantising would turn NaN into 0 and hide the divergence from the receiver
        raise InvalidRequest("cannot encode NaN or Inf as int8: the values have diverged")
    if peak == 0:
        return 1.0, np.zeros(array.size, np.int8)
    scale = np.float32(peak / 127.0)
    # One scaled float32 copy, rounded in place; |value| <= peak makes every entry lie in [-127, 127].
    scaled = np.multiply(array, np.float32(127.0 / peak), dtype=np.float32)
    np.rint(scaled, out=scaled)
    return float(scale), scaled.astype("i1")


def _sparse(array: np.ndarray) -> np.ndarray:
    """The sparse layout's bytes: the uint32 flat indices of the non-zero entries, then their values."""
    flat = array.reshape(-1)
    if flat.size > _SPARSE_MAX_ENTRIES:
        raise InvalidRequest(f"a tensor of {flat.size} entries is too large for the sparse encoding's uint32 indices")
    where = np.flatnonzero(flat)
    indices = where.astype("<u4").view(np.uint8)
    return np.concatenate((indices, flat[where].view(np.uint8)))


def _from_sparse(content: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], field: str) -> np.ndarray:
    count = math.prod(shape)
    width = 4 + dtype.itemsize
    if len(content) % width:
        raise InvalidRequest(
            f"{field}: the sparse encoding sends {width} bytes per entry (a uint32 index and a {dtype.name}), got "
            f"{len(content)} bytes, which is no whole number of entries"
        )
    n = len(content) // width
    if n > count:
        raise InvalidRequest(f"{field}: {n} sparse entries for a shape {list(shape)} of {count} entries")
    indices = np.frombuffer(content, dtype="<u4", count=n).astype(np.int64)
    if n and (indices[-1] >= count or (n > 1 and not bool(np.all(np.diff(indices) > 0)))):
        raise InvalidRequest(
            f"{field}: the sparse indices must increase strictly and lie in [0, {count}) for shape {list(shape)}"
        )
    dense = np.zeros(count, dtype)
    dense[indices] = np.frombuffer(content, dtype=dtype, count=n, offset=4 * n)
    return dense.reshape(shape)


def from_proto(message: pb.Tensor, field: str = "tensor", max_entries: int | None = None) -> np.ndarray:
    """Decode a `Tensor`; a malformed one raises `InvalidRequest` naming `field`, expected vs. got."""
    return decode(message, message.content, field, max_entries)  # each read of a bytes field copies it: read it once


def decode(
    message: pb.Tensor, content: bytes | memoryview, field: str = "tensor", max_entries: int | None = None
) -> np.ndarray:
    """Decode a `Tensor` whose values are `content` (its own, or a view `framing.parse` left in the received
    buffer); for the raw encoding the ndarray is a read-only view of `content`. A sparse tensor of more than
    `max_entries` entries (default `SPARSE_DEFAULT_MAX_ENTRIES`) is refused before it is made dense."""
    dtype = _checked_dtype(message.dtype, field)
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidRequest(f"{field}: {len(shape)} dimensions, at most {MAX_DIMENSIONS} are supported")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    encoding = message.encoding or pb.ENCODING_RAW
    if encoding not in ENCODING_NAMES:
        raise InvalidRequest(f"{field}: unknown encoding {encoding}; expected one of {_EXPECTED_ENCODINGS}")
    if encoding == pb.ENCODING_SPARSE and message.dtype in _FLOAT_CODES:
        limit = SPARSE_DEFAULT_MAX_ENTRIES if max_entries is None else max_entries
        if count > limit:
            raise InvalidRequest(f"{field}: shape {list(shape)} has {count} entries, over the {limit} expected here")
        return _from_sparse(content, dtype, shape, field)
    if encoding == pb.ENCODING_RAW:
        wire = dtype
    elif encoding in _NARROW_FLOATS and message.dtype in _FLOAT_CODES:
        wire = _NARROW_FLOATS[encoding]
    elif encoding == pb.ENCODING_INT8 and message.dtype in _FLOAT_CODES:
        wire = np.dtype("i1")
    else:
        raise InvalidRequest(
            f"{field}: encoding {_encoding_name(encoding)} does not apply to dtype {dtype_name(message.dtype)}"
        )
    expected = count * wire.itemsize
    if len(content) != expected:
        raise InvalidRequest(
            f"{field}: shape {list(shape)} of {dtype_name(message.dtype)} encoded as {_encoding_name(encoding)} "
            f"needs {expected} bytes, got {len(content)}"
        )
    try:
        values = np.frombuffer(content, dtype=wire, count=count).reshape(shape)
    except ValueError as error:  # e.g. an empty tensor whose other dimensions overflow numpy's index range
        raise InvalidRequest(f"{field}: shape {list(shape)} cannot be represented: {error}") from None
    if encoding == pb.ENCODING_INT8:
        return (values.astype(dtype) * dtype.type(message.scale)).astype(dtype, copy=False)
    return values if wire == dtype else values.astype(dtype)


def _checked_dtype(code: DTypeCode, field: str) -> np.dtype:
    if code not in _DTYPES:
        raise InvalidRequest(f"{field}: unknown or unspecified dtype {code}; expected one of {_KNOWN_DTYPES}")
    return _DTYPES[code]


def _encoding_name(code: int) -> str:
    """The name of an `Encoding` value as flags and refusals write it ('int8'; see `encodings.name`)."""
    return ENCODING_NAMES.get(code, f"unknown encoding {code}")  # type: ignore[call-overload]
