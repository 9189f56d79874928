"""Printed verdicts say only what the numbers say (notebooks 04 and 06).

Each test builds results or sweep tables by hand, runs the library's verdict functions and reads
what they say: "too small to judge" on the smoke profile, for one-class models and for gaps inside
the spread; "beats" only for a clear gap between models that learned something; no bold in Table 2
where nothing is comparable. The notebooks' own smoke-profile verdicts are checked in the smoke
reproduce run (tests/test_reproduce.py).
"""
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import reconstruction
from usfmae_lib import results as res

MODELS = ("usf-mae", "scratch", "resnet-50")
INITS = {"usf-mae": "usf-mae: pretrain/checkpoint-last.pth", "scratch": "random (scratch control, tiny)",
         "resnet-50": "imagenet-1k resnet50 (timm cache: x)"}


def _rows(f1: dict, bal: dict, sd: float = 0.01, half: float = 0.03, datasets=("bus-bra",), n_seeds: int = 3,
          folds=(0,), inits=None, fraction: float = 1.0) -> pd.DataFrame:
    """Fine-tuning rows as notebook 05 writes them: per (dataset, model, fold, seed) f1 = f1[model]
    spread by +-sd over seeds, balanced accuracy bal[model], 95% intervals of half-width half."""
    inits = {**INITS, **(inits or {})}
    rows = []
    for d in datasets:
        for m in f1:
            for fold in folds:
                for s in range(n_seeds):
                    shift = sd * (s - (n_seeds - 1) / 2) if n_seeds > 1 else 0.0
                    r = dict(dataset=d, model=m, mode="finetune", fraction=fraction, fold=fold, seed=s,
                             init=inits[m], n_classes=7 if d == "mmotu-2d" else 2, run=f"{d}/{m}/f{fold}s{s}")
                    for k, v in (("precision", f1[m]), ("recall", f1[m]), ("f1", f1[m]),
                                 ("balanced_accuracy", bal[m])):
                        v = float(np.clip(v + shift, 0, 1))
                        r.update({k: v, f"{k}_low": max(0.0, v - half), f"{k}_high": min(1.0, v + half)})
                    rows.append(r)
    return pd.DataFrame(rows)


def _scratch_line(lines, dataset="BUS-BRA"):
    found = [s for s in lines if s.startswith(f"{dataset}: USF-MAE")]
    assert len(found) == 1, lines
    return found[0]


# ------------------------------------------------------------------------------ classifiers
def test_a_clear_gap_between_models_that_learned_beats_and_is_bold():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {m: 0.75 for m in MODELS})
    lines = res.discussion(rows, synthetic=True)
    line = _scratch_line(lines)
    assert line.startswith("BUS-BRA: USF-MAE beats the same architecture from scratch on F1 (80.0 vs 60.0")
    assert "too small to judge" not in line
    best = "BUS-BRA: best mean F1 among comparable rows: USF-MAE (80.0) leads ResNet-50"
    assert any(s.startswith(best) for s in lines)
    long = res.table2_long(rows)
    assert set(long.loc[long["best"], "model"]) == {"usf-mae"} and long["best"].sum() == 3  # P, R and F1
    assert "**80.0 ± 1.0**" in res.to_markdown(long)
    # the other way round is said too, as a loss
    worse = res.discussion(_rows({"usf-mae": 0.60, "scratch": 0.80, "resnet-50": 0.70}, {m: 0.75 for m in MODELS}))
    assert _scratch_line(worse).startswith("BUS-BRA: USF-MAE does worse than the same architecture from scratch")


