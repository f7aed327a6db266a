"""`splitlearning.codec`: ndarrays <-> `splitlearning.v1.Tensor`, raw little-endian bytes, narrow encodings."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitlearning import codec, encodings
from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb

# numpy dtype, its wire code, and its explicit little-endian form.
DTYPES = [
    ("float32", pb.DTYPE_FLOAT32, "<f4"),
    ("float64", pb.DTYPE_FLOAT64, "<f8"),
    ("float16", pb.DTYPE_FLOAT16, "<f2"),
    (ml_dtypes.bfloat16, pb.DTYPE_BFLOAT16, ml_dtypes.bfloat16),
    ("int8", pb.DTYPE_INT8, "i1"),
    ("int16", pb.DTYPE_INT16, "<i2"),
    ("int32", pb.DTYPE_INT32, "<i4"),
    ("int64", pb.DTYPE_INT64, "<i8"),
    ("uint8", pb.DTYPE_UINT8, "u1"),
    ("bool", pb.DTYPE_BOOL, "?"),
]
DTYPE_IDS = [np.dtype(d).name for d, _, _ in DTYPES]
FLOATS = ["float32", "float64"]


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return (rng.normal(size=shape) * 10).astype(dtype)


def round_trip(array: Any, encoding: Any = pb.ENCODING_RAW) -> tuple[pb.Tensor, np.ndarray]:
    message = codec.to_proto(array, encoding)
    # Through the real wire format, not only the in-memory message.
    wire = pb.Tensor.FromString(message.SerializeToString())
    return wire, codec.from_proto(wire, "iv")


def assert_exact(decoded: np.ndarray, original: np.ndarray) -> None:
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    np.testing.assert_array_equal(decoded, original)


# -- raw round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "code", "little"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (7,), (1, 1)], ids=str)
def test_raw_round_trip(dtype: Any, code: Any, little: Any, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    message, decoded = round_trip(array)
    assert message.dtype == code
    assert list(message.shape) == list(shape)
    assert message.encoding == pb.ENCODING_RAW
    assert message.content == array.astype(little).tobytes()
    assert len(message.content) == array.size * np.dtype(dtype).itemsize
    assert_exact(decoded, array)


@pytest.mark.parametrize(("dtype", "code", "little"), DTYPES, ids=DTYPE_IDS)
def test_scalar_round_trip(dtype: Any, code: Any, little: Any) -> None:
    array = sample(dtype, ())
    assert array.ndim == 0
    message, decoded = round_trip(array)
    assert message.dtype == code
    assert list(message.shape) == []
    assert message.content == array.astype(little).tobytes()
    assert_exact(decoded, array)


def test_numpy_scalars_encode_as_0d() -> None:
    message, decoded = round_trip(np.float32(3.5))
    assert list(message.shape) == []
    assert decoded.shape == () and decoded.dtype == np.float32 and float(decoded) == 3.5


@pytest.mark.parametrize(("dtype", "code", "little"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)], ids=str)
def test_empty_round_trip(dtype: Any, code: Any, little: Any, shape: tuple[int, ...]) -> None:
    array = np.zeros(shape, dtype)
    message, decoded = round_trip(array)
    assert message.dtype == code
    assert list(message.shape) == list(shape)
    assert message.content == b""
    assert_exact(decoded, array)


@pytest.mark.parametrize("encoding", [pb.ENCODING_FLOAT16, pb.ENCODING_BFLOAT16, pb.ENCODING_INT8])
def test_empty_round_trip_narrow(encoding: Any) -> None:
    array = np.zeros((0, 5), "float32")
    message, decoded = round_trip(array, encoding)
    assert message.content == b""
    assert_exact(decoded, array)


@pytest.mark.parametrize(("dtype", "code", "little"), DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype: Any, code: Any, little: Any) -> None:
    base = sample(dtype, (6, 8))
    views = {
        "strided": base[:, ::2],
        "transposed": base.T,
        "reversed": base[::-1, ::-3],
        "fortran": np.asfortranarray(base),
        "column": base[:, 3],
    }
    for name, view in views.items():
        message, decoded = round_trip(view)
        assert message.content == np.ascontiguousarray(view).astype(little).tobytes(), name
        assert_exact(decoded, np.ascontiguousarray(view))


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([1.0], "float32"), b"\x00\x00\x80\x3f"),
        (np.array([1.0], "float64"), b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
        (np.array([1.0], "float16"), b"\x00\x3c"),
        (np.array([1.0], ml_dtypes.bfloat16), b"\x80\x3f"),
        (np.array([258], "int16"), b"\x02\x01"),
        (np.array([-2], "int32"), b"\xfe\xff\xff\xff"),
        (np.array([1], "int64"), b"\x01" + b"\x00" * 7),
        (np.array([True, False]), b"\x01\x00"),
    ],
    ids=lambda v: getattr(v, "dtype", None) and v.dtype.name,
)
def test_known_bytes_are_little_endian(array: np.ndarray, expected: bytes) -> None:
    """Spelled-out bytes, so the check does not depend on the host's byte order."""
    assert codec.to_proto(array).content == expected


