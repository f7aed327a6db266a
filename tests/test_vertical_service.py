"""Vertical split learning over real gRPC on 127.0.0.1: a `LabelParty` serving, a `FeatureParty` training
against it (the alignment by PSI, the join, every step and evaluation), equal to the uncut model's `fit` on the
aligned rows in the agreed batch order; and the label party's refusals of bad calls, each with its status and
no change of state (docs/vertical.md, "The wire"). Calls that meet the other parties are retried on UNAVAILABLE,
as a party does (a party late at a meeting under load is not what these tests are about).

One feature party in this process: its compiled step holds one of TensorFlow's inter-op threads while it waits
for its gradient, and the label party's step (in a gRPC thread of this process) runs on the other. Several
feature parties train in their own processes (tests/test_vertical_processes.py).
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from feature_party.party import FeatureParty
from label_party.party import LabelParty
from splitlearning import codec, psi
from splitlearning.batch_order import BatchOrder
from splitlearning.contract import Spec, spec_to_proto
from splitlearning.label_defences import Kind, LabelDefence
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.exactness_support import ONEDNN, assert_close, assert_weights_equal, same_update_as_fit
from tests.vertical_support import OPTIMIZERS, Case, Parties, make_table, uncut_inputs, uncut_model

__all__ = ["same_update_as_fit"]  # a fixture, used by name

BATCH = 16
EPOCHS = 2
SEED = 7
DOC = Path(__file__).resolve().parent.parent / "docs" / "vertical.md"
FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(autouse=True)
def on_cpu() -> Iterator[None]:
    with tf.device("/CPU:0"):
        yield


def make_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.usefixtures("same_update_as_fit")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_over_grpc_equals_uncut_fit_on_the_aligned_rows(optimizer: str) -> None:
    """The label party has its own bottom; ids overlap partially, in shuffled orders; 54 aligned rows: 43 train
    (two full batches of 16 and one of 11), 11 held out. Bit for bit without oneDNN (every update a plain
    graph), within round-off with it."""
    case = Case(1, own_bottom=True, fuse="concat", optimizer=optimizer)
    xs, own_x, y = make_table(case, n=60, seed=11)
    assert own_x is not None
    label_ids = [f"id{i}" for i in range(60)]
    rng = np.random.default_rng(3)
    held = rng.permutation(60)[:54]  # the feature party holds 54 of the label party's 60 ids ...
    feature_ids = [label_ids[i] for i in held] + ["x1", "x2"]  # ... and two of its own
    feature_x = np.concatenate([xs[0][held], rng.normal(size=(2, xs[0].shape[1])).astype("float32")])

    split = Parties.build(case, SEED)
    initial = [m.get_weights() for m in (split.feature[0], split.top)]
    label = LabelParty(
        split.top,
        make_loss(),
        OPTIMIZERS[optimizer](),
        ["accuracy"],
        parties=["bank"],
        ids=label_ids,
        y=y,
        x=own_x,
        bottom=split.own,
        batch_size=BATCH,
        epochs=EPOCHS,
        seed=SEED,
        test_fraction=0.2,
        deadline=30,
        metrics_port=0,
    )
    port = label.start()
    try:
        feature = FeatureParty(
            split.feature[0],
            OPTIMIZERS[optimizer](),
            name="bank",
            ids=feature_ids,
            x=feature_x,
            target=f"127.0.0.1:{port}",
            seed=SEED,
            fuse="concat",
        )
        summary = feature.fit()
        assert label.wait(30)
        assert label.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{label.metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
    finally:
        label.stop()
    order = BatchOrder(43, 11, BATCH, EPOCHS, SEED)
    assert (summary.aligned_rows, summary.train_rows, summary.test_rows) == (54, 43, 11)
    assert summary.final_step == order.total_steps == 6
    coordinator = label.coordinator
    assert coordinator.rows is not None and feature.rows is not None
    # Row k is the same person at both parties (the PSI's common order).
    assert [label_ids[i] for i in coordinator.rows] == [feature_ids[i] for i in feature.rows]

    reference = Parties.build(case, SEED)
    uncut = uncut_model(reference, make_loss(), OPTIMIZERS[optimizer]())
    joined = uncut_inputs([feature_x[feature.rows]], own_x[coordinator.rows])
    labels = y[coordinator.rows]
    history: list[dict[str, Any]] = []
    for epoch in range(EPOCHS):
        rows = np.concatenate([order.train_rows_of(epoch * order.steps_per_epoch + s) for s in range(3)])
        fitted = uncut.fit(
            [x[rows] for x in joined], labels[rows], batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
        history.append({name: values[0] for name, values in fitted.history.items()})
    exact = not ONEDNN
    assert_weights_equal(split.feature[0].get_weights(), reference.feature[0].get_weights(), "feature party", exact)
    trainer = label.trainer
    assert trainer is not None and trainer.bottom is not None and reference.own is not None
    assert_weights_equal(trainer.top.get_weights(), reference.top.get_weights(), "top", exact)
    assert_weights_equal(trainer.bottom.get_weights(), reference.own.get_weights(), "label party's bottom", exact)
    for before, model in zip(initial, (split.feature[0], split.top), strict=True):  # training moved them
        assert all(not np.allclose(b, a) for b, a in zip(before, model.get_weights(), strict=True)), model.name

    held_out = np.arange(43, 54)
    expected_test = uncut.evaluate([x[held_out] for x in joined], labels[held_out], batch_size=BATCH, verbose=0)
    expected_pred = uncut.predict([x[held_out] for x in joined], batch_size=BATCH, verbose=0)
    assert [r.step for r in label.history] == [3, 6]
    for record, expected in zip(label.history, history, strict=True):
        assert_close(record.metrics["loss"], expected["loss"], "loss", exact)
        assert_close(record.metrics["accuracy"], expected["accuracy"], "accuracy", exact)
    assert_close(label.history[-1].test["test_loss"], expected_test[0], "held-out loss", exact)
    assert_close(label.predictions, expected_pred, "predictions", exact)
    assert label.test_ids() == [label_ids[i] for i in coordinator.rows[held_out]]
    # The meters ran beside (they change nothing: the weights above are the uncut model's).
    for record in label.history:
        assert set(record.leakage) == {"leak_norm_auc/bank", "leak_direction_auc/bank"}
        assert all(0.5 <= value <= 1.0 for value in record.leakage.values()), record.leakage
    # ... and Prometheus shows the last epoch's, by party and attack.
    last = label.history[-1]
    for attack in ("norm", "direction"):
        line = f'split_vertical_label_leak_auc{{attack="{attack}",party="bank"}}'
        assert f"{line} {last.leakage[f'leak_{attack}_auc/bank']!r}" in scraped, scraped[-2000:]
    assert "split_vertical_step 6.0" in scraped
    assert [entry["epoch"] for entry in feature.history] == [1, 2]
    assert all(0.0 < entry["input_dcor"] <= 1.0 for entry in feature.history), feature.history


# -- refusals ------------------------------------------------------------------------------------------------

IV = Spec((2,), np.dtype("float32"))
TOKENS = {"a": "token-a", "b": "token-b"}


def top() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


class Raw:
    """The label party's service called by hand, as a party written in another language would."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.VerticalServiceStub(self.channel)

    def call(self, method: str, request: Any, party: str | None = "a") -> Any:
        metadata = (("authorization", f"Bearer {TOKENS[party]}"),) if party in TOKENS else ()
        return getattr(self.stub, method)(request, metadata=metadata, timeout=30)

    def refused(self, method: str, request: Any, party: str | None = "a") -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(method, request, party)
        return caught.value

    @staticmethod
    def retrying(call: Callable[[], Any], attempts: int = 5) -> Any:
        """`call` again while it fails UNAVAILABLE (another party late at the meeting), as a party does."""
        for attempt in range(attempts):
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def align(self, names: list[str], ids: list[str]) -> dict[str, pb.MatchResponse]:
        """Both parties' PSI at once (Match answers when every party has matched)."""
        results: dict[str, pb.MatchResponse] = {}

        def one(name: str) -> None:
            member = psi.Member(ids, name)
            offer = self.call(
                "Align", pb.AlignRequest(protocol_version=1, party=name, blinded=member.request().points), name
            )
            reblinded = member.reblind(psi.Blinded(list(offer.offer)))
            match = pb.MatchRequest(party=name, reblinded=reblinded.points)
            results[name] = self.retrying(lambda: self.call("Match", match, name))

        threads = [threading.Thread(target=one, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def join_all(self, alignment: str, **overrides: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}

        def one(name: str) -> None:
            try:
                request = join_request(name, alignment, **overrides)
                results[name] = self.retrying(lambda: self.call("Join", request, name))
            except grpc.RpcError as error:
                results[name] = error

        threads = [threading.Thread(target=one, args=(name,)) for name in TOKENS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


def join_request(party: str, alignment: str, **overrides: Any) -> pb.JoinRequest:
    fields: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "party": party,
        "alignment": alignment,
        "iv": spec_to_proto(IV),
        "restorable_steps": [0],
    }
    fields.update(overrides)
    return pb.JoinRequest(**fields)


def step_request(ticket: str, step: int, rows: int, value: float = 0.5) -> pb.VerticalStepRequest:
    return pb.VerticalStepRequest(ticket=ticket, step=step, iv=codec.to_proto(np.full((rows, 2), value, np.float32)))


@pytest.fixture
def served() -> Iterator[tuple[LabelParty, Raw]]:
    ids = [f"p{i}" for i in range(40)]
    label = LabelParty(
        top,
        make_loss(),
        "sgd",
        parties=["a", "b"],
        ids=ids,
        y=np.arange(40) % 3,
        batch_size=8,
        epochs=1,
        seed=5,
        test_fraction=0.0,
        deadline=1.5,
        party_tokens=dict(TOKENS),
    )
    raw = Raw(label.start())
    try:
        yield label, raw
    finally:
        raw.channel.close()
        label.stop(grace=0)


def status_table() -> dict[str, str]:
    """Row name -> status, from the table under '### Statuses' of docs/vertical.md."""
    text = DOC.read_text(encoding="utf-8").split("### Statuses", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    return {cells[1].strip().strip("`"): cells[3].strip().strip("`") for cells in rows}


class Seen:
    """The statuses the test produced, by the documentation's row names."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    def __call__(self, row: str, error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
        details = error.details() or ""
        assert error.code() is code, (row, error.code(), details)
        for word in words:
            assert word in details, (row, word, details)
        self.rows[row] = code.name


def test_refusals_before_and_during_training(served: tuple[LabelParty, Raw]) -> None:
    label, raw = served
    seen = Seen()
    ids = [f"p{i}" for i in range(40)]
    coordinator = label.coordinator
    member = psi.Member(ids, "a")
    align = pb.AlignRequest(protocol_version=1, party="a", blinded=member.request().points)
    # Who may call: the token of the party named, no other.
    seen("party-token", raw.refused("Align", align, party=None), grpc.StatusCode.UNAUTHENTICATED)
    seen("wrong-party", raw.refused("Align", align, party="b"), grpc.StatusCode.PERMISSION_DENIED, "'a'")
    unknown = raw.refused("Align", pb.AlignRequest(protocol_version=1, party="c"), party="a")
    seen("wrong-party", unknown, grpc.StatusCode.PERMISSION_DENIED, "'c'")
    seen("version", raw.refused("Align", pb.AlignRequest(protocol_version=2, party="a")), FAILED, "version 2")
    seen("not-aligned", raw.refused("Join", join_request("a", "x")), FAILED, "alignment")
    seen("match-order", raw.refused("Match", pb.MatchRequest(party="a")), FAILED, "Match before Align")
    seen("ticket", raw.refused("Step", step_request("nope", 0, 8)), grpc.StatusCode.ABORTED, "join again")
    undecodable = raw.channel.unary_unary("/splitlearning.v1.VerticalService/Join")
    with pytest.raises(grpc.RpcError) as caught:
        undecodable(b"\xff\xff\xff", metadata=(("authorization", "Bearer token-a"),), timeout=10)
    seen("undecodable", caught.value, grpc.StatusCode.INVALID_ARGUMENT)
    twice = pb.AlignRequest(protocol_version=1, party="a", blinded=[member.request().points[0]] * 2)
    seen("psi-message", raw.refused("Align", twice), INVALID, "not unique")
    seen("psi-message", raw.refused("Align", pb.AlignRequest(protocol_version=1, party="a", blinded=[b"x"])), INVALID)
    offer = raw.call("Align", align)
    short = pb.MatchRequest(party="a", reblinded=list(offer.offer)[:-1])
    seen("psi-message", raw.refused("Match", short), grpc.StatusCode.INVALID_ARGUMENT, "39 values")

    matched = raw.align(["a", "b"], ids)
    alignment = matched["a"].alignment
    assert alignment == matched["b"].alignment and len(matched["a"].positions) == 40
    seen("aligned", raw.refused("Align", align), FAILED, "already aligned")
    # Settings that differ from the label party's, and an alignment of another run.
    for overrides, word in (({"seed": 6}, "seed"), ({"fuse": "sum"}, "fuse"), ({"batch_size": 4}, "batch size")):
        seen("settings", raw.refused("Join", join_request("a", alignment, **overrides)), FAILED, word)
    seen("alignment", raw.refused("Join", join_request("a", "0" * 32)), FAILED, "alignment mismatch")
    # A party alone at the join: the deadline names the one that did not come.
    seen("missing", raw.refused("Join", join_request("a", alignment)), grpc.StatusCode.UNAVAILABLE, "b did not come")

    joined = raw.join_all(alignment)
    tickets = {name: reply.ticket for name, reply in joined.items()}
    assert all(isinstance(reply, pb.JoinResponse) for reply in joined.values()), joined
    assert joined["a"].step == 0 and joined["a"].train_rows == 40 and joined["a"].seed == 5
    # A Join again before any step (a lost answer, a party that gave up waiting): the same answer, b undisturbed.
    assert raw.call("Join", join_request("a", alignment)) == joined["a"]
    # Steps that do not fit: another step, a wrong row count, a wrong shape, another party's slot.
    seen("step", raw.refused("Step", step_request(tickets["a"], 1, 8)), FAILED, "expects step 0")
    seen("iv", raw.refused("Step", step_request(tickets["a"], 0, 7)), INVALID, "7 rows, expected 8")
    shape = pb.VerticalStepRequest(ticket=tickets["a"], step=0, iv=codec.to_proto(np.zeros((8, 3), np.float32)))
    seen("iv", raw.refused("Step", shape), INVALID)
    nan = pb.VerticalStepRequest(ticket=tickets["a"], step=0, iv=codec.to_proto(np.full((8, 2), np.nan, np.float32)))
    seen("iv", raw.refused("Step", nan), INVALID, "NaN")
    seen("wrong-party", raw.refused("Step", step_request(tickets["b"], 0, 8), party="a"), DENIED, "'b'")
    evaluate = pb.VerticalEvaluateRequest(
        ticket=tickets["a"], step=0, batch=0, iv=codec.to_proto(np.zeros((8, 2), np.float32))
    )
    seen("eval-order", raw.refused("Evaluate", evaluate), FAILED, "end of an epoch")
    assert coordinator.position == 0 and label.trainer is not None and label.trainer.iterations == 0

    # a's IV of step 0 waits for b's: at the deadline, a hears b's name and nothing is applied.
    missing = raw.refused("Step", step_request(tickets["a"], 0, 8))
    seen("missing", missing, grpc.StatusCode.UNAVAILABLE, "b did not come to step 0", "nothing was applied")
    assert coordinator.position == 0 and label.trainer.iterations == 0
    # b comes: the step runs with a's IV, kept; a's resend gets the same answer, applied once.
    b_reply = raw.call("Step", step_request(tickets["b"], 0, 8), party="b")
    a_reply = raw.call("Step", step_request(tickets["a"], 0, 8))
    again = raw.call("Step", step_request(tickets["a"], 0, 8))
    assert coordinator.position == 1 and label.trainer.iterations == 1
    assert a_reply.gradient.content == again.gradient.content
    assert codec.from_proto(b_reply.gradient).shape == (8, 2)
    # Under concat each party gets its own columns of dLoss/d(fused): here a's and b's IVs are equal, the top's
    # columns for them are not, so the two gradients differ.
    assert a_reply.gradient.content != b_reply.gradient.content

    # A party whose IV changed since it joined.
    other_iv = spec_to_proto(Spec((3,), np.dtype("float32")))
    seen("iv-changed", raw.refused("Join", join_request("a", alignment, iv=other_iv)), FAILED, "IV was")
    # b joins again (a restart): a's ticket stops working; both rejoin at the step all can restore.
    rejoin = raw.join_all(alignment, restorable_steps=[0, 1])
    assert all(isinstance(reply, pb.JoinResponse) and reply.step == 1 for reply in rejoin.values()), rejoin
    seen("ticket", raw.refused("Step", step_request(tickets["a"], 1, 8)), grpc.StatusCode.ABORTED)
    # A restart that cannot restore step 1, and the label party without checkpoints of step 0.
    stuck = raw.join_all(alignment, restorable_steps=[0])
    for reply in stuck.values():
        assert isinstance(reply, grpc.RpcError)
        seen("no-common-step", reply, FAILED, "no step every party can resume from")
    assert coordinator.position == 1

    seen.rows.update(no_common_ids())
    assert seen.rows == status_table()


def no_common_ids() -> dict[str, str]:
    """A feature party holding none of the label party's ids: the alignment fails for every party."""
    label = LabelParty(top, make_loss(), parties=["a"], ids=["x", "y"], y=np.array([0, 1]), deadline=5)
    raw = Raw(label.start())
    try:
        member = psi.Member(["z"], "a")
        offer = raw.call("Align", pb.AlignRequest(protocol_version=1, party="a", blinded=member.request().points), None)
        reblinded = member.reblind(psi.Blinded(list(offer.offer)))
        error = raw.refused("Match", pb.MatchRequest(party="a", reblinded=reblinded.points), None)
        assert error.code() is FAILED and "holds none" in (error.details() or ""), error
        assert label.wait(5) and label.failed is not None  # the run cannot go on: the label party ends too
        return {"no-common": error.code().name}
    finally:
        raw.channel.close()
        label.stop(grace=0)


def test_a_label_defence_noises_each_step_once() -> None:
    """Marvell on the gradients sent: a resend gets the same noisy gradient (the step is applied once); without
    the defence the same IV gets another one. One batch of all 16 rows: Marvell adds noise only to a batch that
    holds both classes, and which rows a smaller first batch takes depends on the alignment's random blinding."""
    ids = [f"p{i}" for i in range(16)]
    y = (np.arange(16) % 4 == 0).astype(np.float32).reshape(-1, 1)

    def binary_top() -> keras.Model:
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    answers = []
    for defence in (LabelDefence(Kind.MARVELL, 4.0, seed=1), None):
        label = LabelParty(
            binary_top,
            keras.losses.BinaryCrossentropy(from_logits=True),
            "sgd",
            parties=["a"],
            ids=ids,
            y=y,
            batch_size=16,
            test_fraction=0.0,
            label_defence=defence,
        )
        raw = Raw(label.start())
        try:
            member = psi.Member(ids, "a")
            offer = raw.call(
                "Align", pb.AlignRequest(protocol_version=1, party="a", blinded=member.request().points), None
            )
            reblinded = member.reblind(psi.Blinded(list(offer.offer)))
            alignment = raw.call("Match", pb.MatchRequest(party="a", reblinded=reblinded.points), None).alignment
            ticket = raw.call("Join", join_request("a", alignment), None).ticket
            iv = np.linspace(-1, 1, 32, dtype=np.float32).reshape(16, 2)
            request = pb.VerticalStepRequest(ticket=ticket, step=0, iv=codec.to_proto(iv))
            first, again = raw.call("Step", request, None), raw.call("Step", request, None)
            assert first.gradient.content == again.gradient.content
            assert label.trainer is not None and label.trainer.iterations == 1
            answers.append(first.gradient.content)
        finally:
            raw.channel.close()
            label.stop(grace=0)
    assert answers[0] != answers[1]
