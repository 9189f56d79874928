"""Table 2 of the paper regenerated from fine-tuning runs, with the paper's numbers beside ours.

    rows = pd.read_csv("OUT/05_finetuning/results.csv")   # one row per (dataset, model, seed)
    paths = write_table2(rows, "OUT/06_results")          # table2.csv / .md / .tex

Ours: the headline precision / recall / F1 (positive class on BUS-BRA and GIST514-DB, micro
average on MMOTU-2D, as the paper's equal P = R = F1 implies) as the mean over the official folds
(BUS-BRA's 5-fold cross-validation, GIST514-DB's 5 splits; MMOTU-2D has one split) of each fold's
mean over seeds, +/- the sd between folds (over seeds where there is one fold), the 95% bootstrap
interval over test images (each run's, averaged), the numbers of folds and seeds, and the init of
every model. The best mean per column among our rows is marked. UltraSam's paper row is quoted
from UltraSam's own paper, not rerun, and is marked so (`paper_notes`).
Statements for the discussion are computed from the rows (`discussion`), never written by hand.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic_write_text

# Table 2 of the paper (STUDY.md section 5): model -> dataset -> (precision, recall, F1), in %
PAPER_TABLE2 = {
    "vgg-19": {"bus-bra": (60.8, 50.8, 55.4), "mmotu-2d": (62.7, 62.7, 62.7), "gist514": (69.6, 88.1, 77.3)},
    "resnet-50": {"bus-bra": (69.1, 77.0, 72.9), "mmotu-2d": (73.2, 73.2, 73.2), "gist514": (74.0, 90.8, 81.3)},
    "vit-b": {"bus-bra": (71.4, 65.6, 68.4), "mmotu-2d": (74.7, 74.7, 74.7), "gist514": (73.7, 89.3, 80.6)},
    "ultrasam": {"bus-bra": (87.6, 87.5, 87.5), "mmotu-2d": (62.6, 62.4, 62.0), "gist514": (78.2, 74.2, 73.5)},
    "usf-mae": {"bus-bra": (81.3, 82.0, 81.6), "mmotu-2d": (79.6, 79.6, 79.6), "gist514": (75.1, 91.3, 82.4)},
}
DATASET_TITLES = {"bus-bra": "BUS-BRA", "mmotu-2d": "MMOTU-2D", "gist514": "GIST514-DB", "folder": "folder"}
MODEL_TITLES = {"vgg-19": "VGG-19", "resnet-50": "ResNet-50", "vit-b": "ViT-Base", "ultrasam": "UltraSam",
                "usf-mae": "USF-MAE", "scratch": "USF-MAE architecture, from scratch"}
METRICS = ("precision", "recall", "f1")


@dataclass
class Runs:
    """What a fine-tuning folder holds: notebook 05's (results, probe, label_efficiency CSVs and
    setup.json) or a folder of `usfmae finetune` calls (one results.csv with every mode and
    fraction). A missing table is empty: its section of notebook 06 is left out."""
    folder: Path
    results: pd.DataFrame  # fine-tuned on all labels: Table 2's rows
    probe: pd.DataFrame
    label_curve: pd.DataFrame  # every fraction, for the (dataset, model) pairs run below 1
    setup: dict


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def load_runs(folder) -> Runs:
    """Read a fine-tuning folder (see Runs); an error names the file when there is no results.csv."""
    from . import UsfmaeError

    folder = Path(folder)
    rows = _csv(folder / "results.csv")
    if rows.empty:
        raise UsfmaeError(f"{folder / 'results.csv'} not found or empty: run notebook 05 for this out_dir, or point "
                          "results_dir at a folder of `usfmae finetune --out` runs")
    if "fold" not in rows:
        rows["fold"] = 0  # rows written before folds existed: one split
    finetuned = rows[rows["mode"] == "finetune"]
    results = finetuned[finetuned["fraction"] == 1.0].reset_index(drop=True)
    probe = _csv(folder / "probe.csv")
    if probe.empty:
        probe = rows[rows["mode"] == "probe"].reset_index(drop=True)
    curve = _csv(folder / "label_efficiency.csv")
    if curve.empty:
        below = finetuned.loc[finetuned["fraction"] < 1, ["dataset", "model"]].drop_duplicates()
        curve = finetuned.merge(below, on=["dataset", "model"]).reset_index(drop=True)
    setup_file = folder / "setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.is_file() else {}
    return Runs(folder, results, probe, curve, setup)


def paper_long() -> pd.DataFrame:
    """The paper's Table 2 as rows: model, dataset, metric, paper (%)."""
    return pd.DataFrame([dict(model=m, dataset=d, metric=k, paper=v)
                         for m, by in PAPER_TABLE2.items() for d, vals in by.items()
                         for k, v in zip(METRICS, vals)])