@pytest.mark.parametrize("big", [">f4", ">f8", ">i2", ">i4", ">i8", ">f2"])
def test_big_endian_input_goes_on_the_wire_little_endian(big: str) -> None:
    array = np.arange(-3, 9).reshape(3, 4).astype(big)
    message, decoded = round_trip(array)
    little = "<" + big[1:]
    assert message.dtype == codec.dtype_to_proto(np.dtype(little))
    assert message.content == array.astype(little).tobytes()
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == np.dtype(little)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(d) for d in ("<f4", "<f8", "<f2", "i1", "<i2", "<i4", "<i8", "u1", "?")]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_raw_round_trip_property(array: np.ndarray) -> None:
    message, decoded = round_trip(array)
    assert message.content == array.tobytes()
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)  # NaN == NaN here


# -- narrow encodings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_float16_encoding(dtype: str) -> None:
    array = sample(dtype, (5, 7), seed=1)
    message, decoded = round_trip(array, pb.ENCODING_FLOAT16)
    assert message.encoding == pb.ENCODING_FLOAT16
    assert message.dtype == codec.dtype_to_proto(dtype)
    assert message.content == array.astype("<f2").tobytes()
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == array.shape
    np.testing.assert_allclose(decoded, array, rtol=2.0**-11, atol=0)
    assert not np.array_equal(decoded, array)  # it really was narrowed


@pytest.mark.parametrize("dtype", FLOATS)
def test_bfloat16_encoding(dtype: str) -> None:
    array = sample(dtype, (5, 7), seed=2)
    message, decoded = round_trip(array, pb.ENCODING_BFLOAT16)
    assert message.encoding == pb.ENCODING_BFLOAT16
    assert message.content == array.astype(ml_dtypes.bfloat16).tobytes()
    assert len(message.content) == array.size * 2
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == array.shape
    np.testing.assert_allclose(decoded, array, rtol=2.0**-8, atol=0)
    assert not np.allclose(decoded, array, rtol=2.0**-11, atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_encoding(dtype: str) -> None:
    array = sample(dtype, (5, 7), seed=3)
    peak = float(np.max(np.abs(array)))
    message, decoded = round_trip(array, pb.ENCODING_INT8)
    assert message.encoding == pb.ENCODING_INT8
    assert len(message.content) == array.size
    np.testing.assert_allclose(message.scale, peak / 127, rtol=1e-6)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == array.shape
    # Symmetric rounding to the nearest step: at most half a step off, the peak itself (almost) exact.
    np.testing.assert_allclose(decoded, array, rtol=0, atol=message.scale / 2 * (1 + 1e-5))
    index = np.unravel_index(np.argmax(np.abs(array)), array.shape)
    np.testing.assert_allclose(decoded[index], array[index], rtol=1e-6)
    quantised = np.frombuffer(message.content, "i1")
    assert quantised.min() >= -127 and quantised.max() <= 127


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_encoding_refuses_non_finite_values(bad: float) -> None:
    # Quantising would send NaN as 0 (and Inf as the peak), hiding a divergence from the receiver's checks.
    array = np.array([bad, 0.5, -1.0], "float32")
    with pytest.raises(InvalidRequest, match="NaN or Inf"):
        codec.to_proto(array, pb.ENCODING_INT8)


def test_int8_encoding_of_zeros() -> None:
    array = np.zeros((3, 4), "float32")
    message, decoded = round_trip(array, pb.ENCODING_INT8)
    assert message.content == bytes(12)
    assert math.isfinite(message.scale) and message.scale > 0
    assert_exact(decoded, array)


@pytest.mark.parametrize("narrow", ["float16", ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("encoding", [pb.ENCODING_FLOAT16, pb.ENCODING_BFLOAT16, pb.ENCODING_INT8])
def test_narrow_encoding_of_narrow_floats_keeps_dtype(narrow: Any, encoding: Any) -> None:
    array = sample(narrow, (4, 4), seed=4)
    _, decoded = round_trip(array, encoding)
    assert decoded.dtype == array.dtype
    peak = float(np.max(np.abs(array.astype("float32"))))
    np.testing.assert_allclose(decoded.astype("float32"), array.astype("float32"), rtol=2.0**-7, atol=peak / 127 * 3)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("encoding", [pb.ENCODING_FLOAT16, pb.ENCODING_BFLOAT16, pb.ENCODING_INT8])
def test_narrow_encodings_leave_integers_raw(dtype: str, encoding: Any) -> None:
    array = sample(dtype, (3, 5))
    message, decoded = round_trip(array, encoding)
    assert message.encoding == pb.ENCODING_RAW
    assert message.content == array.tobytes()
    assert_exact(decoded, array)


def test_unspecified_encoding_means_raw() -> None:
    array = sample("float32", (2, 3))
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], content=array.tobytes())
    assert message.encoding == pb.ENCODING_UNSPECIFIED
    assert_exact(codec.from_proto(message), array)
    assert codec.to_proto(array, pb.ENCODING_UNSPECIFIED).encoding == pb.ENCODING_RAW


# -- malformed messages ------------------------------------------------------------------------------------


def raises_invalid(message: pb.Tensor, *fragments: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        codec.from_proto(message, "iv")
    text = str(info.value)
    assert text.startswith("iv:"), text
    for fragment in fragments:
        assert fragment in text, text
    assert info.value.status == "INVALID_ARGUMENT"
    return text


@pytest.mark.parametrize("delta", [-1, +1, -24, +4])
def test_wrong_content_length(delta: int) -> None:
    good = codec.to_proto(sample("float32", (2, 3)))
    bad = pb.Tensor(dtype=good.dtype, shape=good.shape, content=good.content[: 24 + delta] + bytes(max(delta, 0)))
    raises_invalid(bad, "needs 24 bytes", f"got {24 + delta}")


def test_wrong_content_length_for_narrow_encoding() -> None:
    # float32 content sent while claiming float16 on the wire.
    bad = pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[2, 3], encoding=pb.ENCODING_FLOAT16, content=np.ones(6, "<f4").tobytes()
    )
    raises_invalid(bad, "needs 12 bytes", "got 24", "float32 encoded as float16")


def test_wrong_content_length_for_int8_encoding() -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], encoding=pb.ENCODING_INT8, scale=0.5, content=bytes(3))
    raises_invalid(bad, "needs 4 bytes", "got 3")


