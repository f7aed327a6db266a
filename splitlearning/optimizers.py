"""The optimizer settings both parts must share (HandshakeRequest.optimizer): what they are, on the wire, and
how two of them are compared. The split trains the uncut model only when both sides' optimizers agree."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb

# Bounds what a peer may make the server parse.
MAX_CONFIG_BYTES = 16 * 1024


@dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer's Keras class name (lower case) and hyperparameters (its Keras config without "name")."""

    name: str
    config: dict[str, Any]

    @staticmethod
    def of(optimizer: Any) -> OptimizerSettings:
        import keras

        serialized = keras.optimizers.serialize(optimizer)
        config = {key: value for key, value in serialized["config"].items() if key != "name"}
        return OptimizerSettings(str(serialized["class_name"]).lower(), config)

    def to_proto(self) -> pb.OptimizerSettings:
        return pb.OptimizerSettings(name=self.name, config_json=json.dumps(self.config, sort_keys=True, default=str))

    @staticmethod
    def from_proto(message: pb.OptimizerSettings) -> OptimizerSettings:
        if len(message.config_json) > MAX_CONFIG_BYTES:
            raise InvalidRequest(
                f"optimizer.config_json: at most {MAX_CONFIG_BYTES} bytes, got {len(message.config_json)}"
            )
        try:
            config = json.loads(message.config_json) if message.config_json else {}
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"optimizer.config_json: not JSON: {error}") from None
        if not isinstance(config, dict):
            raise InvalidRequest(f"optimizer.config_json: expected a JSON object, got {type(config).__name__}")
        return OptimizerSettings(message.name.lower(), config)

    def differences(self, other: OptimizerSettings) -> list[str]:
        """What differs between `self` (the client's) and `other` (the server's), one 'what: client X, server Y'
        each: the name, and every hyperparameter both state with other values."""
        if self.name != other.name:
            return [f"optimizer: client {self.name}, server {other.name}"]
        return [
            f"{key}: client {_show(self.config[key])}, server {_show(other.config[key])}"
            for key in sorted(self.config.keys() & other.config.keys())
            if not _same(self.config[key], other.config[key])
        ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return bool(np.float32(a) == np.float32(b))  # optimizers hold their hyperparameters in float32
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return str(np.float32(value))
    return json.dumps(value, sort_keys=True, default=str)
