"""The study's intervals and verdicts (usfmae_lib.stats) on simulated studies with a known answer.

Each simulated study has the shape of one of the study's designs: two models (A: pretrained, one run
per pretraining seed; B: from scratch) fine-tuned on the same splits with the same seeds, the
difference A - B paired by split, seed and test image exactly as notebook 06 pairs USF-MAE and
scratch. The sources of variance are those of the real study: the pretraining run, the split (the K
splits' training sets overlap, so their effects are correlated: Nadeau and Bengio's model, correlation
n_test / (n_train + n_test)), the fine-tuning seed and the test images. Every source gets an equal
share of the variance here; docs/statistics.md gives the coverage when one source dominates. With
one pretraining run (the paper profile) the interval is that checkpoint's: its pretraining effect is
part of the truth there, not a random source (the table says "not in it: pretraining runs").
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from usfmae_lib import stats

LEVEL = stats.LEVEL
N_COVER, N_NULL = 1000, 2000  # simulated studies per design: at a known difference, and at a difference of 0
# Monte-Carlo error of a 5% rate over N_NULL studies: three standard errors (1.5 points), so that a method
# whose true rate is exactly 5% fails this check by chance once in about 700 runs
MC = 3 * np.sqrt(LEVEL * (1 - LEVEL) / N_NULL)
TEST_OVER_TRAIN = 0.25  # 5-fold cross-validation: 1/5 of the images tested, 4/5 trained on


def crossed_study(rng, delta, n_pre, n_split, n_seed, sd=2.0, scale=None):
    """A and B on K splits, A from n_pre pretraining runs: runs tables. Nadeau and Bengio's model: a
    model's K per-split scores are equicorrelated (correlation n_test / (n_train + n_test)), since the
    splits' training sets overlap, and that holds for one checkpoint's fine-tuning noise as for the
    split's own effect. scale: multipliers of the sources' sd (pretraining, split, seed; default 1)."""
    rho = TEST_OVER_TRAIN / (1 + TEST_OVER_TRAIN)
    scale = {"pretraining": 1.0, "split": 1.0, "seed": 1.0, **(scale or {})}

    def across_splits(source):  # one draw per split, equicorrelated
        return scale[source] * sd * (np.sqrt(rho) * rng.normal() + np.sqrt(1 - rho) * rng.normal(size=n_split))

    hard = across_splits("split")  # how hard each split is, for both models: it cancels in the pairs
    pre = rng.normal(0, scale["pretraining"] * sd if n_pre > 1 else 0.0, n_pre)  # one checkpoint: its own truth
    a = [dict(pretrain_run=r, split=k, seed=s, value=value)
         for r in range(n_pre) for s in range(n_seed)
         for k, value in enumerate(delta + pre[r] + hard + across_splits("split") + across_splits("seed"))]
    b = [dict(pretrain_run=0, split=k, seed=s, value=value)
         for s in range(n_seed) for k, value in enumerate(hard + across_splits("split") + across_splits("seed"))]
    return pd.DataFrame(a), pd.DataFrame(b)


def one_split_study(rng, delta, n_pre, n_seed, n_test=100, sd=2.0, n_resamples=100, scale=None):
    """A and B on one split's n_test test images (a per-image score, its mean is the run's value), the
    same bootstrap resamples of the test images for every run: runs tables with replicates. scale:
    multipliers of the sources' sd (pretraining, seed, images; default 1)."""
    scale = {"pretraining": 1.0, "seed": 1.0, "images": 1.0, **(scale or {})}
    shared = rng.normal(0, 5 * sd, n_test)  # how hard each image is, for both models: it cancels in the pairs
    own_a, own_b = (rng.normal(0, 5 * sd * scale["images"], n_test) for _ in "ab")  # model-specific image effects
    index = stats.resample_index(n_test, n_resamples, int(rng.integers(1 << 31)))
    pre = rng.normal(0, scale["pretraining"] * sd if n_pre > 1 else 0.0, n_pre)

    def run(pretrain_run, seed, per_image):
        return dict(pretrain_run=pretrain_run, split=0, seed=seed, value=per_image.mean(),
                    replicates=per_image[index].mean(1), n_test=n_test)

    seed_sd = scale["seed"] * sd
    a = [run(r, s, delta + pre[r] + rng.normal(0, seed_sd) + shared + own_a + rng.normal(0, seed_sd, n_test))
         for r in range(n_pre) for s in range(n_seed)]
    b = [run(0, s, rng.normal(0, seed_sd) + shared + own_b + rng.normal(0, seed_sd, n_test)) for s in range(n_seed)]
    return pd.DataFrame(a), pd.DataFrame(b)


DESIGNS = {  # name -> (simulator, its arguments, n_test / n_train)
    "quick, 5 folds x 3 pretraining runs": (crossed_study, dict(n_pre=3, n_split=5, n_seed=1), TEST_OVER_TRAIN),
    "quick, one split x 3 pretraining runs x 3 seeds": (one_split_study, dict(n_pre=3, n_seed=3), 0.0),
    "paper, 5 folds x 3 seeds (1 pretraining run)": (crossed_study, dict(n_pre=1, n_split=5, n_seed=3),
                                                     TEST_OVER_TRAIN),
    "paper, one split x 5 seeds (1 pretraining run)": (one_split_study, dict(n_pre=1, n_seed=5), 0.0),
}


