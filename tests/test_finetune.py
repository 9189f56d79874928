"""Fine-tuning and Table 2: weights really loaded, honest init, resumable runs, CLI end to end."""
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from usfmae_lib import UsfmaeError, classifiers, cli, mae, pretrain
from usfmae_lib import finetune as ft
from usfmae_lib import results as res
from usfmae_lib.datasets import load_split

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MAE checkpoint as notebook 03 writes it (untrained: the weights only need to be known)."""
    torch.manual_seed(0)
    model = mae.build_model(mae.CPU_CONFIG, img_size=32, depth=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "params": {"model": mae.CPU_CONFIG, "img_size": 32, "model_overrides": {"depth": 2}}},
               path)
    return path, state


def count_optimiser_steps(monkeypatch) -> list:
    """A list that gains an item at every optimiser step fine-tuning takes (not at a skipped one)."""
    steps = []
    make = ft.make_optimiser

    def counting(model, cfg):
        optimiser = make(model, cfg)
        optimiser.register_step_pre_hook(lambda *_: steps.append(1))
        return optimiser

    monkeypatch.setattr(ft, "make_optimiser", counting)
    return steps


@pytest.fixture(scope="module")
def tiny_data(clean_tree):
    split = load_split("folder", clean_tree, positive="busi", seed=0)
    return ft.prepare_data(split, 32)


def test_usf_mae_model_receives_the_mae_encoder_weights(checkpoint):
    path, state = checkpoint
    model, init, _ = classifiers.build_classifier("usf-mae", 3, 32, checkpoint=path)
    got = model.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "pos_embed", "cls_token", "patch_embed.proj.weight", "norm.weight"):
        assert torch.equal(got[key], state[key]), key
    assert init == f"usf-mae: {path}"
    # global average pooling: the encoder's final norm becomes fc_norm
    avg, _, _ = classifiers.build_classifier("usf-mae", 3, 32, checkpoint=path, pool="avg")
    assert torch.equal(avg.state_dict()["fc_norm.weight"], state["norm.weight"])
    # another input size: position table resized, blocks unchanged
    big, _, _ = classifiers.build_classifier("usf-mae", 3, 64, checkpoint=path)
    assert big.pos_embed.shape[1] == 1 + 16 and torch.equal(big.state_dict()["blocks.0.mlp.fc1.weight"],
                                                            state["blocks.0.mlp.fc1.weight"])
    # the control: same architecture, not the MAE weights
    scratch, init, _ = classifiers.build_classifier("scratch", 3, 32, checkpoint=path)
    assert init == f"random (scratch control, {mae.CPU_CONFIG}, depth=2)"  # the checkpoint's overrides are named
    assert not torch.equal(scratch.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UsfmaeError, match="needs --checkpoint"):
        classifiers.build_classifier("usf-mae", 2, 32)
    with pytest.raises(UsfmaeError, match="ultrasam needs --checkpoint"):
        classifiers.build_classifier("ultrasam", 2, 32)
    with pytest.raises(UsfmaeError, match="does not exist"):
        classifiers.build_classifier("resnet-50", 2, 32, weights=tmp_path / "nope.pth")


def test_init_column_is_honest_about_imagenet_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(classifiers, "find_imagenet_weights", lambda name: None)  # an empty cache
    model, init, _ = classifiers.build_classifier("resnet-50", 2, 32)
    assert init.startswith("random: no ImageNet weights found") and classifiers.TIMM_NAMES["resnet-50"] in init
    assert "WARNING" in capsys.readouterr().out
    # a local file of weights is used, and said so
    torch.manual_seed(1)
    reference = model.state_dict()
    path = tmp_path / "resnet-50.pth"
    torch.save({k: v for k, v in reference.items() if not k.startswith("fc.")}, path)
    loaded, init, _ = classifiers.build_classifier("resnet-50", 2, 32, weights=path)
    assert init == f"imagenet-1k resnet50.tv_in1k (file: {path}, taken to hold resnet50.tv_in1k)"
    assert torch.equal(loaded.state_dict()["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])


def test_sam_encoder_from_an_mmdet_layout_checkpoint(tmp_path):
    from timm.models.vision_transformer_sam import VisionTransformerSAM
    kw = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=2,
              use_rel_pos=True, neck_chans=16, num_classes=2)
    source = VisionTransformerSAM(img_size=64, **kw)
    mm = {}
    for k, v in source.state_dict().items():  # timm -> mmdet/UltraSam names
        if k.startswith("head."):
            continue
        k = (k.replace("patch_embed.proj", "patch_embed.projection").replace("blocks.", "layers.")
             .replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
             .replace(".mlp.fc2.", ".ffn.layers.1."))
        mm["backbone." + k] = v
    mm["decoder.layers.0.norm1.weight"] = torch.zeros(3)  # mask decoder: ignored
    path = tmp_path / "UltraSam.pth"
    torch.save({"state_dict": mm}, path)
    target = classifiers.load_sam_encoder(VisionTransformerSAM(img_size=32, **kw), path)  # another size: tables resized
    assert torch.equal(target.state_dict()["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
    assert target.pos_embed.shape[1:3] == (2, 2)
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, path)
    with pytest.raises(UsfmaeError, match="not a SAM ViT-B image encoder"):
        classifiers.load_sam_encoder(VisionTransformerSAM(img_size=32, **kw), path)


def test_label_subsample_is_stratified_with_one_per_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx = ft.subsample_labels(labels, 0.1, seed=0)
    counts = np.bincount(labels[idx].numpy(), minlength=3)
    assert counts.tolist() == [5, 3, 1]
    assert len(set(idx)) == len(idx)
    assert (ft.subsample_labels(labels, 1.0, 0) == np.arange(len(labels))).all()


def test_runs_resume_and_rerun_when_the_config_changes(tiny_data, checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    cfg = ft.TrainConfig(epochs=1, batch_size=16, img_size=32)
    kw = dict(checkpoint=path, n_bootstrap=20, log=None)
    row = ft.finetune_run(tiny_data, "usf-mae", cfg, 0, tmp_path, **kw)
    run = tmp_path / row["run"]  # relative to the runs folder, so outputs can move
    assert (run / "metrics.json").exists() and (run / "test_predictions.csv").exists()
    preds = pd.read_csv(run / "test_predictions.csv")
    assert len(preds) == len(tiny_data.split.test) and {"label", "pred", "prob_busi"} <= set(preds.columns)
    for key in ("precision", "recall", "f1", "accuracy", "balanced_accuracy", "roc_auc"):
        assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"] or np.isnan(row[key])

    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(ft, "train", must_not_train)
    again = ft.finetune_run(tiny_data, "usf-mae", cfg, 0, tmp_path, **kw)
    assert again == row
    with pytest.raises(AssertionError, match="trained again"):  # another config is another run
        ft.finetune_run(tiny_data, "usf-mae", ft.TrainConfig(epochs=1, batch_size=16, img_size=32, lr=3e-4),
                        0, tmp_path, **kw)


def test_cli_runs_end_to_end_on_a_real_folder(real, tmp_path, capsys):
    rc = cli.main(["finetune", "--dataset", "folder", "--root", str(real("busi_sample")), "--model", "scratch", "--img-size", "32",
                   "--epochs", "1", "--lr", "1e-3", "--weight-decay", "0.01", "--batch-size", "16", "--seeds", "1",
                   "--bootstrap", "30", "--positive", "malignant", "--probe", "--out", str(tmp_path)])
    assert rc == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table["mode"]) == ["finetune", "probe"]
    for m in ("precision", "recall", "f1", "accuracy", "balanced_accuracy", "roc_auc"):
        assert table[[m, f"{m}_low", f"{m}_high"]].notna().all().all(), m
    out = capsys.readouterr().out
    assert "init: random (scratch control" in out and "roc_auc" in out
    assert cli.main(["finetune", "--dataset", "bus-bra", "--root", str(tmp_path / "nowhere"), "--model", "scratch"]) == 2


def _fake_results(models=("scratch", "usf-mae", "resnet-50")):
    rng = np.random.default_rng(0)
    rows = []
    for d in ("bus-bra", "mmotu-2d", "gist514"):
        for i, m in enumerate(models):
            for s in range(2):
                r = dict(dataset=d, model=m, mode="finetune", fraction=1.0, seed=s, n_classes=7 if d == "mmotu-2d" else 2,
                         init="random: no ImageNet weights found" if m == "resnet-50" else f"{m} init")
                for k in (*res.METRICS, "balanced_accuracy") + (("f1_macro",) if d == "mmotu-2d" else ()):
                    v = 0.5 + 0.1 * i + 0.01 * rng.random()
                    r.update({k: v, f"{k}_low": v - 0.1, f"{k}_high": v + 0.1})
                rows.append(r)
    return pd.DataFrame(rows)


def test_table2_files_hold_ours_and_the_papers_numbers(tmp_path):
    results = _fake_results()
    paths = res.write_table2(results, tmp_path)
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    long = pd.read_csv(paths["csv"])
    for text in (md, tex):
        assert "81.6" in text and "87.5" in text  # the paper's USF-MAE and UltraSam F1 on BUS-BRA
        assert "random: no ImageNet weights found" in text
    assert "**" in md and r"\textbf" in tex
    row = long[(long["model"] == "usf-mae") & (long["dataset"] == "bus-bra") & (long["metric"] == "f1")].iloc[0]
    assert row["paper"] == 81.6 and row["n_seeds"] == 2
    assert row["mean"] == pytest.approx(100 * results.query("model == 'usf-mae' and dataset == 'bus-bra'")["f1"].mean(), abs=0.01)
    best = long[long["best"]]
    # resnet-50 scores highest but from random init; scratch is near one class on the binary sets: on
    # MMOTU-2D (7 classes) USF-MAE leads scratch by 10 points, far more than their sd; elsewhere no peer
    assert set(best["model"]) == {"usf-mae"} and set(best["dataset"]) == {"mmotu-2d"}
    lines = res.discussion(results, synthetic=True)
    assert any("synthetic" in s for s in lines) and any("resnet-50" in s and "random init" in s for s in lines)
    assert any(s.startswith("BUS-BRA: USF-MAE vs the same architecture from scratch on F1: one-class (")
               and "near a one-class predictor" in s for s in lines)
    one_class = [s for s in lines if s.startswith("Near a one-class predictor")]  # fake scratch: balanced acc. ~0.5
    assert len(one_class) == 1 and "from scratch on BUS-BRA" in one_class[0] and "from scratch on GIST514" in one_class[0]
    assert "USF-MAE on" not in one_class[0] and "MMOTU" not in one_class[0]  # 7 classes: 50% is far above one-class
    older = results.drop(columns="n_classes")  # rows stored before n_classes: binary = no macro scores
    assert [s for s in res.discussion(older) if s.startswith("Near a one-class")] == one_class


@pytest.mark.parametrize("select_on", ["balanced_accuracy", "loss"])
def test_the_kept_epoch_is_the_best_by_the_chosen_validation_score(tiny_data, checkpoint, select_on):
    path, _ = checkpoint
    torch.manual_seed(0)
    model, _, _ = classifiers.build_classifier("usf-mae", len(tiny_data.split.classes), 32, checkpoint=path)
    cfg = ft.TrainConfig(epochs=4, patience=0, batch_size=16, img_size=32, select_on=select_on)
    result = ft.train(classifiers.add_head_norm(model), tiny_data, cfg, seed=0, positive=tiny_data.split.positive, log=None)
    history = pd.DataFrame(result["history"])
    scores = -history["val_loss"] if select_on == "loss" else history[f"val_{select_on}"]
    assert result["best_epoch"] in history.index[scores == scores.max()]
    # the kept weights are that epoch's: scoring them again gives its validation loss
    prob = ft.predict(model, tiny_data.images["val"], torch.device("cpu"))
    val_loss = float(torch.nn.functional.nll_loss(torch.log(torch.from_numpy(prob)), tiny_data.labels["val"]))
    assert val_loss == pytest.approx(history["val_loss"][result["best_epoch"]], rel=1e-5)
    with pytest.raises(UsfmaeError, match="select_on"):
        ft.TrainConfig(select_on="accuracy")


def test_head_norm_standardises_what_the_head_sees_for_every_timm_family():
    import timm
    for name in ("resnet18", "vgg11_bn", "vit_tiny_patch16_224"):
        model = classifiers.add_head_norm(timm.create_model(name, num_classes=3, img_size=64) if "vit" in name
                                 else timm.create_model(name, num_classes=3))
        norm, linear = model.get_classifier()
        seen = []
        norm.register_forward_hook(lambda m, i, o: seen.append(o))
        model.train()
        logits = model(torch.randn(8, 3, 64, 64) * 3 + 5)
        assert logits.shape == (8, 3) and linear.out_features == 3
        std = seen[0].std(0, unbiased=False)  # 1, less for features (near) constant over the batch (dead ReLUs)
        assert seen[0].mean(0).abs().max() < 1e-4 and std.max() < 1 + 1e-3
        assert ((std - 1).abs() < 1e-2).float().mean() > 0.5


def test_layer_decay_gives_lower_blocks_smaller_learning_rates(checkpoint):
    path, _ = checkpoint
    model, _, _ = classifiers.build_classifier("usf-mae", 2, 32, checkpoint=path)  # depth 2
    opt = ft.make_optimiser(model, ft.TrainConfig(lr=1e-3, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["blocks.1.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(named["patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.125)
    plain = ft.make_optimiser(model, ft.TrainConfig(lr=1e-3))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


# ---------------------------------------------------------------------------- max_steps, max_images (the dry run)
def test_max_steps_stops_training_validates_that_epoch_and_keeps_the_best(tiny_data, checkpoint, monkeypatch):
    path, _ = checkpoint
    steps = count_optimiser_steps(monkeypatch)
    torch.manual_seed(0)
    model, _, _ = classifiers.build_classifier("usf-mae", len(tiny_data.split.classes), 32, checkpoint=path)
    per_epoch = len(tiny_data.split.train) // 8
    cfg = ft.TrainConfig(epochs=5, patience=0, batch_size=8, img_size=32, max_steps=per_epoch + 1)
    result = ft.train(model, tiny_data, cfg, seed=0, positive=tiny_data.split.positive, log=None)
    assert len(steps) == per_epoch + 1 == result["steps_run"]  # stops inside the second epoch
    history = pd.DataFrame(result["history"])
    assert history["steps"].tolist() == [per_epoch, per_epoch + 1] and result["epochs_run"] == 2
    assert result["best_epoch"] in history.index and history["val_loss"].notna().all()  # the cut epoch is validated


def test_fine_tuning_follows_the_pretraining_warmup_cosine(tiny_data, checkpoint, monkeypatch):
    """One schedule for both trainings (pretrain.lr_factor, the reference MAE's): each step's lr is
    the peak times lr_factor, from 0 at the first step, up over the warmup, down a half cosine."""
    path, _ = checkpoint
    lrs = []
    make = ft.make_optimiser

    def recording(model, cfg):
        optimiser = make(model, cfg)
        optimiser.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
        return optimiser

    monkeypatch.setattr(ft, "make_optimiser", recording)
    torch.manual_seed(0)
    model, _, _ = classifiers.build_classifier("usf-mae", len(tiny_data.split.classes), 32, checkpoint=path)
    cfg = ft.TrainConfig(epochs=4, patience=0, batch_size=8, img_size=32, lr=1e-3, warmup_fraction=0.25)
    ft.train(model, tiny_data, cfg, seed=0, positive=tiny_data.split.positive, log=None)
    total = len(lrs)
    warmup = max(1, int(0.25 * total))
    np.testing.assert_allclose(lrs, [1e-3 * pretrain.lr_factor(s, warmup, total) for s in range(total)], atol=1e-12)
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-3)


def test_the_probe_picks_c_on_validation_balanced_accuracy_like_fine_tuning():
    """On an imbalanced validation set F1 of the positive class and balanced accuracy can rank the C
    grid differently; the probe takes the C of the best balanced accuracy (ties: the first)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)  # a draw where the two scores prefer different C (0.1 vs 1)
    y_train, y_val = rng.random(300) < 0.3, rng.random(200) < 0.3  # few positives
    x_train = rng.normal(size=(300, 40)) + 0.6 * y_train[:, None] * (np.arange(40) < 3)
    x_val = rng.normal(size=(200, 40)) + 0.6 * y_val[:, None] * (np.arange(40) < 3)
    cs = (0.001, 0.01, 0.1, 1.0, 10.0)
    score, c, _ = ft.fit_probe(x_train, y_train.astype(int), x_val, y_val.astype(int), 2, 1, seed=0, cs=cs)
    bacc, f1 = [], []
    for candidate in cs:
        pred = make_pipeline(StandardScaler(), LogisticRegression(C=candidate, max_iter=2000, random_state=0)).fit(
            x_train, y_train.astype(int)).predict(x_val)
        bacc.append(balanced_accuracy_score(y_val, pred))
        f1.append(f1_score(y_val, pred, zero_division=0))
    assert c == cs[int(np.argmax(bacc))] and score == pytest.approx(max(bacc))
    assert np.argmax(bacc) != np.argmax(f1)  # so choosing on F1 would fail this test


