"""Table 2 the way the paper computed it: every official fold, one folder per fold, rows that
accumulate over calls, and cells that are the mean over folds."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, cli
from usfmae_lib import finetune as ft
from usfmae_lib import results as res
from usfmae_lib.datasets import official_folds

BUSBRA = Path(__file__).resolve().parents[1].parent / "shared/data/real/busbra_sample/BUSBRA"
TINY = ["--img-size", "32", "--epochs", "1", "--seeds", "1", "--lr", "1e-3", "--weight-decay", "0.01",
        "--batch-size", "16", "--bootstrap", "20", "--device", "cpu"]
SCRATCH = ["--model", "scratch", "--mae-config", "mae_vit_tiny_patch16_dec128d2b"]


def test_official_folds_default_to_all_and_refuse_unknown_ones():
    assert official_folds("bus-bra") == [1, 2, 3, 4, 5]
    assert official_folds("gist514") == [0, 1, 2, 3, 4]
    assert official_folds("mmotu-2d") == [0] and official_folds("gist514", [3]) == [3]
    with pytest.raises(UsfmaeError, match="no fold 6"):
        official_folds("bus-bra", [6])


def _run(root, out, *extra):
    return cli.main(["finetune", "--dataset", "bus-bra", "--root", str(root), "--out", str(out), *TINY, *extra])


def _check_folds(root: Path, out: Path, model: str):
    rows = pd.read_csv(out / "results.csv")
    mine = rows[(rows["model"] == model) & (rows["mode"] == "finetune")]
    assert sorted(mine["fold"].unique()) == [1, 2, 3, 4, 5]
    assert mine["run"].is_unique and all(f"/fold{k}/" in f"/{r}" for k, r in zip(mine["fold"], mine["run"]))
    cv = pd.read_csv(root / "5-fold-cv.csv")
    for k, run in zip(mine["fold"], mine["run"]):  # each fold's test set is exactly its kFold rows
        tested = {Path(p).stem for p in pd.read_csv(out / "runs" / run / "test_predictions.csv")["path"]}
        assert tested == set(cv.loc[cv["kFold"] == k, "ID"])
    return rows


def test_cli_runs_every_fold_accumulates_and_table2_reads_the_folder(synth_eval, tmp_path, capsys):
    root, out = synth_eval / "BUSBRA", tmp_path / "runs"
    assert _run(root, out, *SCRATCH) == 0
    printed = capsys.readouterr().out
    assert "5 fold(s) x 1 seed(s); mean over folds" in printed and "sd of the single runs" in printed
    assert "95% interval of the mean (t (4 df) over 5 splits (Nadeau-Bengio corrected))" in printed
    rows = _check_folds(root, out, "scratch")
    assert len(rows) == 5
    assert _run(root, out, "--model", "resnet-50", "--probe", "--fold", "1", "2") == 0  # another model, two folds
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 5 + 2 + 2 and set(rows["model"]) == {"scratch", "resnet-50"}
    assert _run(root, out, *SCRATCH) == 0  # the same call again: reused, replaced, not duplicated
    assert len(pd.read_csv(out / "results.csv")) == 9
    runs = res.load_runs(out)  # a folder of CLI runs, without notebook 05's probe.csv or setup.json
    assert len(runs.results) == 7 and len(runs.probe) == 2 and runs.label_curve.empty and runs.setup == {}
    table = res.to_markdown(res.table2_long(runs.results))
    assert "ours (5 folds x 1 seed)" in table and "ours (2 folds x 1 seed), RANDOM INIT" in table
    assert "quoted from UltraSam's paper, not rerun" in table and "is 76.1, the row says 73.5" in table


@pytest.mark.skipif(not BUSBRA.is_dir(), reason="needs the real BUS-BRA sample in ../shared/data/real (absent here)")
def test_cli_on_real_busbra_runs_all_five_official_folds(tmp_path):
    out = tmp_path / "runs"
    assert _run(BUSBRA, out, *SCRATCH) == 0
    _check_folds(BUSBRA, out, "scratch")


def test_a_cell_is_the_mean_over_folds_with_the_sd_of_its_runs_and_an_interval_of_the_mean():
    rows = pd.DataFrame(dict(fold=[1, 1, 2, 3], seed=[0, 1, 0, 0], f1=[0.2, 0.4, 0.5, 0.9]))
    cell = res.fold_summary(rows, "f1")
    assert cell["mean"] == pytest.approx(np.mean([0.3, 0.5, 0.9]))  # every fold weighs the same
    assert cell["sd"] == pytest.approx(np.std([0.2, 0.4, 0.5, 0.9], ddof=1))  # the single runs' spread
    assert (cell["n_folds"], cell["n_seeds"]) == (3, 2)
    assert cell["low"] < cell["mean"] < cell["high"] and "3 splits (Nadeau-Bengio corrected)" in cell["method"]
    one_fold = res.fold_summary(rows[rows["fold"] == 1], "f1")  # one split: the interval is over seeds
    assert one_fold["n_folds"] == 1 and "2 seeds" in one_fold["method"]
    single = res.fold_summary(rows.iloc[:1], "f1")
    assert np.isnan(single["sd"]) and np.isnan(single["low"])


def test_merge_results_replaces_the_same_run_and_keeps_the_others(tmp_path):
    path = tmp_path / "results.csv"
    ft.merge_results(path, pd.DataFrame(dict(run=["a", "b"], f1=[0.1, 0.2])))
    merged = ft.merge_results(path, pd.DataFrame(dict(run=["b", "c"], f1=[0.5, 0.6])))
    assert dict(zip(merged["run"], merged["f1"])) == {"a": 0.1, "b": 0.5, "c": 0.6}
    assert pd.read_csv(path).equals(merged)


def test_load_runs_names_a_folder_without_results(tmp_path):
    with pytest.raises(UsfmaeError, match="results.csv not found"):
        res.load_runs(tmp_path)


def test_a_row_says_how_many_runs_made_it_per_dataset_when_they_differ():
    """Quick: BUS-BRA and GIST514-DB 5 folds x 1 seed, MMOTU-2D (one split) 3 seeds: the row must not
    claim 5 folds x 3 seeds."""
    g = pd.DataFrame(dict(dataset=["bus-bra", "mmotu-2d", "gist514"], n_folds=[5, 1, 5], n_seeds=[1, 3, 1]))
    assert res._runs_text(g) == "BUS-BRA, GIST514-DB: 5 folds x 1 seed; MMOTU-2D: 3 seeds"
    assert res._runs_text(g.iloc[[0, 2]]) == "5 folds x 1 seed"
