"""Classification metrics of the study, with bootstrap intervals and seed summaries.

Table 2 of the paper reports precision, recall and F1. For the binary tasks (BUS-BRA:
malignant, GIST514-DB: GIST) they are those of the positive class. For MMOTU-2D (8 classes)
the paper's precision = recall = F1 for every model, which is what micro-averaging gives, so
the headline `precision/recall/f1` of a multi-class task are micro averages and the macro
averages are reported beside them (`*_macro`). All scores come from scikit-learn; intervals
are percentile bootstrap intervals over test images (scipy.stats.bootstrap).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from sklearn import metrics as skm

HEADLINE = ("precision", "recall", "f1")


def classification_metrics(y_true, y_prob, positive: int | None = None) -> dict[str, float]:
    """Scores of one set of predictions.

    y_true: [N] class indices; y_prob: [N, C] class probabilities (rows sum to 1);
    positive: index of the positive class of a binary task, or None for a multi-class task.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)  # [N, C]
    n_classes = y_prob.shape[1]
    y_pred = y_prob.argmax(1)
    labels = np.arange(n_classes)
    out = {"accuracy": skm.accuracy_score(y_true, y_pred)}
    with warnings.catch_warnings():  # a class absent from a resample is scored 0, as sklearn says
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = skm.balanced_accuracy_score(y_true, y_pred)
        if positive is not None:
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=[positive],
                                                             average=None, zero_division=0)
            out.update(precision=p[0], recall=r[0], f1=f[0])
        else:
            for avg in ("micro", "macro"):
                p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                 average=avg, zero_division=0)
                out.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
            out.update(precision=out["precision_micro"], recall=out["recall_micro"], f1=out["f1_micro"])
        present = np.unique(y_true)
        if len(present) < 2:
            out["roc_auc"] = float("nan")  # undefined with one class
        elif positive is not None or n_classes == 2:
            pos = 1 if positive is None else positive
            out["roc_auc"] = skm.roc_auc_score(y_true == pos, y_prob[:, pos])
        elif len(present) == n_classes:
            out["roc_auc"] = skm.roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro")
        else:
            out["roc_auc"] = float("nan")  # one-vs-rest needs every class in the test set
    return {k: float(v) for k, v in out.items()}


def confusion(y_true, y_prob, classes) -> pd.DataFrame:
    """Confusion matrix as a table: rows = true class, columns = predicted class."""
    cm = skm.confusion_matrix(y_true, np.asarray(y_prob).argmax(1), labels=np.arange(len(classes)))
    return pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))


def bootstrap_intervals(y_true, y_prob, positive: int | None = None, n_resamples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every metric with its percentile bootstrap interval over test images.

    Returns a table indexed by metric with columns value, low, high.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    point = classification_metrics(y_true, y_prob, positive)
    names = list(point)

    def statistic(index):  # resample images, score them; [len(names)]
        idx = index.astype(int)
        scores = classification_metrics(y_true[idx], y_prob[idx], positive)
        return np.array([scores[k] for k in names])

    with warnings.catch_warnings():  # NaN AUC on a one-class resample makes scipy warn
        warnings.simplefilter("ignore")
        res = bootstrap((np.arange(len(y_true)),), statistic, vectorized=False, n_resamples=n_resamples,
                        confidence_level=confidence, method="percentile", random_state=seed)
    low, high = np.array(res.confidence_interval.low), np.array(res.confidence_interval.high)
    # ROC-AUC is undefined on a resample that lacks a class (small test sets): scipy's percentile
    # then gives NaN; take the percentiles over the resamples where it is defined instead
    dist = np.asarray(res.bootstrap_distribution)  # [len(names), n_resamples]
    alpha = 100 * (1 - confidence) / 2
    for i in np.flatnonzero(np.isnan(low) | np.isnan(high)):
        if np.isfinite(dist[i]).any():
            low[i], high[i] = np.nanpercentile(dist[i], [alpha, 100 - alpha])
    return pd.DataFrame({"value": [point[k] for k in names], "low": low, "high": high},
                        index=pd.Index(names, name="metric"))


def summarise_seeds(runs: pd.DataFrame, by: list[str], metrics=HEADLINE) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of each metric, per group of `by` columns.

    runs: one row per (group, seed) with metric columns. Returns columns <m>_mean, <m>_sd, n_seeds.
    """
    g = runs.groupby(by, sort=False)
    out = pd.concat({f"{m}_{s}": getattr(g[m], s if s != "sd" else "std")() for m in metrics
                     for s in ("mean", "sd")}, axis=1)
    out["n_seeds"] = g.size()
    return out.reset_index()