def fold_summary(runs: pd.DataFrame, metric: str) -> dict:
    """One cell from its runs: mean over folds of each fold's mean over seeds (every fold weighs the
    same, as in k-fold cross-validation), sd between the fold means (over seeds when there is one
    fold; NaN for a single run), each run's bootstrap interval averaged, n_folds, n_seeds (per fold,
    the most). Rows written before folds existed count as one fold."""
    fold = runs["fold"].fillna(0) if "fold" in runs else pd.Series(0, index=runs.index)
    per_fold = runs.groupby(fold)[metric].mean()
    if len(per_fold) > 1:
        sd = float(per_fold.std(ddof=1))
    else:
        sd = float(runs[metric].std(ddof=1)) if len(runs) > 1 else np.nan
    return dict(mean=float(per_fold.mean()), sd=sd, low=float(runs[f"{metric}_low"].mean()),
                high=float(runs[f"{metric}_high"].mean()), n_folds=len(per_fold),
                n_seeds=int(runs.groupby(fold).size().max()))


def summarise(results: pd.DataFrame, mode: str = "finetune") -> pd.DataFrame:
    """Ours per (dataset, model, metric), in %: fold_summary's mean, sd and interval, n_folds,
    n_seeds, init."""
    rows = results[(results["mode"] == mode) & (results["fraction"] == 1.0)]
    out = []
    for (dataset, model), g in rows.groupby(["dataset", "model"], sort=False):
        for m in METRICS:
            cell = fold_summary(g, m)
            out.append(dict(dataset=dataset, model=model, metric=m, mean=100 * cell["mean"], sd=100 * cell["sd"],
                            low=100 * cell["low"], high=100 * cell["high"], n_folds=cell["n_folds"],
                            n_seeds=cell["n_seeds"], init="; ".join(sorted(g["init"].unique()))))
    return pd.DataFrame(out)


QUOTED = {"ultrasam": "quoted from UltraSam's paper, not rerun"}  # paper rows not measured by the paper's authors


def paper_notes() -> list[str]:
    """What a reader must know before comparing with the paper's rows, computed from its numbers."""
    notes = []
    for model, why in QUOTED.items():
        title = MODEL_TITLES.get(model, model)
        notes.append(f"{title}'s paper row is {why}: the USF-MAE paper presents UltraSam's own reported results "
                     "(its section 2.7: \"their reported results are presented in Table 2\"), not a run with the "
                     "splits and protocol of the other rows. A user-supplied UltraSam checkpoint runs as a row of ours.")
    for model, by in PAPER_TABLE2.items():
        for dataset, (p, r, f1) in by.items():
            implied = 2 * p * r / (p + r)
            if abs(implied - f1) > 1.0:  # beyond rounding and averaging over folds
                notes.append(f"{MODEL_TITLES.get(model, model)} on {DATASET_TITLES[dataset]}: F1 = 2PR/(P+R) of its "
                             f"P {p} and R {r} is {implied:.1f}, the row says {f1}.")
    micro = [m for m, by in PAPER_TABLE2.items() if len(set(by["mmotu-2d"])) > 1]
    for model in micro:
        notes.append(f"{MODEL_TITLES.get(model, model)} on MMOTU-2D: P, R and F1 differ "
                     f"({' / '.join(map(str, PAPER_TABLE2[model]['mmotu-2d']))}) where every other row has P = R = F1 "
                     "(the micro average): another averaging, not comparable with the other rows.")
    return notes


def table2_long(results: pd.DataFrame) -> pd.DataFrame:
    """Ours and the paper side by side, one row per (model, dataset, metric)."""
    ours = summarise(results)
    table = ours.merge(paper_long(), on=["model", "dataset", "metric"], how="outer")
    order = {m: i for i, m in enumerate(list(PAPER_TABLE2) + ["scratch"])}
    table["_o"] = table["model"].map(order).fillna(len(order))
    table["best"] = False
    if not ours.empty:
        for (_, _), g in table.dropna(subset=["mean"]).groupby(["dataset", "metric"]):
            table.loc[g.index[g["mean"] >= g["mean"].max() - 1e-9], "best"] = True  # ties: all marked
    return table.sort_values(["_o", "model", "dataset", "metric"]).drop(columns="_o").reset_index(drop=True)


