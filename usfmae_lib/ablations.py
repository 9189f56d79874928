"""Notebook 07: the paper's claims beyond Table 2, as experiments on frozen encoders.

1. Pretraining helps: the pretrained encoder against the same architecture at random init, with
   1-100% of the training labels (k-NN and a linear probe of frozen features); the fine-tuned
   side of the claim is notebook 05's (results.csv, label_efficiency.csv), read here if present.
2. Mask ratio: notebook 03's recipe pretrained again at other ratios (same images, epochs and
   seed); what transfers is scored the same way, next to the 25% run of notebook 03.
3. Pretraining length: the same scores at the snapshots notebook 03 kept along its run
   (`snapshot_epochs`), against optimiser steps: the monitor self-supervised libraries run during pretraining.

Frozen features are computed once per (checkpoint, split) and every label fraction and seed reuses
them, which is why all three fit in minutes on a CPU. k-NN: cosine similarity on L2-normalised
features, k = 20 (or fewer training images), votes weighted by similarity (DINO's monitor, without
its temperature). Linear probe: standardised features, logistic regression, C picked on
validation F1 (as notebook 05's probe). Each score also carries its F1 on bootstrap resamples of
the split's test images (`replicates`, drawn once per split, so every encoder, fraction and label seed
is scored on the same ones): on a single split (MMOTU-2D) the verdicts' intervals hold the test images.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import UsfmaeError, checkpoints, pretrain, stats
from . import finetune as ft
from .classifiers import build_classifier, pick_device
from .metrics import classification_metrics
from .results import DATASET_TITLES, percent, unjudged, verdict_row

STEP = "07_ablations"
METHODS = ("k-NN", "linear probe")
RANDOM = "random init"  # the label of the same architecture with no pretraining


def frozen_encoder(checkpoint, img_size: int, random_init: bool = False, seed: int = 0, pool: str = "token",
                   device="auto") -> torch.nn.Module:
    """The encoder of an MAE checkpoint as a timm ViT in eval mode (random_init: its architecture
    with seeded random weights, the scratch control)."""
    torch.manual_seed(seed)
    model, _, _ = build_classifier("scratch" if random_init else "usf-mae", 2, img_size, checkpoint, pool=pool)
    return model.to(pick_device(device) if isinstance(device, str) else device).eval()


def split_features(model, data: ft.Data, cache: dict | None = None) -> dict[str, np.ndarray]:
    """{part: [N, D] features} of one split; `cache` (path -> feature) spares the images that
    other folds of the same dataset already showed the encoder."""
    cache = {} if cache is None else cache
    device = next(model.parameters()).device
    for part, df in data.split.parts().items():
        new = [i for i, path in enumerate(df["path"]) if path not in cache]
        if new:
            for i, f in zip(new, ft.features(model, data.images[part][new], device)):
                cache[df["path"].iloc[i]] = f
    return {part: np.stack([cache[path] for path in df["path"]]) for part, df in data.split.parts().items()}


def _knn_proba(train_x, train_y, x, n_classes: int, k: int = 20) -> np.ndarray:
    """Similarity-weighted votes of the k nearest training features (cosine): [N, C] probabilities."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12)
    b = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T  # [N, n_train]
    k = min(k, len(train_x))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [N, k]
    votes = np.zeros((len(x), n_classes))
    np.add.at(votes, (np.arange(len(x))[:, None], train_y[top]), np.take_along_axis(sim, top, 1).clip(0) + 1e-6)
    return votes / votes.sum(1, keepdims=True)


def _probe_proba(train_x, train_y, feats, y_val, n_classes, positive, seed):
    """Notebook 05's linear probe (ft.fit_probe) on these features: test probabilities."""
    if len(np.unique(train_y)) < 2:  # one labelled class: a one-class predictor, as sklearn cannot fit
        prob = np.zeros((len(feats["test"]), n_classes))
        prob[:, train_y[0]] = 1
        return prob
    clf = ft.fit_probe(train_x, train_y, feats["val"], y_val, n_classes, positive, seed)[2]
    return ft.full_proba(clf, feats["test"], n_classes)


N_RESAMPLES = 1000  # bootstrap resamples of the test images per split (as results.add_replicates)


