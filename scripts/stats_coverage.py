"""Coverage of the study's intervals when one source of variance dominates (docs/statistics.md).

tests/test_stats.py checks each design the profiles use with every source at an equal share; this
script runs the same simulated studies with one source's sd three times the others' and prints, per
design and dominant source, the coverage of a true difference of 3 and the rate of above/below
verdicts at a true difference of 0. About a minute per 1,000 studies and design on one core:

    python scripts/stats_coverage.py --studies 1000
    python scripts/stats_coverage.py --bootstrap    # a hierarchical percentile bootstrap instead, for comparison
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_stats as sim  # noqa: E402  (the simulators of the test, not a copy)

def bootstrap_coverage(design: str, n_studies: int, n_resamples: int = 500, delta: float = 3.0) -> float:
    """Coverage of a two-level percentile bootstrap (pretraining runs, then splits, resampled with
    replacement) of the paired mean difference, on the simulated studies of a crossed design."""
    make, kwargs, _ = sim.DESIGNS[design]
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(n_studies):
        a, b = make(rng, delta, **kwargs)
        d = sim.stats.pair(a, b)
        table = d.pivot_table(index="pretrain_run", columns="split", values="value").to_numpy()  # [R, K]
        r, k = table.shape
        means = [table[rng.integers(0, r, r)][:, rng.integers(0, k, k)].mean() for _ in range(n_resamples)]
        low, high = np.percentile(means, [2.5, 97.5])
        covered += low <= delta <= high
    return covered / n_studies


SOURCES = {"crossed": ("pretraining", "split", "seed"), "one split": ("pretraining", "seed", "images")}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--dominance", type=float, default=3.0, help="the dominant source's sd / the others'")
    parser.add_argument("--bootstrap", action="store_true", help="the hierarchical bootstrap's coverage instead")
    args = parser.parse_args()
    if args.bootstrap:
        design = "quick, 5 folds x 3 pretraining runs"
        print(f"{design}: hierarchical percentile bootstrap covers +3 in "
              f"{bootstrap_coverage(design, args.studies):.3f} of {args.studies} studies")
        sys.exit(0)
    print("| design | dominant source | coverage of +3 | above/below at 0 |\n|---|---|---|---|")
    for design, (make, kwargs, _) in sim.DESIGNS.items():
        kind = "crossed" if make is sim.crossed_study else "one split"
        for source in SOURCES[kind]:
            if source == "pretraining" and kwargs["n_pre"] == 1:
                continue
            scale = {s: (args.dominance if s == source else 1.0) for s in SOURCES[kind]}
            cover, _ = sim.simulate(design, 3.0, 1, args.studies, scale)
            _, false = sim.simulate(design, 0.0, 2, args.studies, scale)
            print(f"| {design} | {source} | {cover:.3f} | {false:.3f} |", flush=True)
