"""Notebook 05's two selection switches at their non-default values (issue 27, "the paper, literally"):
select_per="dataset" (one sweep config per model and dataset, the best mean validation score over the
folds) and mmotu_selection="all" (MMOTU-2D trains on its whole official training list, no validation:
every epoch runs, the last is tested, the first config of the grid)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from usfmae_lib import UsfmaeError, classifiers, cli, parameters, runner
from usfmae_lib import finetune as ft
from usfmae_lib.datasets import cap_split, load_split

TINY = ["--img-size", "32", "--seeds", "1", "--weight-decay", "0.01", "--batch-size", "16", "--bootstrap", "20",
        "--device", "cpu", "--model", "scratch", "--mae-config", "mae_vit_tiny_patch16_dec128d2b"]


def _sweep(scores):
    """A sweep table as select_config returns it: one row per config in grid order."""
    return pd.DataFrame([{"val_balanced_accuracy": s, "val_f1": 0.0, "val_loss": 1.0} for s in scores])


def test_select_per_dataset_chooses_one_config_by_the_mean_over_folds():
    grid = ft.sweep_configs(ft.TrainConfig(epochs=1, img_size=32), [3e-4, 1e-3], [0.01], [16])
    # fold 1 prefers lr 3e-4, fold 2 lr 1e-3; the mean over folds prefers 1e-3 (0.55 > 0.5)
    sweeps = {("bus-bra", 1, "scratch", None): _sweep([0.9, 0.5]), ("bus-bra", 2, "scratch", None): _sweep([0.1, 0.6]),
              ("bus-bra", 1, "usf-mae", None): _sweep([0.7, 0.7]), ("bus-bra", 2, "usf-mae", None): _sweep([0.7, 0.7])}
    per_fold = ft.choose_configs(sweeps, {"bus-bra": grid}, "fold")
    assert per_fold[("bus-bra", 1, "scratch", None)].lr == 3e-4 and per_fold[("bus-bra", 2, "scratch", None)].lr == 1e-3
    per_dataset = ft.choose_configs(sweeps, {"bus-bra": grid}, "dataset")
    assert per_dataset[("bus-bra", 1, "scratch", None)].lr == per_dataset[("bus-bra", 2, "scratch", None)].lr == 1e-3
    assert {per_dataset[("bus-bra", k, "usf-mae", None)].lr for k in (1, 2)} == {3e-4}  # a tie: the first in grid order
    index, means = ft.best_over_folds(grid, [sweeps[("bus-bra", k, "scratch", None)] for k in (1, 2)])
    assert index == 1 and means.tolist() == pytest.approx([0.5, 0.55])
    assert ft.selection("dataset", "balanced_accuracy", 5, 8)["selected_per"] == "dataset"
    with pytest.raises(UsfmaeError, match="select_per must be one of 'fold', 'dataset'"):
        ft.choose_configs(sweeps, {"bus-bra": grid}, "model")


def test_select_per_dataset_runs_every_fold_with_the_config_of_the_best_mean_validation_score(synth_eval, tmp_path):
    """The command's one-cell form (notebook 05 calls the same choose_configs): two folds, two configs."""
    out = tmp_path / "out"
    assert cli.main(["finetune", "--dataset", "bus-bra", "--root", str(synth_eval / "BUSBRA"), "--out", str(out), *TINY,
                     "--epochs", "1", "--lr", "3e-4", "1e-3", "--fold", "1", "2", "--select-per", "dataset"]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert sorted(rows["fold"]) == [1, 2] and rows["selected"].nunique() == 1
    assert set(rows["selected_per"]) == {"dataset"} and rows["selected_by"].str.contains("over the dataset's 2 fold").all()
    # the sweep's seed-0 runs on both folds: the chosen tag has the best mean validation balanced accuracy
    tags = [f"lr{lr:g}_wd0.01_bs16_ep1_px32_token" for lr in (3e-4, 1e-3)]
    score = {tag: np.mean([json.loads((out / "runs" / "bus-bra" / f"fold{k}" / "scratch" / "finetune" / tag /
                                       "seed0_frac1" / "metrics.json").read_text())["row"]["val_balanced_accuracy"]
                           for k in (1, 2)]) for tag in tags}
    assert rows["selected"].iloc[0] == tags[int(np.argmax([score[t] for t in tags]))]  # argmax: ties go to the first
    assert set(rows["lr"]) == {float(rows["selected"].iloc[0][2:].split("_")[0])}  # the seeds ran that config


def test_mmotu_all_trains_on_every_official_training_image_and_tests_the_last_epoch(synth_eval, tmp_path, monkeypatch):
    root = synth_eval / "OTU_2d"
    official = [line.split()[0] for line in (root / "train_cls.txt").read_text().splitlines() if line.strip()]
    split = load_split("mmotu-2d", root, val_fraction=0)
    assert sorted(Path(p).name for p in split.train["path"]) == sorted(official) and split.val.empty
    assert "no validation part" in split.split and len(load_split("mmotu-2d", root).val) > 0  # the default carves
    out = tmp_path / "out"
    assert cli.main(["finetune", "--dataset", "mmotu-2d", "--root", str(root), "--out", str(out), *TINY,
                     "--epochs", "2", "--lr", "1e-3", "3e-4", "--mmotu-selection", "all", "--probe"]) == 0
    rows = pd.read_csv(out / "results.csv")
    run = rows[rows["mode"] == "finetune"].iloc[0]
    assert run["n_train"] == len(official) and run["n_val"] == 0
    assert run["epochs_run"] == 2 and run["best_epoch"] == 1 and np.isnan(run["val_balanced_accuracy"])  # fixed schedule
    assert run["lr"] == 1e-3 and run["selected_per"] == "none" and "no validation set" in run["selected_by"]  # first config
    assert run["run"].startswith("mmotu-2d_no_validation/")  # never replaces a run of the carved split
    assert len(pd.read_csv(out / "runs" / run["run"] / "history.csv")) == 2
    probe = rows[rows["mode"] == "probe"].iloc[0]
    assert probe["probe_C"] == 0.01 and np.isnan(probe["val_balanced_accuracy"])  # the first C of its grid
    # the tested model is the last epoch's: the weights train() leaves are those after its last optimiser step
    data = ft.prepare_data(cap_split(split, 16), 32)
    model, _, _ = classifiers.build_classifier("scratch", len(split.classes), 32, mae_config="mae_vit_tiny_patch16_dec128d2b")
    last = {}
    make = ft.make_optimiser

    def snapshotting(model, cfg):
        optimiser = make(model, cfg)
        optimiser.register_step_post_hook(lambda *_: last.update({k: v.clone() for k, v in model.state_dict().items()}))
        return optimiser

    cfg = ft.fixed_schedule(ft.sweep_configs(ft.TrainConfig(epochs=3, patience=5, batch_size=8, img_size=32),
                                             [1e-3, 3e-4], [0.01], [8]))
    assert len(cfg) == 1 and cfg[0].patience == 0 and cfg[0].lr == 1e-3
    monkeypatch.setattr(ft, "make_optimiser", snapshotting)
    result = ft.train(model, data, cfg[0], seed=0, log=None)
    assert result["epochs_run"] == 3 and result["best_epoch"] == 2
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())


