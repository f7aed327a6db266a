"""Where this client's training stands: one record that the session, the step exchange and the fit loop share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Position:
    """The step and the data position, each held here once.

    `step`: training steps completed (applied) in the session (the exchange counts each step once, when its reply
    is read; a restore or a new group round sets it). With stale gradients a step may be in flight beyond it: the
    next request is numbered `step` plus the steps in flight. `epoch0_step`: the step at which epoch 0 of the
    running `fit` began, which with `step` gives the epoch and the batch (saved in the client's checkpoints).
    `reset_metrics`: the next step starts the server's running metrics afresh (a new epoch, a restore, a new
    round). `resume`: restored from a checkpoint at start, so the next `fit` carries on from the saved data
    position.
    """

    step: int
    epoch0_step: int = 0
    reset_metrics: bool = False
    resume: bool = False