def test_max_steps_is_part_of_the_run_identity_but_leaves_existing_names_alone(tiny_data, checkpoint, tmp_path):
    cfg = ft.TrainConfig(epochs=1, batch_size=16, img_size=32)
    assert "max" not in cfg.tag() and "max_steps" not in cfg.identity()  # runs made before max_steps: same folder, reused
    cut = ft.TrainConfig(epochs=1, batch_size=16, img_size=32, max_steps=1)
    assert cut.tag() == cfg.tag() + "_max1steps" and cut.identity()["max_steps"] == 1
    row = ft.finetune_run(tiny_data, "scratch", cut, 0, tmp_path, checkpoint=checkpoint[0], n_bootstrap=10, log=None)
    assert row["max_steps"] == 1 and row["steps_run"] == 1 and row["run"].split("/")[4].endswith("_max1steps")
    with pytest.raises(UsfmaeError, match="max_steps"):
        ft.TrainConfig(max_steps=-1)


def test_the_sweep_picks_the_best_of_several_configs_on_validation(tiny_data, tmp_path, monkeypatch):
    """select_config over two configs (the profiles' grids have one; the paper's has eight)."""
    configs = ft.sweep_configs(ft.TrainConfig(epochs=1, img_size=32), [3e-4, 1e-3], [0.01], [16])
    scores = {3e-4: 0.5, 1e-3: 0.75}

    def fake_run(data, model_name, cfg, seed, runs, **kw):
        return {"val_balanced_accuracy": scores[cfg.lr], "val_f1": 0.0, "val_loss": 1.0, "lr": cfg.lr}

    monkeypatch.setattr(ft, "finetune_run", fake_run)
    chosen, table = ft.select_config(tiny_data, "scratch", configs, tmp_path)
    assert chosen.lr == 1e-3 and len(table) == 2
    scores[3e-4] = 0.75  # a tie: the first in grid order
    assert ft.select_config(tiny_data, "scratch", configs, tmp_path)[0].lr == 3e-4


