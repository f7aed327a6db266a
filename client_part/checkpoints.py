"""The client's checkpoints: the first part's weights, its optimizer state, the step and the data position.

The data position is the step at which epoch 0 of the running `fit` began (`epoch0_step`): with the step it
gives the epoch and the batch, because the order of an epoch is a function of (seed, epoch) alone. The session
and this client's id are kept beside the checkpoints (`session.json`), so a restarted client rejoins its
session as the same client.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from splitlearning.checkpoint import StepCheckpoints
from splitlearning.files import read_json, write_json_atomic
from splitlearning.training.first_part import ClientTrainer


class ClientCheckpoints:
    """Saves `trainer` in `directory` every `every` steps (0: only when asked) and restores any kept step."""

    def __init__(
        self, directory: Path, trainer: ClientTrainer, every: int = 1, max_to_keep: int = 5, head: Any = None
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {every}")
        self.every = every
        self.directory = Path(directory)
        variables = {"model": trainer.model.variables, "optimizer": trainer.optimizer.variables}
        if head is not None:  # the U-shape's head (its model and optimizer) lives on the client too
            variables.update(head_model=head.model.variables, head_optimizer=head.optimizer.variables)
        self._store = StepCheckpoints(
            directory,
            variables,
            max_to_keep,
            extra=("epoch0_step",),
        )
        self._identity_file = Path(directory) / "session.json"

    def identity(self) -> tuple[str, str]:
        """(session id, client id) recorded here; the session is empty before the first handshake."""
        saved = read_json(self._identity_file) or {}
        client_id = str(saved.get("client_id") or uuid.uuid4().hex)
        session_id = str(saved.get("session_id") or "")
        if not saved.get("client_id"):
            self.record(session_id, client_id)
        return session_id, client_id

    def record(self, session_id: str, client_id: str) -> None:
        write_json_atomic(self._identity_file, {"session_id": session_id, "client_id": client_id})

    def steps(self) -> list[int]:
        return self._store.steps()

    def latest(self) -> int | None:
        return self._store.latest()

    def restore(self, step: int) -> int:
        """Restore the state after `step` steps; return the saved `epoch0_step`."""
        return self._store.restore(step)["epoch0_step"]

    def save(self, step: int, epoch0_step: int) -> None:
        self._store.save(step, epoch0_step=epoch0_step)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0
