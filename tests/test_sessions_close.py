"""CloseSession answers the session's final step, as the proto promises, also when it is sent again after the
session left memory (its reply was lost): then the step of its latest checkpoint, not 0."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from client_part import SplitClient
from server_part import SplitServer
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import build_bottom, build_top, make_data, make_loss
from tests.faults_support import wait_for

STEPS = 3


def test_a_close_sent_again_answers_the_final_step_from_the_checkpoints(tmp_path: Path) -> None:
    server = SplitServer(build_top("plain", 4), make_loss(), "adam", ["accuracy"], checkpoint_dir=tmp_path)
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    try:
        x, y = make_data(10 * STEPS, seed=1)
        with SplitClient(build_bottom("plain", 1), "adam", target=target, connect_timeout=10) as client:
            client.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
            session = client.session_id
        # The client closed its stream; once the server has seen it end, any client may close the session.
        held = server.sessions.find(session)
        assert held is not None
        wait_for(lambda: held.idle_seconds(time.monotonic()) is not None, 10, "the server to see the stream end")
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SplitLearningServiceStub(channel)
            request = pb.CloseSessionRequest(session_id=session)
            first = stub.CloseSession(request, timeout=10)
            again = stub.CloseSession(request, timeout=10)
    finally:
        server.stop(grace=1.0)
    assert (first.steps, first.checkpointed) == (STEPS, True)
    assert (again.steps, again.checkpointed) == (STEPS, True)
