"""Benchmark: predicting over the cut (`split-server --serve-only` + `SplitClient.predict`, what `split-client
--predict` runs) against the joined model's `keras.Model.predict` in one process (`split-join`), same parts.

    PYTHONPATH=. python benchmarks/predict.py                       # digits-cnn, 20,000 samples
    PYTHONPATH=. python benchmarks/predict.py --model mnist-cnn --samples 5000

The server runs in a process of its own on loopback; the client in this one. Prints samples/s per batch size
for both, and their ratio. The parts are the built-in pair's at their initial weights (throughput does not
depend on training).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per case; the median is printed")
    args = parser.parse_args()

    import numpy as np

    from client_part import SplitClient
    from splitlearning.joined import join
    from splitlearning.models import BUILTIN, make_optimizer

    pair = BUILTIN[args.model]
    first, second = pair.client(0), pair.server(0)
    x = np.random.default_rng(0).random((args.samples, *pair.input_shape), dtype=np.float32)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        part = Path(folder) / "server.keras"
        second.compile(loss=pair.loss)
        second.save(part)
        port_file = Path(folder) / "port"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        flags = ["--model", str(part), "--serve-only", "--max-batch-size", str(max(sizes))]
        server = subprocess.Popen(
            [sys.executable, "-m", "server_part", "--address", "127.0.0.1:0", "--port-file", str(port_file), *flags],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not (port_file.exists() and port_file.read_text().strip()):
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            target = f"127.0.0.1:{int(port_file.read_text())}"
            optimizer = make_optimizer("adam", 3e-3)
            joined = join([first, second])
            print(f"{args.model}: {args.samples:,} samples of {list(pair.input_shape)}; server on loopback")
            print("| batch | split samples/s | joined (one process) samples/s | split / joined |")
            print("| ---: | ---: | ---: | ---: |")
            with SplitClient(first, optimizer, target=target, max_batch_size=max(sizes), connect_timeout=60) as client:
                for size in sizes:
                    client.predict(x[:size], batch_size=size)  # warm-up: traces at this batch size
                    joined.predict(x[:size], batch_size=size, verbose=0)
                    split_times, joined_times = [], []
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        client.predict(x, batch_size=size)
                        split_times.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        joined.predict(x, batch_size=size, verbose=0)
                        joined_times.append(time.perf_counter() - started)
                    split_rate = args.samples / float(np.median(split_times))
                    joined_rate = args.samples / float(np.median(joined_times))
                    print(f"| {size} | {split_rate:,.0f} | {joined_rate:,.0f} | {split_rate / joined_rate:.2f} |")
                client.end_session()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
