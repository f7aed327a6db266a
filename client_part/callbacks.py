"""Calling Keras callbacks from `SplitClient.fit`: in order, on the training thread, nothing more.

(`keras.callbacks.CallbackList` may dispatch batch hooks to a thread pool; the step's meter is read by
the hooks right after the step, so they run synchronously here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras


class Callbacks:
    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], model: keras.Model, params: dict[str, Any]):
        self._callbacks = list(callbacks)
        for callback in self._callbacks:
            callback.set_model(model)
            callback.set_params(params)

    def on_train_begin(self) -> None:
        for callback in self._callbacks:
            callback.on_train_begin()

    def on_epoch_begin(self, epoch: int) -> None:
        for callback in self._callbacks:
            callback.on_epoch_begin(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        for callback in self._callbacks:
            callback.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for callback in self._callbacks:
            callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        for callback in self._callbacks:
            callback.on_train_end(logs)
