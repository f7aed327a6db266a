"""Model pairs: the built-in ones for the bundled digits data, and loading the user's own.

A pair is two functions: `client(seed)` builds the first part (input -> cut), `server(seed)` the second
(cut -> outputs). `--model package.module:function` names a user's function returning one Keras part.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import keras

from splitlearning import top_k_layer  # noqa: F401 (registers TopK: a first part saved after top-k holds one)

ModelSource: TypeAlias = "keras.Model | Callable[[], keras.Model]"


def materialize(source: Any) -> Any:
    """The Keras model itself: `source` when it is one, else what calling it returns."""
    model = source if isinstance(source, keras.Model) else source()
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model (or a function returning one), got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class ModelPair:
    """The two parts of a built-in model, and what the server part trains with by default."""

    client: Callable[[int], Any]
    server: Callable[[int], Any]
    loss: Any
    metrics: tuple[str, ...] = ("accuracy",)
    # The U-shape (`--cut ushape`): the server's `middle` (cut -> second cut) and the client's `head`.
    middle: Callable[[int], Any] | None = None
    head: Callable[[int], Any] | None = None
    input_shape: tuple[int, ...] = ()  # one sample of what the first part takes


def _dense_top(cut: int, hidden: int, name: str, classes: int | None = 10) -> Callable[[int], Any]:
    """The second part of a built-in pair: the cut -> Dense(hidden, relu) -> Dense(classes) logits; a U-shape's
    middle stops after the hidden layer (`classes=None`)."""

    def build(seed: int) -> Any:
        keras.utils.set_random_seed(seed + 1)
        layers = [keras.Input((cut,), name="cut"), keras.layers.Dense(hidden, activation="relu")]
        if classes is not None:
            layers.append(keras.layers.Dense(classes))
        return keras.Sequential(layers, name=name)

    return build


def dense_bottom(features: int, width: int, hidden: int, seed: int, name: str = "bottom") -> Any:
    """A vertical party's built-in bottom: its columns -> Dense(hidden, relu) -> Dense(width, relu), the IV."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,), name="columns"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
        ],
        name=name,
    )


def dense_top(hidden: int, outputs: int, seed: int, name: str = "top") -> Any:
    """A label party's built-in top, without its input: it is given the fused vector's width when the feature
    parties have joined; Dense(hidden, relu) -> Dense(outputs) logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(outputs)], name=name)


def _digits_mlp_client(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8, 8, 1), name="image"), keras.layers.Flatten(), keras.layers.Dense(64, activation="relu")],
        name="digits_mlp_client",
    )


def _digits_cnn_client(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
        ],
        name="digits_cnn_client",
    )


def _digits_head(seed: int) -> Any:
    keras.utils.set_random_seed(seed + 2)
    return keras.Sequential([keras.Input((64,), name="cut2"), keras.layers.Dense(10)], name="digits_head")


def _mnist_cnn_client(seed: int) -> Any:
    """28x28x1 -> two convolutions with pooling -> an IV of 5*5*64 = 1,600 floats (6.4 KB) per sample."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
        ],
        name="mnist_cnn_client",
    )


