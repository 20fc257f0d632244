"""Writes BasicMotions in long format (one row per reading) from the UEA archive copy that the
sktime wheel bundles (sktime/datasets/data/BasicMotions/BasicMotions_{TRAIN,TEST}.ts).

Usage: pip download --no-deps sktime==1.2.0 && unzip -o sktime-1.2.0-py3-none-any.whl \
           'sktime/datasets/data/BasicMotions/*' && python3 convert.py sktime/datasets/data/BasicMotions
"""

import csv
import pathlib
import sys

CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
# The watch samples every tenth of a second for ten seconds.
PERIOD_S = 0.1


def recordings(path):
    data = False
    for line in open(path, encoding="utf-8-sig"):
        line = line.strip()
        if line.lower().startswith("@data"):
            data = True
            continue
        if data and line:
            *dims, label = line.split(":")
            yield [[float(v) for v in d.split(",")] for d in dims], label.lower()


def main(folder):
    here = pathlib.Path(__file__).parent
    for split in ("train", "test"):
        src = pathlib.Path(folder, f"BasicMotions_{split.upper()}.ts")
        with open(here / f"basicmotions_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["recording", "time", *CHANNELS, "activity"])
            for i, (dims, activity) in enumerate(recordings(src)):
                assert len(dims) == len(CHANNELS)
                for t in range(len(dims[0])):
                    w.writerow(
                        [f"{split}-{i:02d}", f"{t * PERIOD_S:.1f}", *(repr(d[t]) for d in dims), activity]
                    )


if __name__ == "__main__":
    main(sys.argv[1])
