"""The server's checkpoints: one folder per session, each with its part's weights and optimizer state every K steps.

`--checkpoint-dir DIR` holds `DIR/<session id>/`, so a restarted server finds every session that has
checkpoints again when a client names it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from server_part.middle_trainer import MiddleTrainer
from splitlearning.checkpoint import StepCheckpoints, latest_step
from splitlearning.training.loss_trainer import LossTrainer

log = logging.getLogger(__name__)


class ServerCheckpoints:
    """Saves `trainer` in `directory` every `every` steps (0: only when asked) and restores any kept step.

    With each step's part goes top-k's residual (what the server's error feedback left out of the gradients it
    sent, `splitlearning.top_k`), so a session resumed from a checkpoint sends what a session never stopped would.
    A checkpoint written before the residual was kept restores with none (`residual` None)."""

    def __init__(
        self, directory: Path, trainer: LossTrainer | MiddleTrainer, every: int = 1, max_to_keep: int = 5
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {every}")
        self.every = every
        self._trainer = trainer
        # Any shape (the batch's), of the gradient's dtype as error feedback keeps it; empty: none. Host memory:
        # numpy reads and writes it.
        self._dtype = np.result_type(trainer.contract.iv.dtype, np.float32)
        with tf.device("/CPU:0"):
            self._residual = tf.Variable(
                np.zeros((0,), self._dtype), shape=tf.TensorShape(None), trainable=False, name="top_k_residual"
            )
        self._store = StepCheckpoints(
            directory,
            {"model": trainer.model.variables, "optimizer": trainer.optimizer.variables},
            max_to_keep,
            optional={"top_k_residual": self._residual},
        )

    @property
    def residual(self) -> np.ndarray | None:
        """Top-k's residual as the checkpoint last saved or restored holds it (None: none)."""
        value = self._residual.numpy()
        return value if value.size else None

    def steps(self) -> list[int]:
        return self._store.steps()

    def latest(self) -> int | None:
        return self._store.latest()

    def restore(self, step: int) -> None:
        self._trainer.settle()  # a pending update must not land on the restored weights afterwards
        self._residual.assign(np.zeros((0,), self._dtype))  # what a checkpoint that lacks it restores
        self._store.restore(step)

    def save(self, step: int, residual: np.ndarray | None = None) -> None:
        self._trainer.settle()  # the checkpoint of step N holds N's update
        self._residual.assign(np.zeros((0,), self._dtype) if residual is None else residual.astype(self._dtype))
        self._store.save(step)

    def after_step(self, step: int, residual: np.ndarray | None = None) -> None:
        """Called with the number of steps applied so far (and top-k's residual then); saves every `every` steps."""
        if self.every and step % self.every == 0:
            self.save(step, residual)


class SessionStore:
    """The sessions' checkpoint folders under `root`, one per session, named by its id (ids are checked by the
    registry before they reach a path)."""

    def __init__(self, root: Path, every: int = 100, max_to_keep: int = 5) -> None:
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {every}")
        self.root = Path(root)
        self.every = every
        self.max_to_keep = max_to_keep
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / "session.json").is_file():
            log.warning(
                "%s holds one session's checkpoints in the layout of earlier versions (no folder per session): "
                "they are not read; move them into a folder named by the session id to resume that session",
                self.root,
            )

    def holds(self, session_id: str) -> bool:
        """Whether `session_id` has checkpoints here (a session to resume)."""
        return (self.root / session_id / "checkpoint").is_file()

    def latest(self, session_id: str) -> int | None:
        """The step of `session_id`'s latest checkpoint here (its final step, once it left memory)."""
        return latest_step(self.root / session_id) if self.holds(session_id) else None

    def open(self, session_id: str, trainer: LossTrainer | MiddleTrainer) -> ServerCheckpoints:
        return ServerCheckpoints(self.root / session_id, trainer, self.every, self.max_to_keep)

    def sessions(self) -> list[str]:
        """The ids of the sessions held here."""
        return sorted(path.parent.name for path in self.root.glob("*/checkpoint"))
