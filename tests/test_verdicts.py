"""Printed verdicts say only what the numbers say (notebooks 04, 06 and 07).

Each test builds results or sweep tables by hand, runs the library's verdict functions and reads
what they say. One rule everywhere (usfmae_lib.stats): above / below when the 95% interval of the
paired difference excludes 0, "no clear difference" when it includes 0, "one-class" when a model is
near a one-class predictor, "too small to judge" on the smoke profile. Table 2 bolds a best mean only
when its paired lead is above 0. The notebooks' own smoke-profile verdicts are checked in the smoke
reproduce run (tests/test_reproduce.py); the intervals' coverage in tests/test_stats.py.
"""
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import reconstruction, stats
from usfmae_lib import results as res

MODELS = ("usf-mae", "scratch", "resnet-50")
INITS = {"usf-mae": "usf-mae: pretrain/checkpoint-last.pth", "scratch": "random (scratch control, tiny)",
         "resnet-50": "imagenet-1k resnet50 (timm cache: x)"}


def _rows(f1: dict, bal: dict, noise: float = 0.01, datasets=("bus-bra",), n_seeds: int = 3, folds=(0,),
          inits=None, fraction: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """Fine-tuning rows as notebook 05 writes them: per (dataset, model, fold, seed) f1 = f1[model] plus
    Gaussian noise of sd `noise` (each run its own), balanced accuracy bal[model]."""
    inits = {**INITS, **(inits or {})}
    rng = np.random.default_rng(seed)
    rows = []
    for d in datasets:
        for m in f1:
            for fold in folds:
                for s in range(n_seeds):
                    r = dict(dataset=d, model=m, mode="finetune", fraction=fraction, fold=fold, seed=s,
                             init=inits[m], n_classes=7 if d == "mmotu-2d" else 2, run=f"{d}/{m}/f{fold}s{s}")
                    shift = noise * rng.standard_normal()
                    for k, v in (("precision", f1[m]), ("recall", f1[m]), ("f1", f1[m]), ("balanced_accuracy", bal[m])):
                        r[k] = float(np.clip(v + (shift if k != "balanced_accuracy" else 0.0), 0, 1))
                    rows.append(r)
    return pd.DataFrame(rows)


def _swing(rows: pd.DataFrame, size: float) -> pd.DataFrame:
    """Runs that swing by +-size around their model's value, USF-MAE one way and the others the other,
    run after run: paired differences whose spread (2 x size) is larger than a 1-2 point gap."""
    sign = np.where(rows["model"] == "usf-mae", 1.0, -1.0) * np.resize([1.0, -1.0, 0.0], len(rows))
    return rows.assign(**{k: rows[k] + size * sign for k in ("precision", "recall", "f1")})


def _scratch_line(lines, dataset="BUS-BRA"):
    found = [s for s in lines if s.startswith(f"{dataset}: USF-MAE vs")]
    assert len(found) == 1, lines
    return found[0]


LEARNED = {m: 0.75 for m in MODELS}  # balanced accuracy well above one class


# ------------------------------------------------------------------------------ classifiers
def test_a_clear_gap_is_above_and_bold_and_the_reverse_is_below():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, LEARNED)
    lines = res.discussion(rows, synthetic=True)
    line = _scratch_line(lines)
    assert line.startswith("BUS-BRA: USF-MAE vs the same architecture from scratch on F1: above; F1 80.")
    assert "paired difference +" in line and "3 seeds" in line
    best = [s for s in lines if s.startswith("BUS-BRA: best mean F1 among comparable rows: USF-MAE (")]
    assert best and "leads ResNet-50" in best[0] and "paired, above 0;" in best[0]
    long = res.table2_long(rows)
    assert set(long.loc[long["best"], "model"]) == {"usf-mae"} and long["best"].sum() == 3  # P, R and F1
    assert "**80." in res.to_markdown(long)
    worse = res.discussion(_rows({"usf-mae": 0.60, "scratch": 0.80, "resnet-50": 0.70}, LEARNED))
    assert ": below; F1 60." in _scratch_line(worse)


def test_smoke_profile_judges_nothing_even_a_clear_gap(tmp_path):
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, LEARNED, datasets=("bus-bra", "mmotu-2d"))
    curve = pd.concat([rows, _rows({"usf-mae": 0.7, "scratch": 0.5}, {"usf-mae": 0.7, "scratch": 0.7},
                                   fraction=0.25, datasets=("bus-bra", "mmotu-2d"))])
    lines = res.discussion(rows, curve, profile="smoke")
    judged = [s for s in lines if s.startswith(("BUS-BRA:", "MMOTU-2D:", "Label efficiency"))]
    assert len(judged) == 5  # two comparisons with scratch, two best-F1 lines, one label-efficiency line
    for s in judged:
        assert "too small to judge (smoke profile" in s, s
        assert ": above" not in s and "best mean F1 among" not in s, s
    assert not res.table2_long(rows, profile="smoke")["best"].any()
    paths = res.write_table2(rows, tmp_path, profile="smoke")
    assert "**" not in paths["md"].read_text() and r"\textbf" not in paths["tex"].read_text()
    assert not res.table2_long(rows, profile="dry-run")["best"].any()
    assert "too small to judge (dry run" in _scratch_line(res.discussion(rows, profile="dry-run"))
    # the same rows judged by their numbers: the smoke profile alone made the difference
    assert ": above;" in _scratch_line(res.discussion(rows))
    assert res.table2_long(rows)["best"].any()


