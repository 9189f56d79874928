# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Results: Table 2 and what it supports
#
# This notebook gathers the fine-tuning metrics of notebook 05 (or of a folder of `usfmae finetune`
# runs: `results_dir`) into the paper's Table 2
# (precision, recall, F1 per benchmark) with the paper's numbers beside ours, each cell's mean, the
# sd of its runs and the 95% interval of its mean, the init of every model, confusion matrices, the
# label-efficiency plot, the verdicts (USF-MAE against the same architecture from scratch) as one
# table, and a discussion computed from the rows: what the run supports and what it does not.
#
# Run headless: `usfmae run notebooks/06_results.ipynb -f params/smoke/06_results.yaml`.
# Outputs land in `<out_dir>/06_results/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
dpi = 120  # figure resolution
results_dir = None  # fine-tuning folder: notebook 05's or an `usfmae finetune --out` folder; None = <out_dir>/05_finetuning

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown

from usfmae_lib import model_card, results as res, study

STEP = "06_results"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {Path(out_dir).name}/{STEP}")

# %% [markdown]
# ## Fig. 3: the pipeline, as this run ran it
#
# The paper's Fig. 3 draws USF-MAE's two stages: 1) pretraining, where a ViT encoder sees a random
# 75% of each image's patches (25% hidden) and a light decoder fills in the rest, and 2) fine-tuning,
# where the encoder, without its decoder, gets a classification head. Here every number in the
# boxes is read from this run's own records (`res.pipeline_config`): the frames notebook 01 kept, the
# size notebook 02 wrote, the model and mask ratio notebook 03's checkpoint was trained with, and the
# tasks and models notebook 05 ran. A step that was not run leaves its box empty. Compare the boxes
# with the paper's (ViT-B: 12 blocks x 768, 12 heads; decoder 8 x 512; 25% hidden; 224 px).

# %%
src = Path(results_dir) if results_dir else Path(out_dir) / "05_finetuning"
study.show_figure(res.draw_pipeline(res.pipeline_config(out_dir, src)), step_dir / "fig3_pipeline.png", dpi)

# %%
runs = res.load_runs(src)
# checkpoint paths in `init` relative to the output folder: "usf-mae: 03_mae_pretraining/checkpoints/..."
results, probe, label_curve = (res.relative_init(t, out_dir) for t in (runs.results, runs.probe, runs.label_curve))
setup = runs.setup
synthetic = setup.get("synthetic", False)
print(f"{len(results)} fine-tuning rows ({results.groupby('dataset')['fold'].nunique().to_dict()} folds); "
      f"{len(probe)} probe rows; {len(label_curve)} label-efficiency rows; data: "
      f"{'synthetic twins' if synthetic else setup.get('data_root') or 'the roots of the runs in ' + str(src)}")

# %% [markdown]
# ## Table 2: ours beside the paper's
# Precision / recall / F1 in %: the positive class on BUS-BRA (malignant) and GIST514-DB (GIST),
# micro averages on MMOTU-2D (macro averages are in `results.csv`).
#
# **Reading a cell of ours.** The number is the mean F1 (or P, R) over all of that model's runs on
# that dataset: the official splits (BUS-BRA's 5 folds, GIST514-DB's 5 splits, MMOTU-2D's one) weigh
# the same, and USF-MAE's runs also span its pretraining runs. The ± is the sd of the single runs: how
# far one more run may land. The bracketed interval under the table is the 95% interval of the mean
# itself, from every source of variance the runs sample (pretraining runs, splits, seeds, test
# images); each dataset's line under it names them, and what is missing, such as a single
# pretraining run. Bold marks a best mean whose lead over the next row, paired run by run, has an
# interval above 0 (nothing bold on the smoke profile).
#
# The `init` column says where each model's weights came from. UltraSam's paper row is quoted from
# UltraSam's own paper, not rerun: the notes under the table say what that means.

# %%
# the profile that made the numbers (notebook 05's, else this one); a dry run's numbers are judged as none
judged_as = "dry-run" if setup.get("max_steps") or setup.get("max_images") else setup.get("profile", profile)
paths = res.write_table2(results, step_dir, judged_as, made_by=res.runs_provenance(results, setup))
encoder_dir = Path(out_dir) / "03_mae_pretraining" / model_card.FOLDER
if encoder_dir.is_dir():  # notebook 03's exported encoder: its model card gets these results and their intervals
    model_card.add_finetuning_results(encoder_dir, pd.read_csv(paths["csv"]), note=res.unjudged(judged_as),
                                      source=str(paths["csv"].relative_to(out_dir)))
Markdown(paths["md"].read_text())  # table2.md as it is, rendered

# %% [markdown]
# ## All metrics
# Every metric of every cell: its mean ± the sd of its runs; for precision, recall and F1 also the
# 95% interval of the mean, as in Table 2 (`all_metrics.csv`).

# %%
metric_names = [m for m in ("precision", "recall", "f1", "precision_macro", "recall_macro", "f1_macro", "accuracy",
                            "balanced_accuracy", "roc_auc") if m in results.columns]
