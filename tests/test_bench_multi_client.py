"""benchmarks/multi_client.py on its smallest setting (a real server and two members, one round), and the check
that the members report the same group accuracy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from benchmarks import multi_client
from benchmarks.multi_client import Config


@pytest.mark.processes
def test_one_round_of_two_members_gives_the_groups_accuracy_and_round_time(tmp_path: Path) -> None:
    args = multi_client.parse_args(["--rounds", "1", "--model", "digits-mlp", "--configs", "splitfed:2:random"])
    run = multi_client.run_group(args.configs[0], args, tmp_path)

    assert run.name == "splitfed N=2 IID"
    assert len(run.accuracy) == len(run.loss) == 2  # the start, after round 1
    assert all(0.0 <= a <= 1.0 for a in run.accuracy)
    assert run.members_agree and run.spread == 0.0
    assert sorted(run.samples) == [718, 719]  # the digits' 1,437 training samples, cut in two, all trained on
    assert len(run.round_seconds) == 1 and run.round_seconds[0] > 0
    assert [len(seconds) for seconds in run.member_seconds] == [1, 1]
    assert run.total_seconds > run.round_seconds[0]
    rows = multi_client.accuracy_table([run], None).splitlines()
    assert rows[0] == "| round | splitfed N=2 IID |"
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| start", "| 1"]
    assert "| splitfed N=2 IID | 718, 719 |" in multi_client.time_table([run], None)


def _history(member: int, starts: list[float], final: float) -> dict[str, Any]:
    rounds = [
        {"round": r, "samples": 10, "seconds": 1.0, "start_test": {"loss": 1.0, "accuracy": a}}
        for r, a in enumerate(starts)
    ]
    return {"member": member, "rounds": rounds, "final_test": {"loss": 0.5, "accuracy": final}}


def _closes(count: int) -> list[Any]:
    from datetime import datetime, timedelta

    start = datetime(2026, 1, 1)
    return [(start + timedelta(seconds=2 * (i + 1)), 2.0, 2) for i in range(count)]


def test_members_that_disagree_on_the_groups_accuracy_are_reported() -> None:
    config = Config("splitfed", 2)
    same = [_history(1, [0.1, 0.5], 0.8), _history(2, [0.1, 0.5], 0.8)]
    run = multi_client._figures(config, 2, same, _closes(2), 10.0)
    assert run.members_agree and run.accuracy == [0.1, 0.5, 0.8]
    assert run.round_seconds == [2.0, 2.0]

    different = copy.deepcopy(same)
    different[1]["rounds"][1]["start_test"]["accuracy"] = 0.6
    run = multi_client._figures(config, 2, different, _closes(2), 10.0)
    assert not run.members_agree and run.spread == pytest.approx(0.1)

    with pytest.raises(RuntimeError, match="closed 1 rounds, expected 2"):
        multi_client._figures(config, 2, same, _closes(1), 10.0)


def test_configurations_are_parsed_and_named() -> None:
    assert Config.parse("splitfed:4:label").name == "splitfed N=4 non-IID"
    assert Config.parse("round-robin:2").turns == 2
    assert Config.parse("splitfed:1").name == "splitfed N=1 (one client)"
    for bad in ("fedavg:2", "splitfed:0", "splitfed:2:classes", "splitfed"):
        with pytest.raises(ValueError):
            Config.parse(bad)