def test_huge_shape_is_refused_without_allocating() -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2**40, 2**40], content=bytes(8))
    raises_invalid(bad, f"needs {2**80 * 8} bytes", "got 8")


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-1, -1]])
def test_negative_dimension(shape: list[int]) -> None:
    raises_invalid(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, content=b""), "negative", str(shape))


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 11, 99])
def test_unspecified_or_unknown_dtype(code: Any) -> None:
    text = raises_invalid(pb.Tensor(dtype=code, shape=[1], content=bytes(4)), "dtype", str(code))
    assert "float32" in text  # names what is expected, in numpy's names as every refusal does
    assert "DTYPE_" not in text


def test_dtype_from_proto_names_the_dtypes() -> None:
    with pytest.raises(InvalidRequest) as info:
        codec.dtype_from_proto(77)  # type: ignore[arg-type]
    assert "float32" in str(info.value) and "bfloat16" in str(info.value), info.value


@pytest.mark.parametrize(
    "code", [pb.DTYPE_INT8, pb.DTYPE_INT16, pb.DTYPE_INT32, pb.DTYPE_INT64, pb.DTYPE_UINT8, pb.DTYPE_BOOL]
)
@pytest.mark.parametrize(
    ("encoding", "width"), [(pb.ENCODING_FLOAT16, 2), (pb.ENCODING_BFLOAT16, 2), (pb.ENCODING_INT8, 1)]
)
def test_narrow_encoding_of_an_integer_dtype(code: Any, encoding: Any, width: int) -> None:
    bad = pb.Tensor(dtype=code, shape=[3], encoding=encoding, content=bytes(3 * width), scale=1.0)
    text = raises_invalid(
        bad, "does not apply", f"encoding {encodings.name(encoding)} ", f"dtype {codec.dtype_from_proto(code).name}"
    )
    assert "DTYPE_" not in text and "ENCODING_" not in text


@pytest.mark.parametrize("encoding", [6, 42])
def test_unknown_encoding(encoding: Any) -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], encoding=encoding, content=bytes(12))
    raises_invalid(bad, f"unknown encoding {encoding}", "expected one of raw, float16, bfloat16, int8, sparse")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_sparse_is_lossless_and_lays_out_indices_then_values(dtype: str) -> None:
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(4, 5)).astype(dtype)
    dense[rng.random((4, 5)) < 0.6] = 0
    message = codec.to_proto(dense, pb.ENCODING_SPARSE)
    assert message.encoding == pb.ENCODING_SPARSE
    where = np.flatnonzero(dense)
    itemsize = np.dtype(dtype).itemsize
    assert len(message.content) == len(where) * (4 + itemsize)
    assert np.array_equal(np.frombuffer(message.content, "<u4", count=len(where)), where)
    back = codec.from_proto(message)
    assert back.dtype == dense.dtype and np.array_equal(back, dense)
    empty = codec.to_proto(np.zeros((2, 3), dtype), pb.ENCODING_SPARSE)
    assert empty.content == b"" and not codec.from_proto(empty).any()


