"""`splitlearning.text.clip`: what a client-supplied string may look like once echoed in a log line or an error."""

from __future__ import annotations

from splitlearning.text import clip


def test_short_printable_text_is_unchanged() -> None:
    assert clip("session-3f2a") == "session-3f2a"
    assert clip("x" * 80) == "x" * 80


def test_long_text_keeps_its_start_and_says_how_much_was_cut() -> None:
    clipped = clip("a" * 100_000)
    assert clipped.startswith("a" * 80)
    assert "99920 more characters" in clipped
    assert len(clipped) < 120


def test_the_limit_is_the_callers() -> None:
    assert clip("abcdefgh", limit=3) == "abc... (5 more characters)"


def test_control_characters_are_escaped() -> None:
    clipped = clip("evil\nINFO forged line\r\x1b[31m\x00\u2028\\")
    assert "\n" not in clipped and "\r" not in clipped and "\x1b" not in clipped and "\x00" not in clipped
    assert "\u2028" not in clipped
    assert clipped == "evil\\nINFO forged line\\r\\x1b[31m\\x00\\u2028\\\\"


def test_escapes_count_against_the_limit() -> None:
    clipped = clip("\x00" * 100, limit=8)
    assert clipped == "\\x00\\x00... (98 more characters)"


def test_non_ascii_printable_text_is_kept() -> None:
    assert clip("séssion-ü") == "séssion-ü"
