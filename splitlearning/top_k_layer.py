"""Top-k as a Keras layer: the IV as a client that trained with `--top-k` sends it, inside a saved first part.

A client that trains with top-k sends each sample's largest IV entries only, at inference too, and the server's
part learned from such IVs. `TopK` applies the same rule as `splitlearning.top_k.sparsify` (the entries below the
row's k-th largest magnitude set to zero, ties with the k-th kept), so a first part saved with it appended
(`with_top_k`; what `split-client --save-model` writes after top-k training) gives what the split pipeline gave:
for `split-client --predict` with that file, and in the uncut model `split-join` makes of it. Both find the k-th
largest magnitude of the same float values, and compare against it, so they choose the same entries (for finite
values; TensorFlow flushes subnormal numbers to zero). The layer computes in the IV's own dtype, as `sparsify`
does for float32 and float64 (it widens float16 to float32: the same entries, another dtype).

The class is registered with Keras (`splitlearning>TopK`): loading a file that holds it needs this module
imported first, which `splitlearning.models` (every `--model FILE`) and `split-join` do.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from splitlearning.top_k import keep_count


@keras.saving.register_keras_serializable(package="splitlearning")
class TopK(keras.layers.Layer):
    """Keeps, in each sample's row, the entries of the k = ceil(`fraction` x entries) largest magnitudes (and any
    tied with the k-th); the rest become zero. No weights; the gradient flows to the kept entries."""

    def __init__(self, fraction: float, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)  # the IV's own dtype, as `sparsify` keeps a float64 IV float64
        super().__init__(**kwargs)
        if not 0 < fraction < 1:
            raise ValueError(f"top-k keeps a fraction in (0, 1) of each row's entries, got {fraction}")
        self.fraction = float(fraction)

    def call(self, inputs: Any) -> Any:
        dims = tuple(inputs.shape[1:])
        if any(dim is None for dim in dims):
            raise ValueError(f"top-k needs the IV's shape per sample, got {list(dims)}")
        width = math.prod(dims)
        rows = ops.reshape(inputs, (-1, width))
        magnitudes = ops.abs(rows)
        kth = ops.top_k(magnitudes, keep_count(self.fraction, width), sorted=True)[0][:, -1:]
        return ops.reshape(ops.where(magnitudes >= kth, rows, ops.zeros_like(rows)), ops.shape(inputs))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fraction": self.fraction}


def with_top_k(model: keras.Model, fraction: float) -> keras.Model:
    """`model` followed by `TopK(fraction)`: one model, the same layers and weights (not copies). A part that ends
    in that top-k already (loaded from such a file) is returned as it is."""
    last = model.layers[-1] if model.layers else None
    if isinstance(last, TopK) and last.fraction == float(fraction):
        return model
    if len(model.outputs) != 1:
        raise ValueError(f"top-k follows a part with one output (the IV), this one has {len(model.outputs)}")
    return keras.Model(model.inputs, TopK(fraction)(model.outputs[0]), name=f"{model.name}_top_k")