@pytest.mark.parametrize("folds", [(0,), (1, 2, 3, 4, 5)], ids=["seeds", "folds"])
def test_a_gap_inside_the_noise_is_no_clear_difference(folds):
    rows = _rows({"usf-mae": 0.72, "scratch": 0.70, "resnet-50": 0.71}, LEARNED, noise=0.0, folds=folds,
                 n_seeds=3 if len(folds) == 1 else 1)
    rows = _swing(rows, 0.05)
    line = _scratch_line(res.discussion(rows))
    assert ": no clear difference;" in line, line
    d = res.paired(rows, "usf-mae", "scratch")
    assert d.low < 0 < d.high
    assert ("Nadeau-Bengio" in d.method) == (len(folds) > 1)
    assert not res.table2_long(rows)["best"].any()
    best = [s for s in res.discussion(rows) if "best mean F1" in s]
    assert best and best[0].startswith("BUS-BRA: no clear best mean F1: ") and "not clearly above 0" in best[0]


def test_pairing_by_fold_sees_a_gap_that_the_spread_between_folds_hides():
    # 5 folds of very different difficulty; USF-MAE 2.5-3.5 points above scratch on each
    rows = pd.concat([_rows({"usf-mae": base + 0.03, "scratch": base}, LEARNED, noise=0.003, n_seeds=1, folds=(k,),
                            seed=k) for k, base in enumerate((0.40, 0.55, 0.70, 0.45, 0.80), start=1)],
                     ignore_index=True)
    cells = res.summarise(rows).query("metric == 'f1'").set_index("model")
    assert cells.loc["usf-mae", "low"] < cells.loc["scratch", "mean"]  # the cells' own intervals overlap widely
    d = res.paired(rows, "usf-mae", "scratch")
    assert 0 < d.low < 100 * 0 + 0.03 < d.high
    assert ": above;" in _scratch_line(res.discussion(rows))


def test_one_class_models_are_one_class_and_never_bold():
    # binary: balanced accuracy 0.5 is always predicting one class; F1 can still look fair
    rows = _rows({"usf-mae": 0.67, "scratch": 0.40, "resnet-50": 0.55}, {m: 0.5 for m in MODELS})
    lines = res.discussion(rows)
    line = _scratch_line(lines)
    assert ": one-class (" in line and ": above" not in line
    assert "USF-MAE is near a one-class predictor (balanced accuracy 50.0, one class: 50.0)" in line
    long = res.table2_long(rows)
    assert not long["best"].any() and "**" not in res.to_markdown(long)
    assert any(s.startswith("BUS-BRA: no clear best mean F1: fewer than two comparable rows") for s in lines)
    # one model that learned among one-class ones: alone, it is not "best" of anything
    rows = _rows({"usf-mae": 0.67, "scratch": 0.40, "resnet-50": 0.55}, {"usf-mae": 0.8, "scratch": 0.5,
                                                                          "resnet-50": 0.52})
    assert ": one-class (" in _scratch_line(res.discussion(rows))
    assert not res.table2_long(rows)["best"].any()


def test_random_init_baselines_and_paper_rows_are_never_best():
    inits = {"resnet-50": "random: no ImageNet weights found (resnet50)"}
    rows = _rows({"usf-mae": 0.70, "scratch": 0.60, "resnet-50": 0.95}, LEARNED, inits=inits)
    long = res.table2_long(rows)
    assert set(long.loc[long["best"], "model"]) == {"usf-mae"}  # resnet-50 is higher but has random init
    assert long.loc[long["mean"].isna(), "best"].eq(False).all()  # paper rows (UltraSam 87.5, ...) never marked
    assert long.loc[long["model"] == "ultrasam", "paper"].notna().all()


def test_one_run_per_model_has_no_interval_and_no_verdict_either_way():
    """The first issue's case: one-epoch models, F1 50.0 vs 0.0, one seed each: nothing to judge by."""
    rows = _rows({"usf-mae": 0.5, "scratch": 0.0, "resnet-50": 0.0}, LEARNED, n_seeds=1, noise=0.0)
    for profile in (None, "smoke"):
        line = _scratch_line(res.discussion(rows, profile=profile))
        assert ": above" not in line and "F1 50.0 vs 0.0" in line, line
        assert ("too small to judge (smoke profile" in line) == (profile == "smoke")
        assert not res.table2_long(rows, profile=profile)["best"].any()
    assert ": no clear difference;" in _scratch_line(res.discussion(rows))
    assert "no interval: a single run" in _scratch_line(res.discussion(rows))