def test_cap_split_keeps_a_few_images_per_part_and_every_class_it_can(real):
    from usfmae_lib.datasets import cap_split

    split = load_split("folder", real("busi_sample"), positive="malignant", seed=0)
    assert cap_split(split, 0) is split
    small = cap_split(split, 4, seed=1)
    for name, part in small.parts().items():
        full = split.parts()[name]
        assert len(part) == min(4, len(full)) and set(part["path"]) <= set(full["path"])
        assert part["label"].nunique() == min(4, full["label"].nunique())  # the classes in turn
    assert not set(small.train["group"]) & set(small.test["group"])
    assert "capped at 4 images per part" in small.split
    assert cap_split(split, 4, seed=1).test.equals(small.test)  # seeded
    with pytest.raises(UsfmaeError, match="max_images"):
        cap_split(split, -1)


def test_clean_eval_fine_tunes_on_cleaned_copies_in_runs_of_their_own(clean_tree, tmp_path, capsys):
    from usfmae_lib import preprocess

    split = load_split("folder", clean_tree, positive="busi", seed=0)
    cleaned = ft.remove_annotations(split, tmp_path / "cache")
    assert cleaned.images == "annotations removed" and cleaned.split.endswith("; annotations removed")
    for part, df in cleaned.parts().items():
        assert len(df) == len(split.parts()[part]) and list(df["label"]) == list(split.parts()[part]["label"])
        assert all(p.startswith(str(tmp_path / "cache")) and p.endswith(".png") for p in df["path"])
    first = cleaned.train["path"].iloc[0]
    assert preprocess.read_image(first).shape == (224, 224, 3)  # the pretraining corpus's size
    assert (tmp_path / "cache" / "report.csv").exists()
    from usfmae_lib.datasets import cap_split
    capped = cap_split(cleaned, 2)
    assert capped.images == "annotations removed" and capped.fold == cleaned.fold  # capping keeps what the split is

    args = ["finetune", "--dataset", "folder", "--root", str(clean_tree), "--positive", "busi", "--model", "scratch",
            "--mae-config", "mae_vit_tiny_patch16_dec128d2b", "--img-size", "32", "--epochs", "1", "--lr", "1e-3",
            "--weight-decay", "0.01", "--batch-size", "16", "--seeds", "1", "--bootstrap", "10",
            "--out", str(tmp_path / "out")]
    assert cli.main(args + ["--clean-eval"]) == 0
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(table["images"]) == {"annotations removed"}
    assert table["run"].str.startswith("folder_annotations_removed/fold0/").all()
    capsys.readouterr()
    assert cli.main(args) == 2  # as published into the same results.csv: refused, nothing mixed
    assert "Table 2 would average the two" in capsys.readouterr().err


