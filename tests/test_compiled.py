"""Compiled steps: one trace per signature with the batch left open, and numpy handed over through DLPack."""

from __future__ import annotations

import logging

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from splitlearning.compiled import Compiled, aligned_empty, to_tensor
from splitlearning.training.loss_trainer import LossTrainer


@pytest.mark.parametrize(
    ("shape", "dtype"), [((3, 5), "float32"), ((7,), "int64"), ((2, 3, 1), "float16"), ((1,), "uint8")]
)
def test_aligned_empty_starts_on_a_64_byte_boundary(shape: tuple[int, ...], dtype: str) -> None:
    for _ in range(8):  # several allocations: the allocator's own offsets vary
        array = aligned_empty(shape, dtype)
        assert array.ctypes.data % 64 == 0
        assert array.shape == shape and array.dtype == np.dtype(dtype) and array.flags.c_contiguous


def test_the_tensor_holds_its_own_copy() -> None:
    array = aligned_empty((4, 6), "float32")  # aligned and writable: the case that could have been shared
    array[...] = np.arange(24, dtype="float32").reshape(4, 6)
    tensor = to_tensor(array)
    array[...] = -1.0  # what the caller does later does not reach the tensor
    assert tensor.dtype == tf.float32 and tensor.shape == (4, 6)
    np.testing.assert_array_equal(tensor.numpy(), np.arange(24, dtype="float32").reshape(4, 6))
    doubled = Compiled(lambda x: tf.nn.relu(x * 2.0))(array)  # and no kernel writes into the caller's array
    np.testing.assert_array_equal(doubled.numpy(), np.zeros((4, 6)))
    np.testing.assert_array_equal(array, np.full((4, 6), -1.0))


def test_a_view_of_received_bytes_is_copied_once_and_reads_the_same() -> None:
    values = np.random.default_rng(0).standard_normal((5, 3)).astype("float32")
    payload = b"x" + values.tobytes()  # one byte in: the tensor's data is unaligned, and bytes are read-only
    view = np.frombuffer(memoryview(payload)[1:], "float32").reshape(5, 3)
    assert not view.flags.writeable
    tensor = to_tensor(view)
    np.testing.assert_array_equal(tensor.numpy(), values)
    assert tensor.numpy().ctypes.data != view.ctypes.data


@pytest.mark.parametrize(
    "value",
    [
        np.array([True, False]),
        np.zeros((0, 3), "float32"),
        np.float32(2.5),
        np.arange(6, dtype="float32").reshape(2, 3)[:, ::2],  # not contiguous
        np.ones((2, 2), ml_dtypes.bfloat16),
        [[1.0, 2.0]],
    ],
    ids=["bool", "empty", "scalar", "strided", "bfloat16", "list"],
)
def test_anything_else_converts_as_tensorflow_does(value: object) -> None:
    tensor = to_tensor(value)
    expected = tf.convert_to_tensor(np.ascontiguousarray(value) if isinstance(value, np.ndarray) else value)
    assert tensor.dtype == expected.dtype
    np.testing.assert_array_equal(tensor.numpy(), expected.numpy())


def test_one_trace_serves_every_batch_size() -> None:
    weight = tf.Variable([[1.0], [2.0], [3.0]])
    step = Compiled(lambda x, y: tf.matmul(x, tf.cast(weight, x.dtype)) + tf.cast(y, x.dtype)[:, None])
    for batch in (4, 3, 7, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3)).astype("float32")
        y = np.arange(batch, dtype="int64")
        np.testing.assert_allclose(step(x, y).numpy(), x @ weight.numpy() + y[:, None], rtol=1e-6)
    assert step.function.experimental_get_tracing_count() == 1
    step(np.ones((2, 3), "float64"), np.ones(2, "int64"))  # another dtype: its own trace
    assert step.function.experimental_get_tracing_count() == 2


def test_a_fixed_signature_takes_another_dtype_as_tf_function_does() -> None:
    signature = [tf.TensorSpec([None, 2], tf.float32)]
    step = Compiled(lambda x: x * 2.0, input_signature=signature)
    plain = tf.function(lambda x: x * 2.0, input_signature=signature)
    for value in (np.ones((3, 2), "float32"), np.ones((1, 2), "int32"), [[1, 2]]):
        result = step(value)
        assert result.dtype == plain(value).dtype
        np.testing.assert_array_equal(result.numpy(), plain(value).numpy())
    assert step.function.experimental_get_tracing_count() == 1
    with pytest.raises(TypeError, match="Can not cast"):
        step(np.ones((3, 4), "float32"))  # a concrete function would not check the shape: tf.function does


