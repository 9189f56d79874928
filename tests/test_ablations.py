"""Notebook 07's scoring (usfmae_lib.ablations) on features made up to have a known answer: no
model, no notebook; notebook 07 itself runs in the smoke reproduce (tests/test_reproduce.py)."""
import numpy as np
import pandas as pd
import torch

from usfmae_lib import ablations
from usfmae_lib import finetune as ft
from usfmae_lib.datasets import Split


def _data(n_per_class=(30, 10, 20), classes=("benign", "malignant"), seed=0, informative=True):
    """A binary task and features: class means apart (informative) or pure noise."""
    rng = np.random.default_rng(seed)
    parts, feats = {}, {}
    for part, n in zip(("train", "val", "test"), n_per_class):
        y = np.repeat([0, 1], n)
        x = rng.normal(size=(len(y), 16)) + (3.0 * (y[:, None] - 0.5) if informative else 0)  # opposite directions
        parts[part] = pd.DataFrame(dict(path=[f"{part}{i}.png" for i in range(len(y))], label=y, group=range(len(y))))
        feats[part] = x.astype(np.float32)
    split = Split("bus-bra", "fold 1", list(classes), 1, parts["train"], parts["val"], parts["test"], fold=1)
    labels = {part: torch.tensor(df["label"].to_numpy()) for part, df in parts.items()}
    return ft.Data(split, 32, {}, labels), feats


def test_knn_votes_follow_the_nearest_features():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    prob = ablations._knn_proba(train, np.array([0, 0, 1, 1]), np.array([[1.0, 0.05], [0.05, 1.0]]), 2, k=2)
    assert prob.shape == (2, 2) and np.allclose(prob.sum(1), 1)
    assert prob[0].argmax() == 0 and prob[1].argmax() == 1 and prob[0, 0] > 0.99


def test_frozen_scores_separate_informative_from_noise_features_at_every_fraction():
    data, good = _data()
    _, noise = _data(informative=False)
    a = ablations.frozen_scores(data, good, fractions=(0.1, 1.0), label_seeds=2, k=5)
    b = ablations.frozen_scores(data, noise, fractions=(0.1, 1.0), label_seeds=2, k=5)
    # 0.1 of 60 labels, stratified: 3 per class; two subsamples; all labels once
    assert sorted(a.groupby("fraction")["n_train"].first().tolist()) == [6, 60]
    assert len(a) == (2 + 1) * len(ablations.METHODS)
    assert (a["f1"] > 0.9).all() and b["f1"].mean() < 0.8


def test_verdict_needs_pairs_whose_interval_excludes_zero_and_never_judges_smoke():
    rows = []
    for fold in (1, 2, 3, 4, 5):
        for enc, f1 in (("pretrained", 0.80 + 0.01 * fold), ("random init", 0.60 + 0.012 * fold)):
            rows.append(dict(encoder=enc, dataset="bus-bra", fold=fold, method="linear probe", fraction=1.0,
                             label_seed=0, f1=f1))
    scores = pd.DataFrame(rows)
    (clear,) = ablations.verdict(scores, "pretrained", "random init", "quick")
    assert "pretrained above random init" in clear and "over 5 paired" in clear
    (smoke,) = ablations.verdict(scores, "pretrained", "random init", "smoke")
    assert "too small to judge" in smoke and "above" not in smoke.split(";")[0]
    noisy = scores.copy()
    noisy.loc[noisy["encoder"] == "random init", "f1"] = [0.95, 0.5, 0.9, 0.6, 0.86]  # same mean region, wide spread
    (unclear,) = ablations.verdict(noisy, "pretrained", "random init", "quick")
    assert "too small to judge" in unclear and "includes 0" in unclear
    (one,) = ablations.verdict(scores[scores["fold"] == 1], "pretrained", "random init", "quick")
    assert "too small to judge" in one and "one pair" in one


def test_mean_scores_average_folds_and_label_seeds():
    scores = pd.DataFrame(dict(encoder="e", dataset="d", method="k-NN", fraction=[0.1, 0.1, 0.1, 1.0],
                               f1=[0.2, 0.4, 0.6, 0.9]))
    means = ablations.mean_scores(scores).set_index("fraction")
    assert abs(means.loc[0.1, "f1"] - 0.4) < 1e-12 and means.loc[0.1, "n"] == 3 and np.isnan(means.loc[1.0, "sd"])