def test_smoke_profile_judges_nothing_even_a_clear_gap(tmp_path):
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {m: 0.75 for m in MODELS},
                 datasets=("bus-bra", "mmotu-2d"))
    curve = pd.concat([rows, _rows({"usf-mae": 0.7, "scratch": 0.5}, {"usf-mae": 0.7, "scratch": 0.7},
                                   fraction=0.25, datasets=("bus-bra", "mmotu-2d"))])
    lines = res.discussion(rows, curve, profile="smoke")
    judged = [s for s in lines if s.startswith(("BUS-BRA:", "MMOTU-2D:", "Label efficiency"))]
    assert len(judged) == 5  # two comparisons with scratch, two best-F1 lines, one label-efficiency line
    for s in judged:
        assert "too small to judge (smoke profile" in s, s
        assert "beats" not in s and "best mean F1 among" not in s, s
    long = res.table2_long(rows, profile="smoke")
    assert not long["best"].any()
    paths = res.write_table2(rows, tmp_path, profile="smoke")
    assert "**" not in paths["md"].read_text() and r"\textbf" not in paths["tex"].read_text()
    assert not res.table2_long(rows, profile="dry-run")["best"].any()
    assert "too small to judge (dry run" in _scratch_line(res.discussion(rows, profile="dry-run"))
    # the same rows judged by their numbers: the smoke profile alone made the difference
    assert _scratch_line(res.discussion(rows)).startswith("BUS-BRA: USF-MAE beats")
    assert res.table2_long(rows)["best"].any()


@pytest.mark.parametrize("folds", [(0,), (1, 2, 3)], ids=["seeds", "folds"])
def test_a_gap_inside_the_spread_is_too_small_to_judge(folds):
    # 2 points apart, seeds (or folds) 5 points apart; intervals wide enough to overlap too
    f1 = {"usf-mae": 0.72, "scratch": 0.70, "resnet-50": 0.71}
    if len(folds) > 1:  # the spread between folds: each fold shifted, seeds alike within it
        rows = pd.concat([_rows(f1, {m: 0.75 for m in MODELS}, sd=0.0, folds=(k,), n_seeds=2)
                          .assign(**{c: lambda t, c=c, k=k: t[c] + 0.05 * (k - 2)
                                     for c in ("f1", "f1_low", "f1_high", "precision", "precision_low",
                                               "precision_high", "recall", "recall_low", "recall_high")})
                          for k in folds], ignore_index=True)
    else:
        rows = _rows(f1, {m: 0.75 for m in MODELS}, sd=0.05)
    line = _scratch_line(res.discussion(rows))
    assert "beats" not in line and "does worse" not in line
    spread = "sd between folds" if len(folds) > 1 else "sd between seeds"
    assert f"too small to judge (the gap is inside the larger {spread}" in line, line
    assert "gap +2.0 points" in line
    assert not res.table2_long(rows)["best"].any()
    best = [s for s in res.discussion(rows) if "best mean F1" in s]
    assert best and best[0].startswith("BUS-BRA: no clear best mean F1: USF-MAE (72.0) leads ResNet-50 (71.0) by 1.0, "
                                       "not more than the larger sd")


def test_overlapping_intervals_alone_are_too_small_to_judge():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.70, "resnet-50": 0.75}, {m: 0.75 for m in MODELS}, half=0.08)
    line = _scratch_line(res.discussion(rows))
    assert "too small to judge (the 95% intervals overlap)" in line and "beats" not in line


def test_one_class_models_neither_beat_nor_are_bold():
    # binary: balanced accuracy 0.5 is always predicting one class; F1 can still look fair
    rows = _rows({"usf-mae": 0.67, "scratch": 0.40, "resnet-50": 0.55}, {m: 0.5 for m in MODELS})
    lines = res.discussion(rows)
    line = _scratch_line(lines)
    assert "beats" not in line and "too small to judge" in line
    assert "USF-MAE is near a one-class predictor (balanced accuracy 50.0, one class: 50.0)" in line
    assert "from-scratch model (USF-MAE architecture) is near a one-class predictor" in line
    long = res.table2_long(rows)
    assert not long["best"].any() and "**" not in res.to_markdown(long)
    assert any(s.startswith("BUS-BRA: no clear best mean F1: fewer than two comparable rows") for s in lines)
    # one model that learned among one-class ones: alone, it is not "best" of anything
    rows = _rows({"usf-mae": 0.67, "scratch": 0.40, "resnet-50": 0.55}, {"usf-mae": 0.8, "scratch": 0.5,
                                                                          "resnet-50": 0.52})
    assert "beats" not in _scratch_line(res.discussion(rows))
    assert not res.table2_long(rows)["best"].any()