def simulate(design: str, delta: float, seed: int, n_studies: int, scale=None) -> tuple[float, float]:
    """Coverage of delta and the rate of above/below verdicts over n_studies paired intervals (scale:
    the sources' sd multipliers, see the simulators)."""
    make, kwargs, test_over_train = DESIGNS[design]
    kwargs = {**kwargs, "scale": scale}
    rng = np.random.default_rng(seed)
    covered = judged = 0
    for _ in range(n_studies):
        a, b = make(rng, delta, **kwargs)
        iv = stats.interval(stats.pair(a, b), test_over_train=test_over_train, pretrained=True)
        covered += iv.low <= delta <= iv.high
        judged += stats.verdict(iv.low, iv.high) in (stats.ABOVE, stats.BELOW)
    return covered / n_studies, judged / n_studies


@pytest.mark.parametrize("design", DESIGNS)
def test_paired_intervals_cover_the_true_difference(design):
    coverage, _ = simulate(design, delta=3.0, seed=1, n_studies=N_COVER)
    print(f"{design}: coverage of a true difference of 3: {coverage:.3f}")
    assert abs(coverage - LEVEL) <= 0.02, f"{design}: {coverage:.3f} of {N_COVER} intervals cover the truth"


@pytest.mark.parametrize("design", DESIGNS)
def test_no_difference_is_rarely_called_above_or_below(design):
    _, false_verdicts = simulate(design, delta=0.0, seed=2, n_studies=N_NULL)
    print(f"{design}: above/below at a true difference of 0: {false_verdicts:.3f}")
    assert false_verdicts <= 1 - LEVEL + MC, f"{design}: {false_verdicts:.3f} false verdicts"


def test_an_interval_names_its_sources_and_what_is_missing():
    rng = np.random.default_rng(0)
    a, b = crossed_study(rng, 0.0, n_pre=3, n_split=5, n_seed=1)
    iv = stats.interval(stats.pair(a, b), test_over_train=TEST_OVER_TRAIN, pretrained=True)
    assert (iv.n_pre, iv.n_splits, iv.n_seeds) == (3, 5, 1)
    assert set(iv.terms) == {"pretraining runs", "splits"} and not iv.missing
    assert "3 pretraining runs" in iv.method and "Nadeau-Bengio" in iv.method
    one = stats.interval(stats.pair(a[a.pretrain_run == 0], b), test_over_train=TEST_OVER_TRAIN, pretrained=True)
    assert one.missing == ("pretraining runs (one run)",) and "not in it: pretraining runs" in one.method
    single = stats.interval(pd.DataFrame([dict(pretrain_run=0, split=0, seed=0, value=0.7)]))
    assert np.isnan(single.low) and single.method == "no interval: a single run"


def test_the_interval_is_of_the_mean_not_of_one_run():
    """Ten times the runs of the same spread: the interval narrows (the mean is better known), the sd,
    which describes one run, stays."""
    few = stats.interval(pd.DataFrame(dict(split=range(4), value=[0.5, 0.6, 0.7, 0.6])))
    many = stats.interval(pd.DataFrame(dict(split=range(40), value=[0.5, 0.6, 0.7, 0.6] * 10)))
    assert few.mean == pytest.approx(many.mean) == pytest.approx(0.6)
    assert many.high - many.low < (few.high - few.low) / 4
    assert many.sd == pytest.approx(few.sd, rel=0.15)


def test_pairs_are_made_on_split_and_seed_and_scratch_serves_every_pretraining_run():
    a = pd.DataFrame(dict(pretrain_run=["p0", "p0", "p1", "p1"], split=[1, 2, 1, 2], seed=0, value=[5., 6, 7, 8]))
    b = pd.DataFrame(dict(pretrain_run="none", split=[2, 1], seed=0, value=[1., 2]))
    d = stats.pair(a, b).sort_values(["pretrain_run", "split"])
    assert d["value"].tolist() == [3., 5, 5, 7]
    back = stats.pair(b, a).sort_values(["pretrain_run", "split"])  # the single run first: the same pairs, negated
    assert back["value"].tolist() == [-3., -5, -5, -7]


@pytest.mark.parametrize("positive", [1, None])
def test_metric_replicates_match_scikit_learn(positive):
    rng = np.random.default_rng(0)
    label, pred = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    index = stats.resample_index(60, 20, seed=3)
    for metric, score in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        got = stats.metric_replicates(label, pred, index, metric, positive)
        average = dict(labels=[positive], average="macro") if positive is not None else dict(average="micro")
        want = [score(label[i], pred[i], zero_division=0, **average) for i in index]
        np.testing.assert_allclose(got, want)


def test_the_verdict_rule():
    assert stats.verdict(0.5, 3.0) == stats.ABOVE and stats.verdict(-3.0, -0.1) == stats.BELOW
    assert stats.verdict(-1.0, 2.0) == stats.NO_CLEAR and stats.verdict(np.nan, np.nan) == stats.NO_CLEAR
    assert stats.verdict(0.5, 3.0, one_class=True) == stats.ONE_CLASS
    assert stats.verdict(0.5, 3.0, unjudged="smoke profile") == stats.TOO_SMALL
