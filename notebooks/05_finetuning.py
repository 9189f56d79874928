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
# # 05 · Fine-tuning on three benchmarks, with baselines
#
# The paper fine-tunes the USF-MAE encoder to classify breast (BUS-BRA), ovarian (MMOTU-2D) and
# gastrointestinal (GIST514-DB) tumours and compares it with ImageNet VGG-19, ResNet-50, ViT-B
# and UltraSam. This notebook:
#
# 1. loads each benchmark with its official splits (real layout, or the synthetic twin of notebook
#    01): BUS-BRA's 5-fold cross-validation, each fold a test set once, as the paper evaluates it;
#    GIST514-DB's five split files, all five by default (the paper does not say how it used them;
#    `gist_splits = [0]` runs one); MMOTU-2D's one train/test split (`mmotu_selection`: a validation
#    part carved from its training list, or all of it trains);
# 2. runs the grid of models x datasets x folds: the paper's sweep (lr x wd x batch) with seed 0,
#    the config chosen on validation (`select_on`) per fold or once per model and dataset
#    (`select_per`), then `n_seeds` seeds of the chosen config (at least `min_runs` runs per cell:
#    MMOTU-2D's one split gets more seeds; `usfmae finetune` runs one cell, every fold); a Table 2
#    cell is the mean over folds;
# 3. adds a linear probe of frozen encoders on every fold and label-efficiency curves on the same
#    folds and seeds (USF-MAE vs the same architecture from scratch at a few fractions of the
#    training labels).
#
# Every run is resumable (`runs/.../metrics.json`); rerunning the notebook skips finished runs.
# Every row says where its weights came from (`init`): a baseline without ImageNet weights on
# this machine starts from random weights, one warning says so (with the number of runs it
# affects), and the tables say so in every row. Each loop shows one progress bar in JupyterLab and
# prints one line when it ends (runs trained, runs reused), nothing per run or epoch.
#
# Run headless: `usfmae run notebooks/05_finetuning.ipynb -f params/smoke/05_finetuning.yaml`.
# Outputs land in `<out_dir>/05_finetuning/`. On several GPUs or machines, N processes share the grid:
# `usfmae finetune --profile paper --shard I/N`, each run trained once (docs/gpu.md). On a GPU every
# run computes in bf16 autocast (fp16 with a GradScaler where bf16 is missing), on a CPU in fp32
# (`precision`); the `computed_in` column says which.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
datasets = ["bus-bra", "mmotu-2d", "gist514"]  # benchmarks to run
models = ["usf-mae", "scratch"]  # encoders to compare (also: vit-b, resnet-50, vgg-19, ultrasam)
n_seeds = 1  # fine-tuning runs per fold with the chosen config (seeds 0..n_seeds-1)
min_runs = 3  # at least this many runs per cell: a dataset with fewer folds (MMOTU-2D: one) gets more seeds per fold
data_root = None  # folder holding BUSBRA/, OTU_2d/, usd514_jpeg_roi/; None = synthetic twins from notebook 01
checkpoint = None  # MAE checkpoint; None = every pretraining run of notebook 03 (<out_dir>/03_mae_pretraining: checkpoints/checkpoint-last.pth, then seed<k>/...)
ultrasam_checkpoint = None  # UltraSam / SAM ViT-B checkpoint (needed only when models has ultrasam)
weights_dir = None  # folder with ImageNet weights <model>.safetensors|.pth (else timm's cache, else random)
missing_weights = "random"  # baseline without ImageNet weights: random (labelled RANDOM INIT in every table) or skip
img_size = 0  # input side; 0 = the checkpoint's pretraining size (paper: 224)
epochs = 8  # maximum epochs per run
patience = 0  # early stopping: epochs without a better validation score (0 = run all epochs, keep the best)
select_on = "balanced_accuracy"  # validation score picking epoch and config: balanced_accuracy, f1 or loss
head_norm = True  # BatchNorm before the head (MAE's linear-probe trick); False = plain cls -> linear, the paper
layer_decay = 1.0  # ViT layer-wise lr decay (MAE fine-tuning uses 0.65-0.75); 1 = off, the paper
lrs = [1e-3]  # sweep (paper: [3e-4, 1e-3])
weight_decays = [0.01]  # sweep (paper: [0.01, 0.001])
batch_sizes = [32]  # sweep (paper: [32, 64])
pool = "token"  # ViT models: token (cls -> head, the paper) or avg (global average pooling)
probe_models = ["usf-mae", "scratch"]  # linear probe of these frozen encoders
label_fractions = [0.1, 1.0]  # label-efficiency points (paper-style full set: [0.01, 0.1, 0.25, 1.0])
min_steps = 40  # at least this many optimiser steps per run: a label fraction's few images are passed over several times per epoch (0 = one pass)
busbra_folds = [1, 2, 3, 4, 5]  # BUS-BRA test folds of 5-fold-cv.csv (paper: all five)
gist_splits = [0, 1, 2, 3, 4]  # GIST514-DB split files run, a cell their mean (the paper is silent on how it used them; [0] = one)
val_fraction = 0.15  # GIST514-DB and MMOTU-2D ("carve"): share of the training set carved out for validation (paper: not stated)
select_per = "fold"  # sweep config chosen per fold or per dataset (one per model: best mean validation score over folds; paper)
mmotu_selection = "carve"  # MMOTU-2D: carve (val_fraction validates) or all (all 1,000 official training images, all epochs, last tested; paper)
clean_eval = False  # True: evaluation images lose burned-in annotations first, like the pretraining corpus (paper: silent)
n_bootstrap = 200  # bootstrap resamples for the 95% intervals (paper profile: 1000)
device = "auto"  # auto = cuda when available
precision = "auto"  # auto | bf16 | fp16 | fp32: bf16 autocast on a GPU (fp16 + GradScaler without bf16), fp32 on a CPU
shard = None  # "I/N": this process's share of the grid first, then what is left (usfmae finetune --shard I/N; docs/gpu.md)
max_steps = 0  # optimiser steps per fine-tuning run, then validate and stop (0 = no limit; the dry run: 1)
max_images = 0  # images per part (train, val, test) of each split, a seeded sample by class (0 = all; dry run)

