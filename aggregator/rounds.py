"""A group's rounds: who trains when, what each round starts from, when a round closes. No gRPC here.

SplitFed: round r is open to every member at once; each trains from the round's start and submits its first
part; the round closes when all members have submitted, or at the deadline with those that did (at least
`min_members`), and the next round starts from their combination: the sample-weighted average (FedAvg), or the
robust rule the aggregator was started with (splitlearning/aggregation.py). Round-robin: a round is
one turn of each member, in member order; turn t is member (t mod N) + 1's, starts from what turn t-1 ended
with (weights and optimizer state), and closes when that member submits, or is skipped at the deadline (the
next turn starts where this one started).

What each operation guarantees:
- `join` MUST answer TRAIN with the same start for a member that has not submitted to the open round (a
  restarted member redoes its round from the same point), WAIT otherwise, and DONE once the group trained all
  its rounds; it MUST refuse settings unlike the group's, changing nothing, and a join without a first part to a
  group it does not hold (lost in a restart without a store: FAILED_PRECONDITION, saying so).
- `submit` MUST accept a submission only to the open round (round-robin: only from the member whose turn it
  is), MUST answer a resend to a round that closed with the member as accepted, and MUST refuse one to a round
  that closed without it (FAILED_PRECONDITION: the member joins the next round), changing nothing.
- With a store, every accepted submission and every closed round is on disk before it is answered, so a
  restarted aggregator goes on from the same round with the same submissions (deadlines start again).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.store import GroupRecord, GroupStore
from splitlearning import groups
from splitlearning.aggregation import FEDAVG, Aggregation, Rule
from splitlearning.errors import InvalidRequest, PreconditionFailed, SessionNotFound, SplitError
from splitlearning.groups import Action, Contribution, Scheme, Settings
from splitlearning.part_state import PartState

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Next:
    """What a member does next (`join`'s answer)."""

    action: Action
    round: int
    state: PartState | None = None
    start: tuple[Contribution, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Closed:
    """A closed round (round-robin: a turn), for logs and metrics."""

    round: int
    members: tuple[int, ...]
    missed: tuple[int, ...]
    samples: int
    seconds: float


@dataclass
class Group:
    """One group's state (guarded by `Rounds`'s lock)."""

    name: str
    settings: Settings
    members: int
    template: PartState  # the group's first start: the shape every submission must have
    round: int = 0
    start: PartState = field(default_factory=PartState)
    start_refs: tuple[Contribution, ...] = ()
    submitted: dict[int, tuple[PartState, int]] = field(default_factory=dict)
    history: list[Closed] = field(default_factory=list)
    opened_at: float = 0.0
    waiting_noted: bool = False  # the deadline passed with too few submissions, and the log said so

    @property
    def stages(self) -> int:
        """Rounds to train; round-robin counts turns (a round is one turn of each member)."""
        n = self.members if self.settings.scheme is Scheme.ROUND_ROBIN else 1
        return self.settings.rounds * n

    @property
    def done(self) -> bool:
        return self.round >= self.stages

    def due(self) -> int:
        """Round-robin: the member whose turn is open."""
        return self.round % self.members + 1

    def describe_round(self, index: int | None = None) -> str:
        index = self.round if index is None else index
        if self.settings.scheme is Scheme.ROUND_ROBIN:
            return f"turn {index} (round {index // self.members}, member {index % self.members + 1})"
        return f"round {index}"

    def record(self) -> GroupRecord:
        return GroupRecord(
            self.settings,
            self.members,
            self.round,
            self.start_refs,
            {member: samples for member, (_, samples) in self.submitted.items()},
            [(c.round, c.members) for c in self.history],
        )


class Rounds:
    """Every group this aggregator keeps, by name."""

    def __init__(
        self,
        members: int,
        deadline: float = 0.0,
        min_members: int = 1,
        store: GroupStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[str, Closed], None] | None = None,
        on_submit: Callable[[str, int, int], None] | None = None,
        on_open: Callable[[str, int], None] | None = None,
        aggregation: Aggregation = FEDAVG,
    ) -> None:
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        if not 1 <= min_members <= members:
            raise ValueError(f"min_members must lie in [1, {members}], got {min_members}")
        if deadline < 0:
            raise ValueError(f"the round deadline must be >= 0 seconds (0: none), got {deadline:g}")
        self.members = members
        self.deadline = deadline
        self.min_members = min_members
        self.aggregation = aggregation
        if aggregation.rule is Rule.TRIMMED_MEAN and aggregation.trimmed(members) == 0:
            log.warning(
                "%s of %d members trims nothing (floor(%g x %d) = 0): it is the plain unweighted mean; a fraction "
                "of at least %.3g trims one member from each end",
                aggregation, members, aggregation.trim, members, 1 / members,
            )  # fmt: skip
        self._store = store
        self._clock = clock
        self._on_close = on_close
        self._on_submit = on_submit
        self._on_open = on_open
        self._groups: dict[str, Group] = {}
        self._changed = threading.Condition()
        if store is not None:  # every kept group, so deadlines run again from now (not from a first request)
            with self._changed:
                for name in store.names():
                    try:
                        self._load(name)
                    except SplitError as error:  # a set-up mistake (another --members): say so at start
                        raise ValueError(str(error)) from None

    def groups(self) -> list[Group]:
        with self._changed:
            return list(self._groups.values())

    # -- the two calls -----------------------------------------------------------------------------------------

    def join(self, name: str, member: int, settings: Settings, initial: PartState | None, wait: float = 0.0) -> Next:
        """What `member` does next; waits up to `wait` seconds (at most MAX_WAIT_SECONDS) while it is WAIT."""
        groups.check_name(name)
        self._check_member(member)
        until = self._clock() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        with self._changed:
            group = self._group(name, settings, initial)
            while True:
                self._close_overdue(group)
                answer = self._next(group, member)
                left = until - self._clock()
                if answer.action is not Action.WAIT or left <= 0:
                    return answer
                overdue = self._until_deadline(group)
                if overdue is None or group.waiting_noted:  # only a submission (which notifies) changes it now
                    self._changed.wait(left)
                else:
                    self._changed.wait(max(min(left, overdue), 0.01))

    def submit(self, name: str, member: int, round_: int, state: PartState, samples: int) -> tuple[int, int]:
        """Accept `member`'s first part at the end of `round_`; returns (members submitted so far, members)."""
        groups.check_name(name)
        self._check_member(member)
        if samples < 1:
            raise InvalidRequest(f"samples: the samples trained on in the round, at least 1, got {samples}")
        with self._changed:
            group = self._groups.get(name) or self._load(name)
            if group is None:
                raise SessionNotFound(
                    f"no group {name!r} on this aggregator: join it first (a group whose rounds were lost in a "
                    "restart without --state-dir cannot go on)"
                )
            self._close_overdue(group)
            scheme = group.settings.scheme
            if state.empty and scheme is Scheme.SPLITFED:
                raise InvalidRequest("state: SplitFed averages the members' first parts: send the weights")
            if not state.empty:
                state.check_like(group.template, "state")
                state.check_finite("state")
            for closed in reversed(group.history):
                if closed.round == round_:  # a resend to a closed round: accepted if it was counted
                    if member in closed.members:
                        return len(closed.members), group.members
                    raise PreconditionFailed(
                        f"{group.describe_round(round_)} of group {name!r} closed without member {member} (its "
                        f"deadline passed); join again: the group is at {self._at(group)}"
                    )
            if round_ != group.round or group.done:
                raise PreconditionFailed(
                    f"{group.describe_round(round_)} of group {name!r} is not open: the group is at {self._at(group)}"
                )
            if scheme is Scheme.ROUND_ROBIN and member != group.due():
                raise PreconditionFailed(f"{group.describe_round()} of group {name!r} is member {group.due()}'s turn")
            group.submitted[member] = (state, samples)
            if self._store is not None:
                self._store.save_submission(name, round_, member, state)
                self._store.save_record(name, self._record(group))
            submitted = len(group.submitted)
            if self._on_submit is not None:
                self._on_submit(name, member, round_)
            if scheme is Scheme.ROUND_ROBIN or submitted == group.members:
                self._close(group)
            self._changed.notify_all()
            return submitted, group.members

    def tick(self) -> None:
        """Close the rounds whose deadline passed (the background thread calls it; so does every request)."""
        with self._changed:
            changed = False
            for group in self._groups.values():
                changed |= self._close_overdue(group)
            if changed:
                self._changed.notify_all()

    # -- inside the lock -------------------------------------------------------------------------------------

    def _group(self, name: str, settings: Settings, initial: PartState | None) -> Group:
        group = self._groups.get(name) or self._load(name)
        if group is None:
            if initial is None or not initial.weights:  # a member sends none after its first join
                raise PreconditionFailed(
                    f"group {name!r} is not on this aggregator and this join carries no first part to start it "
                    "from (a group's first join must carry one). A member sends none after its first join, so if "
                    "this member joined before, the group's rounds were lost in a restart (keep them with "
                    "split-aggregator --state-dir, or split-server --aggregator --checkpoint-dir): start every "
                    "member of the group again"
                )
            initial.check_finite("initial")
            if settings.scheme is Scheme.SPLITFED:
                initial = PartState(initial.weights, [])  # each round starts with a fresh optimizer
            group = Group(name, settings, self.members, initial, start=initial, opened_at=self._clock())
            if self._store is not None:
                self._store.create(name, initial, self._record(group))
            self._groups[name] = group
            log.info("group %s: %d members train %s, combined by %s", name, self.members, settings, self.aggregation)
            self._opened(group)
        if settings != group.settings:
            raise PreconditionFailed(
                f"group {name!r} trains {group.settings}; this member asks for {settings}: start every member "
                "with the same --scheme, --rounds and --local-epochs"
            )
        return group

    def _record(self, group: Group) -> GroupRecord:
        """What the store keeps of `group`, with the rule its rounds are combined by."""
        return dataclasses.replace(group.record(), aggregation=self.aggregation)

    def _load(self, name: str) -> Group | None:
        if self._store is None:
            return None
        loaded = self._store.load(name)
        if loaded is None:
            return None
        record, template, start, submitted = loaded
        if record.members != self.members:
            raise PreconditionFailed(
                f"group {name!r} was started with {record.members} members, this aggregator has {self.members}: "
                "restart it with the same --members"
            )
        if record.aggregation != self.aggregation:
            raise PreconditionFailed(
                f"group {name!r} was combined by {record.aggregation}, this aggregator by {self.aggregation}: restart "
                f"it with {record.aggregation.flags()}, or give it another --state-dir"
            )
        history = [Closed(r, tuple(m), (), 0, 0.0) for r, m in record.history]
        group = Group(
            name, record.settings, record.members, template, record.round, start, record.start_refs,
            submitted, history, opened_at=self._clock(),
        )  # fmt: skip
        self._groups[name] = group
        log.info("group %s: resumed at %s with %d submissions", name, group.describe_round(), len(submitted))
        self._opened(group)
        complete = len(submitted) == group.members or group.settings.scheme is Scheme.ROUND_ROBIN
        if submitted and complete:  # killed between taking the round's last submission and closing it
            self._close(group)
        return group

    def _next(self, group: Group, member: int) -> Next:
        if group.done:
            return Next(Action.DONE, group.round, group.start, group.start_refs, f"all {group.stages} done")
        if group.settings.scheme is Scheme.ROUND_ROBIN:
            if member != group.due():
                return Next(Action.WAIT, group.round, note=f"{group.describe_round()} is member {group.due()}'s")
        elif member in group.submitted:
            waiting = sorted(set(range(1, group.members + 1)) - set(group.submitted))
            return Next(Action.WAIT, group.round, note=f"round {group.round} waits for members {waiting}")
        return Next(Action.TRAIN, group.round, group.start, group.start_refs)

    def _until_deadline(self, group: Group) -> float | None:
        if not self.deadline or group.done:
            return None
        return group.opened_at + self.deadline - self._clock()

    def _close_overdue(self, group: Group) -> bool:
        left = self._until_deadline(group)
        if left is None or left > 0:
            return False
        if group.settings.scheme is Scheme.SPLITFED and len(group.submitted) < self.min_members:
            if not group.waiting_noted:
                log.warning(
                    "group %s: round %d passed its %g s deadline with %d of the %d submissions it needs; waiting",
                    group.name, group.round, self.deadline, len(group.submitted), self.min_members,
                )  # fmt: skip
                group.waiting_noted = True
            return False
        self._close(group)
        return True

    def _close(self, group: Group) -> None:
        index, scheme = group.round, group.settings.scheme
        members = tuple(sorted(group.submitted))
        expected = (group.due(),) if scheme is Scheme.ROUND_ROBIN else tuple(range(1, group.members + 1))
        missed = tuple(m for m in expected if m not in group.submitted)
        samples = [group.submitted[m][1] for m in members]
        if members:
            states = [group.submitted[m][0] for m in members]
            if scheme is Scheme.ROUND_ROBIN:
                group.start = states[0]
            else:
                group.start = self.aggregation.combine(states, samples, group.start)
            group.start_refs = tuple(Contribution(index, m, n) for m, n in zip(members, samples, strict=True))
        seconds = self._clock() - group.opened_at
        closed = Closed(index, members, missed, sum(samples), seconds)
        group.history.append(closed)
        group.round += 1
        self._opened(group)
        group.submitted = {}
        group.opened_at = self._clock()
        group.waiting_noted = False
        if self._store is not None:
            self._store.save_start(group.name, group.round, group.start)
            self._store.save_record(group.name, self._record(group))
        if missed:
            log.warning(
                "group %s: %s closed at its %g s deadline without member%s %s; %s",
                group.name, group.describe_round(index), self.deadline, "s" * (len(missed) > 1),
                ", ".join(map(str, missed)),
                "the turn is skipped" if scheme is Scheme.ROUND_ROBIN
                else f"averaged {len(members)} members ({sum(samples)} samples, {seconds:.1f} s)",
            )  # fmt: skip
        else:
            log.info(
                "group %s: %s closed with %d member%s (%d samples) in %.1f s",
                group.name, group.describe_round(index), len(members), "s" * (len(members) != 1), sum(samples),
                seconds,
            )  # fmt: skip
        if group.done:
            log.info("group %s: all %d rounds trained", group.name, group.settings.rounds)
        if self._on_close is not None:
            self._on_close(group.name, closed)

    def _opened(self, group: Group) -> None:
        if self._on_open is not None:
            self._on_open(group.name, group.round)

    def _at(self, group: Group) -> str:
        return "its end" if group.done else group.describe_round()

    def _check_member(self, member: int) -> None:
        if not 1 <= member <= self.members:
            raise InvalidRequest(f"member: expected 1 to {self.members} (this aggregator's members), got {member}")
