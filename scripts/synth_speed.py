"""Measure still-image generation speed of `usfmae synth` (images/s, 224x224 PNG).

Times `generate_tree` writing only pretraining stills (every other count 0, size jitter 0),
end to end: process-pool start, scene drawing, simulation, PNG encoding and atomic writes.
Each configuration runs `--repeats` times into a fresh temporary folder; the best and the
median are printed.

    python scripts/synth_speed.py [--n 600] [--workers 1 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from usfmae_lib.synthetic import generate_tree

ZERO = dict(n_videos=0, n_volumes=0, n_annotated=0, n_busbra=0, n_otu=0, n_gist=0)


def measure(n: int, workers: int, size: int = 224, seed: int = 0) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        generate_tree(d, seed=seed, workers=workers, progress=False, n_pretrain=n, image_size=size,
                      size_jitter=0.0, **ZERO)
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="stills per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    for w in a.workers:
        r = [measure(a.n, w, a.size, seed=k) for k in range(a.repeats)]
        print(f"workers={w}: {max(r):.1f} images/s best, {statistics.median(r):.1f} median "
              f"({a.n} stills {a.size}x{a.size}, {a.repeats} runs)")


if __name__ == "__main__":
    main()
