"""What a trainer derives from its Keras model when it is set up: the label contract its loss implies, the
names of its metrics, a tensor's spec, and the variables whose placement it logs."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from splitlearning.contract import Spec

_SPARSE_LOSSES = {"sparse_categorical_crossentropy", "SparseCategoricalCrossentropy"}


def is_sparse(loss: Any) -> bool:
    """Whether `loss` takes integer class ids (a sparse categorical loss, by name or object)."""
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return name in _SPARSE_LOSSES


def label_spec(output: Any, loss: Any) -> Spec:
    """One sample's label for a model whose output is `output` (a symbolic tensor), trained with `loss`:
    sparse categorical losses take int64 class ids, other losses tensors shaped like the output."""
    if is_sparse(loss):
        return Spec(tuple(int(d) for d in output.shape[1:-1]), np.dtype("int64"))
    return Spec(tuple(int(d) for d in output.shape[1:]), np.dtype(output.dtype))


def sparse_classes(output: Any, loss: Any) -> int | None:
    """For sparse categorical losses the number of classes (labels lie in [0, it)); else None."""
    return int(output.shape[-1]) if is_sparse(loss) else None


def spec(tensor: Any, what: str) -> Spec:
    """One sample of a symbolic tensor, whose shape must be fully known after the batch (`what` names it)."""
    if any(d is None for d in tensor.shape[1:]):
        raise ValueError(f"the {what} shape must be fully known after the batch, got {tensor.shape}")
    return Spec(tuple(int(d) for d in tensor.shape[1:]), np.dtype(tensor.dtype))


def metric_names(model: keras.Model, inputs: Any, labels: np.ndarray) -> list[str]:
    """Run the compiled model's loss and metrics once on `inputs` / `labels` (zeros, say) so their names are
    known before the first request; the running values are reset after. `loss` comes first."""
    y_pred = model(inputs, training=False)
    model.compute_loss(x=inputs, y=labels, y_pred=y_pred, training=False)
    names = list(model.compute_metrics(inputs, labels, y_pred))
    model.reset_metrics()
    return sorted(names, key=lambda n: n != "loss")


def zeros(spec: Spec) -> np.ndarray:
    """A batch of one sample of zeros."""
    return np.zeros((1, *spec.shape), spec.dtype)


def tf_variables(*holders: Any) -> list[Any]:
    """The TensorFlow variables behind the Keras variables of models and optimizers."""
    return [getattr(v, "value", v) for h in holders for v in h.variables]
