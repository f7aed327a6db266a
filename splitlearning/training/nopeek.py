"""NoPeek (Vepakomma et al., 2020): the distance correlation between a batch's raw inputs and its IV, in
TensorFlow, so the first part can add `alpha` times it to its loss and learn an IV that says less about its input
(docs/security.md, "Defences"). The same statistic as `splitlearning.leakage.distance_correlation` (numpy)."""

from __future__ import annotations

import tensorflow as tf

# Squared distances below this are taken as this: the square root's gradient stays finite at 0.
_FLOOR = 1e-12


def distance_correlation(x: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """The sample distance correlation of the rows of `x` and `z` (each flattened per example), differentiable."""
    a = _centered(x)
    b = _centered(z)
    dcov = tf.reduce_mean(a * b)
    dvar = tf.sqrt(tf.reduce_mean(a * a) * tf.reduce_mean(b * b))
    return tf.sqrt(tf.maximum(dcov, 0.0) / tf.maximum(dvar, _FLOOR))


def _centered(values: tf.Tensor) -> tf.Tensor:
    rows = tf.reshape(tf.cast(values, tf.float32), [tf.shape(values)[0], -1])
    squares = tf.reduce_sum(rows * rows, axis=1)
    squared = squares[:, None] + squares[None, :] - 2.0 * tf.matmul(rows, rows, transpose_b=True)
    off_diagonal = 1.0 - tf.eye(tf.shape(rows)[0])  # a row's distance to itself is 0 exactly
    distances = tf.sqrt(tf.maximum(squared * off_diagonal, _FLOOR)) * off_diagonal
    return (
        distances
        - tf.reduce_mean(distances, axis=0, keepdims=True)
        - tf.reduce_mean(distances, axis=1, keepdims=True)
        + tf.reduce_mean(distances)
    )
