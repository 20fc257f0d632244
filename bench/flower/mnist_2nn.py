"""Flower's side of the default-run benchmark: the same task as `pollen simulate` without a
spec (MNIST 2NN 784-200-200-10, 100 IID clients of 600 images, C = 0.1, E = 1, B = 10,
lr 0.1, centralized evaluation on the 10k test images after every round), on Flower's
simulation engine (Ray backend), with NumPy clients so that no deep-learning framework's
start-up is timed.

    pip install "flwr[simulation]==1.42.0" numpy
    python3 bench/flower/mnist_2nn.py --rounds 50 --json > flower.jsonl

Prints one JSON object per round (round, seconds, accuracy) and a summary on stderr. A
round's time is the time between two consecutive centralized evaluations, so it includes
sampling, the fits, aggregation and the evaluation, as Pollen's round time does.
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

# One BLAS thread per client process: each Ray actor holds one core. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "mnist"


def idx(name):
    with gzip.open(DATA / f"{name}.gz", "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def images(name):
    # Pollen's MNIST loader: pixels / 255, standardised with MNIST's mean and std.
    x = idx(name).reshape(-1, 784).astype(np.float32) / 255.0
    return (x - 0.1307) / 0.3081


def init(rng):
    # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    params = []
    for fan_in, fan_out in [(784, 200), (200, 200), (200, 10)]:
        b = 1.0 / np.sqrt(fan_in)
        params.append(rng.uniform(-b, b, (fan_in, fan_out)).astype(np.float32))
        params.append(rng.uniform(-b, b, fan_out).astype(np.float32))
    return params


def forward(p, x):
    h1 = np.maximum(x @ p[0] + p[1], 0)
    h2 = np.maximum(h1 @ p[2] + p[3], 0)
    return h1, h2, h2 @ p[4] + p[5]


def sgd_epoch(p, x, y, lr, batch, rng):
    p = [a.copy() for a in p]
    order = rng.permutation(len(x))
    for s in range(0, len(x), batch):
        i = order[s : s + batch]
        xb, yb = x[i], y[i]
        h1, h2, z = forward(p, xb)
        z = z - z.max(axis=1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(axis=1, keepdims=True)
        prob[np.arange(len(yb)), yb] -= 1
        g = prob / len(yb)
        grads = [None] * 6
        grads[4], grads[5] = h2.T @ g, g.sum(0)
        g = (g @ p[4].T) * (h2 > 0)
        grads[2], grads[3] = h1.T @ g, g.sum(0)
        g = (g @ p[2].T) * (h1 > 0)
        grads[0], grads[1] = xb.T @ g, g.sum(0)
        for a, d in zip(p, grads):
            a -= lr * d
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    train_x, train_y = images("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
    test_x, test_y = images("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
    shards = np.array_split(np.random.default_rng(42).permutation(len(train_x)), args.clients)

    class Client(NumPyClient):
        def __init__(self, cid):
            self.cid = cid

        def fit(self, parameters, config):
            i = shards[self.cid]
            rng = np.random.default_rng(1000 + self.cid)
            p = sgd_epoch(parameters, train_x[i], train_y[i], 0.1, 10, rng)
            return p, len(i), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    stamps, accuracy = [], []

    def evaluate(server_round, parameters, config):
        _, _, z = forward(parameters, test_x)
        acc = float((z.argmax(1) == test_y).mean())
        stamps.append(time.perf_counter())
        accuracy.append(acc)
        if server_round > 0 and args.json:
            print(json.dumps({"round": server_round,
                              "seconds": stamps[-1] - stamps[-2],
                              "accuracy": acc}), flush=True)
        return 0.0, {"accuracy": acc}

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=0.1, fraction_evaluate=0.0, min_fit_clients=2,
            min_available_clients=2,
            initial_parameters=ndarrays_to_parameters(init(np.random.default_rng(42))),
            evaluate_fn=evaluate,
        )
        return ServerAppComponents(strategy=strategy,
                                   config=ServerConfig(num_rounds=args.rounds))

    start = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rounds = [b - a for a, b in zip(stamps, stamps[1:])]
    first = next((r for r, a in enumerate(accuracy) if a >= 0.97 and r > 0), None)
    print(f"Flower: {len(rounds)} rounds, median {statistics.median(rounds):.3f} s/round "
          f"(min {min(rounds):.3f}, max {max(rounds):.3f}), final accuracy {accuracy[-1]:.4f}, "
          f"97% first at round {first}, {time.perf_counter() - start:.1f} s in all",
          file=sys.stderr)


if __name__ == "__main__":
    main()