def test_min_steps_gives_a_small_training_set_more_passes_per_epoch(tiny_data, checkpoint, tmp_path):
    """A label fraction's few images still get min_steps optimiser steps (several passes per epoch,
    the same number of epochs and validations), the full set one pass, and the knob names its own
    run folders."""
    base = ft.TrainConfig(epochs=2, patience=0, batch_size=4, img_size=32)
    cfg = ft.TrainConfig(epochs=2, patience=0, batch_size=4, img_size=32, min_steps=12)
    assert "min_steps" not in base.identity() and cfg.tag() == base.tag() + "_min12steps"
    assert cfg.passes_for(2) == 3 and cfg.passes_for(10) == 1 and base.passes_for(1) == 1
    row = ft.finetune_run(tiny_data, "scratch", cfg, 0, tmp_path, fraction=0.25, checkpoint=checkpoint[0],
                          n_bootstrap=10, log=None)
    per_epoch = max(1, row["n_train"] // 4)
    assert row["epochs_run"] == 2 and row["min_steps"] == 12
    assert row["steps_run"] == 2 * per_epoch * -(-12 // (2 * per_epoch)) >= 12
    with pytest.raises(UsfmaeError, match="min_steps"):
        ft.TrainConfig(min_steps=-1)


def test_every_cell_gets_min_runs_runs_whatever_its_number_of_folds():
    assert ft.seeds_per_fold(1, 5, 3) == 1  # five folds already give five runs
    assert ft.seeds_per_fold(1, 1, 3) == 3  # MMOTU-2D's one split: three seeds
    assert ft.seeds_per_fold(3, 1, 3) == 3 and ft.seeds_per_fold(2, 2, 5) == 3 and ft.seeds_per_fold(1, 1, 0) == 1


def test_a_small_roi_crop_of_an_evaluation_set_is_read_not_refused(tmp_path):
    """MIN_SIDE keeps icons out of the pretraining crawl; a 28 px wide ROI crop (GIST514-DB's crops
    are cut around the tumour) is a test image of the official split and is read, resized."""
    import cv2
    from usfmae_lib.curation_readers import Reject, read_image_file

    crop = (np.arange(28 * 37 * 3) % 251).astype(np.uint8).reshape(37, 28, 3)
    path = tmp_path / "usd_0001.jpg"
    cv2.imwrite(str(path), crop)
    with pytest.raises(Reject, match="too small"):
        read_image_file(path)  # curation's policy is unchanged
    assert ft.read_image(path, 64).shape == (64, 64, 3)


# ------------------------------------------------------------------------------ what a loop of runs prints
def test_a_warning_repeated_over_runs_is_said_once_with_its_count(capsys):
    with classifiers.warnings_once():
        for _ in range(5):
            classifiers.warn("vgg-19: no ImageNet weights")
        classifiers.warn("resnet-50: no ImageNet weights")
        assert capsys.readouterr().out == ""  # nothing while the loop runs
    assert capsys.readouterr().out.splitlines() == ["WARNING: vgg-19: no ImageNet weights [5 runs]",
                                                    "WARNING: resnet-50: no ImageNet weights"]
    classifiers.warn("outside: said at once")
    assert capsys.readouterr().out == "WARNING: outside: said at once\n"


def test_the_tally_counts_runs_trained_since_a_time_and_runs_reused(tmp_path):
    import os

    for name, age in (("a", 100), ("b", 100), ("c", 0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text("{}")
        stamp = time.time() - age
        os.utime(tmp_path / name / "metrics.json", (stamp, stamp))
    rows = pd.DataFrame(dict(run=["a", "b", "c", "c"]))  # c twice: a sweep's seed-0 run, again as seed 0
    assert ft.run_tally(rows, tmp_path, since=time.time() - 10) == "3 runs: 1 trained, 2 already finished, reused"


def test_no_reused_line_for_a_run_this_process_just_trained(tiny_data, checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    cfg = ft.TrainConfig(epochs=1, batch_size=16, img_size=32)
    said = []
    kw = dict(checkpoint=path, n_bootstrap=20, log=said.append)
    ft.finetune_run(tiny_data, "usf-mae", cfg, 0, tmp_path, **kw)
    said.clear()
    ft.finetune_run(tiny_data, "usf-mae", cfg, 0, tmp_path, **kw)  # the sweep's run, again as the cell's seed 0
    assert said == []
    monkeypatch.setattr(ft, "_trained_here", set())  # another process: a run found on disk is news
    ft.finetune_run(tiny_data, "usf-mae", cfg, 0, tmp_path, **kw)
    assert len(said) == 1 and said[0].startswith("already finished, reused: ")


def test_notebook_05_inputs_come_from_one_call(checkpoint, tmp_path, monkeypatch, capsys):
    """resolve_inputs: notebook 03's runs under out_dir (first run first), the weights_dir file of each model,
    the baselines without ImageNet weights left out under missing_weights="skip", a missing checkpoint an error."""
    monkeypatch.setattr(classifiers, "find_imagenet_weights", lambda name: None)  # an empty cache
    out = tmp_path / "out"
    first = out / "03_mae_pretraining" / "checkpoints" / "checkpoint-last.pth"
    second = out / "03_mae_pretraining" / "seed1" / "checkpoints" / "checkpoint-last.pth"
    for path in (first, second):
        path.parent.mkdir(parents=True)
        path.write_bytes(checkpoint[0].read_bytes())
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / "resnet-50.pth").write_bytes(b"")
    models, probes, runs, mae_checkpoint, size, checkpoints, weights = ft.resolve_inputs(
        out, ["usf-mae", "resnet-50", "vgg-19"], ["scratch", "vgg-19"], None, "sam.pth", weights_dir, "skip")
    assert (models, probes, runs, mae_checkpoint, size) == (["usf-mae", "resnet-50"], ["scratch"], [first, second], first, 32)
    assert checkpoints == {"usf-mae": first, "scratch": first, "ultrasam": "sam.pth"}
    assert weights == {"usf-mae": None, "resnet-50": weights_dir / "resnet-50.pth", "vgg-19": None}
    assert "skipped, no ImageNet weights here (missing_weights = 'skip'): vgg-19" in capsys.readouterr().out
    assert ft.resolve_inputs(out, ["vgg-19"], [], checkpoint[0]).models == ["vgg-19"]  # random: kept
    assert ft.resolve_inputs(tmp_path / "elsewhere", ["vgg-19"]).mae_size == 224  # no MAE model, no checkpoint needed
    with pytest.raises(UsfmaeError, match="run notebook 03"):
        ft.resolve_inputs(tmp_path / "elsewhere", ["vgg-19"], ["scratch"])
