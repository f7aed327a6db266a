"""A member of a group: trains its rounds as the aggregator says, against the server (docs/multi_client.md).

Each round (round-robin: each turn of this member) the member asks the aggregator what to do; told to train
round r, it loads the first part the aggregator gives (SplitFed: the average of the last round's, with a fresh
optimizer; round-robin: what the last turn ended with, optimizer state included), opens a new session on the
server whose part starts from the contributions the aggregator names, evaluates that start on the test split
(the group's model after the last round), trains `local_epochs` passes over its own data, evaluates its local
model, closes the session leaving the server's part as its contribution, and submits its first part.

The round is the unit of recovery: a member whose round fails part-way (the server restarted, a session was
lost) trains it again from the same start, and a restarted member asks the aggregator and redoes its open
round; a round's steps are a fixed function of its start, its shard and the seed, so the result is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from client_part.aggregator_link import AggregatorLink, Answer
from client_part.client import SplitClient
from client_part.retry import RetriesExhausted
from client_part.transport import RemoteError
from splitlearning import part_state
from splitlearning.groups import Action, Membership, Scheme
from splitlearning.part_state import PartState

log = logging.getLogger(__name__)

# Failed attempts at one round before the member gives up (each after the client's own retries).
MAX_ROUND_ATTEMPTS = 5


@dataclass
class RoundRecord:
    """One round this member trained."""

    round: int  # the aggregator's index (round-robin: the turn)
    samples: int
    seconds: float  # wall time of this member's part of the round: evaluations, training, hand-in
    start_test: dict[str, float]  # the round's start (the group's model after the round before) on the test split
    local_test: dict[str, float]  # this member's model at the end of its round on the test split
    logs: dict[str, float]  # the last local epoch's logs (loss, metrics, val_*)
    attempts: int = 1


@dataclass
class GroupResult:
    group: str
    member: int
    scheme: str
    rounds: list[RoundRecord] = field(default_factory=list)
    final_test: dict[str, float] = field(default_factory=dict)  # the group's final model
    final_round: int = 0
    waited_seconds: float = 0.0  # time spent waiting for other members

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Data:
    x: Any
    y: Any
    batch_size: int
    shuffle: bool
    seed: int
    validation: tuple[Any, Any] | None
    test: tuple[Any, Any]
    verbose: int = 0


class GroupMember:
    """Trains `client`'s part as member `link.member` of `link.group`."""

    def __init__(
        self,
        client: SplitClient,
        link: AggregatorLink,
        handover_dir: Path | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.client = client
        self.link = link
        self.settings = link.settings
        self.scheme = link.settings.scheme
        if handover_dir is not None and self.scheme is not Scheme.ROUND_ROBIN:
            raise ValueError("--handover-dir hands a turn's first part to the next member: round-robin only")
        self.handover_dir = handover_dir
        self._on_round = on_round
        self._callbacks = list(callbacks)

    def train(self, data: Data) -> GroupResult:
        carry = self.scheme.carries_optimizer
        result = GroupResult(self.link.group, self.link.member, self.scheme.value)
        initial = self.client.part_state(with_optimizer=True)  # before any step
        fresh_optimizer = initial.optimizer
        offer: PartState | None = initial if carry else PartState(initial.weights, [])
        attempts: dict[int, int] = {}
        note = ""
        while True:
            asked = time.perf_counter()
            answer = self.link.join(offer)
            result.waited_seconds += time.perf_counter() - asked  # a join waits on the aggregator for its answer
            offer = None  # the group exists now: its start is fixed
            if answer.action is Action.WAIT:
                if answer.note != note:
                    log.info("group %s: waiting (%s)", self.link.group, answer.note)
                    note = answer.note
                continue
            note = ""
            state = self._start_state(answer, fresh_optimizer)
            membership = Membership(
                self.link.group, answer.round, self.link.member, self.scheme, answer.start, answer.aggregation
            )
            if answer.action is Action.DONE:
                result.final_round = answer.round
                result.final_test = self._final(membership, state, data)
                return result
            attempts[answer.round] = attempts.get(answer.round, 0) + 1
            try:
                record = self._round(membership, state, data, carry)
            except (RemoteError, RetriesExhausted, RuntimeError) as error:
                # Ask the aggregator again: the same round from its start while it is open, else the next one
                # (a round that closed at its deadline without this member refuses its submission).
                if attempts[answer.round] >= MAX_ROUND_ATTEMPTS:
                    raise
                log.warning(
                    "%s failed (%s); asking the aggregator what to train (attempt %d of %d at it)",
                    _what(membership, self.scheme), error, attempts[answer.round] + 1, MAX_ROUND_ATTEMPTS,
                )  # fmt: skip
                continue
            record.attempts = attempts[answer.round]
            result.rounds.append(record)
            if self._on_round is not None:
                self._on_round(record)

    # -- one round ---------------------------------------------------------------------------------------------

    def _round(self, membership: Membership, state: PartState, data: Data, carry: bool) -> RoundRecord:
        client, epochs = self.client, self.settings.local_epochs
        started = time.perf_counter()
        client.start_round(membership, state)
        client.connect()
        start_test = client.evaluate(*data.test, batch_size=data.batch_size)
        # This member's own count of rounds numbers its epochs, so each round draws a new data order.
        own_round = membership.round // self._members() if self.scheme is Scheme.ROUND_ROBIN else membership.round
        history = client.fit(
            data.x,
            data.y,
            batch_size=data.batch_size,
            epochs=(own_round + 1) * epochs,
            initial_epoch=own_round * epochs,
            shuffle=data.shuffle,
            validation_data=data.validation,
            verbose=data.verbose,
            seed=data.seed,
            callbacks=self._callbacks,
        )
        local_test = client.evaluate(*data.test, batch_size=data.batch_size)
        samples = epochs * len(data.x)
        client.end_session(contribute_samples=samples)
        finished = client.part_state(with_optimizer=carry)
        if self.handover_dir is not None:
            part_state.save(self._handover_path(membership.round), finished)
            finished = PartState()  # the aggregator learns the turn is done, not its weights
        submitted, members = self.link.submit(membership.round, finished, samples)
        logs = {name: values[-1] for name, values in history.history.items() if values}
        record = RoundRecord(membership.round, samples, time.perf_counter() - started, start_test, local_test, logs)
        log.info(
            "%s: trained on %d samples in %.1f s; %s at its start, %s after (test); %d of %d members handed in",
            _what(membership, self.scheme), samples, record.seconds, _short(start_test), _short(local_test),
            submitted, members,
        )  # fmt: skip
        return record

    def _final(self, membership: Membership, state: PartState, data: Data) -> dict[str, float]:
        """The group's final model (both parts) on the test split, in a session opened for that alone."""
        self.client.start_round(membership, state)
        self.client.connect()
        test = self.client.evaluate(*data.test, batch_size=data.batch_size)
        self.client.end_session()
        log.info("group %s: training done; the group's model on the test split: %s", self.link.group, _short(test))
        return test

    def _start_state(self, answer: Answer, fresh_optimizer: list[Any]) -> PartState:
        state = answer.state
        if state.empty:
            if self.handover_dir is None or not answer.start:
                raise RemoteError(
                    "joining the group",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                    details="the aggregator holds no first part for this round: the members before this one hand "
                    "over through files; start this member with the same --handover-dir",
                )
            path = self._handover_path(answer.start[0].round)
            if not path.is_file():
                raise FileNotFoundError(f"--handover-dir: no hand-over file {path} (the previous turn's first part)")
            state = part_state.load(path)[0]
        if not self.scheme.carries_optimizer:
            state = PartState(state.weights, fresh_optimizer)  # SplitFed: each round's optimizer starts afresh
        return state

    def _handover_path(self, round_: int) -> Path:
        assert self.handover_dir is not None
        return self.handover_dir / f"{self.link.group}-turn-{round_}.npz"

    def _members(self) -> int:
        return self.link.members or 1


def _what(membership: Membership, scheme: Scheme) -> str:
    if scheme is Scheme.ROUND_ROBIN:
        return f"group {membership.group} turn {membership.round}"
    return f"group {membership.group} round {membership.round}"


def _short(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())


def table(result: GroupResult) -> str:
    """The member's rounds for people: one row per round, then the group's final model."""
    names = sorted({name for record in result.rounds for name in record.local_test} | set(result.final_test))
    metric = "accuracy" if "accuracy" in names else (names[0] if names else "loss")
    unit = "turn" if result.scheme == Scheme.ROUND_ROBIN.value else "round"
    header = f"{unit:>5} | samples | seconds | train loss | start test {metric} | local test {metric}"
    lines = [header, "-" * len(header)]
    for record in result.rounds:
        lines.append(
            f"{record.round:>5} | {record.samples:>7} | {record.seconds:>7.1f}"
            f" | {record.logs.get('loss', float('nan')):>10.4f}"
            f" | {record.start_test.get(metric, float('nan')):>{11 + len(metric)}.4f}"
            f" | {record.local_test.get(metric, float('nan')):>{11 + len(metric)}.4f}"
        )
    final = result.final_test.get(metric, float("nan"))
    waited = f"waited {result.waited_seconds:.1f} s for the other members"
    lines.append(f"the group's final model: test {metric} {final:.4f} ({waited})")
    return "\n".join(lines)