def frozen_scores(data: ft.Data, feats: dict, fractions=(1.0,), label_seeds: int = 1, k: int = 20,
                  resample: bool = True) -> pd.DataFrame:
    """Test F1 and balanced accuracy of k-NN and the linear probe on `feats`, for each fraction of
    the training labels (stratified, >= 1 per class; notebook 05's subsample) and label seed; with
    `resample`, also `replicates`: the F1 on N_RESAMPLES resamples of the test images shared by every
    score of the split (only a dataset with a single split needs them: see score_features)."""
    split, n_classes = data.split, len(data.split.classes)
    y = {part: data.labels[part].numpy() for part in ("train", "val", "test")}
    resamples = (stats.resample_index(len(y["test"]), N_RESAMPLES, seed=zlib.crc32(f"{split.dataset}/{split.fold}".encode()))
                 if resample else None)
    rows = []
    for fraction in fractions:
        for s in range(label_seeds if fraction < 1 else 1):  # all labels: one subsample, whatever the seed
            index = ft.subsample_labels(data.labels["train"], fraction, s)
            train_x, train_y = feats["train"][index], y["train"][index]
            for method in METHODS:
                prob = (_knn_proba(train_x, train_y, feats["test"], n_classes, k) if method == "k-NN"
                        else _probe_proba(train_x, train_y, feats, y["val"], n_classes, split.positive, s))
                m = classification_metrics(y["test"], prob, split.positive)
                rows.append(dict(dataset=split.dataset, fold=split.fold, method=method, fraction=fraction,
                                 label_seed=s, n_train=len(index), n_split_train=len(y["train"]),
                                 n_test=len(y["test"]), f1=m["f1"],
                                 balanced_accuracy=m["balanced_accuracy"],
                                 replicates=None if resamples is None else stats.metric_replicates(
                                     y["test"], prob.argmax(1), resamples, "f1", split.positive)))
    return pd.DataFrame(rows)


def write_scores(scores: pd.DataFrame, path) -> None:
    """The scores as a CSV, without the in-memory resamples (`replicates`)."""
    scores.drop(columns="replicates", errors="ignore").to_csv(path, index=False)


def encoder_features(encoders: dict, data: dict, seed: int = 0, device="auto", log=print) -> dict:
    """Frozen features of every encoder on every split: {label: {(dataset, fold): {part: [N, D]}}}.
    encoders: {label: (checkpoint, random_init)}; data: {(dataset, fold): Data}, all at one image
    size. Each image goes through each encoder once, whatever the number of folds; every label
    fraction and seed scored later (score_features) reuses these."""
    out = {}
    size = next(iter(data.values())).img_size
    for label, (checkpoint, random_init) in encoders.items():
        model, cache = frozen_encoder(checkpoint, size, random_init, seed, device=device), {}
        out[label] = {key: split_features(model, d, cache) for key, d in data.items()}
        if log:
            log(f"features of {label}: {len(data)} split(s), {len(cache)} images")
    return out


def score_features(features: dict, data: dict, fractions=(1.0,), label_seeds: int = 1, k: int = 20) -> pd.DataFrame:
    """frozen_scores of encoder_features' features: one row per (encoder, split, method, fraction,
    label seed). Seconds: only the k-NN and the probe are fitted. Test-image resamples only for a
    dataset with a single split in `data`: with several, each split's test images are inside the
    spread between splits (stats.interval)."""
    folds = pd.Series([dataset for dataset, _ in data]).value_counts()
    tables = []
    for label, by_split in features.items():
        for key, feats in by_split.items():
            table = frozen_scores(data[key], feats, fractions, label_seeds, k, resample=folds[key[0]] == 1)
            table.insert(0, "encoder", label)
            tables.append(table)
    return pd.concat(tables, ignore_index=True)


def score_encoders(encoders: dict, data: dict, fractions=(1.0,), label_seeds: int = 1, seed: int = 0,
                   device="auto", k: int = 20, log=print) -> pd.DataFrame:
    """frozen_scores of every encoder on every split (encoder_features, then score_features)."""
    return score_features(encoder_features(encoders, data, seed, device, log), data, fractions, label_seeds, k)


def pool_runs(scores: pd.DataFrame, pooled: dict) -> pd.DataFrame:
    """scores with the pretraining runs of one encoder under one label: `pretrain_run` keeps each row's
    own encoder label (its run), `encoder` becomes pooled.get(label, label). The verdicts then pair
    every run with the other side and hold the variance between runs (stats.interval)."""
    return scores.assign(pretrain_run=scores["encoder"], encoder=scores["encoder"].map(lambda e: pooled.get(e, e)))


