"""The label party's side of a vertical split, without gRPC: the alignment, who is in the run, and the meetings
where every feature party's IV of a step (or of a held-out batch) comes together (docs/vertical.md).

Every call comes from a feature party's RPC thread and may wait for the others: a meeting completes when the
last of the k parties arrives, and that party's thread runs the work (the step, the evaluation) under the lock
while the others wait on the condition. A party that does not come within `deadline` seconds is named in the
waiting parties' error (UNAVAILABLE: retry); nothing is applied with an IV missing.

Membership: a Join by every one of the k parties opens a *generation* and gives each a ticket bound to its slot
and that generation. A party joining again (it restarted, or lost its ticket) starts the next generation:
the tickets of the current one stop working (ABORTED: join again), so every party joins again, states the steps it
can restore, and all resume from the latest step every party (the label party included) can restore.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from splitlearning import psi
from splitlearning.batch_order import BatchOrder, split_rows
from splitlearning.contract import Spec
from splitlearning.errors import InvalidRequest, PreconditionFailed, SplitError, StepMismatch
from splitlearning.files import read_json, write_json_atomic
from splitlearning.label_defences import LabelDefence
from splitlearning.leakage import LabelLeakMeter, positive_class
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.training.vertical import Fuse, FuseTrainer

log = logging.getLogger(__name__)

ALIGNMENT_FILE = "alignment.json"
T = TypeVar("T")


class PartyMissing(SplitError):
    """A feature party did not come to a meeting in time: nothing was applied; retry once it is back."""

    status = "UNAVAILABLE"


class Unknown(SplitError):
    """A call names a party that is not one of the label party's."""

    status = "PERMISSION_DENIED"


class Finished(PreconditionFailed):
    """Training has ended: the label party takes no more steps."""


@dataclass(frozen=True)
class LabelData:
    """The label party's table: ids, labels, and its own columns (with a bottom of its own)."""

    ids: Sequence[Any]
    y: np.ndarray
    x: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """What the label party decides and every feature party follows (or states alike)."""

    parties: tuple[str, ...]
    batch_size: int
    epochs: int
    seed: int = 0
    fuse: Fuse = Fuse.CONCAT
    test_fraction: float = 0.2
    deadline: float = 60.0  # seconds a party waits for the others at a meeting
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    defence: LabelDefence | None = None  # on the gradients sent to each feature party
    meters: bool = True  # the label-leakage meters, per feature party

    def __post_init__(self) -> None:
        if not self.parties:
            raise ValueError("a vertical split needs at least one feature party")
        if len(set(self.parties)) != len(self.parties):
            raise ValueError(f"feature party names must be unique, got {list(self.parties)}")


@dataclass(frozen=True)
class Joined:
    """What a Join answers: the party's ticket and slot, and where training stands."""

    ticket: str
    index: int
    step: int
    order: BatchOrder


@dataclass
class EpochRecord:
    """One epoch as the label party saw it: training's running metrics at its end, then the held-out ones."""

    epoch: int
    step: int
    metrics: dict[str, float]
    test: dict[str, float] = field(default_factory=dict)
    leakage: dict[str, float] = field(default_factory=dict)  # "leak_norm_auc/<party>" and the like


@dataclass
class _Meeting(Generic[T]):
    """One meeting: the parties' contributions so far, and (once complete) each party's answer."""

    key: Any
    brought: dict[str, T] = field(default_factory=dict)
    answers: dict[str, Any] | None = None
    error: SplitError | None = None


