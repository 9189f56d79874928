"""Notebook 07's scoring (usfmae_lib.ablations) on features made up to have a known answer: no
model, no notebook; notebook 07 itself runs in the smoke reproduce (tests/test_reproduce.py)."""
import numpy as np
import pandas as pd
import pytest
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
    assert "pretrained vs random init: above;" in clear and "over 5 splits (Nadeau-Bengio corrected)" in clear
    (smoke,) = ablations.verdict(scores, "pretrained", "random init", "smoke")
    assert "too small to judge (smoke profile" in smoke and "above" not in smoke.split(";")[0]
    noisy = scores.copy()
    noisy.loc[noisy["encoder"] == "random init", "f1"] = [0.95, 0.5, 0.9, 0.6, 0.86]  # same mean region, wide spread
    (unclear,) = ablations.verdict(noisy, "pretrained", "random init", "quick")
    assert ": no clear difference;" in unclear
    (one,) = ablations.verdict(scores[scores["fold"] == 1], "pretrained", "random init", "quick")
    assert ": no clear difference;" in one and "no interval: a single run" in one


def test_mean_scores_average_folds_and_label_seeds():
    scores = pd.DataFrame(dict(encoder="e", dataset="d", method="k-NN", fraction=[0.1, 0.1, 0.1, 1.0],
                               f1=[0.2, 0.4, 0.6, 0.9]))
    means = ablations.mean_scores(scores).set_index("fraction")
    assert abs(means.loc[0.1, "f1"] - 0.4) < 1e-12 and means.loc[0.1, "n"] == 3 and np.isnan(means.loc[1.0, "sd"])


def _paired_scores(noisy=False):
    rows = []
    for fold in (1, 2, 3, 4, 5):
        for enc, f1 in (("pretrained", 0.80 + 0.01 * fold), ("random init", 0.60 + 0.012 * fold)):
            rows.append(dict(encoder=enc, dataset="bus-bra", fold=fold, method="k-NN", fraction=0.1,
                             label_seed=0, f1=f1))
    return pd.DataFrame(rows)


def test_verdict_rows_hold_the_same_verdicts_as_a_table():
    from usfmae_lib import results as res

    scores = _paired_scores()
    (row,) = ablations.verdict_rows(scores, "pretrained", "random init", "quick", "k-NN", 0.1)
    assert list(row) == res.VERDICT_COLUMNS
    assert row["comparison"] == "pretrained - random init, k-NN, 10% of labels" and row["dataset"] == "BUS-BRA"
    assert row["verdict"] == "above" and "5 splits (Nadeau-Bengio corrected)" in row["method"]
    assert row["difference"] == pytest.approx(100 * np.mean([0.2 - 0.002 * k for k in range(1, 6)]))
    assert row["low"] < row["difference"] < row["high"]
    (line,) = ablations.verdict(scores, "pretrained", "random init", "quick", "k-NN", 0.1)
    assert f"{row['difference']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}]" in line  # the sentence's numbers
    # smoke: too small to judge, the profile's reason left to the line above the table
    (smoke,) = ablations.verdict_rows(scores, "pretrained", "random init", "smoke", "k-NN", 0.1)
    assert smoke["verdict"] == "too small to judge"
    (one,) = ablations.verdict_rows(scores[scores["fold"] == 1], "pretrained", "random init", "quick", "k-NN", 0.1)
    assert one["verdict"] == "no clear difference" and one["method"] == "no interval: a single run"
    assert np.isnan(one["low"]) and np.isnan(one["high"])


def test_the_exercise_scores_another_fraction_on_the_features_already_computed():
    data, good = _data()
    _, noise = _data(informative=False)
    features = {"pretrained": {("bus-bra", 1): good}, "random init": {("bus-bra", 1): noise}}
    split = {("bus-bra", 1): data}
    all_labels = ablations.score_features(features, split, [1.0], 1, k=5)
    few = ablations.score_features(features, split, [0.05], 2, k=5)
    assert set(few["encoder"]) == {"pretrained", "random init"} and set(few["fraction"]) == {0.05}
    table = ablations.fraction_table(pd.concat([few, all_labels]))
    assert table.columns.tolist() == [("pretrained", "5%"), ("pretrained", "100%"), ("random init", "5%"),
                                      ("random init", "100%")]
    assert table.index.tolist() == [("BUS-BRA", "k-NN"), ("BUS-BRA", "linear probe")]
    assert table.loc[("BUS-BRA", "k-NN"), ("pretrained", "5%")].count(" ± ") == 1  # two label seeds: an sd


def test_curve_bands_are_named_in_the_legend_and_never_below_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = pd.DataFrame([dict(encoder=e, dataset=d, method=m, fraction=f, f1=f1, sd=0.2, n=3)
                          for e, f1 in (("pretrained", 0.05), ("random init", 0.9)) for d in ("bus-bra", "gist514")
                          for m in ablations.METHODS for f in (0.1, 1.0)])
    fig = ablations.plot_curves(means, "fraction", "title", "labels", log_x=True)
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert ablations.BAND in texts and "pretrained" in texts
    for ax in fig.axes:
        bands = [c for c in ax.collections if len(c.get_paths())]
        assert len(bands) == 2
        ys = np.concatenate([p.vertices[:, 1] for band in bands for p in band.get_paths()])
        assert ys.min() >= 0 and ys.max() <= 100  # F1 5 ± 20 and 90 ± 20, clipped to 0-100
        assert ax.get_ylim() == pytest.approx((-4, 104))  # one scale in every panel
    plt.close(fig)


def test_a_single_split_verdict_holds_its_test_images(tmp_path):
    """On one split (MMOTU-2D's case) the scores carry F1 on resamples of the test images, the same
    resamples for both encoders, and the paired interval names them; the CSV leaves them out."""
    data, good = _data(n_per_class=(30, 10, 40))
    _, noise = _data(informative=False, n_per_class=(30, 10, 40))
    features = {"pretrained": {("bus-bra", 1): good}, "random init": {("bus-bra", 1): noise}}
    scores = ablations.score_features(features, {("bus-bra", 1): data}, [0.2, 1.0], 3, k=5)
    reps = scores["replicates"].iloc[0]
    assert reps.shape == (ablations.N_RESAMPLES,) and abs(reps.mean() - scores["f1"].iloc[0]) < 0.02
    (row,) = ablations.verdict_rows(scores, "pretrained", "random init", "quick", "k-NN", 0.2)
    assert "3 seeds + 80 test images (bootstrap)" in row["method"] and "test images (no" not in row["method"]
    ablations.write_scores(scores, tmp_path / "scores.csv")
    assert "replicates" not in pd.read_csv(tmp_path / "scores.csv")
