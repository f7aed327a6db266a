"""The private set intersection of sample ids (splitlearning/psi.py): right answers, refusals, and a wire that
carries blinded points and the final positions only."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import pytest

from splitlearning import psi


def _sets(rng: random.Random, sizes: list[int], common: int, universe: int = 10**9) -> list[list[int]]:
    """Sets of `sizes` drawing `common` ids shared by all, the rest mostly shared by some, shuffled."""
    pool = rng.sample(range(universe), common + sum(sizes))
    shared, rest = pool[:common], pool[common:]
    out = []
    for size in sizes:
        own = [*shared, *rest[: size - common]]
        rest = rest[size - common :]
        out.append(own)
    # Some ids held by two parties but not all: the label party's private ids shared with feature party 1.
    out[1][-5:] = out[0][-5:]
    for ids in out:
        rng.shuffle(ids)
    return out


def _check(result: Sequence[Sequence[psi.Id]], sets: Sequence[Sequence[psi.Id]]) -> None:
    expected = set.intersection(*(set(map(psi.canonical, ids)) for ids in sets))
    assert expected, "the test's sets must share ids"
    for ids, own in zip(result, sets, strict=True):
        assert set(map(psi.canonical, ids)) == expected
        assert set(ids) <= set(own)  # each party's own values, its own types
    rows = [[psi.canonical(value) for value in ids] for ids in result]
    assert all(row == rows[0] for row in rows)  # one order: row k is the same sample everywhere


def test_two_parties_partial_overlap_integers() -> None:
    sets = _sets(random.Random(1), [120, 90], common=40)
    _check(psi.intersect(*sets), sets)


def test_three_parties_partial_overlap_strings() -> None:
    rng = random.Random(2)
    sets = [[f"user-{value}" for value in ids] for ids in _sets(rng, [100, 80, 70], common=30)]
    result = psi.intersect(*sets)
    _check(result, sets)
    assert len(result[0]) == 30


def test_an_integer_and_its_decimal_string_are_one_id() -> None:
    result = psi.intersect([7, 8, np.int64(9), 10], ["7", "9", "11"], [9, "7", "010"])
    assert sorted(map(psi.canonical, result[0])) == [b"7", b"9"]
    assert sorted(map(str, result[1])) == ["7", "9"]  # each party gets back its own values
    assert {type(value) for value in result[2]} == {int, str}
    assert psi.canonical(7) == psi.canonical("7") == b"7"
    assert psi.canonical("07") != psi.canonical(7)


@pytest.mark.parametrize("bad", [1.0, True, b"7", None])
def test_other_id_types_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="integer or a string"):
        psi.intersect([1, 2, bad], [1])  # type: ignore[list-item]


@pytest.mark.parametrize("ids", [[1, 2, 3, 2], ["a", "b", "a"], [7, "7"]])
def test_duplicate_ids_are_refused_naming_one(ids: list[psi.Id]) -> None:
    duplicate = str(ids[-1])
    with pytest.raises(ValueError, match=f"unique: '{duplicate}' appears more than once"):
        psi.intersect([1, 2, 3], ids)
    with pytest.raises(ValueError, match=f"unique: '{duplicate}' appears more than once"):
        psi.intersect(ids, [1, 2, 3])


def test_an_empty_set_is_refused() -> None:
    with pytest.raises(ValueError, match="feature party has no ids"):
        psi.Member([])
    with pytest.raises(ValueError, match="label party has no ids"):
        psi.intersect([], [1, 2])


def test_a_feature_party_with_no_common_id_is_named_with_the_sizes() -> None:
    with pytest.raises(psi.NoCommonIds, match=r"feature-2 holds none .*label party: 3 ids; feature-2: 2 ids"):
        psi.intersect([1, 2, 3], [2, 3], [4, 5])


def test_no_id_held_by_all_names_every_size() -> None:
    message = r"no id is held by every party \(label party: 3 ids; feature-1: 1; feature-2: 2\)"
    with pytest.raises(psi.NoCommonIds, match=message):
        psi.intersect([1, 2, 3], [1], [2, 3])


def test_blinding_commutes() -> None:
    a, b = psi.Secret(), psi.Secret()
    for value in [b"0", b"7", b"user-42", "é".encode()]:
        point = psi.hash_to_point(value)
        ab, ba = b.blind(a.blind(point)), a.blind(b.blind(point))
        assert ab == ba
        assert len(ab) == psi.POINT_BYTES
        assert len({point, a.blind(point), b.blind(point), ab}) == 4
    assert a.blind(psi.hash_to_point(b"7")) != a.blind(psi.hash_to_point(b"8"))


def test_nothing_but_blinded_points_and_the_final_positions_cross_the_wire() -> None:
    sets = _sets(random.Random(3), [60, 50, 45], common=20)
    outcome = psi.run(*sets)
    _check(outcome.ids, sets)
    common = len(outcome.ids[0])
    everyone = [psi.canonical(value) for ids in sets for value in ids]
    plain = set(everyone) | {value.rjust(psi.POINT_BYTES, b"\0") for value in everyone}
    hashed = {psi.hash_to_point(value) for value in everyone}
    steps = []
    for sent in outcome.messages:
        steps.append((sent.sender, sent.receiver, sent.step))
        names = [f.name for f in dataclasses.fields(sent.message)]
        if isinstance(sent.message, psi.Blinded):
            assert names == ["points"]
            for value in sent.message.points:
                assert type(value) is bytes and len(value) == psi.POINT_BYTES
                assert value not in plain and value not in hashed
        else:
            assert isinstance(sent.message, psi.Positions) and names == ["positions"]
            assert sent.step == "positions" and sent.sender == psi.LABEL
            # Only the final intersection: |I| positions, where the feature party's own ids of I are.
            assert len(sent.message.positions) == common
    members = ["feature-1", "feature-2"]
    assert sorted(steps) == sorted(
        (sender, receiver, step)
        for member in members
        for sender, receiver, step in [
            (member, psi.LABEL, "request"),
            (psi.LABEL, member, "offer"),
            (member, psi.LABEL, "reblinded"),
            (psi.LABEL, member, "positions"),
        ]
    )
    sizes = {
        (sent.receiver if sent.step == "offer" else sent.sender, sent.step): len(sent.message.points)
        for sent in outcome.messages
        if isinstance(sent.message, psi.Blinded)
    }
    assert sizes == {
        ("feature-1", "request"): 50, ("feature-1", "offer"): 60, ("feature-1", "reblinded"): 60,
        ("feature-2", "request"): 45, ("feature-2", "offer"): 60, ("feature-2", "reblinded"): 60,
    }  # fmt: skip


def test_a_feature_party_learns_the_intersection_and_the_hub_its_own_ids_each_holds() -> None:
    hub = psi.Hub([1, 2, 3, 4, 5, 6], ["f1", "f2"])
    f1, f2 = psi.Member([1, 2, 3, 10], "f1"), psi.Member([2, 3, 4, 11, 12], "f2")
    for member in (f1, f2):
        assert hub.match(member.name, member.request(), member.reblind(hub.offer())) == 3
    assert f1.offered == f2.offered == 6  # |S_L|, from the offer's length
    assert hub.held_by("f1") == [1, 2, 3] and hub.held_by("f2") == [2, 3, 4]
    positions = hub.result("f1")
    assert len(positions.positions) == 2  # not 3: the id 1 that f1 shares with the hub alone stays unsaid
    assert sorted(f1.intersection(positions)) == [2, 3]
    assert f1.intersection(positions) == f2.intersection(hub.result("f2")) == hub.intersection()


def test_steps_out_of_order_and_malformed_messages_are_refused() -> None:
    hub = psi.Hub([1, 2, 3], ["f1"])
    member = psi.Member([2, 3, 4], "f1")
    with pytest.raises(psi.ProtocolOrder, match="waiting for \\['f1'\\]"):
        hub.result("f1")
    offer = hub.offer()
    reblinded = member.reblind(offer)
    with pytest.raises(psi.BadMessage, match="has 2 values, the offer 3"):
        hub.match("f1", member.request(), psi.Blinded(reblinded.points[:2]))
    with pytest.raises(psi.BadMessage, match="value 1 is not 32 bytes"):
        hub.match("f1", psi.Blinded([member.request().points[0], b"short"]), reblinded)
    off_curve = b"\xff" * psi.POINT_BYTES  # above P-256's p: no point's x-coordinate
    with pytest.raises(psi.BadMessage, match="value 0 is not the x-coordinate of a P-256 point"):
        hub.match("f1", psi.Blinded([off_curve]), reblinded)
    with pytest.raises(psi.BadMessage, match="repeats a value"):
        hub.match("f1", psi.Blinded(member.request().points * 2), reblinded)
    with pytest.raises(psi.ProtocolOrder, match="unknown feature party 'f9'"):
        hub.match("f9", member.request(), reblinded)
    assert hub.match("f1", member.request(), reblinded) == 2
    with pytest.raises(psi.ProtocolOrder, match="already matched"):
        hub.match("f1", member.request(), reblinded)
    with pytest.raises(psi.BadMessage, match=r"outside the request's 0\.\.2"):
        member.intersection(psi.Positions([0, 3]))
    with pytest.raises(psi.BadMessage, match="repeat an index"):
        member.intersection(psi.Positions([1, 1]))
    assert sorted(member.intersection(hub.result("f1"))) == [2, 3]
