"""The server's checkpoints: the second part's weights, its optimizer state and the session, every K steps.

The session id is kept beside the checkpoints (`session.json`), so a restarted server answers the session its
client already holds.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from server_part.middle_trainer import MiddleTrainer
from server_part.trainer import ServerTrainer
from splitlearning.checkpoint import StepCheckpoints, read_json, write_json_atomic

log = logging.getLogger(__name__)


class ServerCheckpoints:
    """Saves `trainer` in `directory` every `every` steps (0: only when asked) and restores any kept step."""

    def __init__(
        self, directory: Path, trainer: ServerTrainer | MiddleTrainer, every: int = 1, max_to_keep: int = 5
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {every}")
        self.every = every
        self._trainer = trainer
        self._store = StepCheckpoints(
            directory, {"model": trainer.model.variables, "optimizer": trainer.optimizer.variables}, max_to_keep
        )
        self._session_file = Path(directory) / "session.json"

    def session_id(self) -> str:
        """The session these checkpoints belong to (a new one is recorded on first use)."""
        saved = read_json(self._session_file)
        if saved and isinstance(saved.get("session_id"), str):
            return str(saved["session_id"])
        session_id = uuid.uuid4().hex
        write_json_atomic(self._session_file, {"session_id": session_id})
        return session_id

    def steps(self) -> list[int]:
        return self._store.steps()

    def latest(self) -> int | None:
        return self._store.latest()

    def restore(self, step: int) -> None:
        self._trainer.settle()  # a pending update must not land on the restored weights afterwards
        self._store.restore(step)

    def save(self, step: int) -> None:
        self._trainer.settle()  # the checkpoint of step N holds N's update
        self._store.save(step)

    def after_step(self, step: int) -> None:
        """Called with the number of steps applied so far; saves every `every` steps."""
        if self.every and step % self.every == 0:
            self.save(step)