def test_random_init_baselines_and_paper_rows_are_never_best():
    inits = {"resnet-50": "random: no ImageNet weights found (resnet50)"}
    rows = _rows({"usf-mae": 0.70, "scratch": 0.60, "resnet-50": 0.95}, {m: 0.75 for m in MODELS}, inits=inits)
    long = res.table2_long(rows)
    assert set(long.loc[long["best"], "model"]) == {"usf-mae"}  # resnet-50 is higher but has random init
    assert long.loc[long["mean"].isna(), "best"].eq(False).all()  # paper rows (UltraSam 87.5, ...) never marked
    assert long.loc[long["model"] == "ultrasam", "paper"].notna().all()


def test_the_issues_numbers_one_epoch_one_class_do_not_beat():
    """The issue's case: one-epoch models predicting one class, F1 50.0 vs 0.0, one seed each."""
    rows = _rows({"usf-mae": 0.5, "scratch": 0.0, "resnet-50": 0.0}, {m: 0.5 for m in MODELS}, n_seeds=1, half=0.0)
    rows.loc[rows["model"] == "usf-mae", ["f1_low", "f1_high"]] = (0.40, 0.60)
    rows.loc[rows["model"] != "usf-mae", ["f1_low", "f1_high"]] = (0.0, 0.0)  # intervals that do not overlap
    for profile in (None, "smoke"):
        lines = res.discussion(rows, profile=profile)
        line = _scratch_line(lines)
        assert "beats" not in line and "too small to judge" in line, line
        assert "50.0 vs 0.0" in line and "one run per model: no sd between seeds" in line
        assert ("too small to judge (smoke profile" in line) == (profile == "smoke")
        assert not any("beats" in s for s in lines)
        long = res.table2_long(rows, profile=profile)
        assert not long["best"].any(), "Table 2 bolds 0.0 / 0.0 / 0.0 or 50.0 from one-class models"
    assert "near a one-class predictor" in _scratch_line(res.discussion(rows))


def test_label_efficiency_is_counts_not_a_win():
    frac = [0.1, 0.25, 0.5]
    parts = []
    for fr, (a, b) in zip(frac, [(0.80, 0.60), (0.71, 0.70), (0.60, 0.80)]):
        parts.append(_rows({"usf-mae": a, "scratch": b}, {"usf-mae": 0.75, "scratch": 0.75}, sd=0.02, fraction=fr))
    parts.append(_rows({"usf-mae": 0.9, "scratch": 0.5}, {"usf-mae": 0.75, "scratch": 0.5}, fraction=1.0))
    curve = pd.concat(parts, ignore_index=True)
    rows = curve[curve["fraction"] == 1.0]
    line = [s for s in res.discussion(rows, curve) if s.startswith("Label efficiency")]
    assert line == ["Label efficiency, counts only (not a test): of 4 (dataset, label fraction) points, USF-MAE's "
                    "mean F1 is above the scratch model's by more than the larger sd at 1, below it by more than "
                    "that at 1, within the spread (or with a single run, no spread) at 1, and at 1 one of the two "
                    "is near a one-class predictor."]
    assert "higher mean F1 in" not in " ".join(res.discussion(rows, curve))