rows = []
for (d, m, mode), g in pd.concat([results, probe], ignore_index=True).groupby(["dataset", "model", "mode"], sort=False):
    row = dict(dataset=d, model=m, mode=mode, n_runs=len(g), n_folds=g["fold"].nunique(),
               init="; ".join(sorted(g["init"].unique())))
    for k in metric_names:
        if g[k].notna().any():
            cell = res.fold_summary(g, k)
            sd = f" ± {100 * cell['sd']:.1f}" if pd.notna(cell["sd"]) else ""
            interval = (f" [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"
                        if k in res.METRICS and pd.notna(cell["low"]) else "")
            row[k] = f"{100 * cell['mean']:.1f}{sd}{interval}"
    rows.append(row)
all_metrics = pd.DataFrame(rows)
all_metrics.to_csv(step_dir / "all_metrics.csv", index=False)
all_metrics

# %% [markdown]
# ## Confusion matrices (test set)
# One row per dataset, one column per model: the first fold and lowest seed of each fine-tuned cell. Each
# cell gives its count, coloured by its share of the true class (so rows read as per-class recall); with
# more than 4 classes (MMOTU-2D) the classes are numbered and named beside the first panel of the row.

# %%
matrices = res.first_run_confusions(results, src / "runs")  # {(dataset, model): counts, rows true}
fig = res.plot_confusion_grid(matrices, "Confusion matrices: test set, first fold, lowest seed of each cell")
study.show_figure(fig, step_dir / "confusion_matrices.png", dpi)

# %% [markdown]
# ## Label efficiency
# Test F1 (%, one 0-100 axis for every panel) against the fraction of training labels (log axis, a tick
# at each fraction run). Each point is the mean of its runs (folds x label seeds), with a min-max bar
# (lowest to highest run) when there are several; the legend gives the number of runs. Models are shifted
# a little sideways and differ in marker and line style, so a model with the same values as another
# stays visible.

# %%
if len(label_curve):
    label_curve.groupby(["dataset", "model", "fraction"])["f1"].agg(["mean", "std", "count"]).round(3).to_csv(
        step_dir / "label_efficiency.csv")
    study.show_figure(res.plot_label_efficiency(label_curve, "f1"), step_dir / "label_efficiency.png", dpi)

# %% [markdown]
# ## Does pretraining help? The verdicts
# USF-MAE against the same architecture from scratch, per dataset: the mean of the paired
# differences in F1 (each USF-MAE run minus the scratch run on the same split, seed and test images),
# the 95% interval of that mean, how it was made, and the verdict. One rule, the same in notebooks
# 04 and 07: **above** or **below** only when the interval excludes 0, **no clear difference** when
# it includes 0, **one-class** when either model is near a one-class predictor. Also in `verdicts.csv`.

# %%
verdicts = res.scratch_verdicts(results, judged_as)
res.show_verdicts(verdicts, step_dir, judged_as)

# %% [markdown]
# ## Discussion
# Each statement below is computed from the rows above, for this run's data and settings. The same
# statements, each USF-MAE vs scratch verdict spelled out with every number behind it, are in
# `discussion.md`.

# %%
settings = []
if setup:  # notebook 05 wrote its settings; a folder of CLI runs has them in its rows
    settings.append(f"Settings: profile {setup['profile']}, {setup['img_size']} px, at most {setup['epochs']} epochs, "
                    f"{setup['n_configs']} sweep config(s) (paper: 8), {setup['n_bootstrap']} bootstrap resamples; "
                    f"epoch and config picked on validation {setup.get('select_on', 'f1')}"
                    f"{', one config per model and dataset' if setup.get('select_per') == 'dataset' else ''}"
                    + "".join(f" ({res.DATASET_TITLES.get(d, d)}: no validation, the first config's last epoch)"
                              for d, how in setup.get("validation", {}).items() if how.startswith("none"))
                    + "; "
                    f"{'BatchNorm before the head' if setup.get('head_norm') else 'plain linear head'}"
                    f"{', layer decay %g' % setup['layer_decay'] if setup.get('layer_decay', 1) != 1 else ''}.")
dry_run = []
if setup.get("max_steps") or setup.get("max_images"):  # a dry run (usfmae reproduce --dry-run): say so first
    dry_run.append(f"DRY RUN: every fine-tuning run stopped after {setup.get('max_steps') or 'all'} optimiser "
                   f"step(s), on at most {setup.get('max_images') or 'all'} images per split part; these numbers "
                   "check that the code runs, they measure nothing.")
full = dry_run + res.discussion(results, label_curve, synthetic=synthetic, profile=judged_as) + settings
(step_dir / "discussion.md").write_text("".join(f"- {s}\n" for s in full))
# on screen: the verdicts and the profile's reason are in the table above, so the list leaves them out
shown = dry_run + res.discussion(results, label_curve, synthetic=synthetic, profile=judged_as, on_screen=True) + settings
Markdown("".join(f"- {s}\n" for s in shown))

# %%
made = [p.name for p in sorted(step_dir.iterdir()) if p.suffix in (".png", ".csv", ".md", ".tex") and p.name != "index.md"]
(step_dir / "index.md").write_text("\n".join(["# 06 · Results", ""] + [f"- [{n}]({n})" for n in made]) + "\n")
print(f"{len(made)} files in {step_dir.name}/ (listed in index.md): {', '.join(made)}")
