"""Table 2 of the paper regenerated from fine-tuning runs, with the paper's numbers beside ours.

    rows = pd.read_csv("OUT/05_finetuning/results.csv")   # one row per (dataset, model, seed)
    paths = write_table2(rows, "OUT/06_results")          # table2.csv / .md / .tex

Ours: mean +/- sd over seeds of the headline precision / recall / F1 (positive class on
BUS-BRA and GIST514-DB, micro average on MMOTU-2D, as the paper's equal P = R = F1 implies), the
95% bootstrap interval over test images (each seed's interval, averaged over seeds), the number
of seeds, and the init of every model. The best mean per column among our rows is marked.
Statements for the discussion are computed from the rows (`discussion`), never written by hand.
"""
from __future__ import annotations

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


def paper_long() -> pd.DataFrame:
    """The paper's Table 2 as rows: model, dataset, metric, paper (%)."""
    return pd.DataFrame([dict(model=m, dataset=d, metric=k, paper=v)
                         for m, by in PAPER_TABLE2.items() for d, vals in by.items()
                         for k, v in zip(METRICS, vals)])


def summarise(results: pd.DataFrame, mode: str = "finetune") -> pd.DataFrame:
    """Ours per (dataset, model, metric): mean, sd over seeds, interval, n_seeds, init (in %)."""
    rows = results[(results["mode"] == mode) & (results["fraction"] == 1.0)]
    out = []
    for (dataset, model), g in rows.groupby(["dataset", "model"], sort=False):
        for m in METRICS:
            out.append(dict(dataset=dataset, model=model, metric=m, mean=100 * g[m].mean(),
                            sd=100 * g[m].std(ddof=1) if len(g) > 1 else np.nan,
                            low=100 * g[f"{m}_low"].mean(), high=100 * g[f"{m}_high"].mean(),
                            n_seeds=len(g), init="; ".join(sorted(g["init"].unique()))))
    return pd.DataFrame(out)


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
            n = int(g["n_seeds"].max())
            rows.append([title, f"ours ({n} seed{'s' if n > 1 else ''})", init] +
                        [_cell(g[(g["dataset"] == d) & g["mean"].notna()], ours) for d in datasets])
        if g["paper"].notna().any():
            rows.append([title, "paper", "ImageNet (as the paper states)" if model not in ("usf-mae", "ultrasam")
                         else "paper's own pretraining"] +
                        [_cell(g[(g["dataset"] == d) & g["paper"].notna()], lambda r: f"{r['paper']:.1f}")
                         for d in datasets])
    return header, rows


def to_markdown(long: pd.DataFrame) -> str:
    header, rows = _layout(long, lambda s: f"**{s}**", " ± ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    ours = long.dropna(subset=["mean"])
    lines += ["", "F1 with its 95% bootstrap interval over test images (each seed's, averaged):", "",
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
    lines += [r"\bottomrule", r"\end{tabular}"]
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
            a, b = by.get_group("usf-mae"), by.get_group("scratch")
            gap = 100 * (a["f1"].mean() - b["f1"].mean())
            overlap = a["f1_low"].mean() <= b["f1_high"].mean() and b["f1_low"].mean() <= a["f1_high"].mean()
            verdict = "beats" if gap > 0 else "does not beat"
            lines.append(f"{DATASET_TITLES.get(dataset, dataset)}: USF-MAE {verdict} the same architecture from scratch "
                         f"on F1 ({100 * a['f1'].mean():.1f} vs {100 * b['f1'].mean():.1f}, gap {gap:+.1f} points over "
                         f"{len(a)}/{len(b)} seeds); the 95% intervals {'overlap' if overlap else 'do not overlap'}.")
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