def test_label_efficiency_counts_the_verdicts_of_each_point():
    parts = [_rows({"usf-mae": a, "scratch": b}, {"usf-mae": 0.75, "scratch": 0.75}, noise=n, fraction=fr, seed=i)
             for i, (fr, a, b, n) in enumerate([(0.1, 0.80, 0.60, 0.01), (0.25, 0.71, 0.70, 0.05),
                                                (0.5, 0.60, 0.80, 0.01)])]
    parts.append(_rows({"usf-mae": 0.9, "scratch": 0.5}, {"usf-mae": 0.75, "scratch": 0.5}, fraction=1.0))
    curve = pd.concat(parts, ignore_index=True)
    rows = curve[curve["fraction"] == 1.0]
    line = [s for s in res.discussion(rows, curve) if s.startswith("Label efficiency")]
    assert line == ["Label efficiency: of 4 (dataset, label fraction) points, USF-MAE's F1 is above the scratch "
                    "model's at 1, below it at 1, with no clear difference at 1, and at 1 one of the two is near a "
                    "one-class predictor (each point judged by the verdict rule on its paired interval)."]


def test_table2_explains_a_cell_and_names_every_interval_method(tmp_path):
    rows = pd.concat([_rows({"usf-mae": 0.8, "scratch": 0.6}, LEARNED, datasets=("bus-bra",), n_seeds=1,
                            folds=(1, 2, 3, 4, 5)),
                      _rows({"usf-mae": 0.7, "scratch": 0.6}, LEARNED, datasets=("mmotu-2d",), n_seeds=3)])
    md = res.write_table2(rows, tmp_path)["md"].read_text()
    assert res.CELL_NOTE in md and res.CELL_NOTE.count(". ") + 1 <= 5  # at most five sentences
    assert "BUS-BRA, USF-MAE: t (4 df) over 5 splits (Nadeau-Bengio corrected); not in it: pretraining runs" in md
    assert "MMOTU-2D, USF-MAE architecture, from scratch: t (2 df) over 3 seeds; not in it: test images" in md
    long = pd.read_csv(tmp_path / "table2.csv")
    assert {"method", "n_pretrain", "n_folds", "n_seeds", "n_test"} <= set(long.columns)


