"""The end-of-run summary of `split-client`: one dict for scripts (`--history-json`), one table for people."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from client_part.telemetry import StepTotals


def summarize(
    history: Mapping[str, Sequence[float]], test: Mapping[str, float], totals: StepTotals, epochs: int, seconds: float
) -> dict[str, Any]:
    """Epochs, final metrics, throughput, bytes per step and where the step time went."""
    steps = max(totals.steps, 1)
    return {
        "epochs": epochs,
        "steps": totals.steps,
        "seconds": seconds,
        "samples_per_s": totals.samples / seconds if seconds > 0 else 0.0,
        "final": {name: values[-1] for name, values in history.items() if values},
        "test": dict(test),
        "bytes_sent_per_step": totals.bytes_sent / steps,
        "bytes_received_per_step": totals.bytes_received / steps,
        "network_seconds": totals.network_seconds,
        "compute_seconds": totals.compute_seconds,
        "other_seconds": max(seconds - totals.seconds, 0.0),
    }


def table(summary: Mapping[str, Any]) -> str:
    """A two-column text table of `summarize`'s result."""
    seconds = summary["seconds"] or 1e-9
    rows: list[tuple[str, str]] = [
        ("epochs", str(summary["epochs"])),
        ("steps", str(summary["steps"])),
        ("wall time", f"{summary['seconds']:.1f} s"),
        ("samples/s", f"{summary['samples_per_s']:,.0f}"),
    ]
    rows += [(f"final {name}", f"{value:.4f}") for name, value in summary["final"].items()]
    rows += [(f"test {name}", f"{value:.4f}") for name, value in summary["test"].items()]
    rows += [
        ("bytes/step sent", _bytes(summary["bytes_sent_per_step"])),
        ("bytes/step received", _bytes(summary["bytes_received_per_step"])),
    ]
    for what in ("network", "compute", "other"):
        value = summary[f"{what}_seconds"]
        rows.append((f"time in {what}", f"{value:.2f} s ({100 * value / seconds:.0f}%)"))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    return "\n".join([rule, *(f"{name:<{width}}   {value:>{value_width}}" for name, value in rows), rule])


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:.1f} MiB"
