"""Wire encodings of the IV and its gradient: their names, and the choice the handshake makes.

The client states the encodings it prefers, most preferred first; the server answers with the first of them
it allows, else raw. Raw (exact float32) is always spoken, and it is all a server allows unless its operator
opts in, because the narrower encodings change the numbers (see docs/performance.md for their effect).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from splitlearning.codec import EncodingCode
from splitlearning.v1 import split_learning_pb2 as pb

RAW: EncodingCode = pb.ENCODING_RAW

BY_NAME: dict[str, EncodingCode] = {
    "raw": pb.ENCODING_RAW,
    "float16": pb.ENCODING_FLOAT16,
    "bfloat16": pb.ENCODING_BFLOAT16,
    "int8": pb.ENCODING_INT8,
    "sparse": pb.ENCODING_SPARSE,
}
_NAMES: dict[EncodingCode, str] = {code: name for name, code in BY_NAME.items()}


def parse(name: str | int) -> EncodingCode:
    """'float16' (or an `Encoding` value) -> the `Encoding` value; an unknown name raises ValueError."""
    if isinstance(name, int) and not isinstance(name, bool):
        if name == pb.ENCODING_UNSPECIFIED:
            return RAW
        if name in _NAMES:
            return name  # type: ignore[return-value]
        raise ValueError(f"unknown wire encoding {name}; expected one of {sorted(BY_NAME)}")
    key = str(name).strip().lower()
    if key not in BY_NAME:
        raise ValueError(f"unknown wire encoding {name!r}; expected one of {sorted(BY_NAME)}")
    return BY_NAME[key]


def parse_list(names: str | Iterable[str | int]) -> tuple[EncodingCode, ...]:
    """'raw,float16' or ['raw', 'float16'] -> their values, in order, without repeats."""
    items = names.split(",") if isinstance(names, str) else list(names)
    codes: list[EncodingCode] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        code = parse(item)
        if code not in codes:
            codes.append(code)
    return tuple(codes)


def name(code: int) -> str:
    """The flag name of an `Encoding` value ('raw', 'float16', ...)."""
    return _NAMES.get(RAW if code == pb.ENCODING_UNSPECIFIED else code, f"unknown encoding {code}")  # type: ignore[call-overload]


def negotiate(preferred: Sequence[int], allowed: Collection[int]) -> EncodingCode:
    """The first of the client's `preferred` encodings that the server `allowed`; raw when none is."""
    for code in preferred:
        wanted = RAW if code == pb.ENCODING_UNSPECIFIED else code
        if wanted in allowed and wanted in _NAMES:
            return wanted  # type: ignore[return-value]
    return RAW