def test_without_validation_what_cannot_work_says_which_parameter_and_the_fix(synth_eval):
    data = ft.prepare_data(cap_split(load_split("mmotu-2d", synth_eval / "OTU_2d", val_fraction=0), 8), 32)
    model, _, _ = classifiers.build_classifier("scratch", 8, 32, mae_config="mae_vit_tiny_patch16_dec128d2b")
    with pytest.raises(UsfmaeError, match=r"patience = 5 \(early stopping\) needs a validation set.*set patience to 0"):
        ft.train(model, data, ft.TrainConfig(epochs=1, patience=5, img_size=32), seed=0, log=None)
    two = ft.sweep_configs(ft.TrainConfig(epochs=1, patience=0, img_size=32), [3e-4, 1e-3], [0.01], [8])
    with pytest.raises(UsfmaeError, match="no validation set to choose among 2 configs.*fixed_schedule"):
        ft.select_config(data, "scratch", two, "unused")
    with pytest.raises(UsfmaeError, match="mmotu_selection must be one of 'carve', 'all'"):
        ft.check_choice("mmotu_selection", "none", ft.MMOTU_SELECTION)
    with pytest.raises(UsfmaeError, match="val_fraction must be in \\(0, 1\\) for gist514"):
        load_split("gist514", synth_eval / "usd514_jpeg_roi", val_fraction=0)


def test_defaults_keep_todays_selection_and_the_paper_profiles_follow_the_text():
    notebook = runner.read_notebook(parameters.NOTEBOOKS_DIR / "05_finetuning.py")
    defaults = parameters.notebook_parameters(notebook, "05_finetuning")
    assert defaults["select_per"] == "fold" and defaults["mmotu_selection"] == "carve"
    for profile in ("paper", "official"):
        text = (parameters.PARAMS_DIR / profile / "05_finetuning.yaml").read_text()
        params = yaml.safe_load(text)
        assert params["select_per"] == "dataset" and params["mmotu_selection"] == "all", profile
        assert "for each model and dataset" in text and "1000 images for training and 469 for validation" in text
    assert "releases no fine-tuning code" in (parameters.PARAMS_DIR / "official" / "05_finetuning.yaml").read_text()
    quick = yaml.safe_load((parameters.PARAMS_DIR / "quick" / "05_finetuning.yaml").read_text())
    assert quick["select_per"] == "fold" and quick["mmotu_selection"] == "carve"  # docs/verdicts/quick.csv's
