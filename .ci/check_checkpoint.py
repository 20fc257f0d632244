"""Checks that Pollen's checkpoints load with the safetensors library PyTorch users use.

Usage: python3 .ci/check_checkpoint.py RUN_DIR
Loads every models/round-*.safetensors of the run with safetensors.numpy (same format and
reader as safetensors.torch), checks names, PyTorch-layout shapes, dtype and finiteness, and
that consecutive rounds differ (the model trained).
"""

import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file

EXPECTED_2NN = {
    "fc1.weight": (200, 784),
    "fc1.bias": (200,),
    "fc2.weight": (200, 200),
    "fc2.bias": (200,),
    "fc3.weight": (10, 200),
    "fc3.bias": (10,),
}


def main(run_dir: str) -> int:
    files = sorted(pathlib.Path(run_dir, "models").glob("round-*.safetensors"))
    if not files:
        print(f"no checkpoints in {run_dir}/models", file=sys.stderr)
        return 1
    previous = None
    for f in files:
        tensors = load_file(str(f))
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if shapes != EXPECTED_2NN:
            print(f"{f}: shapes {shapes} != {EXPECTED_2NN}", file=sys.stderr)
            return 1
        for k, v in tensors.items():
            if v.dtype != np.float32 or not np.isfinite(v).all():
                print(f"{f}: {k} is {v.dtype} or not finite", file=sys.stderr)
                return 1
        if previous is not None and np.array_equal(previous, tensors["fc1.weight"]):
            print(f"{f}: identical to the previous round", file=sys.stderr)
            return 1
        previous = tensors["fc1.weight"]
    print(f"{len(files)} checkpoints load with safetensors {len(EXPECTED_2NN)} tensors each")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
