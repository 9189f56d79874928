"""Table 2 of the paper regenerated from fine-tuning runs, with the paper's numbers beside ours.

    rows = pd.read_csv("OUT/05_finetuning/results.csv")   # one row per (dataset, model, seed)
    paths = write_table2(rows, "OUT/06_results")          # table2.csv / .md / .tex

Ours: the headline precision / recall / F1 (positive class on BUS-BRA and GIST514-DB, micro
average on MMOTU-2D, as the paper's equal P = R = F1 implies) as the mean over the official splits
(BUS-BRA's 5-fold cross-validation, GIST514-DB's 5 splits; MMOTU-2D has one split) of each split's
mean over USF-MAE's pretraining runs and the seeds, +/- the sd of the single runs, the 95% interval
of that mean (usfmae_lib.stats: every source of variance the runs sample, the method named under
the table), the numbers of pretraining runs, splits and seeds, and the init of every model. A
column's best mean is marked only among comparable rows of ours (not a random-init baseline, not
near a one-class predictor) and only when its lead over the runner-up, paired by split, seed and
test image, has an interval above 0; the paper's rows are never compared with ours. UltraSam's
paper row is quoted from UltraSam's own paper, not rerun, and is marked so (`paper_notes`).
Statements for the discussion are computed from the rows (`discussion`), never written by hand, by
the one verdict rule (stats.RULE); "too small to judge" on the smoke profile. The notebooks show
their verdicts as one table (`scratch_verdicts` here, `ablations.verdict_rows` for notebook 07;
`show_verdicts` writes verdicts.csv and states the rule, and the smoke profile's reason, once).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic_write_text, provenance, stats

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


def read_table(path: Path) -> pd.DataFrame:
    """A CSV notebook 05 wrote, or an empty frame when it is missing or was written with no rows."""
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def load_runs(folder) -> Runs:
    """Read a fine-tuning folder (see Runs), with add_replicates' test-image resamples on single-split
    datasets; an error names the file when there is no results.csv."""
    from . import UsfmaeError

    folder = Path(folder)
    rows = read_table(folder / "results.csv")
    if rows.empty:
        raise UsfmaeError(f"{folder / 'results.csv'} not found or empty: run notebook 05 for this out_dir, or point "
                          "results_dir at a folder of `usfmae finetune --out` runs")
    if "fold" not in rows:
        rows["fold"] = 0  # rows written before folds existed: one split
    finetuned = rows[rows["mode"] == "finetune"]
    results = finetuned[finetuned["fraction"] == 1.0].reset_index(drop=True)
    probe = read_table(folder / "probe.csv")
    if probe.empty:
        probe = rows[rows["mode"] == "probe"].reset_index(drop=True)
    curve = read_table(folder / "label_efficiency.csv")
    if curve.empty:
        below = finetuned.loc[finetuned["fraction"] < 1, ["dataset", "model"]].drop_duplicates()
        curve = finetuned.merge(below, on=["dataset", "model"]).reset_index(drop=True)
    setup_file = folder / "setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.is_file() else {}
    # a single split's runs scored on shared test-image resamples: its intervals hold the test images too
    results, probe, curve = (add_replicates(t, folder / "runs") for t in (results, probe, curve))
    return Runs(folder, results, probe, curve, setup)


def relative_init(rows: pd.DataFrame, folder) -> pd.DataFrame:
    """rows with the checkpoint paths in `init` made relative to `folder` (the study's output folder):
    "usf-mae: 03_mae_pretraining/checkpoints/checkpoint-last.pth", what a reader needs, instead of an
    absolute path that tables cut short. Paths elsewhere stay as they are."""
    if "init" not in rows:
        return rows
    prefix = f"{Path(folder).as_posix().rstrip('/')}/"
    return rows.assign(init=rows["init"].astype(str).str.replace(prefix, "", regex=False))


def paper_long() -> pd.DataFrame:
    """The paper's Table 2 as rows: model, dataset, metric, paper (%)."""
    return pd.DataFrame([dict(model=m, dataset=d, metric=k, paper=v)
                         for m, by in PAPER_TABLE2.items() for d, vals in by.items()
                         for k, v in zip(METRICS, vals)])


# ============================================================================ cells and pairs (usfmae_lib.stats)
def add_replicates(rows: pd.DataFrame, runs_dir, metrics=METRICS, n_resamples: int = 1000) -> pd.DataFrame:
    """rows with, for every run on a dataset with one split (MMOTU-2D), each metric on n_resamples
    bootstrap resamples of its test images (`replicates_<metric>`, arrays) and n_test: the resamples
    are drawn once per split, so every run on it (every model, seed and pretraining run) is scored on
    the same ones, which is what pairs them by test image. Read from each run's test_predictions.csv
    under runs_dir; a run without it (or on other test images) gets none, and its interval then says
    that the test images are not in it. Datasets with several splits need none: each split's own
    test images are inside the spread between splits."""
    rows = rows.copy()
    if rows.empty or "run" not in rows:
        return rows
    runs_dir = Path(runs_dir)
    for m in metrics:
        rows[f"replicates_{m}"] = None
    one_split = rows.groupby("dataset")["fold"].transform("nunique") == 1
    for (dataset, fold), g in rows[one_split].groupby(["dataset", "fold"]):
        preds = {i: runs_dir / str(run) / "test_predictions.csv" for i, run in g["run"].items()}
        preds = {i: pd.read_csv(p) for i, p in preds.items() if p.is_file()}
        if not preds:
            continue
        paths = next(iter(preds.values()))["path"].tolist()
        index = stats.resample_index(len(paths), n_resamples, seed=zlib.crc32(f"{dataset}/{fold}".encode()))
        for i, p in preds.items():
            if p["path"].tolist() != paths:
                continue
            positive = _positive(p, rows.loc[i])
            rows.at[i, "n_test"] = len(p)
            for m in metrics:
                rows.at[i, f"replicates_{m}"] = stats.metric_replicates(p["label"], p["pred"], index, m, positive)
    return rows


def _positive(preds: pd.DataFrame, row: pd.Series) -> int | None:
    """The positive class index of a binary run (the one whose F1 on its predictions is the row's F1);
    None for a multi-class run (micro averages)."""
    if sum(c.startswith("prob_") for c in preds) != 2:
        return None
    whole = np.arange(len(preds))[None]
    for p in (0, 1):
        if abs(stats.metric_replicates(preds["label"], preds["pred"], whole, "f1", p)[0] - row["f1"]) < 1e-9:
            return p
    return 1


def cell_runs(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """rows as the stats module reads them: one row per run with pretrain_run (the checkpoint in `init`:
    each distinct USF-MAE checkpoint is one pretraining run; a baseline has one init), split (fold),
    seed, value (metric) and the test-image replicates when add_replicates made them."""
    fold = rows["fold"].fillna(0) if "fold" in rows else pd.Series(0, index=rows.index)
    seed = rows["seed"] if "seed" in rows else pd.Series(range(len(rows)), index=rows.index)
    pretrain = rows["pretrain_run"] if "pretrain_run" in rows else rows.get("init", pd.Series("", index=rows.index))
    out = pd.DataFrame(dict(pretrain_run=pretrain.astype(str), split=fold, seed=seed, value=rows[metric]))
    if f"replicates_{metric}" in rows:
        out["replicates"] = rows[f"replicates_{metric}"]
        out["n_test"] = rows["n_test"] if "n_test" in rows else 0
    return out


def holdout_ratio(rows: pd.DataFrame) -> float:
    """n_test / n_train of the splits (the whole training part, also for runs on a fraction of its
    labels), for Nadeau and Bengio's correction; k-fold's 1 / (K - 1) for rows that do not record
    their sizes; 0 with one split."""
    k = rows["fold"].nunique() if "fold" in rows else 1
    if k < 2:
        return 0.0
    if {"n_test", "n_train"} <= set(rows) and rows["n_train"].notna().all() and rows["n_test"].notna().all():
        fraction = rows["fraction"] if "fraction" in rows else 1.0
        return float(rows["n_test"].mean() / (rows["n_train"] / fraction).mean())  # the split's, not the labels used
    return 1 / (k - 1)


def cell_interval(rows: pd.DataFrame, metric: str) -> stats.Interval:
    """One cell (one model on one dataset): the mean over its runs with the interval of that mean
    (stats.interval; USF-MAE's pretraining runs are a source of variance, and one run is said to
    leave it out)."""
    pretrained = "model" in rows and len(rows) > 0 and bool((rows["model"] == "usf-mae").all())
    return stats.interval(cell_runs(rows, metric), test_over_train=holdout_ratio(rows), pretrained=pretrained)


def paired(rows: pd.DataFrame, a: str, b: str, metric: str = "f1", key: str = "model") -> stats.Interval | None:
    """a minus b on one dataset's rows (a and b: values of `key`), paired by split, seed and test image
    (stats.pair), with the interval of the mean difference; None when they share no (split, seed)."""
    d = stats.pair(cell_runs(rows[rows[key] == a], metric), cell_runs(rows[rows[key] == b], metric))
    if d.empty:
        return None
    return stats.interval(d, test_over_train=holdout_ratio(rows), pretrained="usf-mae" in (a, b))


def fold_summary(runs: pd.DataFrame, metric: str) -> dict:
    """One cell from its runs, as numbers: mean (over splits of the mean over pretraining runs and
    seeds), sd of the single runs, low and high (the 95% interval of the mean: cell_interval),
    n_folds, n_seeds, n_pretrain and method (the interval's, in words)."""
    iv = cell_interval(runs, metric)
    return dict(mean=iv.mean, sd=iv.sd, low=iv.low, high=iv.high, n_folds=iv.n_splits, n_seeds=iv.n_seeds,
                n_pretrain=iv.n_pre, n_test=iv.n_test, method=iv.method)


def summarise(results: pd.DataFrame, mode: str = "finetune") -> pd.DataFrame:
    """Ours per (dataset, model, metric), in %: fold_summary's mean, sd (of the single runs) and
    interval (of the mean), the interval's method, n_pretrain, n_folds, n_seeds, n_test, init."""
    rows = results[(results["mode"] == mode) & (results["fraction"] == 1.0)]
    out = []
    for (dataset, model), g in rows.groupby(["dataset", "model"], sort=False):
        for m in METRICS:
            cell = fold_summary(g, m)
            out.append(dict(dataset=dataset, model=model, metric=m, mean=100 * cell["mean"], sd=100 * cell["sd"],
                            low=max(100 * cell["low"], 0.0), high=min(100 * cell["high"], 100.0),  # a score's range
                            method=cell["method"],
                            n_pretrain=cell["n_pretrain"], n_folds=cell["n_folds"], n_seeds=cell["n_seeds"],
                            n_test=cell["n_test"], init="; ".join(sorted(g["init"].unique()))))
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


def table2_long(results: pd.DataFrame, profile: str | None = None) -> pd.DataFrame:
    """Ours and the paper side by side, one row per (model, dataset, metric). `best` marks, per
    (dataset, metric), the highest mean of ours among comparable rows when the paired interval of its
    lead over the runner-up lies above 0 (clear_best); nothing on the smoke profile (or a dry run:
    UNJUDGED). The paper's numbers (column `paper`) are never compared with ours."""
    ours = summarise(results)
    table = ours.merge(paper_long(), on=["model", "dataset", "metric"], how="outer")
    order = {m: i for i, m in enumerate(list(PAPER_TABLE2) + ["scratch"])}
    table["_o"] = table["model"].map(order).fillna(len(order))
    table["best"] = False
    if not ours.empty and not unjudged(profile):
        rows = results[(results["mode"] == "finetune") & (results["fraction"] == 1.0)]
        status = one_class_status(rows)
        for (dataset, metric), g in table.dropna(subset=["mean"]).groupby(["dataset", "metric"]):
            best, _ = clear_best(g, status, rows[rows["dataset"] == dataset], metric)
            if best is not None:
                table.loc[g.index[g["model"] == best], "best"] = True
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
    """How many runs made a row's cells: "5 folds x 1 seed", "3 pretraining runs x 5 folds x 1 seed",
    or per dataset when they differ ("BUS-BRA, GIST514-DB: 5 folds x 1 seed; MMOTU-2D: 3 seeds")."""
    def text(pre: int, folds: int, seeds: int) -> str:
        parts = [f"{pre} pretraining runs"] if pre > 1 else []
        parts += [f"{folds} folds"] if folds > 1 else []
        return " x ".join(parts + [f"{seeds} seed{'s' if seeds > 1 else ''}"])

    g = g[g["n_seeds"].notna()]  # a dataset the model did not run on has no runs
    count = {k: (g[k].fillna(1) if k in g else pd.Series(1, index=g.index)).astype(int)
             for k in ("n_pretrain", "n_folds", "n_seeds")}
    runs = pd.DataFrame({"dataset": g["dataset"], **count})
    per_dataset = runs.groupby("dataset", sort=False)[list(count)].max()
    kinds = per_dataset.groupby(list(count), sort=False).groups
    if len(kinds) == 1:
        return text(*next(iter(kinds)))
    return "; ".join(f"{', '.join(DATASET_TITLES.get(d, d) for d in datasets)}: {text(*key)}"
                     for key, datasets in kinds.items())


def runs_provenance(results: pd.DataFrame, setup: dict) -> str:
    """Table 2's provenance note: the commit of every run behind it (results.csv's `commit` column;
    several when runs were made by different code) and notebook 05's environment (setup.json)."""
    commits = sorted(set(results["commit"].dropna())) if "commit" in results else []
    if not commits:
        line = "Commit of the runs: not recorded (runs made before the results carried it)."
    elif len(commits) == 1:
        line = f"Commit of every run: {commits[0]}."
    else:
        counts = results["commit"].value_counts()
        line = ("The runs were made by different code: " + ", ".join(f"{c} ({counts[c]} runs)" for c in commits)
                + "; a table from one commit needs the others' runs redone.")
    made = setup.get("provenance")
    return line + ("\n\n" + provenance.markdown_block(made, "Environment of notebook 05 (fine-tuning)", bold=False) if made else "")


def to_markdown(long: pd.DataFrame, made_by: str | None = None) -> str:
    header, rows = _layout(long, lambda s: f"**{s}**", " ± ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", CELL_NOTE, "", BOLD_NOTE, "", "Notes on the paper's rows:", ""]
    lines += [f"- {n}" for n in paper_notes()]
    ours = long.dropna(subset=["mean"])
    f1 = ours[ours["metric"] == "f1"]
    datasets = [d for d in DATASET_TITLES if d in set(ours["dataset"])]
    lines += ["", "F1 with the 95% interval of its mean (clipped to 0-100):", "",
              "| model | " + " | ".join(DATASET_TITLES[d] for d in datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model, g in f1.groupby("model", sort=False):
        cells = [" ".join(f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]" if np.isfinite(r["low"])
                          else f"{r['mean']:.1f} [no interval]" for _, r in g[g["dataset"] == d].iterrows())
                 for d in datasets]
        lines.append(f"| {MODEL_TITLES.get(model, model)} | " + " | ".join(cells) + " |")
    lines += ["", "How each interval was made (pretraining runs x splits x seeds per pretraining run; test images "
              "where a dataset has one split):", ""]
    for d in datasets:
        for method, g in f1[f1["dataset"] == d].groupby("method", sort=False):
            lines.append(f"- {DATASET_TITLES[d]}, {', '.join(MODEL_TITLES.get(m, m) for m in g['model'])}: {method}")
    if made_by:
        lines += ["", made_by]
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


def write_table2(results: pd.DataFrame, out_dir, profile: str | None = None, made_by: str | None = None) -> dict[str, Path]:
    """table2.csv (long: ours and paper per model, dataset, metric), table2.md, table2.tex; profile
    as table2_long's (smoke or dry-run: nothing bold); made_by: a provenance note under table2.md
    (runs_provenance)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    long = table2_long(results, profile)
    paths = {"csv": out_dir / "table2.csv", "md": out_dir / "table2.md", "tex": out_dir / "table2.tex"}
    atomic_write_text(paths["csv"], long.to_csv(index=False, float_format="%.2f"))
    atomic_write_text(paths["md"], to_markdown(long, made_by))
    atomic_write_text(paths["tex"], to_latex(long))
    return paths


CELL_NOTE = ("How to read a cell of ours: the number is the mean score over every run of that model on that "
             "dataset (each official split weighs the same; USF-MAE's runs also span its pretraining runs). "
             "± is the sd of the single runs: how far one more run may land from the mean. "
             "The bracketed interval, under the table, is the 95% interval of the mean itself, built from every "
             "source of variance the runs sample (pretraining runs, splits, seeds, test images) and named "
             "under it; a source with one level, such as a single pretraining run, is not in it and is "
             "named there too.")
BOLD_NOTE = ("Bold: the best mean of ours among rows that are neither random-init baselines nor near a one-class "
             "predictor, when its lead over the runner-up, paired by split, seed and test image, has a 95% "
             "interval above 0 (none bold: no such lead).")
ONE_CLASS_MARGIN = 0.05  # balanced accuracy below 1 / n_classes + this: close to predicting one class
SMOKE_REASON = "smoke profile: tiny images, one epoch and few runs check that the code runs, they measure nothing"
UNJUDGED = {"smoke": SMOKE_REASON,  # profiles whose numbers no verdict is drawn from, and why
            "dry-run": "dry run: every run stopped after a step or two, the numbers measure nothing"}


TOO_SMALL = stats.TOO_SMALL  # every verdict that draws nothing from the numbers says this
# notebooks 06 and 07 show their verdicts as one table, also written to verdicts.csv (show_verdicts)
VERDICT_COLUMNS = ["comparison", "dataset", "difference", "low", "high", "method", "verdict"]


def unjudged(profile: str | None) -> str | None:
    """Why nothing is judged on this profile's numbers ("smoke", "dry-run"); None: judge by the numbers."""
    return UNJUDGED.get(profile)


RANDOM_INIT = "random: no ImageNet"  # a baseline that found no ImageNet weights (classifiers.build_classifier)


def _n_classes(rows: pd.DataFrame) -> pd.Series:
    """Classes per row; rows stored before n_classes was: binary when there are no macro scores."""
    n_classes = rows["n_classes"] if "n_classes" in rows else pd.Series(np.nan, index=rows.index)
    if "f1_macro" in rows:
        return n_classes.fillna(rows["f1_macro"].isna().map({True: 2.0, False: np.nan}))
    return n_classes.fillna(2.0)


def one_class_status(rows: pd.DataFrame, keys=("dataset", "model")) -> pd.DataFrame:
    """Per keys: mean balanced accuracy, chance = 1 / n_classes, and near_one_class (balanced
    accuracy below chance + ONE_CLASS_MARGIN; NaN where balanced accuracy or n_classes is unknown)."""
    keys = list(keys)
    cols = keys + ["balanced_accuracy", "chance", "near_one_class"]
    if rows.empty:
        return pd.DataFrame(columns=cols).set_index(keys)
    scored = rows.assign(chance=1 / _n_classes(rows),
                         balanced_accuracy=rows["balanced_accuracy"] if "balanced_accuracy" in rows else np.nan)
    out = scored.groupby(keys, sort=False)[["balanced_accuracy", "chance"]].mean()
    near = out["balanced_accuracy"] < out["chance"] + ONE_CLASS_MARGIN
    out["near_one_class"] = near.astype(object).where(out[["balanced_accuracy", "chance"]].notna().all(axis=1))
    return out


def _title(model: str) -> str:
    """A model's name in a sentence."""
    return "the from-scratch model (USF-MAE architecture)" if model == "scratch" else MODEL_TITLES.get(model, model)


def _one_class_reason(status: pd.DataFrame, key: tuple) -> str | None:
    """Why a (dataset, model) cell cannot be compared on its balanced accuracy; None when it can."""
    if key not in status.index or pd.isna(status.loc[key, "near_one_class"]):
        return f"{_title(key[-1])} has no balanced accuracy to rule out a one-class predictor"
    bal, chance = status.loc[key, "balanced_accuracy"], status.loc[key, "chance"]
    if status.loc[key, "near_one_class"]:
        return (f"{_title(key[-1])} is near a one-class predictor (balanced accuracy {100 * bal:.1f}, "
                f"one class: {100 * chance:.1f})")
    return None


def interval_text(iv: stats.Interval | None, signed: bool = True) -> str:
    """"+3.3 [+1.0, +5.6]" in points (iv in fractions), or why there is no interval."""
    if iv is None:
        return "no pairs"
    f = "{:+.1f}" if signed else "{:.1f}"
    if not np.isfinite(iv.low):
        return f"{f.format(100 * iv.mean)} (no interval: {iv.method.removeprefix('no interval: ')})"
    return f"{f.format(100 * iv.mean)} [{f.format(100 * iv.low)}, {f.format(100 * iv.high)}]"


def clear_best(cells: pd.DataFrame, status: pd.DataFrame, rows: pd.DataFrame, metric: str = "f1") -> tuple[str | None, str]:
    """The model with the clearly highest mean among comparable cells, and a sentence on why.

    cells: one row per model of one dataset with dataset, model, mean (%) and init (summarise's
    columns); rows: that dataset's fine-tuning runs. Comparable: init not a random-init baseline
    ("random: no ImageNet ...") and not near a one-class predictor (status from one_class_status).
    Clear: at least two comparable cells and the lead of the highest mean over the runner-up, paired
    by split, seed and test image, has a 95% interval above 0 (the verdict rule, stats.RULE).
    Returns (None, why) when there is no such model."""
    excluded, ok = [], []
    for _, r in cells.iterrows():
        reason = (f"{_title(r['model'])} is a random-init baseline" if RANDOM_INIT in str(r.get("init", ""))
                  else _one_class_reason(status, (r["dataset"], r["model"])))
        if reason:
            excluded.append(reason)
        else:
            ok.append(r)
    left_out = f" (left out: {'; '.join(excluded)})" if excluded else ""
    if len(ok) < 2:
        return None, f"fewer than two comparable rows{left_out}"
    first, second = sorted(ok, key=lambda r: r["mean"], reverse=True)[:2]
    lead = paired(rows, first["model"], second["model"], metric)
    text = (f"{_title(first['model'])} ({first['mean']:.1f}) leads {_title(second['model'])} ({second['mean']:.1f}) "
            f"by {interval_text(lead)} paired")
    if lead is not None and stats.side(lead.low, lead.high) == stats.ABOVE:
        return first["model"], f"{text}, above 0{left_out}"
    return None, f"{text}, not clearly above 0{left_out}"


def scratch_comparison(ft: pd.DataFrame, dataset: str, status: pd.DataFrame, profile: str | None = None) -> dict:
    """USF-MAE against the same architecture from scratch on one dataset's F1, as numbers and a verdict.

    The difference is paired by split, seed and test image, its interval is that of the mean
    difference (stats.interval: pretraining runs, splits, seeds, test images), and the verdict is the
    one rule (stats.verdict): above / below when the interval excludes 0, no clear difference when it
    does not, one-class when either model is near a one-class predictor, too small to judge on a
    profile that measures nothing. Returns dataset (its title), a and b (fold_summary of each),
    paired (the stats.Interval of the difference; None without pairs), one_class (the reasons) and
    verdict."""
    g = ft[ft["dataset"] == dataset]
    a = fold_summary(g[g["model"] == "usf-mae"], "f1")
    b = fold_summary(g[g["model"] == "scratch"], "f1")
    d = paired(g, "usf-mae", "scratch")
    one_class = [r for r in (_one_class_reason(status, (dataset, m)) for m in ("usf-mae", "scratch")) if r]
    verdict = stats.verdict(d.low if d else np.nan, d.high if d else np.nan, bool(one_class), unjudged(profile))
    return dict(dataset=DATASET_TITLES.get(dataset, dataset), a=a, b=b, paired=d, one_class=one_class,
                verdict=verdict)


def compare_with_scratch(ft: pd.DataFrame, dataset: str, status: pd.DataFrame, profile: str | None = None) -> str:
    """scratch_comparison as one sentence (discussion.md): the verdict, why, and every number behind it."""
    c = scratch_comparison(ft, dataset, status, profile)
    a, b, d = c["a"], c["b"], c["paired"]
    why = ([unjudged(profile)] if unjudged(profile) else []) + c["one_class"]
    numbers = (f"F1 {100 * a['mean']:.1f} vs {100 * b['mean']:.1f}; paired difference {interval_text(d)}"
               + (f" ({d.method})" if d is not None and d.terms else ""))
    return (f"{c['dataset']}: USF-MAE vs the same architecture from scratch on F1: {c['verdict']}"
            + (f" ({'; '.join(why)})" if why else "") + f"; {numbers}.")


def scratch_verdicts(results: pd.DataFrame, profile: str | None = None) -> pd.DataFrame:
    """Notebook 06's verdicts as a table (VERDICT_COLUMNS), one row per dataset where both USF-MAE and
    scratch were fine-tuned: the mean paired difference in F1 points, its 95% interval, the interval's
    method and scratch_comparison's verdict (show_verdicts says the profile's reason once, above)."""
    ft = results[(results["mode"] == "finetune") & (results["fraction"] == 1.0)]
    status = one_class_status(ft)
    rows = []
    for dataset, g in ft.groupby("dataset", sort=False):
        if not {"usf-mae", "scratch"} <= set(g["model"]):
            continue
        c = scratch_comparison(ft, dataset, status, profile)
        rows.append(verdict_row("USF-MAE - scratch, fine-tuned (F1)", c["dataset"], c["paired"], c["verdict"]))
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def verdict_row(comparison: str, dataset: str, d: stats.Interval | None, verdict: str) -> dict:
    """One row of a verdict table (VERDICT_COLUMNS; difference, low and high in points)."""
    if d is None:
        return dict(comparison=comparison, dataset=dataset, difference=np.nan, low=np.nan, high=np.nan,
                    method="no pairs", verdict=verdict)
    return dict(comparison=comparison, dataset=dataset, difference=100 * d.mean, low=max(100 * d.low, -100.0),
                high=min(100 * d.high, 100.0), method=d.method, verdict=verdict)  # clipped to what a difference can be


# ============================================================================ verdict tables (notebooks 06 and 07)
def show_verdicts(table, out_dir, profile: str | None = None) -> None:
    """Write `table` (a DataFrame or a list of rows with VERDICT_COLUMNS; difference, low and high in F1
    points) to out_dir/verdicts.csv and display it once: the rule and, on a profile that measures
    nothing, its reason said once above it; the interval in one column. Returns nothing, so that it
    can end a cell."""
    from IPython.display import Markdown, display

    table = pd.DataFrame(table, columns=VERDICT_COLUMNS)
    path = Path(out_dir) / "verdicts.csv"
    atomic_write_text(path, table.to_csv(index=False, float_format="%.2f"))
    notes = ["Difference: the mean of the paired differences (first minus second) in F1 points; interval: the "
             "95% interval of that mean; method: how it was made (docs/statistics.md).", stats.RULE]
    if unjudged(profile):
        notes.insert(0, f"**Every verdict below is {TOO_SMALL}**: {unjudged(profile)}.")
    display(Markdown(" ".join(notes)))
    shown = table.assign(difference=table["difference"].map("{:+.1f}".format),
                         interval=[f"[{lo:+.1f}, {hi:+.1f}]" if np.isfinite(lo) else "none"
                                   for lo, hi in zip(table["low"], table["high"])])
    display(shown[["comparison", "dataset", "difference", "interval", "verdict", "method"]].style
            .hide(axis="index").set_properties(**{"text-align": "left"})
            .set_table_styles([dict(selector="th", props="text-align: left")]))


def _label_efficiency(label_curve: pd.DataFrame, profile: str | None, reason_above: bool = False) -> str | None:
    """The verdicts of USF-MAE vs scratch at every (dataset, label fraction) point, counted."""
    pair = label_curve[label_curve["model"].isin(["usf-mae", "scratch"])]
    keys = ["dataset", "fraction"]
    if pair.empty or pair.groupby(keys)["model"].nunique().max() < 2:
        return None
    status = one_class_status(pair, keys + ["model"])
    counts = {v: 0 for v in (stats.ABOVE, stats.BELOW, stats.NO_CLEAR, stats.ONE_CLASS)}
    for (dataset, fraction), g in pair.groupby(keys, sort=False):
        if g["model"].nunique() < 2:
            continue
        near = status.loc[[(dataset, fraction, m) for m in ("usf-mae", "scratch")], "near_one_class"]
        d = paired(g, "usf-mae", "scratch")
        counts[stats.verdict(d.low if d else np.nan, d.high if d else np.nan, near.eq(True).any())] += 1
    text = (f"of {sum(counts.values())} (dataset, label fraction) points, USF-MAE's F1 is above the scratch "
            f"model's at {counts[stats.ABOVE]}, below it at {counts[stats.BELOW]}, with no clear difference at "
            f"{counts[stats.NO_CLEAR]}, and at {counts[stats.ONE_CLASS]} one of the two is near a one-class "
            "predictor (each point judged by the verdict rule on its paired interval)")
    if unjudged(profile):
        return f"Label efficiency: {_too_small(profile, reason_above)}; counts only: {text}."
    return f"Label efficiency: {text}."


def _too_small(profile: str | None, reason_above: bool) -> str:
    """"too small to judge" on an unjudged profile, with its reason unless it was said above."""
    return TOO_SMALL if reason_above else f"{TOO_SMALL} ({unjudged(profile)})"


def discussion(results: pd.DataFrame, label_curve: pd.DataFrame | None = None, synthetic: bool = True,
               profile: str | None = None, on_screen: bool = False) -> list[str]:
    """What the run supports and what it does not, computed from the rows. profile "smoke" (or
    "dry-run", see UNJUDGED) makes every comparison "too small to judge"; None (or any other
    profile) judges by the numbers alone. on_screen: the list notebook 06 shows under its verdict
    table (show_verdicts of scratch_verdicts), which has said the USF-MAE vs scratch verdicts and the
    profile's reason for judging nothing: both are left out, and the models near a one-class
    predictor are listed by dataset, as sub-items (markdown)."""
    ft = results[(results["mode"] == "finetune") & (results["fraction"] == 1.0)]
    lines = [("Data: the synthetic twins of the benchmarks (generated, not patient images); nothing here "
              "measures clinical performance." if synthetic else "Data: the dataset roots given to notebook 05.")]
    runs = ft.groupby(["dataset", "model"]).size()
    if len(runs):
        lines.append(f"Runs per cell: {runs.min()}-{runs.max()}; each cell gives the sd of its runs and the 95% "
                     "interval of its mean, the paper a single number per cell.")
    random_init = sorted(ft.loc[ft["init"].str.startswith(RANDOM_INIT), "model"].unique())
    if random_init:
        lines.append(f"Baselines without ImageNet weights (random init, unlike the paper): {', '.join(random_init)}; "
                     "their rows compare architectures, not ImageNet transfer.")
    pretrained = sorted(ft.loc[ft["init"].str.startswith("imagenet"), "model"].unique())
    if pretrained:
        lines.append(f"Baselines with ImageNet weights: {', '.join(pretrained)}.")
    if "ultrasam" not in set(ft["model"]):
        lines.append("UltraSam was not run (it needs a user-supplied checkpoint); its paper numbers stand alone.")
    status = one_class_status(ft)
    # USF-MAE vs the same architecture from scratch: the claim that pretraining helps
    for dataset, g in ft.groupby("dataset", sort=False):
        models = set(g["model"])
        if {"usf-mae", "scratch"} <= models and not on_screen:
            lines.append(compare_with_scratch(ft, dataset, status, profile))
        if len(models) > 1:
            paper_best = (_title(max(PAPER_TABLE2, key=lambda m: PAPER_TABLE2[m].get(dataset, (0, 0, 0))[2]))
                          if dataset in PAPER_TABLE2["usf-mae"] else "n/a")
            cells = summarise(g)
            cells = cells[cells["metric"] == "f1"]
            best, why = clear_best(cells, status, g)
            name = DATASET_TITLES.get(dataset, dataset)
            if unjudged(profile):
                lines.append(f"{name}: best mean F1: {_too_small(profile, on_screen)}; "
                             f"the paper's best: {paper_best}.")
            elif best is None:
                lines.append(f"{name}: no clear best mean F1: {why}; the paper's best: {paper_best}.")
            else:
                lines.append(f"{name}: best mean F1 among comparable rows: {why}; the paper's best: {paper_best}.")
    # a one-class model still posts a fair positive-class F1; its balanced accuracy is 1 / n_classes
    near = status[status["near_one_class"].eq(True)]
    if len(near) and on_screen:
        by_dataset = [f"    - {DATASET_TITLES.get(d, d)} (one class: {100 * g['chance'].iloc[0]:.1f}): "
                      + ", ".join(f"{MODEL_TITLES.get(m, m)} {100 * r['balanced_accuracy']:.1f}"
                                  for (_, m), r in g.iterrows())
                      for d, g in near.groupby(level="dataset", sort=False)]
        lines.append(f"Near a one-class predictor (mean test balanced accuracy within {100 * ONE_CLASS_MARGIN:.0f} "
                     "points of always predicting one class); their F1 says little about what they learned:\n"
                     + "\n".join(by_dataset))
    elif len(near):
        weak = [f"{MODEL_TITLES.get(m, m)} on {DATASET_TITLES.get(d, d)} ({100 * r['balanced_accuracy']:.1f}, "
                f"one class: {100 * r['chance']:.1f})" for (d, m), r in near.iterrows()]
        lines.append(f"Near a one-class predictor (mean test balanced accuracy within {100 * ONE_CLASS_MARGIN:.0f} "
                     "points of always predicting one class): " + ", ".join(weak)
                     + "; their F1 says little about what they learned.")
    if label_curve is not None and len(label_curve):
        line = _label_efficiency(label_curve, profile, on_screen)
        if line:
            lines.append(line)
    return lines


# ============================================================================ figures
def _plt():
    import matplotlib.pyplot as plt  # imported on use: tables and verdicts need no plotting stack
    return plt


def percent(fraction: float) -> str:
    """0.01 -> '1%', 0.25 -> '25%', 1.0 -> '100%', 0.005 -> '0.5%'."""
    return f"{100 * fraction:.3g}%"


def first_run_confusions(results: pd.DataFrame, runs_dir) -> dict[tuple[str, str], pd.DataFrame]:
    """{(dataset, model): confusion table (rows true, columns predicted)} of each cell's first fold
    and lowest seed, read from runs_dir/<run>/test_predictions.csv; keys in the order of `results`."""
    from .metrics import confusion

    first_fold = results[results["fold"] == results.groupby(["dataset", "model"])["fold"].transform("min")]
    cells = first_fold[first_fold["seed"] == first_fold.groupby(["dataset", "model"])["seed"].transform("min")]
    out = {}
    for _, row in cells.iterrows():
        preds = pd.read_csv(Path(runs_dir) / row["run"] / "test_predictions.csv")
        classes = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
        out[(row["dataset"], row["model"])] = confusion(preds["label"], preds[[f"prob_{c}" for c in classes]].to_numpy(),
                                                        classes)
    return out


def plot_confusion_grid(matrices: dict, title: str | None = None):
    """Confusion matrices as a grid: one row per dataset, one column per model (keys' order), each
    cell's count written, coloured by its share of the true class (rows sum to 1, so an imbalanced
    test set still reads). Class names label the rows of each dataset's first panel; with more than
    4 classes they are numbered and the columns carry the numbers (long names would not fit)."""
    import textwrap

    import seaborn as sns

    plt = _plt()
    datasets = list(dict.fromkeys(d for d, _ in matrices))
    models = list(dict.fromkeys(m for _, m in matrices))
    n_max = max(len(cm) for cm in matrices.values())
    side = min(3.0, max(1.6, 0.9 + 0.26 * n_max))  # inches per panel: room for n_max cells' counts
    fig, axes = plt.subplots(len(datasets), len(models), squeeze=False, layout="constrained",
                             figsize=(len(models) * side + 1.8, len(datasets) * (side + 0.3) + 0.6))
    image = None
    for r, d in enumerate(datasets):
        present = [c for c, m in enumerate(models) if (d, m) in matrices]
        for c, m in enumerate(models):
            ax = axes[r, c]
            if r == 0:
                ax.set_title(textwrap.fill(MODEL_TITLES.get(m, m), 20), fontsize=9)
            if (d, m) not in matrices:
                ax.axis("off")
                ax.text(0.5, 0.5, "not run", ha="center", va="center", color="grey", transform=ax.transAxes)
                continue
            cm = matrices[(d, m)]
            counts = cm.to_numpy()
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            k = len(cm)
            # seaborn's heatmap: colour = share of the true class, text = the count
            sns.heatmap(share, ax=ax, cmap="Blues", vmin=0, vmax=1, cbar=False, square=True, annot=counts, fmt="d",
                        annot_kws=dict(fontsize=7 if k > 4 else 8))
            image = ax.collections[0]
            numbered = k > 4
            names = [textwrap.fill(str(n), 18) for n in cm.index]
            ax.set_xticks(np.arange(k) + 0.5, [str(i + 1) for i in range(k)] if numbered else names, fontsize=7,
                          rotation=0)
            ax.set_xlabel("predicted", fontsize=7)
            if c == present[0]:
                rows = [f"{i + 1}. {n}" for i, n in enumerate(names)] if numbered else names
                ax.set_yticks(np.arange(k) + 0.5, rows, fontsize=7, rotation=0)
                ax.set_ylabel(f"{DATASET_TITLES.get(d, d)}\ntrue class", fontsize=9)
            else:
                ax.set_yticks(np.arange(k) + 0.5, [""] * k)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.5, label="share of the true class")
    fig.suptitle(title or "Confusion matrices (test set)", fontsize=10)
    return fig


_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1, 1, 1)))]