def _cell(g: pd.DataFrame, fmt) -> str:
    return " / ".join(fmt(g[g["metric"] == m].iloc[0]) if (g["metric"] == m).any() else "-" for m in METRICS)


def _layout(long: pd.DataFrame, bold, pm: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper's layout: model | source | init | P / R / F1 per dataset."""
    datasets = [d for d in DATASET_TITLES if d in set(long["dataset"])]
    header = ["model", "source", "init"] + [f"{DATASET_TITLES[d]} P / R / F1" for d in datasets]
    rows = []
    for model, g in long.groupby("model", sort=False):
        title = MODEL_TITLES.get(model, model)
        if g["mean"].notna().any():
            init = "; ".join(sorted({i for i in g["init"].dropna()}))

            def ours(r):
                text = f"{r['mean']:.1f}" + (f"{pm}{r['sd']:.1f}" if pd.notna(r["sd"]) else "")
                return bold(text) if r["best"] else text
            loud = ", RANDOM INIT: not an ImageNet baseline" if "random: no ImageNet" in init else ""
            rows.append([title, f"ours ({_runs_text(g)}){loud}", init] +
                        [_cell(g[(g["dataset"] == d) & g["mean"].notna()], ours) for d in datasets])
        if g["paper"].notna().any():
            source = f"paper ({QUOTED[model]})" if model in QUOTED else "paper"
            rows.append([title, source, "ImageNet (as the paper states)" if model not in ("usf-mae", "ultrasam")
                         else "paper's own pretraining"] +
                        [_cell(g[(g["dataset"] == d) & g["paper"].notna()], lambda r: f"{r['paper']:.1f}")
                         for d in datasets])
    return header, rows


def _runs_text(g: pd.DataFrame) -> str:
    folds = int(g["n_folds"].max()) if "n_folds" in g and g["n_folds"].notna().any() else 1
    seeds = int(g["n_seeds"].max())
    seed_text = f"{seeds} seed{'s' if seeds > 1 else ''}"
    return f"{folds} folds x {seed_text}" if folds > 1 else seed_text


def to_markdown(long: pd.DataFrame) -> str:
    header, rows = _layout(long, lambda s: f"**{s}**", " ± ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Ours: mean over the official folds of each fold's mean over seeds, ± the sd between folds "
              "(over seeds where a dataset has one split). Notes on the paper's rows:", ""]
    lines += [f"- {n}" for n in paper_notes()]
    ours = long.dropna(subset=["mean"])
    lines += ["", "F1 with its 95% bootstrap interval over test images (each run's, averaged):", "",
              "| model | " + " | ".join(DATASET_TITLES[d] for d in DATASET_TITLES if d in set(ours["dataset"])) + " |",
              "|---|" + "---|" * ours["dataset"].nunique()]
    for model, g in ours[ours["metric"] == "f1"].groupby("model", sort=False):
        cells = [f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]" for d in DATASET_TITLES
                 for _, r in g[g["dataset"] == d].iterrows()]
        lines.append(f"| {MODEL_TITLES.get(model, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(long: pd.DataFrame) -> str:
    def esc(s):
        return str(s).replace("\\", "/").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")
    header, rows = _layout(long, lambda s: rf"\textbf{{{s}}}", r"$\pm$")
    lines = [r"\begin{tabular}{lll" + "c" * (len(header) - 3) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) if i < 3 else c for i, c in enumerate(r)) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\par\footnotesize"]
    lines += [esc(n) + r"\\" for n in paper_notes()]
    return "\n".join(lines) + "\n"


