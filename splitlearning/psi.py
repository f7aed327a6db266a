"""Private set intersection of sample ids (vertical split learning's alignment step): DH-PSI over P-256.

The label party (the hub, `Hub`) and each feature party (a member, `Member`) find the ids they all hold and
nothing else: only blinded 32-byte points and, at the end, positions cross between them. The construction
(Meadows 1986; Huberman, Franklin and Hogg 1999) and what each party learns are in docs/vertical.md,
"Alignment: private set intersection". Pure: no gRPC, no TensorFlow; the messages are plain dataclasses
(`Blinded`, `Positions`) that a servicer can carry.

Steps, for each member i (any order across members):

1. `Member.request()`: its ids hashed to the curve and blinded by its secret, in a random order it keeps.
2. `Hub.offer()`: the hub's ids blinded by its secret (one offer for every member), in a random order.
3. `Member.reblind(offer)`: the offer blinded again by the member's secret, same order.
4. `Hub.match(member, request, reblinded)`: the hub blinds the request with its own secret and compares.
5. Once every member is matched, `Hub.result(member)`: the member's positions (in its request's order) of
   the ids every party holds, in one order common to all; `Member.intersection(positions)` maps them back.
   `Hub.intersection()` is the hub's ids in that same order, so row k is the same person at every party.

`intersect(label_ids, *feature_ids)` runs it all in one process (tests, benchmarks); `run` also keeps every
message sent.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, SupportsIndex, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from splitlearning.errors import InvalidRequest, PreconditionFailed

Id = str | SupportsIndex
"""A sample id: a string or an integer (int, numpy's integers); its canonical bytes are `canonical(id)`."""
IdT = TypeVar("IdT", bound=Id)

POINT_BYTES = 32
"""A blinded value on the wire: the x-coordinate of a P-256 point, 32 bytes big-endian."""
POSITION_BYTES = 4
"""A position, counted on the wire as an unsigned 32-bit integer (benchmarks' byte counts)."""

_CURVE = ec.SECP256R1()
# Hash-to-curve domain: a fixed tag, then a one-byte attempt counter, then the id's canonical bytes.
_DOMAIN = b"splitlearning/psi/v1 P-256 SHA-256 try-and-increment\x00"
# A SHA-256 output is the x-coordinate of a P-256 point about half the time: 256 attempts fail with
# probability 2**-256.
_ATTEMPTS = 256
_RANDOM = random.SystemRandom()


class BadMessage(InvalidRequest, ValueError):
    """A peer's PSI message is malformed: a value not 32 bytes or not a point, the wrong count, repeats,
    positions out of range."""


class NoCommonIds(PreconditionFailed, ValueError):
    """The parties hold no id in common (all of them, or the hub and one member): nothing to train on."""


class ProtocolOrder(PreconditionFailed):
    """A step called out of order (a result before every member is matched, a member matched twice)."""


@dataclass(frozen=True)
class Blinded:
    """Blinded ids as sent: one 32-byte x-coordinate per id, in the sender's (random) order."""

    points: list[bytes]

    @property
    def nbytes(self) -> int:
        """The payload's size on the wire, in bytes."""
        return POINT_BYTES * len(self.points)


@dataclass(frozen=True)
class Positions:
    """The hub's answer to a member: indices into the member's request, one per common id, in the common
    order (row k of every party's intersection is the same sample)."""

    positions: list[int]

    @property
    def nbytes(self) -> int:
        """The payload's size on the wire, in bytes."""
        return POSITION_BYTES * len(self.positions)


def canonical(value: Id) -> bytes:
    """An id's bytes, the same on every party for the same value: an integer's decimal digits (`7` -> b"7",
    numpy's integers included), a string's UTF-8 as given (no Unicode normalisation or stripping). So the
    integer 7 and the string "7" are one id; "07" and " 7" are others. Booleans and other types: TypeError."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError(f"an id is an integer or a string, not a bool ({value!r})")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"an id is an integer or a string, not {type(value).__name__} ({value!r})") from None
    return str(number).encode("ascii")


def canonical_ids(ids: Iterable[Id], party: str) -> list[bytes]:
    """`ids`' canonical bytes in order; ValueError when empty or when two ids are one (naming one)."""
    out = [canonical(value) for value in ids]
    if not out:
        raise ValueError(f"{party} has no ids: a private set intersection needs at least one")
    if len(set(out)) != len(out):
        seen: set[bytes] = set()
        for value in out:
            if value in seen:
                shown = value.decode("utf-8", "backslashreplace")
                raise ValueError(f"{party}'s ids must be unique: {shown!r} appears more than once")
            seen.add(value)
    return out


def hash_to_point(value: bytes) -> bytes:
    """The P-256 point of an id's canonical bytes, as its 32-byte x-coordinate (its unblinded hash).

    Try-and-increment: the first SHA-256(domain, counter, value) that OpenSSL accepts as the x-coordinate of
    a point (SEC1 compressed decoding: below p, and x**3 - 3x + b a square). No curve arithmetic of ours.
    """
    return _hash_to_key(value)[0]


def _hash_to_key(value: bytes) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    for counter in range(_ATTEMPTS):
        x = hashlib.sha256(_DOMAIN + bytes([counter]) + value).digest()
        try:
            return x, ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x02" + x)
        except ValueError:
            continue
    raise ValueError("no P-256 point in 256 attempts (probability 2**-256): this id cannot be hashed")


def _decode(x: bytes, what: str, index: int) -> ec.EllipticCurvePublicKey:
    if not isinstance(x, bytes) or len(x) != POINT_BYTES:
        raise BadMessage(f"{what}: value {index} is not {POINT_BYTES} bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x02" + x)
    except ValueError:
        raise BadMessage(f"{what}: value {index} is not the x-coordinate of a P-256 point") from None


class Secret:
    """One party's blinding secret: a P-256 scalar k drawn by OpenSSL, and P -> x(k·P) with it (ECDH).

    x(k·P) does not depend on P's sign, so a value can be blinded again from its x-coordinate alone, and
    blinding commutes: blind_b(blind_a(P)) = x(ab·P) = blind_a(blind_b(P)).
    """

    def __init__(self) -> None:
        self._key = ec.generate_private_key(_CURVE)

    def blind(self, x: bytes) -> bytes:
        """The 32-byte x-coordinate of k·P, P the point of x-coordinate `x`; BadMessage if `x` is none."""
        return self._blind_key(_decode(x, "blinding", 0))

    def blind_all(self, points: Sequence[bytes], what: str) -> list[bytes]:
        """`blind` of each of `points`, in order; BadMessage naming `what` and the index of a bad value."""
        return [self._blind_key(_decode(x, what, index)) for index, x in enumerate(points)]

    def _blind_key(self, point: ec.EllipticCurvePublicKey) -> bytes:
        try:
            return self._key.exchange(ec.ECDH(), point)
        except ValueError as error:  # the point at infinity: cannot happen for a valid point and k != 0
            raise BadMessage(f"blinding failed: {error}") from None

    def blind_ids(self, ids: Sequence[bytes]) -> list[bytes]:
        """Each canonical id hashed to the curve and blinded, in order."""
        return [self._blind_key(_hash_to_key(value)[1]) for value in ids]


def _unique(points: Sequence[bytes], what: str) -> None:
    if len(set(points)) != len(points):
        raise BadMessage(f"{what} repeats a value: the ids behind it are unique, so it cannot")


class Member(Generic[IdT]):
    """A feature party's side: `request`, `reblind`, then `intersection` of the hub's positions."""

    def __init__(self, ids: Iterable[IdT], name: str = "feature party") -> None:
        self.name = name
        self._ids = list(ids)
        canonical_ = canonical_ids(self._ids, name)
        self._order = list(range(len(canonical_)))
        _RANDOM.shuffle(self._order)
        self._secret = Secret()
        self._request = Blinded(self._secret.blind_ids([canonical_[index] for index in self._order]))
        self.offered: int | None = None

    def request(self) -> Blinded:
        """Step 1: this party's ids, hashed and blinded by its secret, in a random order it keeps."""
        return self._request

    def reblind(self, offer: Blinded) -> Blinded:
        """Step 3: the hub's offer blinded again by this party's secret, in the offer's order. The offer's
        length is the hub's id count, which this party thereby learns (`offered`)."""
        _unique(offer.points, "the hub's offer")
        self.offered = len(offer.points)
        return Blinded(self._secret.blind_all(offer.points, "the hub's offer"))

    def intersection(self, positions: Positions) -> list[IdT]:
        """Step 5: this party's ids at the hub's `positions` (of its request), in the positions' order: the
        ids every party holds, in the order common to all."""
        return [self._ids[row] for row in self.rows(positions)]

    def rows(self, positions: Positions) -> list[int]:
        """The same as indices into this party's `ids` (its table's rows)."""
        count = len(self._order)
        values = positions.positions
        if not values:
            raise NoCommonIds(f"{self.name}: the hub reports no id in common")
        if len(set(values)) != len(values):
            raise BadMessage(f"{self.name}: the hub's positions repeat an index")
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
                raise BadMessage(f"{self.name}: position {value!r} is outside the request's 0..{count - 1}")
        return [self._order[value] for value in values]


@dataclass
class _Match:
    size: int  # the member's id count (its request's length)
    held: dict[int, int]  # the hub's id index -> the member's position, for each hub id the member holds


class Hub(Generic[IdT]):
    """The label party's side: one `offer` for all, `match` each member, then `result` for each."""

    def __init__(self, ids: Iterable[IdT], members: Sequence[str], name: str = "label party") -> None:
        if not members:
            raise ValueError("a private set intersection needs at least one feature party")
        if len(set(members)) != len(members):
            raise ValueError(f"feature party names must be unique: {list(members)}")
        self.name = name
        self._ids = list(ids)
        canonical_ = canonical_ids(self._ids, name)
        self._members = list(members)
        self._order = list(range(len(canonical_)))
        _RANDOM.shuffle(self._order)
        self._secret = Secret()
        self._offer = Blinded(self._secret.blind_ids([canonical_[index] for index in self._order]))
        self._matches: dict[str, _Match] = {}
        self._common: list[int] | None = None  # the hub's id indices every member holds, in the common order

    def offer(self) -> Blinded:
        """Step 2: this party's ids, hashed and blinded by its secret, in a random order (the same offer
        for every member)."""
        return self._offer

    def match(self, member: str, request: Blinded, reblinded: Blinded) -> int:
        """Step 4: blind `member`'s request with this party's secret and compare with its `reblinded` offer.

        Returns how many of this party's ids the member holds (which ids: `held_by`). NoCommonIds, naming
        both sizes, when it holds none; BadMessage when a message is malformed; ProtocolOrder when the member
        is unknown or already matched.
        """
        if member not in self._members:
            raise ProtocolOrder(f"unknown feature party {member!r} (expected one of {self._members})")
        if member in self._matches:
            raise ProtocolOrder(f"feature party {member!r} is already matched")
        if len(reblinded.points) != len(self._offer.points):
            raise BadMessage(
                f"{member}'s reblinded offer has {len(reblinded.points)} values, the offer {len(self._offer.points)}"
            )
        _unique(request.points, f"{member}'s request")
        _unique(reblinded.points, f"{member}'s reblinded offer")
        twice = {x: self._order[slot] for slot, x in enumerate(reblinded.points)}
        held: dict[int, int] = {}
        for position, x in enumerate(self._secret.blind_all(request.points, f"{member}'s request")):
            index = twice.get(x)
            if index is not None:
                held[index] = position
        if not held:
            raise NoCommonIds(
                f"{member} holds none of the {self.name}'s ids "
                f"({self.name}: {len(self._ids):,} ids; {member}: {len(request.points):,} ids)"
            )
        self._matches[member] = _Match(len(request.points), held)
        return len(held)

    def held_by(self, member: str) -> list[IdT]:
        """This party's ids that `member` holds (what the hub learns from `match`), in its own input order."""
        return [self._ids[index] for index in sorted(self._matches[member].held)]

    def _common_order(self) -> list[int]:
        if self._common is None:
            missing = [member for member in self._members if member not in self._matches]
            if missing:
                raise ProtocolOrder(f"no result before every feature party is matched (waiting for {missing})")
            common = set(range(len(self._ids)))
            for match in self._matches.values():
                common &= match.held.keys()
            if not common:
                sizes = "; ".join(f"{member}: {match.size:,}" for member, match in self._matches.items())
                raise NoCommonIds(
                    f"no id is held by every party ({self.name}: {len(self._ids):,} ids; {sizes}), "
                    "though each feature party shares some with the label party"
                )
            order = sorted(common)
            _RANDOM.shuffle(order)  # a random common order: neither party's row order leaks through it
            self._common = order
        return self._common

    def result(self, member: str) -> Positions:
        """Step 5: `member`'s positions (in its request) of the ids every party holds, in the common order.
        ProtocolOrder until every member is matched; NoCommonIds when no id is held by all."""
        if member not in self._members:
            raise ProtocolOrder(f"unknown feature party {member!r} (expected one of {self._members})")
        common = self._common_order()
        held = self._matches[member].held
        return Positions([held[index] for index in common])

    def intersection(self) -> list[IdT]:
        """This party's ids that every party holds, in the common order (the members' results' order)."""
        return [self._ids[index] for index in self._common_order()]

    def intersection_rows(self) -> list[int]:
        """The same, as indices into this party's `ids` (its table's rows)."""
        return list(self._common_order())


@dataclass(frozen=True)
class Sent:
    """One message of an in-process run: who sent it to whom, and what."""

    sender: str
    receiver: str
    step: str
    message: Blinded | Positions


@dataclass
class Run:
    """An in-process run: each party's intersection (the label party's first, all in one order), and every
    message exchanged."""

    ids: list[list[Id]]
    messages: list[Sent] = field(default_factory=list)

    @property
    def wire_bytes(self) -> int:
        """The payloads' total size in bytes (points and positions; no framing)."""
        return sum(sent.message.nbytes for sent in self.messages)


LABEL = "label"


def run(label_ids: Iterable[Id], *feature_ids: Iterable[Id]) -> Run:
    """The whole protocol in one process between a label party and `feature_ids`' feature parties (named
    "feature-1", ...), keeping every message; raises as the parties would."""
    names = [f"feature-{number}" for number in range(1, len(feature_ids) + 1)]
    hub: Hub[Id] = Hub(label_ids, names)
    members: list[Member[Id]] = [Member(ids, name) for name, ids in zip(names, feature_ids, strict=True)]
    messages: list[Sent] = []
    for member in members:
        request = member.request()
        messages.append(Sent(member.name, LABEL, "request", request))
        offer = hub.offer()
        messages.append(Sent(LABEL, member.name, "offer", offer))
        reblinded = member.reblind(offer)
        messages.append(Sent(member.name, LABEL, "reblinded", reblinded))
        hub.match(member.name, request, reblinded)
    ids = [hub.intersection()]
    for member in members:
        positions = hub.result(member.name)
        messages.append(Sent(LABEL, member.name, "positions", positions))
        ids.append(member.intersection(positions))
    return Run(ids, messages)


def intersect(label_ids: Iterable[Id], *feature_ids: Iterable[Id]) -> list[list[Id]]:
    """The ids every party holds, as each party's own values, the label party's list first; all lists in one
    order (row k is the same sample at every party)."""
    return run(label_ids, *feature_ids).ids
