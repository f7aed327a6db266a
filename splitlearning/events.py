"""TensorBoard scalars written straight to an event file: cheap enough for every training step.

`tf.summary.scalar` needs the `tensorboard` package and costs about half a millisecond per value in eager
mode; writing the `Event` protos ourselves through `tf.io.TFRecordWriter` costs tens of microseconds for a
whole step's worth of values and needs TensorFlow alone. The files are ordinary `events.out.tfevents.*`
files: `tensorboard --logdir DIR` shows them, `read_scalars` reads them back.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import tensorflow as tf
from tensorflow.core.framework import summary_pb2, tensor_pb2, types_pb2
from tensorflow.core.util import event_pb2

_SCALAR = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


class ScalarWriter:
    """Appends scalars to one new event file under `log_dir`; thread-safe; flushes every `flush_secs`."""

    def __init__(self, log_dir: str | Path, flush_secs: float = 10.0) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self.path = self.log_dir / name
        self._writer: tf.io.TFRecordWriter | None = tf.io.TFRecordWriter(str(self.path))
        self._lock = threading.Lock()
        self._flush_secs = flush_secs
        self._flushed = time.monotonic()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record `values` (tag -> number) at `step` as one event."""
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=tag,
                    metadata=_SCALAR,
                    tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)]),
                )
                for tag, value in values.items()
            ]
        )
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        if time.monotonic() - self._flushed > self._flush_secs:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _write(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        with self._lock:
            if self._writer is not None:
                self._writer.write(data)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `log_dir` (not its subfolders): tag -> [(step, value), ...]."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = value.tensor.float_val[0] if value.tensor.float_val else value.simple_value
                found.setdefault(value.tag, []).append((int(event.step), float(number)))
    return found
