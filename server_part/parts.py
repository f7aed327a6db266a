"""A second part per session: the first session trains the model the server was given, each later one a copy.

Every session starts from the same point as a fresh server would: the copy is built from the model source (the
user's building function again, or `keras.models.clone_model` of a given model), then given the weights the
first part had before any training, with an optimizer and metrics of its own made from the same configuration.
No gRPC here.
"""

from __future__ import annotations

import threading
from typing import TypeAlias

import keras
import numpy as np

from server_part.middle_trainer import MiddleTrainer
from splitlearning.models import ModelSource
from splitlearning.training.loss_trainer import LossTrainer

Trainer: TypeAlias = LossTrainer | MiddleTrainer

# Trainers of ended sessions kept for later sessions (each holds a part, its optimizer and traced steps).
IDLE_TRAINERS = 4

# Building Keras models from several threads at once races on Keras's global name counters (and a user's
# building function may seed the global RNG): one build at a time.
_BUILD_LOCK = threading.Lock()


class PartFactory:
    """Makes the trainer of each new session from the server's model source.

    `first` is the trainer built from the user's own model object: the first session to be opened takes it
    (so that object holds that session's trained weights); every later session gets a copy with the initial
    weights of `first`, recorded here before any training.
    """

    def __init__(self, source: ModelSource, first: Trainer, device: str, keep_idle: int = IDLE_TRAINERS) -> None:
        self._source = source
        self._first: Trainer | None = first
        self._user = first  # the user's own model object's trainer: never handed to another session
        self._idle: list[Trainer] = []  # trainers of ended sessions, reset and ready for a new one
        self._keep_idle = keep_idle
        # A new copy's variables as built (weights, and random layers' seed states) and its optimizer's: what a
        # reused trainer is reset to, so it is indistinguishable from a new copy.
        self._fresh: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self._device = device
        self._initial = [np.array(w) for w in first.model.get_weights()]
        self._template = first.model
        self._lock = threading.Lock()

    @property
    def initial(self) -> list[np.ndarray]:
        """The part's weights before any training (what a new session starts from)."""
        return self._initial

    def take(self) -> Trainer:
        """The trainer for a session being opened: the user's model's the first time, after that a trainer an
        ended session gave back (reset to the initial weights and a fresh optimizer), else a new copy."""
        with self._lock:
            first, self._first = self._first, None
            idle = self._idle.pop() if first is None and self._idle else None
        if first is not None:
            return first
        if idle is not None:
            assert self._fresh is not None
            idle.reset(*self._fresh)
            return idle
        return self._copy()

    def give_back(self, trainer: Trainer) -> None:
        """A session ended: keep its trainer for a later session (building and tracing a new one costs a new
        session about half a second), unless it is the user's model's or broke (a failed update)."""
        if trainer is self._user or not trainer.reusable:
            return
        with self._lock:
            if len(self._idle) < self._keep_idle and all(trainer is not t for t in self._idle):
                self._idle.append(trainer)

    def _copy(self) -> Trainer:
        with _BUILD_LOCK:
            trainer = self._user.copy(self._build, self._device)
        if self._fresh is None:  # as built, before any step
            self._fresh = (
                [np.array(v.numpy()) for v in trainer.model.variables],
                [np.array(v.numpy()) for v in trainer.optimizer.variables],
            )
        return trainer

    def _build(self) -> keras.Model:
        """The model, as the source builds it, with the first part's initial weights (called on the device)."""
        model = _rebuild(self._source, self._template)
        model.set_weights(self._initial)
        return model


def _rebuild(source: ModelSource, template: keras.Model) -> keras.Model:
    if not isinstance(source, keras.Model) and callable(source):
        built = source()
        if isinstance(built, keras.Model) and built is not template:
            return built
    try:
        return keras.models.clone_model(template)
    except Exception as error:  # a subclassed model without get_config, say
        raise ValueError(
            f"cannot make this server's part for another session ({type(error).__name__}: {error}): give the "
            "server a function that builds the part, or a model that keras.models.clone_model can copy"
        ) from error
