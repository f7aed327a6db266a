"""`FeatureParty`: a feature party of a vertical split as a Python API (docs/vertical.md): align its ids with the
label party's, join, then train its bottom part step by step as the label party asks, sending only IVs and
receiving only the gradient of its own IV."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_party.link import LabelPartyLink, Rejoin
from splitlearning import codec, psi
from splitlearning.batch_order import BatchOrder
from splitlearning.checkpoint import StepCheckpoints
from splitlearning.contract import spec_to_proto
from splitlearning.devices import resolve_device
from splitlearning.files import read_json, write_json_atomic
from splitlearning.leakage import InputLeakMeter
from splitlearning.models import ModelSource
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.security import Secret, TlsConfig
from splitlearning.training.first_part import ClientTrainer
from splitlearning.training.vertical import Fuse
from splitlearning.v1 import split_learning_pb2 as pb

log = logging.getLogger(__name__)

ALIGNMENT_FILE = "alignment.json"


@dataclass(frozen=True)
class Summary:
    """What a feature party's `fit` did: the aligned rows, the steps it ran here, the seconds it took."""

    aligned_rows: int
    train_rows: int
    test_rows: int
    steps: int
    final_step: int
    seconds: float
    rejoins: int
    retries: int


class FeatureParty:
    """Holds one feature party's columns `x` (rows named by `ids`) and its bottom `model`, and trains it with
    the label party at `target` under the name `name` (its slot).

    `seed`, `fuse` and `batch_size` state what this party expects; unset (None, "", 0), it follows the label
    party's; set and different, the label party refuses the join. `state_dir` keeps the alignment and, every
    `checkpoint_every` steps, the part's checkpoints, so a restarted party resumes where every party can.
    """

    def __init__(
        self,
        model: ModelSource,
        optimizer: Any = None,
        *,
        name: str,
        ids: Sequence[Any],
        x: np.ndarray,
        target: str,
        seed: int | None = None,
        fuse: Fuse | str = "",
        batch_size: int = 0,
        device: str = "/CPU:0",
        tls: TlsConfig | None = None,
        auth_token: Secret | str | None = None,
        state_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        checkpoint_keep: int = 5,
        retry_timeout: float = 120.0,
        max_ids: int = 1_000_000,
        nopeek_alpha: float = 0.0,
        leakage_samples: int = 4,
    ) -> None:
        if len(ids) != len(x):
            raise ValueError(f"ids and x must have one row per sample: {len(ids)} ids, {len(x)} rows")
        self.name = name
        self.ids = list(ids)
        self.x = np.asarray(x)
        self.seed = seed
        self.fuse = Fuse(fuse).value if fuse else ""
        self.batch_size = batch_size
        self.checkpoint_every = checkpoint_every
        self.device = resolve_device(device)
        self.trainer = ClientTrainer(
            model, optimizer or "sgd", self.device, exchange=self._exchange, nopeek_alpha=nopeek_alpha
        )
        # The distance correlation of the first `leakage_samples` batches of each epoch with their IVs (0: off).
        self.input_meter = InputLeakMeter(leakage_samples) if leakage_samples else None
        self._inputs: np.ndarray | None = None
        self.history: list[dict[str, float]] = []  # per epoch: input_dcor
        self.link = LabelPartyLink(
            target,
            tls,
            Secret(auth_token) if isinstance(auth_token, str) else auth_token,
            retry_timeout,
            max_ids=max_ids,
        )
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._checkpoints: StepCheckpoints | None = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._checkpoints = StepCheckpoints(
                self.state_dir / "checkpoints",
                {"model": self.trainer.model.variables, "optimizer": self.trainer.optimizer.variables},
                checkpoint_keep,
            )
            if not self._checkpoints.steps():
                self._checkpoints.save(0)
        self.alignment: str | None = None
        self.rows: np.ndarray | None = None  # this party's table rows, in the common order
        self.position = 0  # steps applied to this party's part
        self._ticket = ""
        self._step = 0
        self.rejoins = 0

    # -- the run ---------------------------------------------------------------------------------------------

    def fit(self) -> Summary:
        """Align, join, and train until the label party's last step and evaluation; then close the channel."""
        started = time.perf_counter()
        first = self.position
        try:
            self.align()
            order = self._join()
            evaluated = -1
            while True:
                try:
                    if _evaluates_at(order, self.position) and evaluated != self.position:
                        self._evaluate(order)
                        evaluated = self.position
                    if self.position >= order.total_steps:
                        break
                    self._train_step(order)
                except Rejoin as why:
                    log.info("%s: joining again (%s)", self.name, why)
                    self.rejoins += 1
                    before = self.position
                    order = self._join()
                    if self.position != before:
                        evaluated = -1
        finally:
            self.link.close()
        return Summary(
            len(self.rows) if self.rows is not None else 0,
            order.train_rows,
            order.test_rows,
            self.position - first,
            self.position,
            time.perf_counter() - started,
            self.rejoins,
            self.link.retries,
        )

    def align(self) -> int:
        """The private set intersection with the label party (or the alignment kept in `state_dir`); returns
        the number of aligned rows."""
        saved = read_json(self.state_dir / ALIGNMENT_FILE) if self.state_dir is not None else None
        if saved:
            self.alignment, self.rows = str(saved["alignment"]), np.array(saved["rows"], dtype=np.int64)
            log.info("%s: resuming alignment %s (%d rows)", self.name, self.alignment, len(self.rows))
            return len(self.rows)
        begun = time.perf_counter()
        member = psi.Member(self.ids, self.name)
        offer = self.link.align(
            pb.AlignRequest(protocol_version=PROTOCOL_VERSION, party=self.name, blinded=member.request().points)
        )
        reblinded = member.reblind(psi.Blinded(list(offer.offer)))
        matched = self.link.match(pb.MatchRequest(party=self.name, reblinded=reblinded.points))
        rows = member.rows(psi.Positions(list(matched.positions)))
        self.alignment, self.rows = matched.alignment, np.array(rows, dtype=np.int64)
        if self.state_dir is not None:
            write_json_atomic(self.state_dir / ALIGNMENT_FILE, {"alignment": self.alignment, "rows": rows})
        log.info(
            "%s: aligned %d of its %d ids with the label party's %d in %.1f s",
            self.name,
            len(rows),
            len(self.ids),
            member.offered,
            time.perf_counter() - begun,
        )
        return len(rows)

    def _join(self) -> BatchOrder:
        assert self.alignment is not None
        restorable = {self.position} | set(self._checkpoints.steps() if self._checkpoints is not None else ())
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            party=self.name,
            alignment=self.alignment,
            iv=spec_to_proto(self.trainer.iv_spec),
            fuse=self.fuse,
            batch_size=self.batch_size,
            restorable_steps=sorted(restorable),
        )
        if self.seed is not None:
            request.seed = self.seed
        joined = self.link.join(request)
        self._ticket = joined.ticket
        if joined.step != self.position:
            if self._checkpoints is None:
                raise RuntimeError(
                    f"{self.name}: the label party resumes at step {joined.step}, which it cannot restore"
                )
            self._checkpoints.restore(joined.step)
            log.info("%s: restored step %d (was at %d)", self.name, joined.step, self.position)
            self.position = joined.step
        order = BatchOrder(joined.train_rows, joined.test_rows, joined.batch_size, joined.epochs, joined.seed)
        log.info(
            "%s: party %d of %d; step %d of %d (%d per epoch), batch %d, fuse %s",
            self.name,
            joined.party_index,
            joined.parties,
            self.position,
            order.total_steps,
            order.steps_per_epoch,
            order.batch_size,
            joined.fuse,
        )
        return order

    def _train_step(self, order: BatchOrder) -> None:
        assert self.rows is not None
        rows = self.rows[order.train_rows_of(self.position)]
        self._step = self.position
        meter = self.input_meter
        if meter is not None:
            if self.position % order.steps_per_epoch == 0:
                meter.reset()
            self._inputs = self.x[rows] if meter.due() else None
        self.trainer.train(self.x[rows], np.zeros(len(rows), np.int32))
        if meter is not None:
            if self._inputs is None:
                meter.skip()
            if order.ends_epoch(self.position):
                self.history.append({"epoch": order.epoch_of(self.position) + 1, **meter.result()})
                log.info("%s: epoch %d: input_dcor %.4f", self.name, *self.history[-1].values())
        self._inputs = None
        self.position += 1
        if self._checkpoints is not None and self.checkpoint_every and self.position % self.checkpoint_every == 0:
            self._checkpoints.save(self.position)
        if self.position == order.total_steps and self._checkpoints is not None:
            self._checkpoints.save(self.position)

    def _exchange(self, iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Inside the compiled step: this party's IV out, the gradient of it back (labels: a placeholder)."""
        if self._inputs is not None and self.input_meter is not None:  # once, though a step may be sent again
            self.input_meter.add(self._inputs, iv)
            self._inputs = None
        request = pb.VerticalStepRequest(ticket=self._ticket, step=self._step)
        codec.write(iv, request.iv)  # in place: no copy of a finished tensor message
        reply = self.link.step(request)
        gradient = codec.from_proto(reply.gradient, "gradient")
        if gradient.shape != iv.shape:
            raise RuntimeError(f"the label party's gradient is shaped {gradient.shape}, the IV {iv.shape}")
        return gradient.astype(iv.dtype, copy=False)

    def _evaluate(self, order: BatchOrder) -> None:
        assert self.rows is not None
        for batch in range(order.test_batches):
            rows = self.rows[order.test_rows_of(batch)]
            iv = self.trainer.forward(self.x[rows])
            self.link.evaluate(
                pb.VerticalEvaluateRequest(ticket=self._ticket, step=self.position, batch=batch, iv=codec.to_proto(iv))
            )


def _evaluates_at(order: BatchOrder, step: int) -> bool:
    """Whether the held-out rows are evaluated after `step` steps: at the end of every epoch, if there are any."""
    return order.test_rows > 0 and step > 0 and step % order.steps_per_epoch == 0