def sparse_tensor(indices: list[int], values: list[float], shape: list[int]) -> pb.Tensor:
    content = np.array(indices, "<u4").tobytes() + np.array(values, "<f4").tobytes()
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, encoding=pb.ENCODING_SPARSE, content=content)


def test_malformed_sparse_tensors_are_refused() -> None:
    raises_invalid(sparse_tensor([1, 1], [1, 2], [3]), "increase strictly")
    raises_invalid(sparse_tensor([2, 1], [1, 2], [3]), "increase strictly")
    raises_invalid(sparse_tensor([0, 3], [1, 2], [3]), "lie in [0, 3)")
    raises_invalid(sparse_tensor([0, 1, 2, 0], [1, 2, 3, 4], [3]), "4 sparse entries for a shape [3]")
    ragged = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], encoding=pb.ENCODING_SPARSE, content=bytes(12))
    raises_invalid(ragged, "8 bytes per entry", "got 12 bytes")
    huge = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], encoding=pb.ENCODING_SPARSE, content=b"")
    raises_invalid(huge, "entries, over the")  # refused before a dense array is made
    with pytest.raises(InvalidRequest, match="over the 10 expected"):
        codec.from_proto(sparse_tensor([0], [1], [11]), "iv", max_entries=10)
    labels = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], encoding=pb.ENCODING_SPARSE, content=bytes(12))
    raises_invalid(labels, "does not apply to dtype int64")


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "uint32", "uint64", "object", "U3", "datetime64[s]"])
def test_unsupported_dtype_cannot_be_encoded(dtype: str) -> None:
    with pytest.raises(InvalidRequest, match="cannot go on the wire"):
        codec.to_proto(np.zeros(2, dtype))


def test_unknown_encoding_cannot_be_encoded() -> None:
    with pytest.raises(InvalidRequest, match="unknown encoding"):
        codec.to_proto(np.zeros(2, "float32"), 42)  # type: ignore[arg-type]


def test_dtype_helpers() -> None:
    for dtype, code, _ in DTYPES:
        assert codec.dtype_to_proto(np.dtype(dtype)) == code
        assert codec.dtype_from_proto(code) == np.dtype(dtype)
    assert codec.dtype_to_proto("float32") == pb.DTYPE_FLOAT32
    assert codec.dtype_to_proto(np.float64) == pb.DTYPE_FLOAT64
    with pytest.raises(InvalidRequest):
        codec.dtype_from_proto(pb.DTYPE_UNSPECIFIED)
    with pytest.raises(InvalidRequest):
        codec.dtype_to_proto("string")


@pytest.mark.parametrize(
    ("shape", "fragment"), [((1,) * 33, "33 dimensions, at most 32"), ((0, 2**62), "cannot be represented")]
)
def test_shapes_numpy_cannot_hold_are_refused(shape: tuple[int, ...], fragment: str) -> None:
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, content=b"" if 0 in shape else bytes(4))
    with pytest.raises(InvalidRequest, match=fragment):
        codec.from_proto(message, "iv")


@pytest.mark.parametrize("shape", [(3, 4), (0, 4)])
def test_int8_of_an_all_zero_or_empty_tensor_has_scale_one(shape: tuple[int, ...]) -> None:
    """docs/protocol.md, "int8, exactly": peak 0 gives scale 1.0 and every q 0."""
    message = codec.to_proto(np.zeros(shape, "float32"), pb.ENCODING_INT8)
    assert message.scale == 1.0
    assert np.frombuffer(message.content, "i1").tolist() == [0] * math.prod(shape)


def test_int8_is_the_documented_formula_exactly() -> None:
    """q = round_half_even(float32(x) * float32(127 / peak)), scale = float32(peak / 127): never -128."""
    peak = 2.0
    x = np.array([-2.0, 2.0, 1.0, -1.0, 0.0, 0.5 * 2 / 127, 1.5 * 2 / 127, -0.3], "float32")
    message = codec.to_proto(x, pb.ENCODING_INT8)
    expected = np.rint(x * np.float32(127 / peak)).astype("i1")  # numpy's rint rounds half to even
    np.testing.assert_array_equal(np.frombuffer(message.content, "i1"), expected)
    assert message.scale == np.float32(peak / 127)
    assert np.frombuffer(message.content, "i1").min() == -127