class Coordinator:
    """The label party's state and its meetings (see the module). `make_trainer(iv_specs)` builds the
    FuseTrainer once every party's IV spec is known; `checkpoints(trainer)` opens its checkpoints (or None)."""

    def __init__(
        self,
        data: LabelData,
        plan: Plan,
        make_trainer: Callable[[list[Spec]], FuseTrainer],
        state_dir: Path | None = None,
        checkpoints: Callable[[FuseTrainer], Any] | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> None:
        self.data = data
        self.plan = plan
        self._make_trainer = make_trainer
        self._state_dir = state_dir
        self._open_checkpoints = checkpoints
        self._on_epoch = on_epoch
        self._cond = threading.Condition()
        self.trainer: FuseTrainer | None = None
        self._checkpoints: Any = None
        self._specs: dict[str, Spec] = {}
        # Alignment.
        self._hub: psi.Hub[Any] | None = None
        self._requests: dict[str, psi.Blinded] = {}
        self._match = _Meeting[None]("match")
        self.alignment: str | None = None
        self.rows: np.ndarray | None = None  # the label party's table rows, in the common order
        self.order: BatchOrder | None = None
        self._load_alignment()
        # Membership.
        self.generation = 0
        self._tickets: dict[str, tuple[str, int]] = {}  # ticket -> (party, generation)
        self._joining: _Meeting[list[int]] | None = None
        self._joined: _Meeting[list[int]] | None = None  # the join that opened the current generation
        # Training.
        self.position = 0  # steps applied
        self._step: _Meeting[np.ndarray] = _Meeting(0)
        self._last: _Meeting[np.ndarray] | None = None  # the last completed step (its answers, for resends)
        self._evaluation: _Meeting[np.ndarray] | None = None
        self._evaluated: set[tuple[int, int]] = set()  # (step, batch) evaluated at the current step
        self._test_values: list[float] = []
        self.predictions: list[np.ndarray] = []  # the last evaluation's outputs, batch by batch
        self.history: list[EpochRecord] = []
        self._epoch_metrics: list[float] = []
        self._epoch_leakage: dict[str, float] = {}
        self.positive = positive_class(data.y)  # the class the meters and Marvell score against the rest
        if plan.defence is not None:
            self.plan = plan = dataclasses.replace(
                plan, defence=dataclasses.replace(plan.defence, positive=self.positive)
            )
        self._leak = {name: LabelLeakMeter(self.positive) for name in plan.parties} if plan.meters else {}
        self.finished = threading.Event()  # training ended, or `failed`
        self.failed: SplitError | None = None

    # -- alignment -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Blind this party's ids for the alignment (before serving; skipped when an alignment was loaded)."""
        if self.alignment is None and self._hub is None:
            started = time.perf_counter()
            self._hub = psi.Hub(self.data.ids, list(self.plan.parties))
            log.info(
                "blinded the label party's %d ids for the alignment in %.1f s",
                len(self.data.ids),
                time.perf_counter() - started,
            )

    def align(self, version: int, party: str, blinded: Sequence[bytes]) -> list[bytes]:
        """PSI steps 1-2: keep the party's blinded ids, answer the offer."""
        _check_version(version)
        with self._cond:
            self._check_party(party)
            if self.alignment is not None:
                raise PreconditionFailed(
                    f"the label party is already aligned (alignment {self.alignment}): {party} resumes with the "
                    "alignment in its own state folder, or every party starts afresh"
                )
            if self._hub is None:
                raise PreconditionFailed("the label party is not ready to align yet: retry")
            for index, value in enumerate(blinded):
                if len(value) != psi.POINT_BYTES:
                    raise psi.BadMessage(
                        f"{party}'s blinded id {index} is {len(value)} bytes; each is a {psi.POINT_BYTES}-byte value"
                    )
            if len(set(blinded)) != len(blinded):
                raise psi.BadMessage(f"{party}'s blinded ids repeat a value: its ids are not unique")
            self._requests[party] = psi.Blinded(list(blinded))
            return self._hub.offer().points

    def match(self, party: str, reblinded: Sequence[bytes]) -> tuple[list[int], str]:
        """PSI steps 3-5: match the party; once every party has, answer its positions and the alignment."""
        with self._cond:
            self._check_party(party)
            hub = self._hub
            if self.alignment is not None and self._match.answers is not None and party in self._match.answers:
                return self._match.answers[party], self.alignment
            if hub is None or party not in self._requests:
                raise PreconditionFailed(f"{party}: Match before Align: send the blinded ids first")
            if party not in self._match.brought:
                try:
                    hub.match(party, self._requests[party], psi.Blinded(list(reblinded)))
                except psi.NoCommonIds as error:  # no alignment can come of this run: every party hears it
                    self._fail(self._match, error)
                    raise
                self._match.brought[party] = None
            if len(self._match.brought) == len(self.plan.parties):
                try:
                    answers = {name: hub.result(name).positions for name in self.plan.parties}
                    rows = np.array(hub.intersection_rows(), dtype=np.int64)
                    if split_rows(len(rows), self.plan.test_fraction)[0] < 1:
                        raise PreconditionFailed(
                            f"{len(rows)} aligned rows leave none to train once {self.plan.test_fraction:g} of them "
                            "are held out"
                        )
                except PreconditionFailed as error:
                    self._fail(self._match, error)
                    raise
                self._aligned(secrets.token_hex(16), rows)
                self._match.answers = answers
                self._cond.notify_all()
            self._wait(self._match, "the alignment", lambda: self._match.answers is not None)
            assert self._match.answers is not None and self.alignment is not None
            return self._match.answers[party], self.alignment

    def _fail(self, meeting: _Meeting[Any], error: SplitError) -> None:
        """The run cannot go on (no alignment can come of it): every waiting party hears `error`, and so does
        whoever waits for the end (`failed`, `finished`)."""
        meeting.error = error
        self.failed = error
        log.error("the run cannot go on: %s", error)
        self._cond.notify_all()
        self.finished.set()

    def _aligned(self, alignment: str, rows: np.ndarray) -> None:
        self.alignment, self.rows = alignment, rows
        train, test = split_rows(len(rows), self.plan.test_fraction)
        self.order = BatchOrder(train, test, self.plan.batch_size, self.plan.epochs, self.plan.seed)
        log.info(
            "aligned %d rows with %d feature parties (alignment %s): %d train, %d held out",
            len(rows),
            len(self.plan.parties),
            alignment,
            train,
            test,
        )
        if self._state_dir is not None:
            write_json_atomic(self._state_dir / ALIGNMENT_FILE, {"alignment": alignment, "rows": rows.tolist()})

    def _load_alignment(self) -> None:
        saved = read_json(self._state_dir / ALIGNMENT_FILE) if self._state_dir is not None else None
        if saved:
            rows = np.array(saved["rows"], dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= len(self.data.ids)):
                raise ValueError(f"{self._state_dir}: the saved alignment names rows this table does not have")
            self._aligned(str(saved["alignment"]), rows)

    # -- membership ------------------------------------------------------------------------------------------

    def join(
        self,
        version: int,
        party: str,
        alignment: str,
        iv: Spec,
        seed: int | None,
        fuse: str,
        batch_size: int,
        restorable: Sequence[int],
    ) -> Joined:
        """Check the party's settings, then wait until every party has joined; answer its ticket and the step
        all resume from."""
        _check_version(version)
        with self._cond:
            self._check_party(party)
            order = self.order
            if order is None or self.alignment is None:
                raise PreconditionFailed(f"{party}: Join before the alignment: run Align and Match first")
            if alignment != self.alignment:
                raise PreconditionFailed(
                    f"{party}: alignment mismatch: the party states {alignment or '(none)'}, the label party holds "
                    f"{self.alignment}; a party's rows must come from this run's Match"
                )
            self._check_settings(party, seed, fuse, batch_size)
            known = self._specs.get(party)
            if known is not None and known != iv:
                raise PreconditionFailed(f"{party}: its IV was {known} when it joined before, now {iv}")
            if self.plan.fuse is not Fuse.CONCAT and self._specs and iv not in self._specs.values():
                other = next(iter(self._specs.values()))
                raise PreconditionFailed(f"{party}: fuse={self.plan.fuse.value} needs equal IVs: {iv}, others {other}")
            joined = self._joined
            if (
                self._joining is None
                and joined is not None
                and joined.answers is not None
                and party in joined.answers
                and joined.answers[party][2] == self.position
                and self.position in restorable
            ):
                # A Join again before this generation has applied a step, from a party that can stand where it
                # stands (its answer was lost, or it gave up waiting while the others came): the same answer, not a
                # new generation that would send every party back to the join.
                ticket, index, step = joined.answers[party]
                return Joined(ticket, index, step, order)
            if self._joining is None:
                self._joining = _Meeting(self.generation + 1)
                if self._tickets:
                    log.info("%s joins again: every party joins generation %d", party, self._joining.key)
                self._tickets.clear()  # the running generation ends: its calls are refused from now on
                self._cond.notify_all()
            meeting = self._joining
            self._specs[party] = iv
            meeting.brought[party] = [int(s) for s in restorable]
            if len(meeting.brought) == len(self.plan.parties):
                self._complete_join(meeting)
            self._wait(meeting, f"generation {meeting.key}'s join", lambda: meeting.answers is not None)
            assert meeting.answers is not None
            ticket, index, step = meeting.answers[party]
            return Joined(ticket, index, step, order)

    def _check_settings(self, party: str, seed: int | None, fuse: str, batch_size: int) -> None:
        plan = self.plan
        differ = []
        if seed is not None and seed != plan.seed:
            differ.append(f"seed: {party} {seed}, label party {plan.seed}")
        if fuse and fuse != plan.fuse.value:
            differ.append(f"fuse: {party} {fuse}, label party {plan.fuse.value}")
        if batch_size and batch_size != plan.batch_size:
            differ.append(f"batch size: {party} {batch_size}, label party {plan.batch_size}")
        if differ:
            raise PreconditionFailed("settings mismatch: " + "; ".join(differ))

    def _complete_join(self, meeting: _Meeting[list[int]]) -> None:
        """Every party has joined: build the trainer (first time), agree the step, restore it, issue tickets."""
        try:
            if self.trainer is None:
                self.trainer = self._make_trainer([self._specs[name] for name in self.plan.parties])
                if self._open_checkpoints is not None:
                    self._checkpoints = self._open_checkpoints(self.trainer)
            step = self._agree(meeting.brought)
        except SplitError as error:
            meeting.error = error
            self._joining = None
            self._cond.notify_all()
            raise
        except ValueError as error:  # the parties' IVs do not fit the top model
            meeting.error = PreconditionFailed(f"the feature parties' IVs do not fit the label party's part: {error}")
            self._joining = None
            self._cond.notify_all()
            raise meeting.error from error
        self.generation = meeting.key
        answers = {}
        for index, name in enumerate(self.plan.parties):
            ticket = secrets.token_hex(16)
            self._tickets[ticket] = (name, self.generation)
            answers[name] = (ticket, index, step)
        meeting.answers = answers
        self._joining = None
        self._joined = meeting
        log.info(
            "generation %d: all %d feature parties joined; training resumes at step %d", meeting.key, len(answers), step
        )
        self._cond.notify_all()

    def _agree(self, offered: dict[str, list[int]]) -> int:
        """The latest step every party and the label party can restore; the label party restores it."""
        assert self.trainer is not None
        mine = {self.position} if self.trainer.reusable else set()
        if self._checkpoints is not None:
            mine |= set(self._checkpoints.steps())
        common = set(mine)
        for steps in offered.values():
            common &= set(steps)
        if not common:
            sides = "; ".join(f"{name}: {sorted(steps)[-5:]}" for name, steps in offered.items())
            raise PreconditionFailed(
                f"no step every party can resume from (label party: {sorted(mine)[-5:]}; {sides}): give every "
                "party a --state-dir with checkpoints, or start all afresh"
            )
        step = max(common)
        if step != self.position:
            self._checkpoints.restore(step)
            log.info("restored the label party's part at step %d (was at %d)", step, self.position)
            self.position = step
            self.history = [record for record in self.history if record.step <= step]
        self._step = _Meeting(step)
        self._last = None
        self._evaluation = None
        self._evaluated.clear()
        return step

    def party_of(self, ticket: str) -> str:
        """The party `ticket` was issued to (StepMismatch, ABORTED, when it is not a current one)."""
        with self._cond:
            return self._member(ticket)

    def _member(self, ticket: str) -> str:
        found = self._tickets.get(ticket)
        if found is None:
            raise StepMismatch("the ticket is not one of the current membership's (a party joined again): join again")
        return found[0]

    # -- training --------------------------------------------------------------------------------------------

    def step(self, ticket: str, step: int, iv: np.ndarray) -> np.ndarray:
        """One party's IV of step `step`; answers its gradient once every party's IV has come."""
        with self._cond:
            party = self._member(ticket)
            order = self.order
            assert order is not None and self.trainer is not None
            last = self._last
            if last is not None and step == last.key and last.answers is not None:
                return last.answers[party]  # a resend: the step is applied, its answer kept
            if self.position >= order.total_steps:
                raise Finished(f"training has ended at step {self.position}: no step {step}")
            if step != self.position:
                raise PreconditionFailed(f"{party}: step {step}, but the label party expects step {self.position}")
            self._check_iv(party, iv, order.rows_in(step), f"step {step}")
            meeting = self._step
            meeting.brought[party] = iv
            if len(meeting.brought) == len(self.plan.parties):
                self._run_step(meeting, order)
            self._wait(
                meeting,
                f"step {step}",
                lambda: meeting.answers is not None or meeting.error is not None or ticket not in self._tickets,
            )
            if meeting.answers is None:
                self._member(ticket)  # the membership changed while waiting: join again
                raise meeting.error or StepMismatch("the step was abandoned: join again")
            return meeting.answers[party]

    def _run_step(self, meeting: _Meeting[np.ndarray], order: BatchOrder) -> None:
        trainer = self.trainer
        assert trainer is not None
        step = meeting.key
        rows = self._label_rows(order.train_rows_of(step))
        own = self.data.x[rows] if self.data.x is not None else None
        ivs = [meeting.brought[name] for name in self.plan.parties]
        first = step % order.steps_per_epoch == 0
        try:
            grads, values = trainer.train(ivs, self.data.y[rows], own, reset_metrics=first)
        except SplitError as error:
            meeting.error = error
            self._step = _Meeting(step)  # a retry meets afresh
            self._cond.notify_all()
            raise
        labels = self.data.y[rows]
        defence = self.plan.defence
        if defence is not None and defence.active:  # each party's own noise, the same again if the step is redone
            grads = [defence.apply(g, labels, (step, index)) for index, g in enumerate(grads)]
        for name, sent in zip(self.plan.parties, grads, strict=True):
            if name in self._leak:
                if first:
                    self._leak[name].reset()
                self._leak[name].add(sent, labels)
        meeting.answers = dict(zip(self.plan.parties, grads, strict=True))
        self.position = step + 1
        self._last = meeting
        self._step = _Meeting(self.position)
        self._evaluated.clear()
        if (
            self._checkpoints is not None
            and self.plan.checkpoint_every
            and self.position % self.plan.checkpoint_every == 0
        ):
            self._checkpoints.save(self.position)
        self._cond.notify_all()
        if order.ends_epoch(step):
            self._epoch_metrics = values
            self._epoch_leakage = {
                f"{key}/{name}": value for name, meter in self._leak.items() for key, value in meter.result().items()
            }
            if order.test_rows == 0:
                self._end_epoch(order, {})

    def _end_epoch(self, order: BatchOrder, test: dict[str, float]) -> None:
        assert self.trainer is not None
        names = self.trainer.metric_names
        record = EpochRecord(
            order.epoch_of(self.position - 1),
            self.position,
            dict(zip(names, self._epoch_metrics, strict=True)),
            test,
            dict(self._epoch_leakage),
        )
        if self.history and self.history[-1].step == record.step:
            self.history[-1] = record
        else:
            self.history.append(record)
        if self._on_epoch is not None:
            self._on_epoch(record)
        if self.position >= order.total_steps:
            if self._checkpoints is not None:
                self._checkpoints.save(self.position)
            self.trainer.settle()
            self.finished.set()

    def evaluate(self, ticket: str, step: int, batch: int, iv: np.ndarray) -> None:
        """One party's IV of held-out batch `batch` after `step` steps; returns once every party's has come."""
        with self._cond:
            party = self._member(ticket)
            order = self.order
            assert order is not None and self.trainer is not None
            if (step, batch) in self._evaluated:
                return  # a resend: this batch is evaluated
            if step != self.position or step == 0 or step % order.steps_per_epoch:
                raise PreconditionFailed(
                    f"{party}: an evaluation after step {step}, but the label party evaluates at the end of an epoch "
                    f"and stands at step {self.position}"
                )
            if not 0 <= batch < order.test_batches:
                raise InvalidRequest(f"{party}: held-out batch {batch} is outside 0..{order.test_batches - 1}")
            meeting = self._evaluation
            if meeting is None or meeting.key != (step, batch):
                expected = len(self._evaluated)
                if batch != expected:
                    raise PreconditionFailed(f"{party}: held-out batch {batch}, but the label party expects {expected}")
                meeting = self._evaluation = _Meeting((step, batch))
            self._check_iv(party, iv, len(order.test_rows_of(batch)), f"held-out batch {batch}")
            meeting.brought[party] = iv
            if len(meeting.brought) == len(self.plan.parties):
                self._run_evaluation(meeting, order, step, batch)
            self._wait(
                meeting,
                f"held-out batch {batch}",
                lambda: meeting.answers is not None or meeting.error is not None or ticket not in self._tickets,
            )
            if meeting.answers is None:
                self._member(ticket)
                raise meeting.error or StepMismatch("the evaluation was abandoned: join again")

    def _run_evaluation(self, meeting: _Meeting[np.ndarray], order: BatchOrder, step: int, batch: int) -> None:
        trainer = self.trainer
        assert trainer is not None
        rows = self._label_rows(order.test_rows_of(batch))
        own = self.data.x[rows] if self.data.x is not None else None
        ivs = [meeting.brought[name] for name in self.plan.parties]
        try:
            self._test_values = trainer.evaluate(ivs, self.data.y[rows], own, reset_metrics=batch == 0)
            if batch == 0:
                self.predictions = []
            self.predictions.append(trainer.predict(ivs, own))
        except SplitError as error:
            meeting.error = error
            self._evaluation = None  # a retry meets afresh
            self._cond.notify_all()
            raise
        meeting.answers = {}
        self._evaluated.add((step, batch))
        self._cond.notify_all()
        if batch == order.test_batches - 1:
            names = [f"test_{name}" for name in trainer.metric_names]
            self._end_epoch(order, dict(zip(names, self._test_values, strict=True)))

    # -- helpers ---------------------------------------------------------------------------------------------

    def restorable(self) -> list[int]:
        with self._cond:
            return sorted(self._checkpoints.steps()) if self._checkpoints is not None else []

    def test_ids(self) -> list[Any]:
        """The ids of the held-out rows, in order (the rows of `predictions`)."""
        assert self.order is not None and self.rows is not None
        rows = self.rows[self.order.train_rows : self.order.train_rows + self.order.test_rows]
        return [self.data.ids[row] for row in rows]

    def _label_rows(self, aligned: np.ndarray) -> np.ndarray:
        assert self.rows is not None
        return self.rows[aligned]

    def _check_party(self, party: str) -> None:
        if party not in self.plan.parties:
            raise Unknown(f"unknown feature party {party[:64]!r}: the label party waits for {list(self.plan.parties)}")

    def _check_iv(self, party: str, iv: np.ndarray, rows: int, what: str) -> None:
        spec = self._specs[party]
        count = spec.check_batch(iv, f"{party}'s IV of {what}")
        if count != rows:
            raise InvalidRequest(f"{party}'s IV of {what}: {count} rows, expected {rows}")
        if iv.dtype.kind == "f" and not np.isfinite(iv).all():  # one would spoil every party's weights
            raise InvalidRequest(f"{party}'s IV of {what} holds NaN or infinite values")

    def _wait(self, meeting: _Meeting[Any], what: str, done: Callable[[], bool]) -> None:
        """Wait (the lock held by the caller) until `done`, or fail naming who has not come."""
        deadline = time.monotonic() + self.plan.deadline
        while not done():
            if meeting.error is not None:
                raise meeting.error
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [name for name in self.plan.parties if name not in meeting.brought]
                raise PartyMissing(
                    f"{', '.join(missing)} did not come to {what} within {self.plan.deadline:g} s: nothing was "
                    "applied; retry once every party is up"
                )
            self._cond.wait(left)


def _check_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise PreconditionFailed(
            f"protocol version {version} is not supported (this label party speaks {PROTOCOL_VERSION})"
        )