def reuse(scores: pd.DataFrame, names: dict, fraction: float = 1.0) -> pd.DataFrame:
    """The rows of already scored encoders at one label fraction under new labels ({old: new}):
    claims 2 and 3 compare with the same two encoders claim 1 scored, so they are not scored twice."""
    rows = scores[scores["encoder"].isin(names) & (scores["fraction"] == fraction)]
    return rows.assign(encoder=rows["encoder"].map(names)).drop(columns="pretrain_run", errors="ignore")


def pretrain_variant(checkpoint, store_dir, run_dir, progress: bool = False, **changes) -> Path:
    """Notebook 03's run again with `changes` (e.g. mask_ratio=0.75): every other parameter is the
    checkpoint's own, so the runs differ only there. Resumable; returns its checkpoint-last.pth."""
    params = checkpoints.read_checkpoint(checkpoint).get("params")
    if not isinstance(params, dict):
        raise UsfmaeError(f"{checkpoint}: no pretraining parameters recorded (a bare state dict); the ablation "
                          "needs notebook 03's checkpoint-last.pth to repeat its recipe")
    params = {k: v for k, v in params.items() if k in pretrain.DEFAULTS}
    params.update(snapshot_epochs=[], **changes)
    pretrain.train(store_dir, run_dir, resume=True, progress=progress, **params)
    return Path(run_dir) / "checkpoints" / pretrain.CHECKPOINT


def mean_scores(scores: pd.DataFrame, by=("encoder", "dataset", "method", "fraction")) -> pd.DataFrame:
    """Mean and sd of F1 over folds and label seeds, per `by` (what the figures draw)."""
    g = scores.groupby(list(by), sort=False)["f1"]
    return g.agg(f1="mean", sd="std", n="count").reset_index()


def _runs(g: pd.DataFrame, encoder: str) -> pd.DataFrame:
    """One encoder's scores as the stats module reads them: pretraining run (`pretrain_run` where the
    scores carry it, else the encoder: one checkpoint), split (fold), seed (label subsample), value."""
    r = g[g["encoder"] == encoder]
    runs = pd.DataFrame(dict(pretrain_run=r["pretrain_run"].fillna(encoder) if "pretrain_run" in r else encoder,
                             split=r["fold"], seed=r["label_seed"], value=r["f1"]))
    if "replicates" in r:  # the test images; stats.interval uses them on a single split where every run has them
        runs = runs.assign(replicates=r["replicates"], n_test=r["n_test"])
    return runs


def _holdout_ratio(g: pd.DataFrame) -> float:
    """n_test / n_train of the splits (Nadeau and Bengio's correction), 1 / (K - 1) for scores without
    the sizes, 0 with one split."""
    k = g["fold"].nunique()
    if k < 2:
        return 0.0
    if {"n_test", "n_split_train"} <= set(g) and g[["n_test", "n_split_train"]].notna().all().all():
        return float(g["n_test"].mean() / g["n_split_train"].mean())
    return 1 / (k - 1)


def _paired_comparisons(scores: pd.DataFrame, a: str, b: str, profile: str | None, method: str, fraction: float):
    """Per dataset where both encoders were scored: (dataset, mean F1 of a and of b, the stats.Interval
    of a - b paired by fold and label seed, the verdict by the one rule, stats.verdict)."""
    sub = scores[(scores["method"] == method) & (scores["fraction"] == fraction)]
    for dataset, g in sub.groupby("dataset", sort=False):
        if not {a, b} <= set(g["encoder"]):
            continue
        d = stats.interval(stats.pair(_runs(g, a), _runs(g, b)), test_over_train=_holdout_ratio(g),
                           pretrained=True)
        means = [stats.interval(_runs(g, e)).mean for e in (a, b)]
        yield dataset, means, d, stats.verdict(d.low, d.high, unjudged=unjudged(profile))