# %%
import json
import time
from pathlib import Path

import pandas as pd
from IPython.display import display
from tqdm.auto import tqdm

from usfmae_lib import amp, atomic_write_text, classifiers, provenance, study
from usfmae_lib import finetune as ft
from usfmae_lib.datasets import SYNTHETIC_FOLDERS, cap_split, load_split, official_folds, resolve_root
from usfmae_lib.results import relative_init

STEP = "05_finetuning"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
runs = step_dir / "runs"
headless = study.MARKER in globals()  # under usfmae run a progress bar would only be printed text: none
print(f"profile={profile}  outputs -> {Path(out_dir).name}/{STEP}")

# %% [markdown]
# ## Inputs: the MAE checkpoint and the datasets
# The USF-MAE encoder comes from notebook 03, once per pretraining run it made (`pretrain_seeds`):
# every cell of USF-MAE is fine-tuned from each, so its intervals hold the variance between
# pretraining runs. `scratch` takes the same architecture with random weights. Without `data_root`
# the benchmarks are the synthetic twins written by notebook 01.

# %%
models, probe_models, mae_checkpoints, mae_checkpoint, mae_size, checkpoints, weights = ft.resolve_inputs(
    out_dir, models, probe_models, checkpoint, ultrasam_checkpoint, weights_dir, missing_weights)
# (missing_weights = 'skip' leaves out the baselines without ImageNet weights here, and says which; 'random': the
# grid below warns once per baseline, with the runs it affects)
size = img_size or mae_size
synthetic = data_root is None
roots = {d: resolve_root(d, data_root and Path(data_root) / SYNTHETIC_FOLDERS[d], out_dir) for d in datasets}
shown_checkpoint = mae_checkpoint.relative_to(out_dir) if mae_checkpoint.is_relative_to(out_dir) else mae_checkpoint
print(f"checkpoint {shown_checkpoint}{f' and {len(mae_checkpoints) - 1} more pretraining run(s)' if len(mae_checkpoints) > 1 else ''} "
      f"(pretrained at {mae_size} px); fine-tuning at {size} px; "
      f"{'synthetic twins' if synthetic else 'data_root ' + str(data_root)}")

# %%
ft.check_choice("select_per", select_per, ft.SELECT_PER)
ft.check_choice("mmotu_selection", mmotu_selection, ft.MMOTU_SELECTION)
no_validation = {"mmotu-2d"} if mmotu_selection == "all" else set()  # trains on its whole official training list
folds = {"bus-bra": busbra_folds, "gist514": gist_splits}
splits = {}  # (dataset, fold) -> Split
first_folds = {}  # dataset -> images per class and part of its first fold (shown below)
for d in datasets:
    for k in official_folds(d, folds.get(d)):
        split = load_split(d, roots[d], seed=seed, fold=k, val_fraction=0.0 if d in no_validation else val_fraction)
        if clean_eval:  # the whole image folder once (cached in clean_eval/<dataset>), then this fold's paths
            split = ft.remove_annotations(split, step_dir / "clean_eval" / d)
        splits[(d, k)] = cap_split(split, max_images, seed)
    first = splits[(d, official_folds(d, folds.get(d))[0])]
    first_folds[f"{d} ({first.split})"] = first.summary()
    ks = [k for (dd, k) in splits if dd == d]
    line = f"{d}: {len(ks)} fold(s) {ks}"
    if d in no_validation:
        line += f"; mmotu_selection 'all': all {len(first.train)} official training images train, no validation part"
    elif d != "bus-bra":  # BUS-BRA has official validation marks; the others lose val_fraction of training
        n_official = len(first.train) + len(first.val)
        line += (f"; val_fraction {val_fraction:g}: {len(first.val)} of the {n_official} official training images "
                 f"validate, {len(first.train)} train")
    print(line)
