"""Intervals and verdicts: one method for every cell and every comparison of notebooks 04, 06 and 07.

A number the study reports is a mean over runs. A run is one fine-tuning (or probe) of one
encoder on one split with one seed; the sources of variance are

    pretraining run   R  USF-MAE checkpoints pretrained with different seeds (1 for any other model)
    split             K  BUS-BRA's 5 folds, GIST514-DB's 5 splits, MMOTU-2D's single split
    seed              S  fine-tuning seeds (or label subsamples) per split
    test image        N  the images of each split's test set

The mean is taken level by level (seeds within a pretraining run and split, then pretraining runs,
then splits: every split weighs the same). Its interval is a t interval of that mean whose variance
adds one term per source that has more than one level (`interval`):

    pretraining runs  var(run means) / R                           when R >= 2
    splits            var(split means) * (1/K + n_test/n_train)    when K >= 2: Nadeau and Bengio's
                      corrected resampled t (2003), since the training sets of the K splits overlap;
                      each split has its own test images, so their sampling is inside this term
    one split         var(seed means) / S, when R = 1 and S >= 2, plus the test images' term: the
                      variance of the mean over B bootstrap resamples of the test images (the same
                      resample for every run on the split, so runs that share a test set are not
                      counted as independent)

with Welch-Satterthwaite degrees of freedom. A source with one level adds nothing and is named in
`missing`: one pretraining run leaves the pretraining variance out, which every table says.

A paired comparison (USF-MAE vs scratch, pretrained vs random, 25% vs 75% mask) is the same interval
of the per-run differences A - B, each pair on the same split, seed and test images (`pair`), the
bootstrap resamples shared by both. One rule turns an interval into a verdict (`verdict`): "above"
or "below" when the interval excludes 0, "no clear difference" when it does not, "one-class" when
either side is near a one-class predictor, "too small to judge" on a profile that measures nothing
(smoke, dry run). tests/test_stats.py checks the coverage of the intervals and the rate of false
verdicts on simulated studies with a known answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95
KEYS = ("pretrain_run", "split", "seed")  # the levels of a runs table, outermost first after the split
ABOVE, BELOW, NO_CLEAR, ONE_CLASS, TOO_SMALL = "above", "below", "no clear difference", "one-class", \
    "too small to judge"
RULE = ("A verdict says above or below only when the 95% interval of the paired difference excludes 0, "
        "\"no clear difference\" when it includes 0, and \"one-class\" when either model is near a "
        "one-class predictor (its balanced accuracy within 5 points of always predicting one class).")


@dataclass
class Interval:
    """A mean over runs with its interval (see the module's doc); sd: the spread of the single runs'
    values (what one more run may give), not of the mean."""
    mean: float
    low: float
    high: float
    sd: float
    n_pre: int
    n_splits: int
    n_seeds: int
    n_test: int = 0
    terms: dict = field(default_factory=dict)  # source -> its share of the mean's variance
    df: float = np.nan
    missing: tuple = ()
    seed_name: str = "seeds"  # what the seed level stands for ("images" in notebook 04's paired errors)

    @property
    def method(self) -> str:
        """What the interval is, in one line: its sources and the t."""
        if not self.terms:
            return "no interval: a single run"
        names = {"pretraining runs": f"{self.n_pre} pretraining runs",
                 "splits": f"{self.n_splits} splits (Nadeau-Bengio corrected)",
                 "seeds": f"{self.n_seeds} {self.seed_name}", "test images": f"{self.n_test} test images (bootstrap)"}
        text = (f"t ({self.df:.0f} df)" if np.isfinite(self.df) else "normal") + " over " + \
            " + ".join(names[k] for k in self.terms)
        return text + (f"; not in it: {', '.join(self.missing)}" if self.missing else "")


def _levels(runs: pd.DataFrame) -> pd.DataFrame:
    """runs with every key present (a missing one is a single level)."""
    if all(k in runs for k in KEYS):
        return runs
    return runs.assign(**{k: runs[k] if k in runs else 0 for k in KEYS})


def _array(runs: pd.DataFrame, column: str) -> np.ndarray:
    """runs' `column` as a [R, K, S, ...] array (pretraining run, split, seed, by their values; NaN
    where a run is missing); a column of arrays (replicates) adds their axis."""
    codes = [pd.factorize(runs[k])[0] for k in KEYS]
    values = np.stack(runs[column].to_numpy()).astype(float)
    out = np.full(tuple(c.max() + 1 for c in codes) + values.shape[1:], np.nan)
    out[tuple(codes)] = values
    return out


def interval(runs: pd.DataFrame, value: str = "value", test_over_train: float = 0.0, pretrained: bool = False,
             level: float = LEVEL, seed_name: str = "seeds") -> Interval:
    """The interval of the mean of `value` over `runs` (one row per run; columns pretrain_run, split,
    seed, value, and `replicates` when the test images were resampled: an array of B values of the run
    on the same B resamples as every other run on its split). test_over_train: n_test / n_train of the
    splits (Nadeau and Bengio's correction; 0 when there is one split). pretrained: the value comes
    from a pretrained encoder, so one pretraining run is named as a missing source. seed_name: what
    the seed level stands for in the method's text (notebook 04 puts images there).

    The pretraining runs are crossed with the splits (every checkpoint is fine-tuned on every split),
    and, in a paired table (`pair`) on one split, with the seeds (the other model's run with seed s is
    subtracted from every checkpoint's run with seed s): then the run x split (or seed) noise is in
    both terms, and its second share is taken out (the two-way ANOVA's residual mean square)."""
    runs = _levels(runs[runs[value].notna()] if runs[value].isna().any() else runs)
    if runs.empty:
        return Interval(np.nan, np.nan, np.nan, np.nan, 0, 0, 0)
    x = _array(runs, value)  # [R, K, S]
    n_pre, n_split, n_seed = x.shape
    cells = np.nanmean(x, axis=2)  # [R, K]: mean over seeds
    mean = float(np.nanmean(np.nanmean(cells, axis=0)))  # over pretraining runs, then splits
    if n_split >= 2:  # each split has its own test images: their sampling is inside this term
        table, second, factor = cells, "splits", 1 / n_split + test_over_train
    elif n_pre == 1 or "paired" in runs:  # seeds crossed with the pretraining runs (or the only factor)
        table, second, factor = x[:, 0, :], "seeds", 1 / n_seed
    else:  # seeds nested in pretraining runs: their noise is in the runs' spread
        table, second, factor = cells, None, 0.0
    terms, dfs, missing, n_test = {}, {}, [], 0
    if n_pre >= 2:
        terms["pretraining runs"] = float(np.nanmean(table, axis=1).var(ddof=1) / n_pre)
        dfs["pretraining runs"] = n_pre - 1
    elif pretrained:
        missing.append("pretraining runs (one run)")
    if table.shape[1] >= 2:
        share = float(np.nanmean(table, axis=0).var(ddof=1) * factor)
        if n_pre >= 2 and np.isfinite(table).all():
            resid = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
            ms_e = float((resid ** 2).sum() / ((n_pre - 1) * (table.shape[1] - 1)))
            share = max(share - factor * ms_e / n_pre, 0.0)
        terms[second], dfs[second] = share, table.shape[1] - 1
    elif n_split == 1 and n_pre == 1:
        missing.append("seeds (one run)")
    elif n_split == 1 and "paired" in runs:
        missing.append("the other model's seed (one run, shared by every pretraining run)")
    if n_split == 1 and seed_name == "seeds":  # (images as the seed level: their sampling is that term)
        if "replicates" in runs and runs["replicates"].map(lambda v: isinstance(v, np.ndarray)).all():
            reps = np.nanmean(np.nanmean(_array(runs, "replicates"), axis=2), axis=0)[0]  # [B]
            terms["test images"], dfs["test images"] = float(reps.var(ddof=1)), np.inf
            n_test = int(runs["n_test"].iloc[0]) if "n_test" in runs else 0
        else:
            missing.append("test images (no predictions to resample)")
    sd = float(runs[value].std(ddof=1)) if len(runs) > 1 else np.nan
    var = sum(terms.values())  # 0 when every run gave the same value: a zero-width interval, as the data say
    if not terms:
        return Interval(mean, np.nan, np.nan, sd, n_pre, n_split, n_seed, n_test, {}, np.nan, tuple(missing))
    finite = [v ** 2 / dfs[k] for k, v in terms.items() if np.isfinite(dfs[k]) and v > 0]
    df = var ** 2 / sum(finite) if finite else np.inf  # Welch-Satterthwaite
    half = float(sps.t.ppf(0.5 + level / 2, df) * np.sqrt(var))
    return Interval(mean, mean - half, mean + half, sd, n_pre, n_split, n_seed, n_test, terms, float(df),
                    tuple(missing), seed_name)


def pair(a: pd.DataFrame, b: pd.DataFrame, value: str = "value") -> pd.DataFrame:
    """The runs of A - B, paired on split and seed (and on the test-image resamples, where both carry
    `replicates`). One side may have one pretraining run (scratch, a random encoder, a baseline)
    against the other's several: each of the several is paired with the single side's run on the same
    split and seed. Two sides with several runs each are paired run by run. Runs without a partner
    are left out."""
    a, b = _levels(a), _levels(b)
    if b["pretrain_run"].nunique() > 1 and a["pretrain_run"].nunique() == 1:  # one run against several: B - A, negated
        d = pair(b, a, value)
        d[value] = -d[value]
        if "replicates" in d:
            d["replicates"] = [-x if isinstance(x, np.ndarray) else None for x in d["replicates"]]
        return d
    on = ["split", "seed"] + (["pretrain_run"] if b["pretrain_run"].nunique() > 1 else [])
    partner = dict(zip(zip(*(b[k] for k in on)), range(len(b))))
    j = np.array([partner.get(key, -1) for key in zip(*(a[k] for k in on))])
    out = a[j >= 0].copy()
    j = j[j >= 0]
    out[value] = out[value].to_numpy() - b[value].to_numpy()[j]
    if "replicates" in a and "replicates" in b:
        other = b["replicates"].to_numpy()[j]
        out["replicates"] = [x - y if isinstance(x, np.ndarray) and isinstance(y, np.ndarray) else None
                             for x, y in zip(out["replicates"], other)]
    out["paired"] = True
    return out


def side(low: float, high: float) -> str:
    """ABOVE / BELOW when the interval excludes 0, NO_CLEAR when it includes 0 or is missing."""
    if np.isfinite(low) and low > 0:
        return ABOVE
    if np.isfinite(high) and high < 0:
        return BELOW
    return NO_CLEAR


def verdict(low: float, high: float, one_class: bool = False, unjudged: str | None = None) -> str:
    """The one verdict rule (RULE): TOO_SMALL on an unjudged profile, ONE_CLASS, else side()."""
    if unjudged:
        return TOO_SMALL
    if one_class:
        return ONE_CLASS
    return side(low, high)


# ============================================================================ test-image resamples
def resample_index(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[B, n] bootstrap indices of n test images; the same seed gives every run on a split the same."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def metric_replicates(label: np.ndarray, pred: np.ndarray, index: np.ndarray, metric: str,
                      positive: int | None) -> np.ndarray:
    """metric (precision, recall or f1 of the positive class; micro averages, i.e. accuracy, when
    positive is None, as metrics.classification_metrics scores MMOTU-2D) of one run on each resample:
    [B]. Counted on the [B, n] index at once; tests/test_stats.py checks it against scikit-learn."""
    label, pred = np.asarray(label)[index], np.asarray(pred)[index]  # [B, n]
    if positive is None:
        return (label == pred).mean(1)
    tp = ((pred == positive) & (label == positive)).sum(1)
    fp = ((pred == positive) & (label != positive)).sum(1)
    fn = ((pred != positive) & (label == positive)).sum(1)
    num, den = {"precision": (tp, tp + fp), "recall": (tp, tp + fn), "f1": (2 * tp, 2 * tp + fp + fn)}[metric]
    return np.divide(num, den, out=np.zeros(len(index)), where=den > 0)  # 0 when undefined, as zero_division=0
