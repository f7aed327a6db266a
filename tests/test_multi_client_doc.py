"""docs/multi_client.md's commands are commands the programs take: each `split-*` line of its shell blocks parses
with that program's own parser, and the flags its tables name exist (a renamed flag fails here)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli import parse_args as aggregator_args
from client_part.cli import parse_args as client_args
from server_part.cli import parse_args as server_args

DOC = Path(__file__).resolve().parent.parent / "docs" / "multi_client.md"
PARSERS: dict[str, Callable[[list[str]], Any]] = {
    "split-server": server_args,
    "split-client": client_args,
    "split-aggregator": aggregator_args,
}


def commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.split(" ", 1)[0] in PARSERS]


def test_the_page_shows_every_program() -> None:
    assert {words[0] for words in commands()} == set(PARSERS)


@pytest.mark.parametrize("words", commands(), ids=lambda words: " ".join(words))
def test_each_command_parses(words: list[str]) -> None:
    PARSERS[words[0]](words[1:])


def test_the_flag_tables_name_flags_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    helps = {}
    for name, parse in PARSERS.items():
        with pytest.raises(SystemExit):
            parse(["--help"])
        helps[name] = capsys.readouterr().out
    tables = re.findall(r"^\| `(--[a-z-]+)", DOC.read_text(encoding="utf-8"), re.M)
    assert len(tables) >= 10
    for flag in tables:
        assert any(re.search(rf"{re.escape(flag)}\b", text) for text in helps.values()), flag
