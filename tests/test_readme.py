"""The README is the specification users read: its Python API example runs as pasted, its links resolve."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_python_api_example_runs_as_pasted(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", section("Python API (Keras habits)"), re.S)
    assert len(blocks) == 1
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md (Python API)", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    accuracies = ast.literal_eval(lines[0])  # the printed list of floats
    assert len(accuracies) == 3 and accuracies[-1] > 0.5
    assert "'accuracy'" in lines[1] and lines[2] == "(360, 10)" and re.fullmatch(r"[0-9a-f]{32}", lines[3])


def test_the_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (README.parent / link).exists(), link


def test_the_exactness_rerun_is_the_same_in_the_readme_and_in_ci() -> None:
    """The README's `TF_ENABLE_ONEDNN_OPTS=0` test command names the same test modules as `.ci/run`'s."""
    ci = (README.parent / ".ci" / "run").read_text()

    def modules(text: str) -> list[str]:
        command = re.search(r"^TF_ENABLE_ONEDNN_OPTS=0 .*?pytest(.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL)
        assert command, "no TF_ENABLE_ONEDNN_OPTS=0 pytest command"
        return re.findall(r"tests/\S+\.py", command.group(1))

    assert modules(README.read_text()) == modules(ci)
    assert "tests/test_cli_default_exactness.py" in modules(ci)


def test_the_test_command_is_the_same_in_the_readme_and_in_ci() -> None:
    """The README's first test command (its pytest options: the workers and how tests are spread over them) is
    the one `.ci/run` runs under the Docker engine, and the README names it so."""
    ci = (README.parent / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", section("Quick start"), re.S)
    tests = [block for block in blocks if "pytest" in block]
    assert len(tests) == 1, "not one test command in the README's Quick start"
    first = tests[0].splitlines()[0]
    assert first.startswith(".venv/bin/python -m pytest"), first
    ran = re.findall(r"^SPLIT_TESTS_REQUIRE_ALL=1 scripts/docker_engine.sh (.*)$", ci, re.MULTILINE)
    assert ran == [first]
    assert f"`SPLIT_TESTS_REQUIRE_ALL=1 scripts/docker_engine.sh {first}`" in " ".join(README.read_text().split())


def test_the_after_training_commands_parse_with_the_programs_parsers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `split-*` line of "After training" is a command its program takes (a renamed flag fails here)."""
    import shlex

    from client_part.cli import parse_args as client_args
    from server_part.cli import parse_args as server_args
    from splitlearning.joined import parse_args as join_args

    parsers = {"split-server": server_args, "split-client": client_args}
    blocks = re.findall(r"```bash\n(.*?)```", section("After training: use the model"), re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("split-")]
    assert {words[0] for words in commands} == {"split-server", "split-client", "split-join"}
    monkeypatch.chdir(tmp_path)  # split-join's parser checks that the parts' files exist
    for name in ("client.keras", "server.keras"):
        (tmp_path / name).touch()
    for words in commands:
        if words[0] == "split-join":
            assert [str(part) for part in join_args(words[1:]).parts] == ["client.keras", "server.keras"]
        else:
            parsers[words[0]](words[1:])
