"""A small PNG of the training and validation curves, one panel per metric (needs matplotlib: `.[plot]`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def write_plot(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Draw `history` (Keras layout: 'loss', 'val_loss', ...) per epoch into `path`; return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'splitlearning[plot]'") from None
    names = [name for name in history if not name.startswith("val_") and history[name]]
    if not names:
        raise ValueError("nothing to plot: the history is empty")
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        epochs = range(1, len(history[name]) + 1)
        axis.plot(epochs, history[name], marker="o", label="training")
        if history.get(f"val_{name}"):
            axis.plot(epochs, history[f"val_{name}"], marker="o", label="validation")
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=80)
    plt.close(figure)
    return target
