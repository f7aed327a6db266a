"""The split's compute alone, in one process and with no gRPC: what R could be if the exchange cost nothing.

Times, as medians in ms over `--rounds` calls after a warm-up, on the same seeded model pair:
- the uncut model's step as Keras `fit` runs it (the reference R is measured against: `fit` with the
  benchmark's metrics and its data pipeline, a callback stamping each step's end);
- the uncut model's bare compiled training step (`tf.function`: forward, loss, gradients, Adam);
- the client's step, `ClientTrainer.train`, its exchange answering at once with a fixed dLoss/dIV;
- the server's step, `LossTrainer.train` (the reply's part), and `settle` (its update, after the reply);
- one step of both parts: in turn (the client's step, then the server's step and update: the compute floor
  `benchmarks/wan.py` measures E against), and joined (the client's exchange calls the server's step by a
  numpy hand-off); see `ComputeFloor`.

A split step that does no exchange still runs the client's step and the server's reply in turn, so
uncut / (client + server reply) bounds R where the server's update runs beside the client's backward pass on
its own device, and uncut / (client + server reply + update) where both parts share the same cores. Both are
printed against `fit`'s step (what the benchmark's R divides by) and against the bare step (`fit` adds its
metrics, its data pipeline and its per-step Python to the same compute).

    PYTHONPATH=. python benchmarks/compute_floor.py [--model mnist-cnn] [--batch 128] [--rounds 120] [--optimizer sgd]
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
    parser.add_argument("--optimizer", default="adam", help="both parts' optimizer (adam, sgd, ...)")
    parser.add_argument("--cpus", default=None, help="cores to pin to (default: all); one TF thread per core")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if args.cpus is None else None
    devices.setup_process(args.cpus, cores if cores is not None else len(args.cpus.split(",")))
    parts = measure_parts(args.model, args.batch, args.rounds, args.optimizer)
    fit_ms, uncut_ms = _fit_step_ms(args.model, args.batch, args.rounds, args.optimizer), parts["uncut_ms"]
    client_ms, reply_ms, update_ms = parts["client_ms"], parts["reply_ms"], parts["update_ms"]
    print(f"{args.model}, batch {args.batch}, {args.optimizer}, {args.rounds} rounds, median ms per call:")
    print(f"  uncut: fit's step {fit_ms:.2f}, bare step {uncut_ms:.2f} | client step {client_ms:.2f}", end="")
    print(f" | server reply {reply_ms:.2f} | server update {update_ms:.2f} (after the reply)")
    print(
        f"  one step of both parts in one process: in turn {parts['parts_ms']:.2f}, joined by a numpy hand-off "
        f"{parts['joined_ms']:.2f}"
    )
    split_hidden, split_shared = client_ms + reply_ms, client_ms + reply_ms + update_ms
    print("  with a free exchange, R is at most (against fit's step; against the bare step in brackets):")
    print(f"    {fit_ms / split_hidden:.2f} ({uncut_ms / split_hidden:.2f}) with a device per process (update hidden)")
    print(f"    {fit_ms / split_shared:.2f} ({uncut_ms / split_shared:.2f}) with both parts on the same cores")


class ComputeFloor:
    """The split step's compute in one process, no gRPC, on the same seeded parts, two ways:

    - `parts`: the client's compiled step (its exchange answering at once with a fixed dLoss/dIV), then the
      server's compiled step on an IV and its update (`settle`), in turn: the floor benchmarks/wan.py measures
      E against;
    - `joined`: the client's step whose exchange calls the server's step on the IV by a numpy hand-off, then
      the server's update. The same work, but the server's step runs nested inside the client's (a TensorFlow
      call from a `numpy_function`), which on two shared cores costs 5-35 ms more at batch 128 than `parts`:
      a lower bar, printed for reference.
    """

    def __init__(self, model: str, batch: int, optimizer: str = "adam") -> None:
        import numpy as np
        import tensorflow as tf

        from benchmarks.workloads import synthetic_mnist
        from splitlearning.models import BUILTIN, make_optimizer
        from splitlearning.training.first_part import ClientTrainer
        from splitlearning.training.loss_trainer import LossTrainer

        pair = BUILTIN[model]
        x, y = synthetic_mnist(batch)
        self.x, self.y, self.labels = tf.constant(x), tf.constant(y), y
        self.server = LossTrainer(pair.server(0), pair.loss, make_optimizer(optimizer, 1e-3), ["accuracy"])
        iv_shape = (batch, *self.server.contract.iv.shape)
        self.iv = np.random.default_rng(1).standard_normal(iv_shape).astype(np.float32)
        gradient = (1e-4 * np.random.default_rng(2).standard_normal(iv_shape)).astype(np.float32)
        self.client = ClientTrainer(pair.client(0), make_optimizer(optimizer, 1e-3), "/CPU:0", lambda *_: gradient)

        def exchange(iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
            return self.server.train(iv, labels, reset_metrics=False)[0]

        self.joined_client = ClientTrainer(pair.client(0), make_optimizer(optimizer, 1e-3), "/CPU:0", exchange)

    def parts_step(self) -> None:
        self.client.train(self.x, self.y)
        self.server.train(self.iv, self.labels, reset_metrics=False)
        self.server.settle()

    def joined_step(self) -> None:
        self.joined_client.train(self.x, self.y)
        self.server.settle()

    def measure(self, rounds: int, warmup: int = 10) -> dict[str, float]:
        """Median ms of each way, `rounds` steps each, taken in turn (the machine's load moves both alike)."""
        import numpy as np

        for _ in range(warmup):
            self.parts_step()
            self.joined_step()
        times: dict[str, list[float]] = {"parts_ms": [], "joined_ms": []}
        for _ in range(rounds):
            for key, step in (("parts_ms", self.parts_step), ("joined_ms", self.joined_step)):
                started = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - started)
        return {key: 1e3 * float(np.median(values)) for key, values in times.items()}