def _mnist_wide_client(seed: int) -> Any:
    """28x28x1 -> one convolution, no pooling -> an IV of 28*28*16 = 12,544 floats (49 KB) per sample."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
        ],
        name="mnist_wide_client",
    )


_digits_mlp_server = _dense_top(64, 64, "digits_mlp_server")
_digits_cnn_server = _dense_top(512, 64, "digits_cnn_server")
_digits_middle = _dense_top(64, 64, "digits_middle", classes=None)
_digits_cnn_middle = _dense_top(512, 64, "digits_cnn_middle", classes=None)
_mnist_cnn_server = _dense_top(1600, 128, "mnist_cnn_server")
_mnist_wide_server = _dense_top(12544, 64, "mnist_wide_server")

_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

BUILTIN: dict[str, ModelPair] = {
    "digits-mlp": ModelPair(
        _digits_mlp_client,
        _digits_mlp_server,
        _LOGITS,
        middle=_digits_middle,
        head=_digits_head,
        input_shape=(8, 8, 1),
    ),
    "digits-cnn": ModelPair(
        _digits_cnn_client,
        _digits_cnn_server,
        _LOGITS,
        middle=_digits_cnn_middle,
        head=_digits_head,
        input_shape=(8, 8, 1),
    ),
    # 28x28x1 inputs (the layout of mnist.npz): the benchmark's workloads.
    "mnist-cnn": ModelPair(_mnist_cnn_client, _mnist_cnn_server, _LOGITS, input_shape=(28, 28, 1)),
    "mnist-wide": ModelPair(_mnist_wide_client, _mnist_wide_server, _LOGITS, input_shape=(28, 28, 1)),
}


def input_mismatch(model: Any, sample_shape: tuple[int, ...], spec: str, dataset: str) -> str | None:
    """None when `model` (a first part) takes samples of `sample_shape`; else one line naming both shapes and
    the built-in pairs that take the data (`spec`, `dataset`: the flags' values, for the message)."""
    expected = model.input_shape
    if not isinstance(expected, tuple) or any(isinstance(entry, (tuple, list)) for entry in expected):
        return None  # several inputs: Keras says which
    takes = tuple(expected[1:])
    sample = tuple(int(d) for d in sample_shape)
    if len(takes) == len(sample) and all(
        want is None or want == have for want, have in zip(takes, sample, strict=True)
    ):
        return None
    fits = [name for name, pair in BUILTIN.items() if pair.input_shape == sample]
    shown = "[" + ", ".join("any" if d is None else str(d) for d in takes) + "]"
    fix = (
        "use " + " or ".join(f"--model {name}" for name in fits) + " on both processes"
        if fits
        else "no built-in pair takes it: give both processes --model package.module:function parts that do"
    )
    return f"--dataset {dataset} has samples of shape {list(sample)}, but --model {spec} takes {shown}; {fix}"


def load_part(spec: str, side: str, seed: int) -> Callable[[], Any]:
    """A function building one part: a built-in pair's `side` ('client', 'server'; for the U-shape 'middle',
    'head'), `module:function`, or a `.keras` file (a trained part, as --save-model writes it: its weights, and
    the loss and metrics it was compiled with; the optimizer starts afresh, so continue a run exactly from
    checkpoints instead).

    A user's function is called with no arguments, or with `seed=` if it takes one. Its module is imported
    from the current folder first, then from the installed packages, as `python -m` does.
    """
    if spec.endswith(".keras"):
        return _keras_file(spec)
    if spec in BUILTIN:
        builtin = getattr(BUILTIN[spec], side)
        if builtin is None:
            raise ValueError(f"--model {spec!r} has no {side} part")
        return lambda: builtin(seed)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model: expected one of {sorted(BUILTIN)} or 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: {error} (looked in {os.getcwd()} and the installed packages)") from None
    if not callable(function):
        raise ValueError(f"--model {spec!r} is not callable")

    def build() -> Any:
        keras.utils.set_random_seed(seed)
        try:
            return function(seed=seed)
        except TypeError:
            return function()

    return build


def make_optimizer(name: str, learning_rate: float) -> Any:
    """The Keras optimizer `name` (sgd, adam, ...) at `learning_rate`; ValueError naming --optimizer if unknown."""
    try:
        return keras.optimizers.get({"class_name": name, "config": {"learning_rate": learning_rate}})
    except ValueError as error:
        raise ValueError(f"--optimizer {name!r}: {error}") from None


def _keras_file(spec: str) -> Callable[[], Any]:
    path = os.path.abspath(spec)
    if not os.path.isfile(path):
        raise ValueError(f"--model {spec}: no such file")

    def load() -> Any:
        try:
            return keras.saving.load_model(path)
        except (ValueError, OSError) as error:
            raise ValueError(f"--model {spec}: not a Keras model file: {error}") from None

    return load
