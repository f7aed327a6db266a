"""Step-indexed checkpoints for either part: `tf.train.CheckpointManager` files named `ckpt-<step>`.

A checkpoint holds the state *after* `step` training steps. Saving is atomic where it matters: the manager
writes the data and index files first and only then rewrites the `checkpoint` list (an atomic rename), and
only checkpoints on that list are ever read, so a half-written one is never restored. A listed checkpoint is
never overwritten: saving a step that is already listed is a no-op (the state is the same), and restoring an
older step first unlists, then deletes, the later ones (a branch of history that is being redone).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
from google.protobuf import text_format

from splitlearning.files import write_text_atomic

log = logging.getLogger(__name__)

_NAME = "ckpt"
_STEP = re.compile(rf"{_NAME}-(\d+)$")


def latest_step(directory: Path) -> int | None:
    """The step of the latest checkpoint listed in `directory` (by `StepCheckpoints`), None if it lists none."""
    state = tf.train.get_checkpoint_state(str(directory))
    found = _STEP.search(state.model_checkpoint_path) if state is not None else None
    return int(found.group(1)) if found else None


class StepCheckpoints:
    """The last `max_to_keep` checkpoints of `variables` in `directory`, indexed by step.

    `variables` maps a name to a list of Keras or TensorFlow variables (for example the model's and the
    optimizer's); `extra` names int64 scalars saved with them (the data position, for instance). `optional` maps a
    name to a variable saved with every checkpoint that a checkpoint may lack (one written before it existed):
    restoring such a checkpoint leaves that variable as it is, and `restore` says which were absent.
    """

    def __init__(
        self,
        directory: Path,
        variables: Mapping[str, Sequence[Any]],
        max_to_keep: int = 5,
        extra: Sequence[str] = (),
        optional: Mapping[str, tf.Variable] | None = None,
    ) -> None:
        if max_to_keep < 2:
            raise ValueError("keep at least 2 checkpoints: resuming may need the one before the latest")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.extra = {name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name) for name in extra}
        tracked = {name: [getattr(v, "value", v) for v in vs] for name, vs in variables.items()}
        self._tracked = {"step": self.step, **tracked, **self.extra}
        self._optional = dict(optional or {})
        self._checkpoint = tf.train.Checkpoint(**self._tracked, **self._optional)
        self._max_to_keep = max_to_keep
        self._manager = self._new_manager()
        self.absent: list[str] = []  # the optional variables the last checkpoint restored lacked

    def _new_manager(self) -> tf.train.CheckpointManager:
        return tf.train.CheckpointManager(
            self._checkpoint, str(self.directory), max_to_keep=self._max_to_keep, checkpoint_name=_NAME
        )

    def steps(self) -> list[int]:
        """Steps this directory can restore, oldest first."""
        found = (_STEP.search(path) for path in self._manager.checkpoints)
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, **extra: int) -> None:
        """Save the current state as the state after `step` steps (no-op when that step is already saved)."""
        if step in self.steps():
            return
        self.step.assign(step)
        for name, value in extra.items():
            self.extra[name].assign(value)
        path = self._manager.save(checkpoint_number=step)
        log.info("saved checkpoint %s", path)

    def restore(self, step: int) -> dict[str, int]:
        """Restore the state after `step` steps; forget later checkpoints; return the saved extras. The optional
        variables the checkpoint lacks are listed in `absent` afterwards (and left as they were)."""
        path = str(self.directory / f"{_NAME}-{step}")
        if step not in self.steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (have {self.steps()})")
        saved = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)} if self._optional else set()
        self.absent = sorted(set(self._optional) - saved)
        checkpoint = self._checkpoint
        if self.absent:  # the same objects, less those it lacks
            present = {name: v for name, v in self._optional.items() if name in saved}
            checkpoint = tf.train.Checkpoint(**self._tracked, **present)
        checkpoint.restore(path).assert_existing_objects_matched().expect_partial()
        if int(self.step.numpy()) != step:
            raise ValueError(f"{path} holds step {int(self.step.numpy())}, not {step}")
        self._forget_after(step)
        log.info("restored checkpoint %s", path)
        return {name: int(v.numpy()) for name, v in self.extra.items()}

    def _forget_after(self, step: int) -> None:
        keep = [p for p in self._manager.checkpoints if (m := _STEP.search(p)) and int(m.group(1)) <= step]
        stale = [p for p in self._manager.checkpoints if p not in keep]
        if not stale:
            return
        # Unlist first (an atomic rewrite of the `checkpoint` file), then delete: a crash in between leaves
        # only unlisted files, which are never read and are overwritten by a later save of the same step.
        self._write_state(keep)
        self._manager = self._new_manager()
        for prefix in stale:
            for file in tf.io.gfile.glob(prefix + ".*"):
                tf.io.gfile.remove(file)
        log.info("forgot checkpoints after step %d: %s", step, [Path(p).name for p in stale])

    def _write_state(self, keep: Sequence[str]) -> None:
        """Rewrite the `checkpoint` state file to list only `keep` (the latest last), atomically.

        The file CheckpointManager writes and reads, in the same text format and with the same relative paths
        and timestamps (the manager ages its checkpoints by them); TensorFlow's own writer,
        `tf.compat.v1.train.update_checkpoint_state`, is deprecated and logs so on every call."""
        state = tf.train.get_checkpoint_state(str(self.directory))
        timestamps = dict(zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps, strict=False))
        kept = type(state)()
        kept.model_checkpoint_path = Path(keep[-1]).name
        for path in keep:
            kept.all_model_checkpoint_paths.append(Path(path).name)
            kept.all_model_checkpoint_timestamps.append(timestamps.get(path, state.last_preserved_timestamp))
        kept.last_preserved_timestamp = state.last_preserved_timestamp
        write_text_atomic(self.directory / "checkpoint", text_format.MessageToString(kept))


def save_model(path: Path, model: Any) -> None:
    """The model as a `.keras` file (`keras.saving`): architecture, weights, and when compiled its loss, metrics
    and optimizer state; written beside and renamed over `path`, so a reader never sees half a file."""
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a Keras model file must end in .keras")
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)


def save_weights(path: Path, model: Any, optimizer: Any) -> None:
    """The model's weights (w0, w1, ... as `get_weights()` orders them) and the optimizer's step count, as .npz."""
    import numpy as np

    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["iterations"] = np.asarray(int(optimizer.iterations.numpy()))
    temporary = path.with_name(f".{path.name}.tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
