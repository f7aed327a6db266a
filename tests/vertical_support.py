"""Vertical split learning in one process: tiny seeded parties, the feature parties' side of a step, and the
uncut model of the same parties (tests/test_vertical_exactness.py).

The feature parties' step mirrors `splitlearning.training.first_part.ClientTrainer._train_step` line for line:
the forward under a tape, dLoss/dIV from the label party through `tf.numpy_function`, `tape.gradient(iv, weights,
output_gradients=g)`, `optimizer.apply` (each party its own optimizer), in one compiled call. It runs all k
parties in that one call because k `ClientTrainer` steps in one process cannot wait for each other: each
blocks a thread of TensorFlow's inter-op pool (as many threads as cores) inside its compiled call until its
gradient comes back, and the label party's step then has no thread left to run on. In a deployment each party
is its own process and holds its own pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from splitlearning.contract import Spec
from splitlearning.training.vertical import FuseTrainer

NUM_CLASSES = 3
FEATURES = (3, 2, 4)  # party i's own columns (at most three feature parties here)
IV_DIMS = (4, 3, 2)  # party i's IV width under concat (unequal, so a wrong slice cannot go unseen)
EQUAL_IV = 3  # every part's IV width under sum and mean
OWN_FEATURES = 2  # the label party's own columns

OPTIMIZERS: dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(learning_rate=0.01),
}


@dataclass(frozen=True)
class Case:
    """One vertical split: k feature parties, whether the label party has a bottom, the fuse, the optimizer."""

    parties: int
    own_bottom: bool
    fuse: str
    optimizer: str

    def iv_dim(self, index: int) -> int:
        """The IV width of feature party `index`, or of the label party's bottom (index -1)."""
        if self.fuse != "concat":
            return EQUAL_IV
        return 5 if index < 0 else IV_DIMS[index]

    @property
    def fused_dim(self) -> int:
        if self.fuse != "concat":
            return EQUAL_IV
        return sum(self.iv_dim(i) for i in range(-1 if self.own_bottom else 0, self.parties))

    def __str__(self) -> str:
        own = "+own" if self.own_bottom else ""
        return f"{self.parties}{own}-{self.fuse}-{self.optimizer}"


def build_bottom(inputs: int, outputs: int, seed: int, name: str) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(outputs, "tanh")],
        name=name,
    )


def build_top(inputs: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(NUM_CLASSES)],
        name="top",
    )


@dataclass
class Parties:
    """Every party's part, built from `seed` alone (two calls give equal weights)."""

    case: Case
    feature: list[keras.Model]
    top: keras.Model
    own: keras.Model | None

    @classmethod
    def build(cls, case: Case, seed: int) -> Parties:
        feature = [build_bottom(FEATURES[i], case.iv_dim(i), seed + 10 * i, f"party_{i}") for i in range(case.parties)]
        own = build_bottom(OWN_FEATURES, case.iv_dim(-1), seed + 100, "own_bottom") if case.own_bottom else None
        return cls(case, feature, build_top(case.fused_dim, seed + 200), own)


def make_table(case: Case, n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """The joined table split by party: each feature party's columns, the label party's own, the labels."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, FEATURES[i])).astype("float32") for i in range(case.parties)]
    own = rng.normal(size=(n, OWN_FEATURES)).astype("float32") if case.own_bottom else None
    return xs, own, rng.integers(0, NUM_CLASSES, size=n).astype("int64")


def uncut_model(parties: Parties, loss: keras.losses.Loss, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    """One functional model: an Input per party (the label party's own first), each bottom, the fuse, the top."""
    inputs = [keras.Input((FEATURES[i],), name=f"x_{i}") for i in range(parties.case.parties)]
    parts = [bottom(x) for bottom, x in zip(parties.feature, inputs, strict=True)]
    if parties.own is not None:
        own = keras.Input((OWN_FEATURES,), name="own")
        inputs.insert(0, own)
        parts.insert(0, parties.own(own))
    fuse = {"concat": keras.layers.Concatenate(), "sum": keras.layers.Add(), "mean": keras.layers.Average()}
    model = keras.Model(inputs, parties.top(fuse[parties.case.fuse](parts)))
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=False)
    return model


def uncut_inputs(xs: Sequence[np.ndarray], own: np.ndarray | None) -> list[np.ndarray]:
    return ([own] if own is not None else []) + list(xs)


@dataclass
class FeatureParties:
    """The k feature parties' side of each step, each with its own optimizer, exchanging with a FuseTrainer."""

    models: list[keras.Model]
    optimizers: list[keras.optimizers.Optimizer]
    label_party: FuseTrainer
    metrics: list[float] = field(default_factory=list)  # the label party's running metrics, last step
    _own_x: np.ndarray | None = None
    _labels: np.ndarray | None = None
    _reset: bool = False

    def __post_init__(self) -> None:
        for model, optimizer in zip(self.models, self.optimizers, strict=True):
            optimizer.build(model.trainable_variables)
        self._step = tf.function(self._train_step, reduce_retracing=True)
        self._forward = tf.function(lambda xs: [m(x, training=False) for m, x in zip(self.models, xs, strict=True)])

    def train(self, xs: Sequence[np.ndarray], labels: np.ndarray, own_x: np.ndarray | None, reset: bool) -> None:
        """One step of every party on one batch (the labels stay with the label party)."""
        self._own_x, self._reset, self._labels = own_x, reset, labels
        self._step([tf.constant(x) for x in xs])

    def forward(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each party's IV in inference mode (evaluate, predict)."""
        return [iv.numpy() for iv in self._forward([tf.constant(x) for x in xs])]

    def _exchange(self, *ivs: np.ndarray) -> list[np.ndarray]:
        assert self._labels is not None
        grads, self.metrics = self.label_party.train(list(ivs), self._labels, self._own_x, reset_metrics=self._reset)
        return grads

    def _train_step(self, xs: list[tf.Tensor]) -> None:
        tapes, ivs = [], []
        for model, x in zip(self.models, xs, strict=True):  # each party's forward under its own tape
            with tf.GradientTape() as tape:
                ivs.append(model(x, training=True))
            tapes.append(tape)
        grads_iv = tf.numpy_function(self._exchange, ivs, Tout=[iv.dtype for iv in ivs], stateful=True)
        for tape, model, optimizer, iv, grad in zip(tapes, self.models, self.optimizers, ivs, grads_iv, strict=True):
            weights = model.trainable_variables
            grads = tape.gradient(iv, weights, output_gradients=tf.ensure_shape(grad, iv.shape))
            optimizer.apply(grads, weights)


def spec(width: int) -> Spec:
    return Spec((width,), np.dtype("float32"))