def fraction_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean test F1 ± its sd over folds and label seeds (%), one row per (dataset, method) and one
    column per (encoder, fraction): label fractions side by side, to compare by eye."""
    means = mean_scores(scores)
    means["F1 ± sd"] = [f"{100 * m:.1f} ± {100 * s:.1f}" if np.isfinite(s) else f"{100 * m:.1f}"
                        for m, s in zip(means["f1"], means["sd"])]
    means["labels"] = means["fraction"].map(percent)
    table = means.pivot(index=["dataset", "method"], columns=["encoder", "labels"], values="F1 ± sd")
    table.index = table.index.set_levels([DATASET_TITLES.get(d, d) for d in table.index.levels[0]], level=0)
    order = sorted(means["fraction"].unique())
    return table.reindex(columns=[(e, percent(f)) for e in dict.fromkeys(means["encoder"]) for f in order])


def verdict(scores: pd.DataFrame, a: str, b: str, profile: str | None = None, method: str = "linear probe",
            fraction: float = 1.0) -> list[str]:
    """Per dataset: is encoder `a`'s F1 above encoder `b`'s? The difference paired by fold and label
    seed, the 95% interval of its mean (stats.interval: splits with Nadeau and Bengio's correction, or
    the seeds on one split), the verdict by the one rule (stats.RULE); "too small to judge" on the smoke
    profile. One sentence each."""
    lines = []
    for dataset, (mean_a, mean_b), d, judged in _paired_comparisons(scores, a, b, profile, method, fraction):
        why = f" ({unjudged(profile)})" if unjudged(profile) else ""
        lines.append(f"{DATASET_TITLES.get(dataset, dataset)}, {method}, {percent(fraction)} of labels: {a} vs {b}: "
                     f"{judged}{why}; F1 {100 * mean_a:.1f} vs {100 * mean_b:.1f}, paired difference "
                     f"{100 * d.mean:+.1f}" + (f" [{100 * d.low:+.1f}, {100 * d.high:+.1f}] ({d.method})"
                                               if np.isfinite(d.low) else f" ({d.method})"))
    return lines


def verdict_rows(scores: pd.DataFrame, a: str, b: str, profile: str | None = None, method: str = "linear probe",
                 fraction: float = 1.0) -> list[dict]:
    """verdict's comparisons as rows of a verdict table (results.VERDICT_COLUMNS; difference, low and
    high in F1 points), the profile's reason left to results.show_verdicts, which says it once."""
    return [verdict_row(f"{a} - {b}, {method}, {percent(fraction)} of labels", DATASET_TITLES.get(dataset, dataset),
                        d, judged)
            for dataset, _, d, judged in _paired_comparisons(scores, a, b, profile, method, fraction)]


# ---------------------------------------------------------------------------- figures
BAND = "shaded: mean ± 1 sd over folds and label seeds (clipped to 0-100)"


def plot_curves(means: pd.DataFrame, x: str, title: str, xlabel: str, log_x: bool = False, x_labels=None,
                reference: pd.DataFrame | None = None):
    """One panel per (method, dataset); one line per encoder with its sd band (BAND, named in the
    legend; an F1 lies in 0-100, so the band is clipped there and every panel shares that axis).
    `means`: mean_scores; `reference` (mean_scores of one encoder, e.g. random init): a dashed level
    in each panel."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    datasets, methods = list(dict.fromkeys(means["dataset"])), list(dict.fromkeys(means["method"]))
    fig, axes = plt.subplots(len(methods), len(datasets), figsize=(3.6 * len(datasets), 2.8 * len(methods) + 0.4),
                             squeeze=False, sharey=True)
    markers = "osD^v<>"
    for r, method in enumerate(methods):
        for c, dataset in enumerate(datasets):
            ax = axes[r, c]
            sub = means[(means["method"] == method) & (means["dataset"] == dataset)]
            for i, (enc, g) in enumerate(sub.groupby("encoder", sort=False)):
                g = g.sort_values(x)
                f1, sd = 100 * g["f1"], 100 * g["sd"].fillna(0)
                ax.plot(g[x], f1, marker=markers[i % len(markers)], lw=1.5, label=enc, color=f"C{i}")
                ax.fill_between(g[x], (f1 - sd).clip(0, 100), (f1 + sd).clip(0, 100), alpha=0.15, color=f"C{i}")
            if reference is not None:
                level = reference[(reference["method"] == method) & (reference["dataset"] == dataset)]["f1"]
                if len(level):
                    ax.axhline(100 * level.mean(), color="grey", ls="--", lw=1, label=reference["encoder"].iloc[0])
            if log_x:
                ax.set_xscale("log")
            ticks = sorted(sub[x].unique())
            ax.set_xticks(ticks)
            ax.set_xticklabels([x_labels(t) if x_labels else f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(-4, 104)  # F1 in %: a point at 0 or 100 drawn whole
            ax.set_yticks(range(0, 101, 20))
            ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)} · {method}", fontsize=9)
            ax.set_xlabel(xlabel)
            if c == 0:
                ax.set_ylabel("test F1 (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    handles.append(Patch(facecolor="grey", alpha=0.25))
    labels.append(BAND)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the panels
    return fig
