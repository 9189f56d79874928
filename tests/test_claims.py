"""Every claim the README's status and the docs make about a measured comparison matches the verdicts
of the run it cites.

A claim is written after a marker, invisible in rendered Markdown, that names the verdict it quotes:

    <!-- verdict: quick-06 | USF-MAE - scratch, fine-tuned (F1) | BUS-BRA --> +4.8 [-9.1, +18.8], no clear difference

The source names a committed verdicts table (SOURCES): the quick run's verdicts of notebooks 04, 06
and 07 (docs/verdicts/quick.csv, written by that run, `notebook` column) or the teaching MAE's
evaluation. The text after the marker must give the row's difference and interval as the notebooks
print them and its verdict word. And no interval may stand in these pages without a marker: a number
that no verdicts table backs is not a claim this project makes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/finetuning.md", "docs/ablations.md", "docs/reconstruction.md"]
SOURCES = {  # name -> (verdicts file, notebook or None, digits the numbers are quoted with)
    "quick-04": ("docs/verdicts/quick.csv", "04", 3),
    "quick-06": ("docs/verdicts/quick.csv", "06", 1),
    "quick-07": ("docs/verdicts/quick.csv", "07", 1),
    "teaching": ("usfmae_lib/data/teaching_mae/heldout_evaluation.csv", None, 3),
}
MARKER = re.compile(r"<!-- verdict: (?P<source>[\w-]+) \| (?P<comparison>[^|]+?) \| (?P<dataset>[^|]+?) -->")
INTERVAL = re.compile(r"[+-]?\d+\.\d+ \[[+-]?\d+\.\d+, [+-]?\d+\.\d+\]")  # "+4.8 [-9.1, +18.8]", "-0.236 [-0.302, -0.170]"
REACH = 160  # characters after a marker that belong to its claim


def _claims():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for m in MARKER.finditer(text):
            yield page, m, text[m.end():m.end() + REACH]


def _row(source: str, comparison: str, dataset: str) -> pd.Series:
    path, notebook, _ = SOURCES[source]
    table = pd.read_csv(ROOT / path, dtype={"notebook": str})
    if notebook is not None:
        table = table[table["notebook"] == notebook]
    rows = table[(table["comparison"] == comparison) & (table["dataset"] == dataset)]
    assert len(rows) == 1, f"{source}: {len(rows)} verdicts for {comparison!r} on {dataset!r} in {path}"
    return rows.iloc[0]


def test_every_marked_claim_quotes_its_verdict():
    claims = list(_claims())
    assert claims, "no marked claim in " + ", ".join(PAGES)
    for page, m, claim in claims:
        row = _row(m["source"], m["comparison"], m["dataset"])
        digits = SOURCES[m["source"]][2]
        f = f"{{:+.{digits}f}}"
        numbers = f"{f.format(row['difference'])} [{f.format(row['low'])}, {f.format(row['high'])}]"
        where = f"{page}: {m.group(0)}"
        assert claim.lstrip(" *").startswith(numbers), f"{where} quotes {claim[:40]!r}, its verdict says {numbers}"
        assert str(row["verdict"]) in claim, f"{where}: the verdict {row['verdict']!r} is not said"


@pytest.mark.parametrize("page", PAGES)
def test_no_interval_without_a_verdict_behind_it(page):
    text = (ROOT / page).read_text()
    backed = [(m.end(), m.end() + REACH) for m in MARKER.finditer(text)]
    loose = [i.group(0) for i in INTERVAL.finditer(text)
             if not any(start <= i.start() < end for start, end in backed)]
    assert not loose, f"{page}: intervals with no verdict marker before them: {loose}"