def write_table2(results: pd.DataFrame, out_dir) -> dict[str, Path]:
    """table2.csv (long: ours and paper per model, dataset, metric), table2.md, table2.tex."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    long = table2_long(results)
    paths = {"csv": out_dir / "table2.csv", "md": out_dir / "table2.md", "tex": out_dir / "table2.tex"}
    atomic_write_text(paths["csv"], long.to_csv(index=False, float_format="%.2f"))
    atomic_write_text(paths["md"], to_markdown(long))
    atomic_write_text(paths["tex"], to_latex(long))
    return paths


ONE_CLASS_MARGIN = 0.05  # balanced accuracy below 1 / n_classes + this: close to predicting one class


def discussion(results: pd.DataFrame, label_curve: pd.DataFrame | None = None, synthetic: bool = True) -> list[str]:
    """What the run supports and what it does not, computed from the rows."""
    ft = results[(results["mode"] == "finetune") & (results["fraction"] == 1.0)]
    lines = [("Data: the synthetic twins of the benchmarks (generated, not patient images); nothing here "
              "measures clinical performance." if synthetic else "Data: the dataset roots given to notebook 05.")]
    seeds = ft.groupby(["dataset", "model"]).size()
    if len(seeds):
        lines.append(f"Seeds per cell: {seeds.min()}-{seeds.max()}; sd over seeds and bootstrap intervals "
                     "are reported, the paper reports a single number per cell.")
    random_init = sorted(ft.loc[ft["init"].str.startswith("random: no ImageNet"), "model"].unique())
    if random_init:
        lines.append(f"Baselines without ImageNet weights (random init, unlike the paper): {', '.join(random_init)}; "
                     "their rows compare architectures, not ImageNet transfer.")
    pretrained = sorted(ft.loc[ft["init"].str.startswith("imagenet"), "model"].unique())
    if pretrained:
        lines.append(f"Baselines with ImageNet weights: {', '.join(pretrained)}.")
    if "ultrasam" not in set(ft["model"]):
        lines.append("UltraSam was not run (it needs a user-supplied checkpoint); its paper numbers stand alone.")
    # USF-MAE vs the same architecture from scratch: the claim that pretraining helps
    for dataset, g in ft.groupby("dataset", sort=False):
        by = g.groupby("model")
        if {"usf-mae", "scratch"} <= set(by.groups):
            a, b = fold_summary(by.get_group("usf-mae"), "f1"), fold_summary(by.get_group("scratch"), "f1")
            gap = 100 * (a["mean"] - b["mean"])
            overlap = a["low"] <= b["high"] and b["low"] <= a["high"]
            verdict = "beats" if gap > 0 else "does not beat"
            lines.append(f"{DATASET_TITLES.get(dataset, dataset)}: USF-MAE {verdict} the same architecture from scratch "
                         f"on F1 ({100 * a['mean']:.1f} vs {100 * b['mean']:.1f}, gap {gap:+.1f} points; "
                         f"{a['n_folds']} fold(s) x {a['n_seeds']} seed(s) each); the 95% intervals "
                         f"{'overlap' if overlap else 'do not overlap'}.")
        means = by["f1"].mean()
        if len(means) > 1:
            lines.append(f"{DATASET_TITLES.get(dataset, dataset)}: best mean F1 {MODEL_TITLES.get(means.idxmax(), means.idxmax())} "
                         f"({100 * means.max():.1f}); the paper's best: "
                         + (max(PAPER_TABLE2, key=lambda m: PAPER_TABLE2[m].get(dataset, (0, 0, 0))[2])
                            if dataset in PAPER_TABLE2["usf-mae"] else "n/a") + ".")
    # a one-class model still posts a fair positive-class F1; its balanced accuracy is 1 / n_classes
    n_classes = ft["n_classes"] if "n_classes" in ft else pd.Series(np.nan, index=ft.index)
    if "f1_macro" in ft:  # rows stored before n_classes was: binary when there are no macro scores
        n_classes = n_classes.fillna(ft["f1_macro"].isna().map({True: 2.0, False: np.nan}))
    else:
        n_classes = n_classes.fillna(2.0)
    if "balanced_accuracy" in ft:
        scored = ft.assign(n_classes=n_classes).dropna(subset=["n_classes"])
        bal = scored.groupby(["dataset", "model", "n_classes"], sort=False)["balanced_accuracy"].mean()
        weak = [f"{MODEL_TITLES.get(m, m)} on {DATASET_TITLES.get(d, d)} ({100 * v:.1f}, one class: {100 / k:.1f})"
                for (d, m, k), v in bal.items() if v < 1 / k + ONE_CLASS_MARGIN]
        if weak:
            lines.append(f"Near a one-class predictor (mean test balanced accuracy within {100 * ONE_CLASS_MARGIN:.0f} "
                         "points of always predicting one class): " + ", ".join(weak)
                         + "; their F1 says little about what they learned.")
    if label_curve is not None and len(label_curve):
        lc = label_curve.groupby(["dataset", "model", "fraction"])["f1"].mean().unstack("model")
        if {"usf-mae", "scratch"} <= set(lc.columns):
            wins = (lc["usf-mae"] > lc["scratch"]).sum()
            lines.append(f"Label efficiency: USF-MAE has the higher mean F1 in {wins} of {len(lc)} "
                         "(dataset, label fraction) points.")
    return lines