display(pd.concat(first_folds, names=["dataset (first fold)", "class"]))  # images per class and part

# %% [markdown]
# ## The grid: sweep on validation, then seeds, on every fold
# For each (dataset, fold, model): every config of the sweep with seed 0. With `select_per = "fold"`
# the best validation score of that fold wins; with `"dataset"` one config per model and dataset, the
# best mean validation score over the dataset's folds (ties: the first in grid order), is used on
# every fold. No fold's test set picks anything. Then `n_seeds` seeds of the chosen config (more on
# a dataset with fewer than `min_runs` folds); test metrics with bootstrap 95% intervals. A dataset
# without a validation part (MMOTU-2D, `mmotu_selection = "all"`) runs no sweep: the first config of
# the grid, every epoch, the last one tested (`ft.fixed_schedule`). The columns `selected`,
# `selected_per` and `selected_by` say which config each row used and how it was chosen. Each fold has
# its own run folders (`runs/<dataset>/fold<k>/`; `runs/mmotu-2d_no_validation/` under "all").

# %%
base = ft.TrainConfig(epochs=epochs, patience=patience, img_size=size, pool=pool, select_on=select_on,
                      head_norm=head_norm, layer_decay=layer_decay, max_steps=max_steps, min_steps=min_steps)
configs = ft.sweep_configs(base, lrs, weight_decays, batch_sizes)
grids = {d: ft.fixed_schedule(configs) if d in no_validation else configs for d in datasets}  # the configs each runs
n_folds = {d: len([k for (dd, k) in splits if dd == d]) for d in datasets}
seeds = {d: ft.seeds_per_fold(n_seeds, n_folds[d], min_runs) for d in datasets}
print(f"{len(configs)} config(s) per cell, chosen per {select_per}: {[c.tag() for c in configs]}; seeds per fold: {seeds}")
if no_validation & set(datasets):
    print(ft.mmotu_note(mmotu_selection, configs, len(splits[("mmotu-2d", 0)].train)))
t0 = time.time()
data = {key: ft.prepare_data(split, size) for key, split in splits.items()}  # decoded and resized once
shard_ = ft.parse_shard(shard)  # (I, N) or None
computes_in = amp.precision_name(amp.autocast_dtype(precision, classifiers.pick_device(device)))
print(f"fine-tuning on {classifiers.pick_device(device)} in {computes_in}"
      + (f"; shard {shard}: this process's share first, then what the other shards leave" if shard_ else ""))


def run_kw(m, name, ckpt):  # one start's arguments of every run
    return dict(checkpoint=ckpt, weights=weights.get(m), device=device, n_bootstrap=n_bootstrap, log=None,
                run_name=name, precision=precision)


with classifiers.warnings_once():  # one warning per baseline without ImageNet weights
    # chosen: the config of every (dataset, fold, model, run): per fold, or one per (dataset, model)
    sweeps, chosen, results = ft.run_grid(data, ft.starts(models, checkpoints, mae_checkpoints), grids, seeds, runs,
                                          select_per, run_kw, shard_, progress=not headless)
print(f"grid, {time.time() - t0:.0f} s: {ft.run_tally(pd.concat([*sweeps.values(), results]), runs, t0)}")
relative_init(results, out_dir)[["dataset", "fold", "model", "seed", "init", "selected", "selected_per",
                                 "val_balanced_accuracy", "val_f1", "precision", "recall", "f1", "f1_low", "f1_high",
                                 "accuracy", "roc_auc"]].round(3)

# %% [markdown]
# ## Linear probe of frozen encoders
# Features of the encoder as it comes (no fine-tuning) -> logistic regression, C picked on
# validation balanced accuracy, as fine-tuning selects (without a validation part, MMOTU-2D under
# `mmotu_selection = "all"`: the first C of its grid, 0.01, and no validation score): how much the
# representation itself separates the classes.

# %%
t0 = time.time()
probe_tasks = [(key, start) for key in splits for start in ft.starts(probe_models, checkpoints, mae_checkpoints)]


