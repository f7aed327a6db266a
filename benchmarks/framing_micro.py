"""Micro-benchmark: one `cnn` training request (128 x 1,600 float32 + labels) through protobuf objects
(`codec.write` + `SerializeToString`, `FromString` + `codec.from_proto`) against `framing` (`Outgoing.serialize`,
`framing.parse` + `codec.decode`). Prints the median of each in µs.

    PYTHONPATH=. python benchmarks/framing_micro.py [--batch 128] [--width 1600] [--rounds 300]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.timing import median_seconds
from splitlearning import codec, framing
from splitlearning.v1 import split_learning_pb2 as pb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    iv = np.random.default_rng(0).standard_normal((args.batch, args.width)).astype(np.float32)
    labels = np.zeros(args.batch, np.int64)

    def send_protobuf() -> bytes:
        request = pb.TrainRequest(session_id="session", step=3)
        codec.write(iv, request.iv)
        codec.write(labels, request.labels)
        return request.SerializeToString()

    def send_framed() -> bytes:
        request = pb.TrainRequest(session_id="session", step=3)
        return framing.Outgoing(request, {"iv": codec.encode(iv), "labels": codec.encode(labels)}).serialize()

    wire = send_protobuf()
    assert pb.TrainRequest.FromString(send_framed()) == pb.TrainRequest.FromString(wire)

    def receive_protobuf() -> object:
        request = pb.TrainRequest.FromString(wire)
        return codec.from_proto(request.iv), codec.from_proto(request.labels)

    def receive_framed() -> object:
        frame = framing.parse(pb.TrainRequest, wire)
        return codec.decode(frame.message.iv, frame.content("iv")), codec.decode(
            frame.message.labels, frame.content("labels")
        )

    print(f"request of {len(wire):,} bytes, median of {args.rounds}:")
    for name, function in [
        ("send, protobuf objects", send_protobuf),
        ("send, framing", send_framed),
        ("receive, protobuf objects", receive_protobuf),
        ("receive, framing", receive_framed),
    ]:
        print(f"  {name:28s} {1e6 * median_seconds(function, args.rounds):8.1f} µs")


if __name__ == "__main__":
    main()
