"""Tiny seeded parts for the U-shape tests: the server's middle and the client's head (bottom: conftest)."""

from __future__ import annotations

from typing import Any

import keras

from tests.conftest import CUT_DIM, NUM_CLASSES

MIDDLE_DIM = 7


def build_middle(kind: str = "plain", seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed + 2)
    layers: list[Any] = [keras.Input((CUT_DIM,), name="cut"), keras.layers.Dense(8, activation="relu")]
    if kind == "batchnorm":
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(MIDDLE_DIM, activation="tanh"))
    return keras.Sequential(layers, name="middle")


def build_head(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed + 3)
    return keras.Sequential([keras.Input((MIDDLE_DIM,), name="cut2"), keras.layers.Dense(NUM_CLASSES)], name="head")
