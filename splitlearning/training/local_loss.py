"""The local auxiliary loss's head at the cut (Han et al., 2021, "Accelerating Federated Learning with Split
Learning on Locally Generated Losses"): pure math, no gRPC.

With a local loss the client trains its part on a small head of its own, fed the IV, against its own labels, and
never waits for dLoss/dIV from the server. `LocalHead` holds that head, its loss and its optimizer; the step that
uses it is `ClientTrainer`'s (splitlearning/training/first_part.py), one compiled call: forward, head, loss,
backward, and one update of the bottom and the head.

The head has an optimizer of its own: a fresh copy (same class, same hyperparameters) of the client's. For the
per-variable optimizers (SGD, momentum, Adam, RMSprop, ...) that is the same arithmetic as one optimizer built on
both variable lists; it keeps the bottom's optimizer (its variables, its step count, the settings the server
checks) exactly as the exact split has it, and lets the default head be built once the class count is known.
A global norm clip (`global_clipnorm`) is the exception: it is taken per part, not over both.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from splitlearning.contract import Spec


def default_head(iv: Spec, classes: int) -> keras.Model:
    """Flatten + Dense(`classes`): logits, for sparse categorical cross-entropy from logits."""
    if classes < 1:
        raise ValueError(f"the local loss's default head needs a positive number of classes, got {classes}")
    return keras.Sequential(
        [keras.Input(iv.shape, dtype=str(iv.dtype)), keras.layers.Flatten(), keras.layers.Dense(classes)],
        name="local_head",
    )


def default_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classes_of(labels: Any) -> int:
    """The class count the default head needs, from integer labels: their largest value + 1."""
    values = np.asarray(labels)
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            "the local loss's default head needs integer class labels to count the classes: give local_classes=..., "
            "or a head of your own (local_head=...)"
        )
    return int(values.max()) + 1


class LocalHead:
    """The head at the cut, its loss and its optimizer (a fresh copy of `optimizer`'s class and settings).

    `head` is a Keras model from the IV to the head's outputs, or a callable `head(iv_spec) -> model`; None builds
    `default_head(iv, classes)`. `loss` is any Keras loss (None: sparse categorical cross-entropy from logits)."""

    def __init__(self, head: Any, loss: Any, optimizer: keras.optimizers.Optimizer, iv: Spec, classes: int | None):
        if head is None:
            if classes is None:
                raise ValueError("the local loss's default head needs the number of classes")
            model = default_head(iv, classes)
        elif isinstance(head, keras.Model):
            model = head
        elif callable(head):
            model = head(iv)
        else:
            raise TypeError(f"local_head must be a keras.Model or a builder of one from the IV spec, got {head!r}")
        if not isinstance(model, keras.Model):
            raise TypeError(f"the local head's builder returned {type(model).__name__}, not a keras.Model")
        if not model.built:
            model.build((None, *iv.shape))
        self.model: keras.Model = model
        self.loss: keras.losses.Loss = keras.losses.get(loss) if loss is not None else default_loss()
        self.optimizer: keras.optimizers.Optimizer = type(optimizer).from_config(optimizer.get_config())
        self.optimizer.build(self.model.trainable_variables)
