"""One table of a run's verdicts, for the docs to quote (tests/test_claims.py checks them against it).

    python scripts/collect_verdicts.py outputs/quick docs/verdicts/quick.csv

Reads <out>/04_reconstruction/verdicts.csv, <out>/06_results/verdicts.csv and
<out>/07_ablations/verdicts.csv (the columns every notebook writes: comparison, dataset,
difference, low, high, method, verdict) and writes them as one CSV with a `notebook` column.
"""
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ["notebook", "comparison", "dataset", "difference", "low", "high", "method", "verdict"]

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out, target = Path(sys.argv[1]), Path(sys.argv[2])
    tables = []
    for step in ("04_reconstruction", "06_results", "07_ablations"):
        path = out / step / "verdicts.csv"
        if not path.is_file():
            sys.exit(f"{path} not found: run notebook {step[:2]} for {out} first")
        tables.append(pd.read_csv(path).assign(notebook=step[:2]))
    table = pd.concat(tables, ignore_index=True)[COLUMNS]
    target.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(target, index=False)
    print(f"{len(table)} verdicts -> {target}")