def probe_run(task, wait):
    key, (m, name, ckpt) = task
    return ft.linear_probe(data[key], m, seed, runs, pool=pool, checkpoint=ckpt, weights=weights.get(m), device=device,
                           n_bootstrap=n_bootstrap, log=None, run_name=name, wait=wait)


with classifiers.warnings_once(), tqdm(total=len(probe_tasks), desc="probes", disable=headless) as bar:
    probes = ft.run_shared(probe_tasks, probe_run, shard_, bar)
probe = pd.DataFrame(probes)
if len(probe):
    print(f"probes: {ft.run_tally(probe, runs, t0)}")
(relative_init(probe, out_dir)[["dataset", "fold", "model", "init", "probe_C", "val_balanced_accuracy", "f1", "f1_low", "f1_high"]]
 .round(3) if len(probe) else probe)

# %% [markdown]
# ## Label efficiency: USF-MAE vs the same architecture from scratch
# Training labels subsampled per class (at least one each, seeded by the run's seed); validation and
# test unchanged (under `mmotu_selection = "all"`, MMOTU-2D's runs have no validation: every epoch runs
# and the last is tested, as in its grid); each model uses the config chosen on all labels, on every fold and seed of the grid,
# so a point is a mean over folds like a Table 2 cell (and the 100% point is the grid's own runs).
# `min_steps` gives the small training sets several passes per epoch: 10% of ~400 images is one batch.

# %%
t0 = time.time()
curve_tasks = [(key, start, f, s) for key in splits if label_fractions
               for start in ft.starts(["usf-mae", "scratch"], checkpoints, mae_checkpoints)
               for f in label_fractions for s in range(seeds[key[0]])]


def curve_run(task, wait):
    key, (m, name, ckpt), fraction, s = task
    cfg = chosen.get((*key, m, name)) or grids[key[0]][0]
    return ft.finetune_run(data[key], m, cfg, s, runs, fraction=fraction, checkpoint=ckpt, device=device,
                           n_bootstrap=n_bootstrap, log=None, run_name=name, precision=precision, wait=wait)


with tqdm(total=len(curve_tasks), desc="label efficiency", disable=headless) as bar:
    curves = ft.run_shared(curve_tasks, curve_run, shard_, bar)
label_curve = pd.DataFrame(curves)
if len(label_curve):  # the 100% points are the grid's own runs: reused here
    print(f"label efficiency: {ft.run_tally(label_curve, runs, t0)}")
if not label_fractions:
    print("label_fractions is empty: no fine-tuned label curve (notebook 07 scores frozen encoders with 1-100% of the labels)")
label_curve.groupby(["dataset", "model", "fraction"])[["n_train", "steps_run", "f1"]].mean().round(3) if len(label_curve) else None

# %% [markdown]
# ## Outputs
# `results.csv` (one row per dataset x model x seed, the chosen config and how it was chosen), `sweep.csv`, `probe.csv`,
# `label_efficiency.csv`, `setup.json` (what notebook 06 needs to describe the run).

# %%
for name, table in [("results", results), ("sweep", pd.concat(list(sweeps.values()), ignore_index=True)), ("probe", probe),
                    ("label_efficiency", label_curve)]:
    # no machine's folder in a table; atomic: a grid's shards each write the same complete tables at their end
    atomic_write_text(step_dir / f"{name}.csv", relative_init(table, out_dir).to_csv(index=False))
setup = dict(profile=profile, synthetic=synthetic, data_root=data_root, checkpoint=str(mae_checkpoint),
             pretraining_runs=[str(c) for c in mae_checkpoints],
             img_size=size, datasets=datasets, models=models, n_seeds=n_seeds, min_runs=min_runs, seeds=seeds,
             n_configs=len(configs), min_steps=min_steps,
             folds={d: [k for (dd, k) in splits if dd == d] for d in datasets}, val_fraction=val_fraction,
             select_per=select_per, mmotu_selection=mmotu_selection,
             validation={d: ("none: every official training image trains" if d in no_validation else
                             "official valid_k marks" if d == "bus-bra" else f"{val_fraction:g} of training carved out")
                         for d in datasets},
             sweep=dict(lr=lrs, weight_decay=weight_decays, batch_size=batch_sizes), epochs=epochs,
             patience=patience, select_on=select_on, head_norm=head_norm, layer_decay=layer_decay,
             label_fractions=label_fractions, n_bootstrap=n_bootstrap, max_steps=max_steps, max_images=max_images,
             precision=precision, computed_in=computes_in)
setup["provenance"] = provenance.record(params=setup, profile=profile, device=device)  # code, versions, device
atomic_write_text(step_dir / "setup.json", json.dumps(setup, indent=1))
print(sorted(p.name for p in step_dir.iterdir()))
