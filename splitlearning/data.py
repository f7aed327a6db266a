"""Datasets: the bundled handwritten digits (no download) or the user's own `.npz`."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGITS = "digits"


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __str__(self) -> str:
        return (
            f"{len(self.x_train)} training and {len(self.x_test)} test samples of shape {list(self.x_train.shape[1:])}"
        )


def load(name: str = DIGITS, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """`digits` (scikit-learn's 1,797 8x8 images, bundled in the package) or the path of an `.npz` file."""
    if name == DIGITS:
        return digits(test_fraction, seed)
    return from_npz(Path(name))


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The real handwritten digits that ship inside scikit-learn: images scaled to [0, 1], shape (8, 8, 1).

    The split into train and test is a fixed function of `seed`, stratified by class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype("float32")[..., None]
    labels = bunch.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Dataset(x_train, y_train, x_test, y_test)


def from_npz(path: Path) -> Dataset:
    """An `.npz` holding `x_train, y_train, x_test, y_test` (the layout of the common mnist.npz).

    Integer images (uint8 pixels) are scaled to [0, 1] float32; a channel axis is added to 3-d images.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--dataset: no such file {str(path)!r} (expected 'digits' or an .npz path)")
    if not zipfile.is_zipfile(path):  # an .npz is a zip archive; numpy would guess at pickles instead
        raise ValueError(
            f"--dataset {path}: not an .npz archive; expected one made by numpy.savez with x_train, y_train, "
            "x_test, y_test (such as the common mnist.npz), or 'digits'"
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {sorted(archive.files)}")
        arrays = {name: archive[name] for name in ("x_train", "y_train", "x_test", "y_test")}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ValueError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype("float32") / float(np.iinfo(x.dtype).max)
        if x.ndim == 3:
            x = x[..., None]
        arrays[f"x_{split}"] = x.astype("float32", copy=False)
        if np.issubdtype(y.dtype, np.integer):
            arrays[f"y_{split}"] = y.astype("int64", copy=False)
    return Dataset(**arrays)


def hold_out(
    x: np.ndarray, y: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(x, y) to train on and the last `fraction` of the samples to validate on (None for 0), as Keras's
    `validation_split` does: the test split stays unseen until the final evaluation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--validation-split must lie in [0, 1), got {fraction:g}")
    split_at = int(len(x) * (1.0 - fraction))
    if fraction == 0.0:
        return x, y, None
    if split_at == 0 or split_at == len(x):
        raise ValueError(
            f"--validation-split {fraction:g} of {len(x)} training samples leaves "
            f"{split_at} to train on and {len(x) - split_at} to validate on; choose a fraction that leaves both"
        )
    return x[:split_at], y[:split_at], (x[split_at:], y[split_at:])


def read_inputs(path: Path) -> np.ndarray:
    """The inputs to predict on (`split-client --predict`): an `.npz`'s `x` (else its `x_test`), an `.npy` array,
    or a `.csv` file (a header row, then one row of numbers per sample). Images are prepared as `from_npz`
    prepares them: integers scaled to [0, 1], a channel axis added to 3-d arrays; float32."""
    if not path.is_file():
        raise FileNotFoundError(f"--predict: no such file {str(path)!r}")
    if path.suffix == ".csv":
        try:
            x = np.loadtxt(path, delimiter=",", skiprows=1, dtype="float32", ndmin=2)
        except ValueError as error:
            raise ValueError(f"--predict {path}: expected a header row, then rows of numbers: {error}") from None
    elif path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    else:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"--predict {path}: not an .npz archive (numpy.savez makes one)")
        with np.load(path, allow_pickle=False) as archive:
            name = next((key for key in ("x", "x_test") if key in archive.files), None)
            if name is None:
                raise ValueError(f"--predict {path}: expected an array x (or x_test); found {sorted(archive.files)}")
            x = archive[name]
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"--predict {path}: expected samples along the first axis, got shape {list(x.shape)}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype("float32") / float(np.iinfo(x.dtype).max)
    if x.ndim == 3:
        x = x[..., None]
    return x.astype("float32", copy=False)


def write_outputs(path: Path, outputs: np.ndarray) -> None:
    """The model's outputs, one row per sample: `.npy`, or `.csv` with a header (output_0, output_1, ...)."""
    rows = outputs.reshape(len(outputs), -1)
    if path.suffix == ".csv":
        header = ",".join(f"output_{i}" for i in range(rows.shape[1]))
        np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.9g")
    else:
        np.save(path, outputs)