def plot_label_efficiency(label_curve: pd.DataFrame, metric: str = "f1"):
    """Test `metric` (%) against the fraction of training labels, one panel per dataset, one line per
    model: the mean over the runs of a point (folds x label seeds) with min-max bars (lowest to highest
    run) when a point has several; the legend says the same. The panels share one 0-100 y axis, so
    datasets compare at a glance. The x axis is logarithmic with a tick at each fraction run, in percent. Models are shifted a
    little sideways and differ in marker and line style, so equal values never hide a line."""
    plt = _plt()
    from matplotlib.ticker import NullLocator

    datasets = list(dict.fromkeys(label_curve["dataset"]))
    models = list(dict.fromkeys(label_curve["model"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False,
                             layout="constrained", sharey=True)
    handles = {}
    for ax, d in zip(axes[0], datasets):
        rows = label_curve[label_curve["dataset"] == d]
        for k, m in enumerate(models):
            g = rows[rows["model"] == m]
            if g.empty:
                continue
            s = g.groupby("fraction")[metric].agg(["mean", "min", "max", "count"])
            shift = 10 ** (0.03 * (k - (len(models) - 1) / 2))  # a few % sideways on the log axis
            marker, line = _STYLES[k % len(_STYLES)]
            spread = s["count"].max() > 1
            h = ax.errorbar(s.index * shift, 100 * s["mean"],
                            yerr=[100 * (s["mean"] - s["min"]), 100 * (s["max"] - s["mean"])] if spread else None,
                            marker=marker, ls=line, ms=6, capsize=3, lw=1.5, color=f"C{k}",
                            mfc="white" if k % 2 else f"C{k}")
            every = label_curve[label_curve["model"] == m].groupby(["dataset", "fraction"]).size()  # all panels
            runs = int(every.min()), int(every.max())
            n = f"{runs[0]}" if runs[0] == runs[1] else f"{runs[0]}-{runs[1]}"
            handles.setdefault(m, (h, f"{MODEL_TITLES.get(m, m)}: "
                                      + (f"mean, min-max of {n} runs (folds x label seeds)" if spread
                                         else "1 run per point")))
        fractions = sorted(rows["fraction"].unique())
        ax.set_xscale("log")
        ax.set_xticks(fractions, [percent(f) for f in fractions])
        ax.xaxis.set_minor_locator(NullLocator())  # log minor ticks would be labelled 3x10^-1 and the like
        ax.set_xlim(fractions[0] / 1.4, fractions[-1] * 1.4)
        ax.set_xlabel("training labels used")
        ax.set_ylim(-4, 104)  # a score in %: the same 0-100 scale in every panel, a point at 0 or 100 whole
        ax.set_yticks(range(0, 101, 20))
        if ax is axes[0, 0]:
            ax.set_ylabel(f"test {metric.upper() if len(metric) < 4 else metric} (%)")
        ax.set_title(DATASET_TITLES.get(d, d), fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend([h for h, _ in handles.values()], [t for _, t in handles.values()], loc="outside lower center",
               ncol=min(len(handles), 2), fontsize=8, frameon=False)
    return fig


# ============================================================================ Fig. 3
def pipeline_config(out_dir, finetune_dir=None) -> dict:
    """What Fig. 3 draws, read from the run's own records, never from the paper: 01_curation's
    summary.json and datasets.csv (frames kept, datasets), 02_preprocessing's clean/index.csv and
    clean/clean_config.json (images, their side, cleaner preset), the recipe notebook 03's checkpoint
    records (encoder, decoder, mask ratio, position tables, loss), 05_finetuning's setup.json and results.csv
    (datasets, classes, splits, models, head; or `finetune_dir`'s). A step not run leaves its keys out."""
    from . import checkpoints, mae

    out, cfg = Path(out_dir), {}
    curation = out / "01_curation"
    if (curation / "summary.json").is_file():
        summary = json.loads((curation / "summary.json").read_text())
        cfg["frames"] = int(summary["kept"])
        cfg["video_fps"] = summary.get("settings", {}).get("video_fps")
        if (curation / "datasets.csv").is_file():
            per = pd.read_csv(curation / "datasets.csv")
            cfg["datasets"] = int(((~per["is_eval"].astype(bool)) & (per["kept"] > 0)).sum())
    clean = out / "02_preprocessing" / "clean"
    if (clean / "index.csv").is_file():
        cfg["clean_images"] = len(pd.read_csv(clean / "index.csv"))
        config = clean / "clean_config.json"  # written by the cleaning, every setting and the preset's name
        settings = json.loads(config.read_text()) if config.is_file() else {}
        cfg["clean_side"], cfg["cleaner"] = settings.get("image_size"), settings.get("cleaner")
    checkpoint = out / "03_mae_pretraining" / "checkpoints" / "checkpoint-last.pth"
    recipe = checkpoints.checkpoint_params(checkpoint) if checkpoint.is_file() else {}
    if recipe.get("model") in mae.CONFIGS:
        model = {**mae.CONFIGS[recipe["model"]], **(recipe.get("model_overrides") or {})}
        cfg.update(model=recipe["model"], img_size=int(recipe["img_size"]), patch=int(model["patch_size"]),
                   encoder=(model["depth"], model["embed_dim"], model["num_heads"]),
                   decoder=(model["decoder_depth"], model["decoder_embed_dim"], model["decoder_num_heads"]),
                   mask_ratio=recipe.get("mask_ratio"), pos_embed=recipe.get("pos_embed", "fixed"),
                   norm_pix_loss=bool(recipe.get("norm_pix_loss", False)), epochs=recipe.get("epochs"),
                   batch_size=recipe.get("batch_size"))
    finetune = Path(finetune_dir) if finetune_dir else out / "05_finetuning"
    if (finetune / "setup.json").is_file() and (finetune / "results.csv").is_file():
        setup, rows = json.loads((finetune / "setup.json").read_text()), read_table(finetune / "results.csv")
        cfg["models"] = list(setup.get("models", []))
        cfg["head_norm"] = bool(setup.get("head_norm", False))
        cfg["pool"] = str(rows["pool"].dropna().iloc[0]) if "pool" in rows and rows["pool"].notna().any() else "token"
        parts = [c for c in ("n_train", "n_val", "n_test") if c in rows]  # a hand-made folder may lack some

        def first(g, column):
            return int(g[column].iloc[0]) if column in g and g[column].notna().any() else None

        cfg["tasks"] = [dict(dataset=d, classes=first(g, "n_classes"),
                             splits=int(g["fold"].nunique()) if "fold" in g else None,
                             images=int(g[parts].iloc[0].sum()) if parts else None)
                        for d, g in rows.groupby("dataset", sort=False)]
    return cfg


def _pipeline_texts(cfg: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(title, body) of each box: the pretraining row, then the fine-tuning row."""
    def lines(*items):
        return "\n".join(str(i) for i in items if i)

    top = [("1 · Curation", lines(f"{cfg['frames']:,} frames" if "frames" in cfg else "not run",
                                  f"from {cfg['datasets']} datasets" if "datasets" in cfg else None,
                                  f"videos at {cfg['video_fps']:g} frames/s" if cfg.get("video_fps") else None,
                                  "evaluation sets kept out")),
           ("2 · Cleaning", lines("OCR, CLAHE, HSV + K-Means,", "Canny + contours, morphology,",
                                  "Navier-Stokes inpainting",
                                  f"{cfg['clean_images']:,} PNG, {cfg['clean_side']} x {cfg['clean_side']} px"
                                  if cfg.get("clean_side") else None,
                                  f"cleaner: {cfg['cleaner']}" if cfg.get("cleaner") else None))]
    if "encoder" in cfg:
        grid, ratio = cfg["img_size"] // cfg["patch"], cfg["mask_ratio"]
        top += [("3 · Patches and mask", lines(f"{grid} x {grid} = {grid * grid} patches of {cfg['patch']} px",
                                               f"{ratio:.0%} hidden at random" if ratio is not None
                                               else "mask ratio not recorded",
                                               f"{int(grid * grid * (1 - ratio))} visible" if ratio is not None
                                               else None)),
                ("4 · ViT encoder", lines(f"{cfg['encoder'][0]} blocks x {cfg['encoder'][1]}, {cfg['encoder'][2]} heads",
                                          f"{cfg['pos_embed']} position tables", "reads visible patches only")),
                ("5 · Decoder", lines(f"{cfg['decoder'][0]} blocks x {cfg['decoder'][1]}, {cfg['decoder'][2]} heads",
                                      "mask tokens fill hidden places", "(dropped after pretraining)")),
                ("6 · Loss", lines("MSE on hidden patches", "normalised patch pixels" if cfg["norm_pix_loss"]
                                   else "raw pixels", f"{cfg['epochs']} epochs, batch {cfg['batch_size']}"
                                   if cfg.get("epochs") else None))]
    else:
        top.append(("3-6 · MAE", "no pretraining checkpoint in this run"))
    head = ("cls token" if cfg.get("pool", "token") == "token" else "average of patch tokens") + " ->"
    bottom = [("Encoder", lines("USF-MAE's, pretrained", "(or a baseline's)", "fine-tuned end to end")),
              ("Head", lines(head, "BatchNorm -> linear" if cfg.get("head_norm") else "linear",
                             "softmax over classes"))]
    tasks = cfg.get("tasks", [])
    if tasks:
        def task(t):
            counts = [f"{t['images']:,} images" if t["images"] is not None else None,
                      f"{t['splits']} split{'s' if t['splits'] > 1 else ''}" if t["splits"] is not None else None]
            return (f"{DATASET_TITLES.get(t['dataset'], t['dataset'])}"
                    + (f": {t['classes']} classes" if t["classes"] is not None else "")
                    + "\n" + ", ".join(c for c in counts if c))

        bottom.append(("Tasks", "\n".join(task(t) for t in tasks)))
        bottom.append(("Test metrics", lines("precision, recall, F1", "on each split's test images",
                                             "95% interval of each mean")))
    if cfg.get("models"):
        bottom.append(("Compared", "\n".join(MODEL_TITLES.get(m, m).replace("USF-MAE architecture, ", "")
                                             for m in cfg["models"])))
    return top, bottom


def draw_pipeline(cfg: dict):
    """Fig. 3 of the paper (the USF-MAE pipeline: 1) pretraining, 2) fine-tuning) with the numbers of
    this run (pipeline_config). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    top, bottom = _pipeline_texts(cfg)
    n = max(len(top), len(bottom))
    fig, ax = plt.subplots(figsize=(2.35 * n, 5.2))
    ax.set_xlim(0, n)
    ax.set_ylim(0, 2.2)
    ax.axis("off")
    for boxes, y, label, colour in [(top, 1.25, "1) pretraining (self-supervised)", "#dbe8f5"),
                                    (bottom, 0.1, "2) fine-tuning (labelled)", "#f5e6d3")]:
        ax.text(0.05, y + 0.88, label, fontsize=10, weight="bold", va="bottom")
        for i, (title, body) in enumerate(boxes):
            ax.add_patch(FancyBboxPatch((i + 0.06, y), 0.88, 0.8, boxstyle="round,pad=0.02,rounding_size=0.05",
                                        fc=colour, ec="0.35", lw=1))
            ax.text(i + 0.5, y + 0.74, title, ha="center", va="top", fontsize=8.5, weight="bold")
            ax.text(i + 0.5, y + (0.6 if title != "Tasks" else 0.64), body, ha="center", va="top", fontsize=7.2 if title != "Tasks" else 6.6,
                    linespacing=1.35)
            if i and title != "Compared":  # the baselines stand beside the chain, not in it
                ax.add_patch(FancyArrowPatch((i - 0.06, y + 0.4), (i + 0.06, y + 0.4), arrowstyle="-|>",
                                             mutation_scale=10, color="0.3"))
    if len(top) > 3:  # the trained encoder goes down to fine-tuning
        ax.add_patch(FancyArrowPatch((3.5, 1.25), (0.5, 0.9), arrowstyle="-|>", mutation_scale=12, color="0.3",
                                     connectionstyle="arc3,rad=0.15", ls="--"))
        ax.text(2.0, 1.02, "the trained encoder", fontsize=7.5, style="italic", ha="center", color="0.3")
    return fig