# ------------------------------------------------------------------------------ reconstruction
def _per_image(mse: dict, baseline: dict, n: int = 8, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """mask_ratio_sweep's per-image rows: at each ratio r, mse[r] and baseline[r] per image plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in mse:
        for i in range(n):
            rows.append(dict(mask_ratio=r, image=i, path=None, anatomy=("breast", "liver")[i % 2],
                             mse=mse[r] + noise * rng.standard_normal(), objective=0.0,
                             baseline_mse=baseline[r] + noise * rng.standard_normal()))
    return pd.DataFrame(rows)


def test_a_reconstruction_worse_than_the_flat_fill_makes_no_ratio_claim():
    # the issue's smoke numbers: 1.7092 at 25%, more at 75%, both worse than the flat fill
    per_image = _per_image({0.25: 1.7092, 0.75: 1.9}, {0.25: 0.9, 0.75: 0.95})
    text = reconstruction.sweep_verdict(per_image, 0.25, 0.75)
    first, second, ratio = text.splitlines()
    assert first.startswith("25% vs flat fill: does not beat the flat fill: it is worse than filling")
    assert second.startswith("75% vs flat fill: does not beat the flat fill")
    assert ratio.startswith("25% vs 75%: too small to judge: the model does not beat the flat fill at 25% and 75%")
    assert "no claim about which ratio has the lower error" in ratio
    assert "lower than" not in text and "beats the flat fill" not in text
    assert "Student-t 95% interval over 8 images" in first


def test_a_reconstruction_that_beats_the_flat_fill_compares_its_ratios():
    per_image = _per_image({0.25: 0.30, 0.9: 0.60}, {0.25: 0.90, 0.9: 0.95})
    lines = reconstruction.sweep_verdict(per_image, 0.25, 0.9).splitlines()
    assert lines[0].startswith("25% vs flat fill: beats the flat fill")
    assert lines[1].startswith("90% vs flat fill: beats the flat fill")
    assert lines[2].startswith("25% vs 90%: the masked-patch error at 25% is lower than at 90%")
    # the same model, one ratio's difference inside the noise between images: no ratio claim
    close = _per_image({0.25: 0.30, 0.9: 0.305}, {0.25: 0.90, 0.9: 0.95}, noise=0.05)
    ratio = reconstruction.sweep_verdict(close, 0.25, 0.9).splitlines()[2]
    assert ratio.startswith("25% vs 90%: too small to judge (the interval includes 0)")
    # a difference from the flat fill inside the noise: not beaten, so no ratio claim
    tie = _per_image({0.25: 0.90, 0.9: 0.60}, {0.25: 0.90, 0.9: 0.95}, noise=0.05)
    lines = reconstruction.sweep_verdict(tie, 0.25, 0.9).splitlines()
    assert "does not beat the flat fill (too small to judge: the interval includes 0)" in lines[0]
    assert lines[2].startswith("25% vs 90%: too small to judge: the model does not beat the flat fill at 25",)


def test_smoke_profile_sweep_verdict_is_too_small_to_judge():
    per_image = _per_image({0.25: 0.30, 0.9: 0.60}, {0.25: 0.90, 0.9: 0.95})  # clear by the numbers
    lines = reconstruction.sweep_verdict(per_image, 0.25, 0.9, profile="smoke").splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "too small to judge (smoke profile" in line, line
        assert "beats" not in line and "lower than" not in line, line
    assert "no claim about which ratio has the lower error" in lines[2]
    assert reconstruction.sweep_verdict(per_image, 0.25, 0.75) == "the sweep lacks 25% or 75%; no comparison"


def test_paired_interval_is_student_t_over_images():
    d = reconstruction.paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert d["mean"] == pytest.approx(2.5) and d["n"] == 4
    assert (d["low"], d["high"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert np.isnan(reconstruction.paired_difference([1.0], [0.0])["low"])


def test_the_scratch_comparison_also_gives_the_gap_paired_by_fold():
    # 5 folds of very different difficulty; USF-MAE 3.1-3.5 points above scratch on each: the sd between folds
    # (~16) hides the gap, the paired difference does not; the verdict keeps its rule
    rows = pd.concat([_rows({"usf-mae": base + 0.03 + 0.001 * k, "scratch": base}, {"usf-mae": 0.75, "scratch": 0.75},
                            n_seeds=1, folds=(k,))
                      for k, base in enumerate((0.40, 0.55, 0.70, 0.45, 0.80), start=1)], ignore_index=True)
    line = _scratch_line(res.discussion(rows))
    assert "too small to judge" in line and "the gap is inside the larger sd between folds" in line
    assert "paired by fold and seed: +3.3 [+3.1, +3.5] (Student-t 95% over 5 pairs)" in line
    # one run per model: no pairs to make an interval from, nothing added
    single = _scratch_line(res.discussion(_rows({"usf-mae": 0.8, "scratch": 0.6}, {"usf-mae": 0.75, "scratch": 0.75},
                                                n_seeds=1)))
    assert "paired" not in single


# ------------------------------------------------------------------------------ notebook 06's verdict table
def _shown(monkeypatch) -> list:
    """What show_verdicts displays, captured (no IPython needed)."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    return shown


def test_scratch_verdicts_are_one_row_per_dataset_with_the_paired_interval():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {m: 0.75 for m in MODELS},
                 datasets=("bus-bra", "gist514"), folds=(1, 2), n_seeds=2)
    table = res.scratch_verdicts(rows)
    assert list(table.columns) == res.VERDICT_COLUMNS
    assert table.dataset.tolist() == ["BUS-BRA", "GIST514-DB"] and (table.method == "fine-tuned").all()
    assert table.verdict.tolist() == ["USF-MAE beats scratch"] * 2
    assert table.difference.tolist() == pytest.approx([20.0, 20.0])
    assert (table.low <= table.difference).all() and (table.difference <= table.high).all()  # 4 (fold, seed) pairs
    # the same logic as the sentence: a loss is said as one, a gap inside the spread is too small to judge
    worse = res.scratch_verdicts(_rows({"usf-mae": 0.60, "scratch": 0.80}, {"usf-mae": 0.75, "scratch": 0.75}))
    assert worse.verdict.tolist() == ["USF-MAE does worse than scratch"]
    close = res.scratch_verdicts(_rows({"usf-mae": 0.72, "scratch": 0.70}, {"usf-mae": 0.75, "scratch": 0.75}, sd=0.05))
    assert close.verdict.iloc[0].startswith("too small to judge (the gap is inside the larger sd between seeds")
    one = res.scratch_verdicts(_rows({"usf-mae": 0.8, "scratch": 0.6}, {"usf-mae": 0.75, "scratch": 0.75}, n_seeds=1))
    assert np.isnan(one.low.iloc[0]) and np.isnan(one.high.iloc[0])  # one pair: no interval


