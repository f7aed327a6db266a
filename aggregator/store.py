"""The aggregator's state on disk: one folder per group under `--state-dir`.

`DIR/<group>/group.json` holds the settings, the open round, what it starts from and who submitted;
`initial.npz` the group's first start, `start-<round>.npz` the open round's start and `round-<round>-member-<k>.npz`
each submission. Every file is written to a temporary name and renamed; `group.json` is written last, and it
names only files that exist, so a process killed at any point leaves a state to go on from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splitlearning import part_state
from splitlearning.aggregation import FEDAVG, Aggregation, Rule
from splitlearning.files import write_json_atomic
from splitlearning.groups import Contribution, Scheme, Settings
from splitlearning.part_state import PartState


@dataclass(frozen=True)
class GroupRecord:
    settings: Settings
    members: int
    round: int
    start_refs: tuple[Contribution, ...]
    submitted: dict[int, int]  # member -> samples, in the open round
    history: list[tuple[int, tuple[int, ...]]]  # (round, members counted) of each closed round
    aggregation: Aggregation = FEDAVG  # how the group's SplitFed rounds are combined (FedAvg in older files)

    def to_json(self) -> dict[str, object]:
        return {
            "scheme": self.settings.scheme.value,
            "rounds": self.settings.rounds,
            "local_epochs": self.settings.local_epochs,
            "members": self.members,
            "round": self.round,
            "start": [[c.round, c.member, c.samples] for c in self.start_refs],
            "submitted": {str(m): n for m, n in self.submitted.items()},
            "history": [[r, list(m)] for r, m in self.history],
            "aggregation": {
                "rule": self.aggregation.rule.value,
                "trim": self.aggregation.trim,
                "bound": self.aggregation.bound,
            },
        }

    @staticmethod
    def from_json(payload: dict[str, object]) -> GroupRecord:
        data = json.loads(json.dumps(payload))  # a deep copy with plain types
        settings = Settings(Scheme(data["scheme"]), int(data["rounds"]), int(data["local_epochs"]))
        return GroupRecord(
            settings,
            int(data["members"]),
            int(data["round"]),
            tuple(Contribution(*map(int, c)) for c in data["start"]),
            {int(m): int(n) for m, n in data["submitted"].items()},
            [(int(r), tuple(int(x) for x in m)) for r, m in data["history"]],
            _aggregation(data.get("aggregation")),
        )


def _aggregation(saved: dict[str, object] | None) -> Aggregation:
    if saved is None:
        return FEDAVG
    return Aggregation(Rule(saved["rule"]), float(saved["trim"]), float(saved["bound"]))  # type: ignore[arg-type]


class GroupStore:
    """Groups' state under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        return self.root / name  # names are checked (groups.check_name) before they reach a path

    def names(self) -> list[str]:
        """The groups kept here."""
        return sorted(path.parent.name for path in self.root.glob("*/group.json"))

    def create(self, name: str, initial: PartState, record: GroupRecord) -> None:
        folder = self._dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        part_state.save(folder / "initial.npz", initial)
        self.save_record(name, record)

    def save_submission(self, name: str, round_: int, member: int, state: PartState) -> None:
        part_state.save(self._dir(name) / f"round-{round_}-member-{member}.npz", state)

    def save_start(self, name: str, round_: int, state: PartState) -> None:
        part_state.save(self._dir(name) / f"start-{round_}.npz", state)

    def save_record(self, name: str, record: GroupRecord) -> None:
        folder = self._dir(name)
        write_json_atomic(folder / "group.json", record.to_json())
        for stale in folder.glob("*.npz"):  # what no longer belongs to the open round
            keep = stale.name in ("initial.npz", f"start-{record.round}.npz") or stale.name.startswith(
                f"round-{record.round}-"
            )
            if not keep:
                stale.unlink(missing_ok=True)

    def load(self, name: str) -> tuple[GroupRecord, PartState, PartState, dict[int, tuple[PartState, int]]] | None:
        """(record, initial, the open round's start, its submissions), or None for a group never stored."""
        folder = self._dir(name)
        path = folder / "group.json"
        if not path.is_file():
            return None
        record = GroupRecord.from_json(json.loads(path.read_text()))
        initial, _ = part_state.load(folder / "initial.npz")
        start_path = folder / f"start-{record.round}.npz"
        if record.round > 0 and not start_path.is_file():
            raise FileNotFoundError(f"{start_path}: the aggregator's state is incomplete")
        start = part_state.load(start_path)[0] if record.round > 0 else initial
        submitted = {
            member: (part_state.load(folder / f"round-{record.round}-member-{member}.npz")[0], samples)
            for member, samples in record.submitted.items()
        }
        return record, initial, start, submitted