def measure_parts(model: str, batch: int, rounds: int, optimizer: str = "adam") -> dict[str, float]:
    """Median ms per call of: the uncut model's bare compiled step; the client's step with an exchange that
    answers at once; the server's reply and its update; and one step of both parts (`ComputeFloor`)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.workloads import synthetic_mnist
    from splitlearning.models import BUILTIN, make_optimizer
    from splitlearning.training.first_part import ClientTrainer
    from splitlearning.training.loss_trainer import LossTrainer

    floor = ComputeFloor(model, batch, optimizer).measure(rounds)
    pair = BUILTIN[model]
    x, y = synthetic_mnist(batch)
    xt, yt = tf.constant(x), tf.constant(y)

    uncut = keras.Sequential([pair.client(0), pair.server(0)])
    loss = keras.losses.get(pair.loss)
    uncut_optimizer = make_optimizer(optimizer, 1e-3)
    uncut_optimizer.build(uncut.trainable_variables)

    @tf.function
    def uncut_step(inputs: tf.Tensor, labels: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            value = loss(labels, uncut(inputs, training=True))
        uncut_optimizer.apply(tape.gradient(value, uncut.trainable_variables), uncut.trainable_variables)

    server = LossTrainer(pair.server(0), pair.loss, make_optimizer(optimizer, 1e-3), ["accuracy"])
    iv_shape = (batch, *server.contract.iv.shape)
    iv = np.random.default_rng(1).standard_normal(iv_shape).astype(np.float32)
    gradient = (1e-4 * np.random.default_rng(2).standard_normal(iv_shape)).astype(np.float32)
    client = ClientTrainer(pair.client(0), make_optimizer(optimizer, 1e-3), "/CPU:0", lambda *_: gradient)

    uncut_ms = 1e3 * median_seconds(lambda: uncut_step(xt, yt), rounds, warmup=10)
    client_ms = 1e3 * median_seconds(lambda: client.train(xt, yt), rounds, warmup=10)
    reply, update = [], []
    for index in range(rounds + 10):
        started = time.perf_counter()
        server.train(iv, y, reset_metrics=False)  # the reply's part; the update is left pending
        answered = time.perf_counter()
        server.settle()
        if index >= 10:
            reply.append(answered - started)
            update.append(time.perf_counter() - answered)
    reply_ms, update_ms = (1e3 * float(np.median(t)) for t in (reply, update))
    return {
        "uncut_ms": uncut_ms,
        "client_ms": client_ms,
        "reply_ms": reply_ms,
        "update_ms": update_ms,
        "parts_ms": floor["parts_ms"],
        "joined_ms": floor["joined_ms"],
    }


def _fit_step_ms(model: str, batch: int, rounds: int, optimizer: str = "adam") -> float:
    """The median step of Keras `fit` on the uncut model, from the benchmark's own uncut run (each step's end
    stamped by a callback); a median, like the other figures here (the benchmark's rate is a mean)."""
    from benchmarks import roles

    spec = {"model": model, "seed": 0, "samples": batch * rounds, "batch_size": batch, "warmup_steps": 10}
    spec["optimizer"] = optimizer
    return 1e3 * float(roles.uncut(spec)["median_step_s"])


if __name__ == "__main__":
    main()
