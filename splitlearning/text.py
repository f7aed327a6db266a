"""Client-supplied text, made safe to echo in a log line or an error message.

A peer chooses its session id, client id, method name... An id of 100 KB echoed whole makes a log line of that
size (twice, with the bound field) and an error too large for the client's metadata limit; a newline in it
forges a log line. `clip` keeps the start, says how much it cut, and escapes what is not printable.
"""

from __future__ import annotations

# A whole message that may hold client-supplied text (an error's, a refusal's): room for a contract or two.
MESSAGE_LIMIT = 1024
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clip(value: str, limit: int = 80) -> str:
    """`value` with control (non-printable) characters escaped, cut after `limit` characters of output.

    A cut text ends with "... (N more characters)", N counted in `value`'s own characters. An escape counts
    its full length against `limit` and is never split.
    """
    value = str(value)
    out: list[str] = []
    used = 0
    for index, char in enumerate(value):
        shown = _escape(char)
        if used + len(shown) > limit:
            return "".join(out) + f"... ({len(value) - index} more characters)"
        out.append(shown)
        used += len(shown)
    return "".join(out)


def clip_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message of ours that may embed client text: unchanged when short and printable, else `clip`ped."""
    return text if len(text) <= limit and text.isprintable() else clip(text, limit)


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
