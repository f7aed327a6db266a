"""The split's compute alone, in one process and with no gRPC: what R could be if the exchange cost nothing.

Times, as medians in ms over `--rounds` calls after a warm-up, on the same seeded model pair:
- the uncut model's step as Keras `fit` runs it (the reference R is measured against: `fit` with the
  benchmark's metrics and its data pipeline, a callback stamping each step's end);
- the uncut model's bare compiled training step (`tf.function`: forward, loss, gradients, Adam);
- the client's step, `ClientTrainer.train`, its exchange answering at once with a fixed dLoss/dIV;
- the server's step, `LossTrainer.train` (the reply's part), and `settle` (its update, after the reply).

A split step that does no exchange still runs the client's step and the server's reply in turn, so
uncut / (client + server reply) bounds R where the server's update runs beside the client's backward pass on
its own device, and uncut / (client + server reply + update) where both parts share the same cores. Both are
printed against `fit`'s step (what the benchmark's R divides by) and against the bare step (`fit` adds its
metrics, its data pipeline and its per-step Python to the same compute).

    PYTHONPATH=. python benchmarks/compute_floor.py [--model mnist-cnn] [--batch 128] [--rounds 120]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.timing import median_seconds
from splitlearning import devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist-cnn", help="a built-in pair with 28x28x1 inputs")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--cpus", default=None, help="cores to pin to (default: all); one TF thread per core")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if args.cpus is None else None
    devices.setup_process(args.cpus, cores if cores is not None else len(args.cpus.split(",")))

    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.workloads import synthetic_mnist
    from splitlearning.models import BUILTIN, make_optimizer
    from splitlearning.training.first_part import ClientTrainer
    from splitlearning.training.loss_trainer import LossTrainer

    pair = BUILTIN[args.model]
    x, y = synthetic_mnist(args.batch)
    xt, yt = tf.constant(x), tf.constant(y)

    uncut = keras.Sequential([pair.client(0), pair.server(0)])
    loss = keras.losses.get(pair.loss)
    optimizer = make_optimizer("adam", 1e-3)
    optimizer.build(uncut.trainable_variables)

    @tf.function
    def uncut_step(inputs: tf.Tensor, labels: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            value = loss(labels, uncut(inputs, training=True))
        optimizer.apply(tape.gradient(value, uncut.trainable_variables), uncut.trainable_variables)

    server = LossTrainer(pair.server(0), pair.loss, make_optimizer("adam", 1e-3), ["accuracy"])
    iv_shape = (args.batch, *server.contract.iv.shape)
    iv = np.random.default_rng(1).standard_normal(iv_shape).astype(np.float32)
    gradient = (1e-4 * np.random.default_rng(2).standard_normal(iv_shape)).astype(np.float32)
    client = ClientTrainer(pair.client(0), make_optimizer("adam", 1e-3), "/CPU:0", lambda *_: gradient)

    fit_ms = _fit_step_ms(args.model, args.batch, args.rounds)
    uncut_ms = 1e3 * median_seconds(lambda: uncut_step(xt, yt), args.rounds, warmup=10)
    client_ms = 1e3 * median_seconds(lambda: client.train(xt, yt), args.rounds, warmup=10)
    reply, update = [], []
    for index in range(args.rounds + 10):
        started = time.perf_counter()
        server.train(iv, y, reset_metrics=False)  # the reply's part; the update is left pending
        answered = time.perf_counter()
        server.settle()
        if index >= 10:
            reply.append(answered - started)
            update.append(time.perf_counter() - answered)
    reply_ms, update_ms = (1e3 * float(np.median(t)) for t in (reply, update))
    print(f"{args.model}, batch {args.batch}, {args.rounds} rounds, median ms per call:")
    print(f"  uncut: fit's step {fit_ms:.2f}, bare step {uncut_ms:.2f} | client step {client_ms:.2f}", end="")
    print(f" | server reply {reply_ms:.2f} | server update {update_ms:.2f} (after the reply)")
    split_hidden, split_shared = client_ms + reply_ms, client_ms + reply_ms + update_ms
    print("  with a free exchange, R is at most (against fit's step; against the bare step in brackets):")
    print(f"    {fit_ms / split_hidden:.2f} ({uncut_ms / split_hidden:.2f}) with a device per process (update hidden)")
    print(f"    {fit_ms / split_shared:.2f} ({uncut_ms / split_shared:.2f}) with both parts on the same cores")


def _fit_step_ms(model: str, batch: int, rounds: int) -> float:
    """The median step of Keras `fit` on the uncut model, from the benchmark's own uncut run (each step's end
    stamped by a callback); a median, like the other figures here (the benchmark's rate is a mean)."""
    from benchmarks import roles

    spec = {"model": model, "seed": 0, "samples": batch * rounds, "batch_size": batch, "warmup_steps": 10}
    return 1e3 * float(roles.uncut(spec)["median_step_s"])


if __name__ == "__main__":
    main()
