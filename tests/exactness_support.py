"""What "equals the uncut model" means in the exactness tests, and the comparisons that check it.

Two claims, each checked by the same tests (tests/test_exactness.py, tests/test_ushape_exactness.py,
tests/test_group_exactness.py):

**Bit for bit where the computation order is the same.** The split runs the uncut model's own float32 ops: the
same kernels on the same shapes (a part's forward is the uncut forward's slice; the client back-propagates
dLoss/dIV through its tape, which is the uncut tape's back half), Keras's own loss, metrics and optimizer
update. Two things can change the order of the additions, and the tests pin both down:

- By default the server (and a U-shaped client's head) applies its optimizer update as one XLA-compiled
  function (docs/performance.md), which may fuse and contract the update's arithmetic (a fused multiply-add
  rounds once where `fit` rounds twice). `split-server --exact` (`SplitServer(exact=True)`) applies it as a
  plain graph, as `fit` does; `same_update_as_fit` does the same for every part built in the test, the
  U-shaped head included (`jit_compile=False`).
- oneDNN (TensorFlow's default CPU kernels on x86-64) picks its blocking, and so the order in which a sum is
  accumulated, from the CPU model and the surrounding graph; the uncut graph and the split's two graphs may
  be fused differently (batch normalization, convolutions). `TF_ENABLE_ONEDNN_OPTS=0` turns it off (TensorFlow
  reads it when it starts, so it is set for the whole process: .ci/run runs the exactness tests a second time
  with it). Then the kernels are Eigen's, whose order depends only on the shapes and the thread pool.

With both, weights (batch-norm statistics included), predictions and metrics are compared bit for bit. One
documented exception: with a regularized client part, the reported loss is the server's running mean loss plus
the client's running mean penalty, where `fit` keeps the running mean of their sums (one rounding per step may
differ: `STEPS` ulps of the value at most).

**Within float32 round-off otherwise** (oneDNN on, and the update XLA-compiled as in production). A reordered
float32 sum of n terms differs by at most about n·u·Σ|terms| (u = 2⁻²⁴, the unit round-off; Higham, *Accuracy
and Stability of Numerical Algorithms*, §4.2), and by far less in practice. The longest sums a reordering can
change are over the batch (`REDUCTION` = the batch size: the weight gradients, batch-norm's mean and variance);
each step reorders the forward and the backward pass (2); steps add their differences (`STEPS`). Taking the
tensor's largest magnitude as Σ|terms|, every value may differ from the uncut model's by at most

    ROUNDOFF · max|expected|,   ROUNDOFF = 2 · REDUCTION · STEPS · eps,   eps = 2u = 2⁻²³

which for 8 steps of batch 16 is 256 ulps of the tensor's scale (3.1e-5). Measured on an Intel Xeon with
AVX-512: at most 88 ulps of the scale (batch norm with Adam, oneDNN off, the update XLA-compiled), 2.2 with the
plain-graph update. An error in the split's math (a missed regularization term, a wrong gradient, a
double-applied update) is a difference of order the learning rate times a gradient, 1e-3 or more: far outside.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from splitlearning import compiled
from splitlearning.leakage import DCOR, DIRECTION, NORM

BATCH = 16  # 50 samples: three full batches and a partial one of 2
EPOCHS = 2
STEPS = EPOCHS * 4
REDUCTION = BATCH
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one ulp at 1.0
ROUNDOFF = 2 * REDUCTION * STEPS * EPS32
# TensorFlow's own parsing of the variable: oneDNN is on by default on x86-64 Linux, off for "0" or "false".
METER_KEYS = frozenset({DCOR, DIRECTION, NORM})
ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")


@pytest.fixture
def same_update_as_fit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Parts built inside the test apply their optimizer updates as a plain graph, as `fit` does."""
    original = compiled.Compiled.__init__

    def plain_graph(self: compiled.Compiled, *args: Any, **kwargs: Any) -> None:
        kwargs["jit_compile"] = False
        original(self, *args, **kwargs)

    monkeypatch.setattr(compiled.Compiled, "__init__", plain_graph)
    yield


def roundoff(batch: int, steps: int) -> float:
    """The tolerance above (`ROUNDOFF`) for `steps` steps whose longest reordered sums run over `batch`."""
    return 2 * batch * steps * EPS32


def assert_within(actual: Any, expected: Any, what: str, tolerance: float | None = None) -> None:
    """Bit for bit if `tolerance` is None, else within `tolerance` times the expected values' largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if tolerance is None:
        np.testing.assert_array_equal(actual, expected, err_msg=f"{what}: not bit for bit")
        return
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=tolerance * scale, err_msg=f"{what}: beyond float32 round-off"
    )


def assert_close(actual: Any, expected: Any, what: str, exact: bool, tolerance: float = ROUNDOFF) -> None:
    """Bit for bit if `exact`, else within `tolerance` (default `ROUNDOFF`) of the expected values' largest
    magnitude."""
    assert_within(actual, expected, what, None if exact else tolerance)


def assert_same(
    actual: Sequence[Any],
    expected: Sequence[Any],
    what: str,
    tolerance: float | None = None,
    same_dtype: bool = False,
) -> None:
    """Weights (or any list of tensors) tensor by tensor, as many as expected: bit for bit, or given `tolerance`,
    each within `tolerance` times its expected values' largest magnitude (`assert_within`); `same_dtype`: each
    tensor's dtype must be the expected one's too."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if same_dtype:
            assert np.asarray(a).dtype == np.asarray(e).dtype, f"{what}[{i}]"
        assert_within(a, e, f"{what}[{i}]", tolerance)


def assert_weights_equal(
    actual: list[np.ndarray], expected: list[np.ndarray], what: str, exact: bool, tolerance: float = ROUNDOFF
) -> None:
    """`assert_same`: bit for bit if `exact`, else within `tolerance` (default `ROUNDOFF`)."""
    assert_same(actual, expected, what, None if exact else tolerance)


def trained_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """The split's logs without the leakage meters' (splitlearning/leakage.py: a split-client adds them to each
    epoch's logs, where `fit` has none; tests/test_privacy.py checks them and that they change no weight)."""
    return {key: value for key, value in logs.items() if key not in METER_KEYS}


def assert_logs_equal(actual: dict[str, Any], expected: dict[str, Any], exact: bool, sum_of_means: bool) -> None:
    """Metrics (or per-epoch histories) by name; `sum_of_means`: the loss is the server's plus the client's
    penalty (see the module's docstring), within `STEPS` ulps of its value even where the rest is exact. The
    split's leakage meters are left out (`trained_logs`)."""
    actual = trained_logs(actual)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        if exact and sum_of_means and key.endswith("loss"):
            np.testing.assert_allclose(actual[key], expected[key], rtol=STEPS * EPS32, atol=0, err_msg=key)
        else:
            assert_close(actual[key], expected[key], key, exact)
