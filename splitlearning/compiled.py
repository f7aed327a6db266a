"""Calling compiled TensorFlow steps cheaply: concrete functions, and numpy handed over without TensorFlow's copy.

A `tf.function` call resolves its arguments' types against its traces on every call, and converts numpy
arguments through a slow path (about 0.2-0.4 ms per call at batch 128 on a CPU, measured in
docs/performance.md). `Compiled` traces once per input signature and then calls the concrete function with
tensors; `to_tensor` copies a numpy array once into a 64-byte-aligned buffer and hands that to TensorFlow
through DLPack, which takes it over instead of copying it again.

The batch dimension is left open in the signatures it traces (as `reduce_retracing=True` would after the
second shape), so the full batches and the smaller last one share one trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

# TensorFlow's CPU tensors must start on this boundary (Eigen's widest vectors); DLPack refuses less.
_ALIGNMENT = 64
_DLPACK_DTYPES = frozenset(
    np.dtype(d) for d in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8")
)


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def to_tensor(value: Any) -> tf.Tensor:
    """`value` as an eager tensor on the host, holding its own copy of the values.

    A numpy array of a plain numeric dtype is copied once, by numpy, into an aligned buffer that TensorFlow
    then takes over through DLPack (no second copy). The buffer is never the caller's, so nothing the caller
    does later can reach the tensor and no TensorFlow kernel can write into the caller's array. Anything else
    goes through `tf.convert_to_tensor`.
    """
    if isinstance(value, tf.Tensor):
        return value
    if not isinstance(value, np.ndarray) or value.ndim == 0 or value.size == 0 or value.dtype not in _DLPACK_DTYPES:
        return tf.convert_to_tensor(value)
    copy = aligned_empty(value.shape, value.dtype)
    np.copyto(copy, value)
    return tf.experimental.dlpack.from_dlpack(copy.__dlpack__())


_DIRECT = (tf.Tensor, np.ndarray, np.generic)  # what a concrete function is called with; the rest: tf.function


class Compiled:
    """`tf.function(fn)` called through its concrete functions: one per input signature (dtypes and shapes
    after the batch dimension, or whole shapes with `open_batch=False`), traced on first use. Arguments are
    tensors or numpy arrays and scalars (see `to_tensor`); with `input_signature` there is exactly one trace and
    arguments are converted to it. Any other argument (`None` for a variable with no gradient, a dict or list
    of a multi-input model's inputs) sends the call through `tf.function` itself, as before.

    `jit_compile=True` compiles the function with XLA, which fuses elementwise work into few kernels (an
    optimizer's update: one pass over each weight instead of one per operation). The function is first lowered
    without running it; if XLA cannot compile one of its operations (a `tf.numpy_function`, an op with no XLA
    kernel), it runs as a plain graph instead, with a log line saying so."""

    def __init__(
        self,
        fn: Callable[..., Any],
        input_signature: Sequence[tf.TensorSpec] | None = None,
        open_batch: bool = True,
        jit_compile: bool = False,
    ) -> None:
        self._fn = fn
        self.jit_compile = jit_compile
        self._unchecked = jit_compile  # XLA support is checked once, on the first call
        self.function = self._function(input_signature)
        self._signature = None if input_signature is None else list(input_signature)
        self._open_batch = open_batch
        self._concrete: dict[tuple[Any, ...], Any] = {}

    def _function(self, input_signature: Sequence[tf.TensorSpec] | None) -> Any:
        return tf.function(
            self._fn,
            input_signature=input_signature,
            reduce_retracing=input_signature is None,
            jit_compile=self.jit_compile,
        )

    def _check_xla(self, *args: Any) -> None:
        """Lower the function to XLA's HLO for these arguments, running nothing; where that fails, fall back to
        a plain graph for every later call."""
        self._unchecked = False
        try:
            self.function.experimental_get_compiler_ir(*args)(stage="hlo")
        except Exception as error:  # an op without an XLA kernel surfaces as ValueError, InvalidArgument, ...
            reason = str(error).strip().splitlines()[0][:300]
            log.info("%s runs as a plain graph: XLA cannot compile it (%s)", _name(self._fn), reason)
            self.jit_compile = False
            self.function = self._function(self.function.input_signature)

    def _spec(self, tensor: tf.Tensor) -> tf.TensorSpec:
        shape = tensor.shape
        if not self._open_batch or not shape.rank:
            return tf.TensorSpec(shape, tensor.dtype)
        return tf.TensorSpec([None, *shape[1:]], tensor.dtype)

    def __call__(self, *args: Any) -> Any:
        if not all(isinstance(a, _DIRECT) for a in args):
            if self._unchecked:
                self._check_xla(*args)
            return self.function(*args)
        tensors = [to_tensor(a) for a in args]
        if self._signature is not None:
            # A concrete function checks no shapes: anything off the signature gets tf.function's own
            # conversion or refusal.
            if len(tensors) != len(self._signature) or not all(
                s.dtype == t.dtype and s.shape.is_compatible_with(t.shape)
                for s, t in zip(self._signature, tensors, strict=False)
            ):
                return self.function(*args)
            key: tuple[Any, ...] = ()
        else:
            key = tuple((t.dtype, tuple(self._spec(t).shape)) for t in tensors)
        concrete = self._concrete.get(key)
        if concrete is None:
            specs = () if self._signature is not None else tuple(self._spec(t) for t in tensors)
            if self._unchecked:
                self._check_xla(*tensors)
            concrete = self._concrete[key] = self.function.get_concrete_function(*specs)
        return concrete(*tensors)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