def test_a_none_argument_goes_through_tf_function() -> None:
    step = Compiled(lambda x, extra: x * 2.0 if extra is None else x + extra)
    np.testing.assert_array_equal(step(np.ones((2, 2), "float32"), None).numpy(), np.full((2, 2), 2.0))
    np.testing.assert_array_equal(step(np.ones((2, 2), "float32"), np.ones((2, 2), "float32")).numpy(), 2.0)


def test_nested_inputs_go_through_tf_function() -> None:
    step = Compiled(lambda inputs: inputs["a"] + 2.0 * inputs["b"])
    value = {"a": np.ones((3, 2), "float32"), "b": np.full((3, 2), 5.0, "float32")}
    np.testing.assert_array_equal(step(value).numpy(), np.full((3, 2), 11.0))
    pair = Compiled(lambda inputs: inputs[0] - inputs[1])
    np.testing.assert_array_equal(pair([np.ones(2, "float32"), np.ones(2, "float32")]).numpy(), [0.0, 0.0])


def test_a_closed_batch_traces_whole_shapes() -> None:
    step = Compiled(lambda x: tf.reduce_sum(x, axis=0), open_batch=False)
    for rows in (3, 4, 3):
        np.testing.assert_array_equal(step(np.ones((rows, 2), "float32")).numpy(), [rows, rows])
    assert step.function.experimental_get_tracing_count() == 2


class _WithSpareWeight(keras.layers.Layer):
    """A layer with a weight its output never uses: that weight gets no gradient."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], 3), initializer="ones")
        self.spare = self.add_weight(shape=(2,), initializer="zeros")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs @ self.kernel


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_a_weight_without_gradient_is_left_alone_as_fit_leaves_it() -> None:
    inputs = keras.Input((5,))
    model = keras.Model(inputs, _WithSpareWeight()(inputs))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = LossTrainer(model, loss, keras.optimizers.SGD(0.1), [])
    iv = np.random.default_rng(0).random((4, 5)).astype("float32")
    kernel = model.layers[1].kernel.numpy()
    for _ in range(2):
        trainer.train(iv, np.array([0, 1, 2, 1]), reset_metrics=False)
    assert trainer.iterations == 2
    assert not np.allclose(model.layers[1].kernel.numpy(), kernel)
    np.testing.assert_array_equal(model.layers[1].spare.numpy(), np.zeros(2))


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_a_weight_without_gradient_is_left_alone_by_pipelined_steps_too() -> None:
    def trainer() -> tuple[LossTrainer, keras.Model]:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((5,))
        model = keras.Model(inputs, _WithSpareWeight()(inputs))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return LossTrainer(model, loss, keras.optimizers.Adam(0.1), []), model

    iv = np.random.default_rng(0).random((4, 5)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    whole, whole_model = trainer()
    parts, parts_model = trainer()
    for _ in range(2):
        whole.train(iv, labels, reset_metrics=False)
        parts.train_micro(iv[:2], labels[:2], 0.5, last=False, reset_metrics=False)
        parts.train_micro(iv[2:], labels[2:], 0.5, last=True, reset_metrics=False)
    assert parts.iterations == whole.iterations == 2
    for got, want in zip(parts_model.get_weights(), whole_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parts_model.layers[1].spare.numpy(), np.zeros(2))


def test_jit_compile_runs_the_update_once_through_xla() -> None:
    weight = tf.Variable(tf.ones(3))
    step = Compiled(lambda grad: weight.assign_sub(0.5 * grad), open_batch=False, jit_compile=True)
    step(np.full(3, 2.0, "float32"))  # lowering it for the XLA check runs nothing: one update, not two
    assert step.jit_compile
    np.testing.assert_array_equal(weight.numpy(), [0.0, 0.0, 0.0])


def test_jit_compile_falls_back_to_a_graph_where_xla_cannot_compile(caplog: pytest.LogCaptureFixture) -> None:
    weight = tf.Variable(tf.ones(3))

    def update(grad: tf.Tensor) -> None:
        doubled = tf.numpy_function(lambda g: 2 * g, [grad], tf.float32)  # no XLA kernel
        weight.assign_sub(tf.reshape(doubled, [3]))

    step = Compiled(update, open_batch=False, jit_compile=True)
    with caplog.at_level(logging.INFO, logger="splitlearning.compiled"):
        step(np.ones(3, "float32"))
        step(np.ones(3, "float32"))
    assert not step.jit_compile
    assert "XLA cannot compile it" in caplog.text
    np.testing.assert_array_equal(weight.numpy(), [-3.0, -3.0, -3.0])
