"""Leakage meters: how much a run's messages would tell their receiver (docs/security.md, "Measured leakage").
numpy only; each party computes them from what it already holds, and nothing is sent.

- **Label leakage** (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022): a
  receiver of the gradients dLoss/d(what it sent) may guess each example's label from them. Two attacks, each
  scored by the AUC of its scores against the true labels over an epoch's examples:
  - *norm*: the score is the gradient's L2 norm (in an imbalanced binary task the rare class's examples have
    the larger gradients);
  - *direction*: the score is the cosine between the gradient and the one of a known example of the positive
    class in the same batch (with one logit, the two classes' gradients point in opposite directions).
  The AUC reported is max(AUC, 1 - AUC): a receiver that knows which side is which (0.5: no better than a coin;
  1.0: every label told). Positive class: 1 for binary labels (0/1, any shape with one value per example); for
  class ids, one class against the rest: the most frequent one of the labels the meter is built with (stated in
  `LabelLeakMeter.positive`).
- **Input leakage** (Vepakomma et al., NoPeek, 2020): the distance correlation between a batch's raw inputs and
  the IV sent for them (each flattened per example): 1 when one is a similarity transform of the other. The
  meter reports the bias-corrected statistic R* (Szekely and Rizzo 2014; an unbiased estimate of the squared
  distance correlation), about 0 for an IV independent of the input at any batch size; the plain sample
  statistic (`distance_correlation`, the one NoPeek's loss uses) reads well above 0 for independent data in a
  batch of 64. The meter samples the first `samples` batches of each epoch and reports their mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NORM = "leak_norm_auc"
DIRECTION = "leak_direction_auc"
DCOR = "input_dcor"


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """The ROC AUC of `scores` for telling `positives` (bool) from the rest: the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U). NaN without both kinds."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    positives = np.asarray(positives, bool).reshape(-1)
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks (1-based) over ties: a tie group of `count` values ending at rank `end` has rank
    # end - (count - 1) / 2.
    _, group, count = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(count)
    ranks = (ends - (count - 1) / 2.0)[group]
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def leak_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """max(AUC, 1 - AUC): what an attacker who knows the sign of its score achieves."""
    value = auc(scores, positives)
    return value if np.isnan(value) else max(value, 1.0 - value)


def per_example(gradients: np.ndarray) -> np.ndarray:
    """The gradients as float64 rows, one per example."""
    gradients = np.asarray(gradients)
    return gradients.reshape(len(gradients), -1).astype(np.float64)


def norm_scores(gradients: np.ndarray) -> np.ndarray:
    """The norm attack's scores: each example's gradient's L2 norm."""
    return np.linalg.norm(per_example(gradients), axis=1)


def direction_scores(gradients: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The direction attack on one batch: the cosine of every other example's gradient with the first positive
    example's, and whether each of those examples is positive. Empty without a positive example."""
    rows = per_example(gradients)
    positives = np.asarray(positives, bool).reshape(-1)
    found = np.flatnonzero(positives)
    if not len(found):
        return np.zeros(0), np.zeros(0, bool)
    reference = rows[found[0]]
    others = np.delete(np.arange(len(rows)), found[0])
    norms = np.linalg.norm(rows[others], axis=1) * np.linalg.norm(reference)
    cosines = rows[others] @ reference / np.maximum(norms, np.finfo(np.float64).tiny)
    return cosines, positives[others]


def distance_correlation(x: np.ndarray, z: np.ndarray) -> float:
    """The (sample, biased) distance correlation of Székely, Rizzo and Bakirov (2007) between the rows of `x`
    and of `z` (each flattened per example): in [0, 1]; 0 for a constant."""
    a = _centered_distances(x)
    b = _centered_distances(z)
    dcov = (a * b).mean()
    dvar = np.sqrt((a * a).mean() * (b * b).mean())
    if dvar <= 0:
        return 0.0
    return float(np.sqrt(max(dcov, 0.0) / dvar))


def unbiased_distance_correlation(x: np.ndarray, z: np.ndarray) -> float:
    """The bias-corrected distance correlation R* of Szekely and Rizzo (2014): the U-centred distance
    covariance over the root of the two U-centred distance variances. It estimates the squared population
    distance correlation without bias, so it is about 0 for independent rows at any batch size (and may come out
    slightly negative), where the sample statistic above is not (for 64 rows of independent data it reads 0.4
    to 0.85, depending on the widths); 1 when one is a similarity transform of the other. Needs 4 rows."""
    a = _u_centered_distances(x)
    b = _u_centered_distances(z)
    n = len(a)
    scale = 1.0 / (n * (n - 3))
    dcov = (a * b).sum() * scale
    dvar = np.sqrt(max((a * a).sum() * scale, 0.0) * max((b * b).sum() * scale, 0.0))
    if dvar <= 0:
        return 0.0
    return float(dcov / dvar)


def _distances(values: np.ndarray) -> np.ndarray:
    rows = per_example(values)
    squares = (rows * rows).sum(axis=1)
    return np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2.0 * rows @ rows.T, 0.0))