def test_smoke_verdicts_say_the_profile_once_above_the_table(tmp_path, monkeypatch):
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {"usf-mae": 0.75, "scratch": 0.5,
                                                                          "resnet-50": 0.75},
                 datasets=("bus-bra", "mmotu-2d", "gist514"), folds=(1, 2))
    table = res.scratch_verdicts(rows, "smoke")
    assert len(table) == 3 and table.verdict.str.startswith("too small to judge").all()
    assert not table.verdict.str.contains("smoke").any()
    # every other reason stays in its row: scratch is near a one-class predictor on the binary tasks
    binary = table[table.dataset != "MMOTU-2D"].verdict
    assert binary.str.contains("from-scratch model (USF-MAE architecture) is near a one-class predictor",
                               regex=False).all()
    assert table.set_index("dataset").loc["MMOTU-2D", "verdict"] == "too small to judge"  # smoke alone
    shown = _shown(monkeypatch)
    res.show_verdicts(table, tmp_path, "smoke")
    path = tmp_path / "verdicts.csv"
    assert pd.read_csv(path).columns.tolist() == res.VERDICT_COLUMNS and len(pd.read_csv(path)) == 3
    note, styled = shown
    assert note.data.count(res.SMOKE_REASON) == 1 and "too small to judge" in note.data
    html = styled.to_html()
    assert "smoke profile" not in html and html.count("too small to judge") == 3
    assert "[+" in html or "[-" in html  # the interval in one column
    # judged by the numbers: no disclaimer
    shown.clear()
    res.show_verdicts(res.scratch_verdicts(rows), tmp_path, None)
    assert "too small to judge**" not in shown[0].data and res.SMOKE_REASON not in shown[0].data


def test_discussion_on_screen_leaves_out_what_the_table_says():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {"usf-mae": 0.75, "scratch": 0.5,
                                                                          "resnet-50": 0.52},
                 datasets=("bus-bra", "gist514"))
    curve = pd.concat([rows, _rows({"usf-mae": 0.7, "scratch": 0.5}, {"usf-mae": 0.7, "scratch": 0.7},
                                   fraction=0.25, datasets=("bus-bra", "gist514"))])
    full = res.discussion(rows, curve, profile="smoke")
    screen = res.discussion(rows, curve, profile="smoke", on_screen=True)
    assert sum("from scratch on F1" in s for s in full) == 2 and not any("from scratch on F1" in s for s in screen)
    assert sum(res.SMOKE_REASON in s for s in full) == 5 and not any(res.SMOKE_REASON in s for s in screen)
    assert "BUS-BRA: best mean F1: too small to judge; the paper's best: UltraSam." in screen
    assert any(s.startswith("Label efficiency: too small to judge; counts only:") for s in screen)
    # the models near a one-class predictor, one sub-item per dataset instead of one long sentence
    (near,) = [s for s in screen if s.startswith("Near a one-class predictor")]
    assert near.count("\n    - ") == 2 and "\n    - BUS-BRA (one class: 50.0): " in near
    assert "USF-MAE architecture, from scratch 50.0, ResNet-50 52.0" in near