# ------------------------------------------------------------------------------ notebook 06's verdict table
def _shown(monkeypatch) -> list:
    """What show_verdicts displays, captured (no IPython needed)."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    return shown


def test_scratch_verdicts_are_one_row_per_dataset_with_the_paired_interval():
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, LEARNED, datasets=("bus-bra", "gist514"),
                 folds=(1, 2), n_seeds=2)
    table = res.scratch_verdicts(rows)
    assert list(table.columns) == res.VERDICT_COLUMNS
    assert table.dataset.tolist() == ["BUS-BRA", "GIST514-DB"]
    assert table.verdict.tolist() == [stats.ABOVE] * 2
    assert table.difference.to_numpy() == pytest.approx([20.0, 20.0], abs=2)
    assert (table.low <= table.difference).all() and (table.difference <= table.high).all()
    assert table.method.str.contains("2 splits (Nadeau-Bengio corrected)", regex=False).all()
    worse = res.scratch_verdicts(_rows({"usf-mae": 0.60, "scratch": 0.80}, LEARNED))
    assert worse.verdict.tolist() == [stats.BELOW]
    close = res.scratch_verdicts(_swing(_rows({"usf-mae": 0.72, "scratch": 0.70}, LEARNED, noise=0.0), 0.05))
    assert close.verdict.tolist() == [stats.NO_CLEAR]
    one = res.scratch_verdicts(_rows({"usf-mae": 0.8, "scratch": 0.6}, LEARNED, n_seeds=1))
    assert np.isnan(one.low.iloc[0]) and one.verdict.iloc[0] == stats.NO_CLEAR  # one pair: no interval


def test_smoke_verdicts_say_the_profile_and_the_rule_once_above_the_table(tmp_path, monkeypatch):
    rows = _rows({"usf-mae": 0.80, "scratch": 0.60, "resnet-50": 0.70}, {"usf-mae": 0.75, "scratch": 0.5,
                                                                          "resnet-50": 0.75},
                 datasets=("bus-bra", "mmotu-2d", "gist514"), folds=(1, 2))
    table = res.scratch_verdicts(rows, "smoke")
    assert len(table) == 3 and (table.verdict == stats.TOO_SMALL).all()
    shown = _shown(monkeypatch)
    res.show_verdicts(table, tmp_path, "smoke")
    path = tmp_path / "verdicts.csv"
    assert pd.read_csv(path).columns.tolist() == res.VERDICT_COLUMNS and len(pd.read_csv(path)) == 3
    note, styled = shown
    assert note.data.count(res.SMOKE_REASON) == 1 and note.data.count(stats.RULE) == 1
    html = styled.to_html()
    assert "smoke profile" not in html and html.count("too small to judge") == 3
    assert "[+" in html or "[-" in html  # the interval in one column
    shown.clear()
    res.show_verdicts(res.scratch_verdicts(rows), tmp_path, None)  # judged by the numbers: no disclaimer
    assert "too small to judge**" not in shown[0].data and res.SMOKE_REASON not in shown[0].data
    # near one class on the binary tasks: said as such, by the numbers
    assert set(res.scratch_verdicts(rows).set_index("dataset").verdict[["BUS-BRA", "GIST514-DB"]]) == {stats.ONE_CLASS}


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
    (near,) = [s for s in screen if s.startswith("Near a one-class predictor")]
    assert near.count("\n    - ") == 2 and "\n    - BUS-BRA (one class: 50.0): " in near
    assert "USF-MAE architecture, from scratch 50.0, ResNet-50 52.0" in near


# ------------------------------------------------------------------------------ reconstruction (notebook 04)
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


def _verdicts(per_image, ratios, profile=None):
    return reconstruction.verdict_table(per_image, ratios[0], ratios, profile).set_index(["comparison", "dataset"])


def test_a_reconstruction_worse_than_the_flat_fill_makes_no_ratio_claim():
    table = _verdicts(_per_image({0.25: 1.7092, 0.75: 1.9}, {0.25: 0.9, 0.75: 0.95}), [0.25, 0.75])
    assert table.loc[("MAE vs flat fill at 25%", "all"), "verdict"] == "higher error"
    assert table.loc[("MAE error at 25% vs at 75%", "all"), "verdict"] == \
        "not judged: the model does not beat the flat fill at both ratios"
    assert table.loc[("MAE vs flat fill at 25%", "all"), "method"] == \
        "t (7 df) over 8 images; not in it: pretraining runs (one run)"


def test_a_reconstruction_that_beats_the_flat_fill_compares_its_ratios():
    table = _verdicts(_per_image({0.25: 0.30, 0.9: 0.60}, {0.25: 0.90, 0.9: 0.95}), [0.25, 0.9])
    assert table.loc[("MAE vs flat fill at 25%", "all"), "verdict"] == "lower error"
    assert table.loc[("MAE error at 25% vs at 90%", "all"), "verdict"] == "lower error"
    close = _verdicts(_per_image({0.25: 0.30, 0.9: 0.305}, {0.25: 0.90, 0.9: 0.95}, noise=0.05), [0.25, 0.9])
    assert close.loc[("MAE error at 25% vs at 90%", "all"), "verdict"] == stats.NO_CLEAR
    smoke = _verdicts(_per_image({0.25: 0.30, 0.9: 0.60}, {0.25: 0.90, 0.9: 0.95}), [0.25, 0.9], "smoke")
    assert set(smoke.verdict) == {stats.TOO_SMALL}


def test_one_checkpoint_is_a_student_t_over_images():
    rows = pd.DataFrame(dict(image=range(4), mse=[1.0, 2.0, 3.0, 4.0], baseline_mse=0.0))
    d = reconstruction.paired_error(rows, "mse", "baseline_mse")
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert d.mean == pytest.approx(2.5) and d.n_seeds == 4
    assert (d.low, d.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert np.isnan(reconstruction.paired_error(rows.head(1), "mse", "baseline_mse").low)


def test_pretraining_runs_that_disagree_widen_the_interval_and_are_named():
    one = _per_image({0.25: 0.30}, {0.25: 0.40}, n=8, noise=0.01)
    runs = pd.concat([one.assign(pretrain_run=f"run {k}", mse=one.mse + shift)
                      for k, shift in enumerate([-0.06, 0.0, 0.06], start=1)], ignore_index=True)
    first = _verdicts(one, [0.25]).loc[("MAE vs flat fill at 25%", "all")]
    pooled = _verdicts(runs, [0.25]).loc[("MAE vs flat fill at 25%", "all")]
    assert first["verdict"] == "lower error" and pooled["n"] == 8
    assert pooled["high"] - pooled["low"] > 5 * (first["high"] - first["low"])  # the runs' spread is in it
    assert pooled["method"].startswith("t (") and "3 pretraining runs + 8 images" in pooled["method"]
    assert "not in it" not in pooled["method"]
    sweep = reconstruction.summarize_sweep(runs.assign(inpaint_mse=0.5))
    assert sweep.loc[sweep.anatomy == "all", "n_images"].item() == 8