def _u_centered_distances(values: np.ndarray) -> np.ndarray:
    distances = _distances(values)
    n = len(distances)
    if n < 4:
        raise ValueError(f"the bias-corrected distance correlation needs at least 4 rows, got {n}")
    rows = distances.sum(axis=1) / (n - 2)
    centered = distances - rows[:, None] - rows[None, :] + distances.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(centered, 0.0)
    return centered


def _centered_distances(values: np.ndarray) -> np.ndarray:
    distances = _distances(values)
    return distances - distances.mean(axis=0) - distances.mean(axis=1)[:, None] + distances.mean()


def class_ids(labels: np.ndarray) -> np.ndarray:
    """One class id per example: a label as it is (floats rounded), or a one-hot (or probability) row's argmax."""
    labels = np.asarray(labels)
    flat = labels.reshape(len(labels), -1)
    if flat.shape[1] > 1:
        return np.argmax(flat, axis=1).astype(np.int64)
    return np.rint(flat[:, 0]).astype(np.int64)


def positive_class(labels: np.ndarray) -> int:
    """The class a label-leakage meter scores: 1 for binary labels (0/1), else the most frequent class."""
    ids = class_ids(labels)
    if set(np.unique(ids).tolist()) <= {0, 1}:
        return 1
    return int(np.argmax(np.bincount(ids - ids.min())) + ids.min())


def positives_of(labels: np.ndarray, positive: int) -> np.ndarray:
    """Which examples are of class `positive` (`class_ids`)."""
    return class_ids(labels) == positive


@dataclass
class LabelLeakMeter:
    """Both label attacks over an epoch's gradients (`add` per step, `result` at the epoch's end, `reset`)."""

    positive: int = 1
    _norms: list[np.ndarray] = field(default_factory=list)
    _norm_labels: list[np.ndarray] = field(default_factory=list)
    _cosines: list[np.ndarray] = field(default_factory=list)
    _cosine_labels: list[np.ndarray] = field(default_factory=list)

    def add(self, gradients: np.ndarray, labels: np.ndarray) -> None:
        """The gradients a receiver gets for one batch, and the batch's labels."""
        positives = positives_of(labels, self.positive)
        self._norms.append(norm_scores(gradients))
        self._norm_labels.append(positives)
        cosines, same = direction_scores(gradients, positives)
        self._cosines.append(cosines)
        self._cosine_labels.append(same)

    def result(self) -> dict[str, float]:
        """The epoch's leak AUCs (NaN where the epoch had no example of a class)."""
        if not self._norms:
            return {NORM: float("nan"), DIRECTION: float("nan")}
        return {
            NORM: leak_auc(np.concatenate(self._norms), np.concatenate(self._norm_labels)),
            DIRECTION: leak_auc(np.concatenate(self._cosines), np.concatenate(self._cosine_labels)),
        }

    def reset(self) -> None:
        for kept in (self._norms, self._norm_labels, self._cosines, self._cosine_labels):
            kept.clear()


@dataclass
class InputLeakMeter:
    """The distance correlation of the first `samples` batches of each epoch (`due` says whether the next batch
    is sampled; `add` its inputs and IV; `result` the epoch's mean; `reset`)."""

    samples: int = 4
    _values: list[float] = field(default_factory=list)
    _seen: int = 0

    def due(self) -> bool:
        return self._seen < self.samples

    def add(self, inputs: np.ndarray, iv: np.ndarray) -> None:
        self._seen += 1
        if len(inputs) >= 4:  # a smaller batch is counted but not measured
            self._values.append(unbiased_distance_correlation(inputs, iv))

    def skip(self) -> None:
        """A batch that is not sampled."""
        self._seen += 1

    def result(self) -> dict[str, float]:
        return {DCOR: float(np.mean(self._values)) if self._values else float("nan")}

    def reset(self) -> None:
        self._values.clear()
        self._seen = 0
