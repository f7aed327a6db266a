"""The end-of-run summary of `split-client`: one dict for scripts (`--history-json`), one table for people."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from client_part.telemetry import StepTotals


def summarize(
    history: Mapping[str, Sequence[float]],
    test: Mapping[str, float],
    totals: StepTotals,
    epochs: Sequence[int],
    seconds: float,
    session_epochs: int,
    session_steps: int,
    start_step: int = 0,
    link: Mapping[str, Any] | None = None,
    approximations: Sequence[str] = (),
) -> dict[str, Any]:
    """What this run trained (`epochs`: the epoch indices it trained in, from 0; `totals`: its steps), final
    metrics, throughput, bytes per step, where the step time went, and what the session holds in all (after a
    resume at `start_step`, more than this run trained); `approximations`: those the session trained with, beyond
    the exact split (docs/performance.md, "Beyond exact"), by flag name."""
    steps = max(totals.steps, 1)
    return {
        "epochs": len(epochs),
        "first_epoch": epochs[0] + 1 if epochs else 0,
        "steps": totals.steps,
        "session_epochs": session_epochs,
        "session_steps": session_steps,
        "start_step": start_step,
        "seconds": seconds,
        "samples_per_s": totals.samples / seconds if seconds > 0 else 0.0,
        "final": {name: values[-1] for name, values in history.items() if values},
        "test": dict(test),
        "bytes_sent_per_step": totals.bytes_sent / steps,
        "bytes_received_per_step": totals.bytes_received / steps,
        "network_seconds": totals.network_seconds,
        "compute_seconds": totals.compute_seconds,
        "other_seconds": max(seconds - totals.seconds, 0.0),
        "link": dict(link) if link is not None else None,
        "approximations": list(approximations),
    }


def headline(summary: Mapping[str, Any]) -> str:
    """One line: what this run trained and, after a resume, what the session holds in all."""
    epochs, steps, seconds = summary["epochs"], summary["steps"], summary["seconds"]
    line = f"trained {epochs} epoch{'s' if epochs != 1 else ''}, {steps} steps, in {seconds:.1f} s"
    line += f" ({summary['samples_per_s']:,.0f} samples/s)"
    if summary["start_step"] == 0:
        return line
    if steps == 0:  # a finished run resumed: its checkpoints are at its end
        return (
            f"nothing left to train: the session already holds {summary['session_epochs']} epochs, "
            f"{summary['session_steps']} steps (resumed at step {summary['start_step']}, its end)"
        )
    first, last = summary["first_epoch"], summary["first_epoch"] + epochs - 1
    trained = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    return (
        f"{line} in this run ({trained}, resumed at step {summary['start_step']}); "
        f"the session holds {summary['session_epochs']} epochs, {summary['session_steps']} steps"
    )


def table(summary: Mapping[str, Any]) -> str:
    """A two-column text table of `summarize`'s result."""
    seconds = summary["seconds"] or 1e-9
    resumed = summary["start_step"] > 0
    rows: list[tuple[str, str]] = [
        ("epochs" + (" (this run)" if resumed else ""), str(summary["epochs"])),
        ("steps" + (" (this run)" if resumed else ""), str(summary["steps"])),
    ]
    if resumed:
        rows += [
            ("session epochs", str(summary["session_epochs"])),
            ("session steps", str(summary["session_steps"])),
        ]
    if summary.get("approximations"):
        rows.append(("approximations (not exact)", ", ".join(summary["approximations"])))
    rows += [
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
    link = summary.get("link")
    if link:
        rows.append(("link round trip", f"{link['rtt_ms']:.2f} ms"))
        for way in ("up", "down"):
            rate = link[f"{way}_mbit_s"]
            rows.append((f"link {way}", f"{rate:,.0f} Mbit/s" if rate is not None else "faster than the probe tells"))
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
