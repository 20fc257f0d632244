"""PyTorch's side of `pollen-bench train --pytorch PYTHON`: the same local epoch Pollen's
devices run (the model of python/pollen_models.py, the first N MNIST training images scaled as
Pollen scales them, shuffled, SGD with lr 0.05, cross-entropy, weights loaded before and read
after), timed per epoch after one untimed epoch. Prints a JSON list of
{"batch_size": B, "seconds": [...]} rows.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import pollen_models  # noqa: E402

MODELS = {
    "mnist-2nn": lambda: pollen_models.Mlp(784, 10, hidden=(200, 200)),
    "mnist-cnn": lambda: pollen_models.Cnn2d((1, 28, 28), 10),
}


def epoch(model, state, x, y, batch_size, seed):
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            raise SystemExit(f"diverged: loss {loss.item()}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--data", required=True)
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", default="10,64")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d = Path(a.data)
    images = next(q for q in (d / "train-images-idx3-ubyte.gz", d / "train-images-idx3-ubyte") if q.exists())
    labels = next(q for q in (d / "train-labels-idx1-ubyte.gz", d / "train-labels-idx1-ubyte") if q.exists())
    x = pollen_models.mnist_images(images)[:a.examples]
    y = pollen_models.mnist_labels(labels)[:a.examples]
    model = MODELS[a.model]()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for b in (int(s) for s in a.batch_sizes.split(",")):
        epoch(model, state, x, y, b, 0)
        seconds = []
        for run in range(a.runs):
            started = time.perf_counter()
            epoch(model, state, x, y, b, run + 1)
            seconds.append(time.perf_counter() - started)
        rows.append({"batch_size": b, "seconds": seconds})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
