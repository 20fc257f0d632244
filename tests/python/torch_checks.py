"""What a PyTorch user does with Pollen, for tests/tests/torch.rs: export a TorchScript model for
a run, and load a run's checkpoint back into PyTorch to measure it.

    torch_checks.py script OUT.pt [--wrong-output]     # torch.jit.script a small MNIST CNN
    torch_checks.py scripted MODULE.pt CHECKPOINT MNIST_DIR N
    torch_checks.py builtin CHECKPOINT MNIST_DIR N
    torch_checks.py forward CHECKPOINT IO

The last two print one JSON object: the accuracy on the first N MNIST test images, as Pollen's
centralized evaluation measures it, of the checkpoint loaded with ``load_state_dict`` (strict)
into the user's module or into ``python/pollen_models.py``'s equivalent of the run's model.
``forward`` rebuilds a checkpoint's module from its header and prints the largest difference
between its outputs for the ``x`` of the IO file and the ``y`` burn computed.
"""

import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import pollen_models  # noqa: E402


class SmallCnn(nn.Module):
    """A model a user would write: two convolutions and a linear layer, [batch, 1, 28, 28] in."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.head = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def test_set(mnist_dir, n):
    d = Path(mnist_dir)
    images = next(p for p in (d / "t10k-images-idx3-ubyte.gz", d / "t10k-images-idx3-ubyte") if p.exists())
    labels = next(p for p in (d / "t10k-labels-idx1-ubyte.gz", d / "t10k-labels-idx1-ubyte") if p.exists())
    return pollen_models.mnist_images(images)[:n], pollen_models.mnist_labels(labels)[:n]


def main(argv):
    torch.manual_seed(0)
    cmd = argv[0]
    if cmd == "script":
        # 7 classes where the task has 10: the run must fail its fits with the shape named.
        model = SmallCnn(7 if "--wrong-output" in argv else 10)
        torch.jit.script(model).save(argv[1])
        return
    if cmd == "scripted":
        module, checkpoint, mnist_dir, n = argv[1], argv[2], argv[3], int(argv[4])
        model = torch.jit.load(module)
        model.load_state_dict(safetensors.torch.load_file(checkpoint))
        x, y = test_set(mnist_dir, n)
        x = x.reshape(-1, 1, 28, 28)
    elif cmd == "forward":
        checkpoint, io = argv[1], safetensors.torch.load_file(argv[2])
        model, manifest = pollen_models.load_checkpoint(checkpoint)
        with torch.no_grad():
            got = model(io["x"]).reshape(io["y"].shape)
        print(json.dumps({
            "family": manifest["model"]["family"],
            "max_abs_diff": (got - io["y"]).abs().max().item(),
            "max_abs": io["y"].abs().max().item(),
        }))
        return
    elif cmd == "builtin":
        checkpoint, mnist_dir, n = argv[1], argv[2], int(argv[3])
        model, _ = pollen_models.load_checkpoint(checkpoint)
        x, y = test_set(mnist_dir, n)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    meta = pollen_models.checkpoint_metadata(checkpoint)
    print(json.dumps({
        "accuracy": pollen_models.accuracy(model, x, y),
        "round": int(meta["pollen.round"]),
        "run_id": meta["pollen.run_id"],
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
