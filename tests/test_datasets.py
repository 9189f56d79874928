"""Evaluation-set loaders on trees in each real layout, and the metrics of Table 2."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from usfmae_lib import UsfmaeError, curation, datasets, metrics

def test_busbra_folds_keep_patients_apart(synth_eval):
    for fold in range(1, 6):
        s = datasets.load_split("bus-bra", synth_eval / "BUSBRA", fold=fold)
        train, val, test = (set(df["group"]) for df in (s.train, s.val, s.test))
        assert not test & (train | val) and not train & val
        assert s.classes[s.positive] == "malignant"
    # every image is tested exactly once over the five folds
    tested = pd.concat([datasets.load_busbra(synth_eval / "BUSBRA", fold=k).test for k in range(1, 6)])
    assert tested["path"].is_unique
    assert len(tested) == len(pd.read_csv(synth_eval / "BUSBRA" / "bus_data.csv"))


def test_busbra_split_follows_the_cv_table(synth_eval):
    cv = pd.read_csv(synth_eval / "BUSBRA" / "5-fold-cv.csv")
    s = datasets.load_busbra(synth_eval / "BUSBRA", fold=2)
    ids = {name: {Path(p).stem for p in df["path"]} for name, df in s.parts().items()}
    assert ids["test"] == set(cv.loc[cv["kFold"] == 2, "ID"])
    assert ids["val"] == set(cv.loc[(cv["kFold"] != 2) & (cv["valid_2"] == 0), "ID"])
    assert ids["train"] == set(cv.loc[(cv["kFold"] != 2) & (cv["valid_2"] == 1), "ID"])


def test_busbra_patient_leak_is_refused(synth_eval, tmp_path):
    root = tmp_path / "BUSBRA"
    root.mkdir()
    (root / "Images").symlink_to(synth_eval / "BUSBRA" / "Images")
    info = pd.read_csv(synth_eval / "BUSBRA" / "bus_data.csv")
    cv = pd.read_csv(synth_eval / "BUSBRA" / "5-fold-cv.csv")
    case = info.groupby("Case").size().idxmax()  # a patient with several views
    first = info.index[info["Case"] == case][0]
    cv.loc[first, "kFold"] = 1 if cv.loc[first, "kFold"] != 1 else 2  # move one view to another fold
    info.to_csv(root / "bus_data.csv", index=False)
    cv.to_csv(root / "5-fold-cv.csv", index=False)
    with pytest.raises(UsfmaeError, match="appear in the test fold"):
        for fold in range(1, 6):
            datasets.load_busbra(root, fold=fold)


def test_mmotu_official_split(synth_eval):
    s = datasets.load_split("mmotu-2d", synth_eval / "OTU_2d", seed=0)
    n_train = len((synth_eval / "OTU_2d" / "train_cls.txt").read_text().split("\n")) - 1
    n_test = len((synth_eval / "OTU_2d" / "val_cls.txt").read_text().split("\n")) - 1
    assert len(s.train) + len(s.val) == n_train and len(s.test) == n_test
    assert s.positive is None and len(s.classes) == 8
    assert not set(s.train["path"]) & set(s.val["path"])
    # the validation part is seeded
    again = datasets.load_mmotu(synth_eval / "OTU_2d", seed=0)
    assert list(again.val["path"]) == list(s.val["path"])


def test_gist_split_uses_coco_labels(synth_eval):
    root = synth_eval / "usd514_jpeg_roi"
    s = datasets.load_split("gist514", root, fold=3)
    coco = json.loads((root / "annotations" / "val_anno_crop_split_3.json").read_text())
    cat = {i["id"]: i["file_name"] for i in coco["images"]}
    want = {cat[a["image_id"]]: a["category_id"] - 1 for a in coco["annotations"]}
    got = dict(zip((Path(p).name for p in s.test["path"]), s.test["label"]))
    assert got == want
    assert s.classes[s.positive] == "GIST"


@pytest.mark.parametrize("dataset,folder,remove,needle", [
    ("bus-bra", "BUSBRA", "5-fold-cv.csv", "5-fold-cv.csv"),
    ("bus-bra", "BUSBRA", "bus_data.csv", "bus_data.csv"),
    ("mmotu-2d", "OTU_2d", "val_cls.txt", "val_cls.txt"),
    ("gist514", "usd514_jpeg_roi", "annotations/val_anno_crop_split_0.json", "val_anno_crop_split_0.json"),
])
def test_partial_root_names_the_missing_file(synth_eval, tmp_path, dataset, folder, remove, needle):
    import shutil

    root = tmp_path / folder
    shutil.copytree(synth_eval / folder, root)
    (root / remove).unlink()
    with pytest.raises(UsfmaeError, match=needle):
        datasets.load_split(dataset, root)


def test_missing_image_is_named(synth_eval, tmp_path):
    import shutil

    root = tmp_path / "OTU_2d"
    shutil.copytree(synth_eval / "OTU_2d", root)
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(UsfmaeError, match=victim.name):
        datasets.load_mmotu(root)


def test_folder_dataset_on_real_busi(real):
    root = real("busi_sample")
    s = datasets.load_split("folder", root, seed=1, positive="malignant")
    assert s.classes == ["benign", "malignant", "normal"] and s.positive == 1
    n = sum(len(df) for df in s.parts().values())
    assert n == 60 and len(set(pd.concat(s.parts().values())["path"])) == 60
    assert (s.summary()["test"] == 4).all()  # 20 per class, 20% stratified
    with pytest.raises(UsfmaeError, match="not a folder"):
        datasets.load_folder(root / "nope")


# ---------------------------------------------------------------------------- folder datasets that cannot leak
def _add_busi_masks(root: Path) -> int:
    """BUSI as it ships: `x_mask.png` beside every image, `x_mask_1.png` beside some; plus the junk
    a copied folder collects (hidden files, a masks/ folder). Returns the number of mask files."""
    import cv2

    n = 0
    for i, image in enumerate(sorted(root.glob("*/*.png"))):
        mask = np.zeros((8, 8), np.uint8)
        cv2.imwrite(str(image.with_name(f"{image.stem}_mask.png")), mask)
        n += 1
        if i % 3 == 0:
            cv2.imwrite(str(image.with_name(f"{image.stem}_mask_1.png")), mask)
            n += 1
        if i == 0:
            (image.parent / "masks").mkdir()
            cv2.imwrite(str(image.parent / "masks" / image.name), mask)
            (image.parent / f"._{image.name}").write_bytes(b"\0\5\26\7")  # macOS resource fork
            (image.parent / ".DS_Store").write_bytes(b"\0")
    return n


def _relative_parts(split, root: Path) -> dict[str, set[str]]:
    return {name: {Path(p).relative_to(root).as_posix() for p in df["path"]} for name, df in split.parts().items()}


def _assert_masks_change_nothing(plain: Path, with_masks: Path, seed: int = 1):
    """Masks are never samples, every image is used once, and the split is the one without masks."""
    s = datasets.load_folder(with_masks, seed=seed)
    parts = _relative_parts(s, with_masks)
    samples = [p for part in parts.values() for p in part]
    images = sorted(p.relative_to(plain).as_posix() for p in plain.glob("*/*.png"))
    assert sorted(samples) == images  # each real image once, no mask, no hidden file
    assert not any(curation.is_mask_name(Path(p).stem) for p in samples)
    # an image's group is its stem, which its masks share: one group, one part
    groups = [set(df["group"]) for df in s.parts().values()]
    assert all(not a & b for i, a in enumerate(groups) for b in groups[i + 1:])
    assert {g for part in groups for g in part} == {p[:-len(".png")] for p in images}
    # the masks do not move a single image to another part
    assert parts == _relative_parts(datasets.load_folder(plain, seed=seed), plain)
    return s


def test_folder_on_busi_layout_never_takes_masks_as_images(real, tmp_path):
    import shutil

    plain = real("busi_sample")
    root = tmp_path / "busi"
    shutil.copytree(plain, root)
    n_masks = _add_busi_masks(root)
    s = _assert_masks_change_nothing(plain, root)
    assert f"{n_masks} mask/annotation files not used" in s.split  # the user sees what was left out


def _write_class_tree(root: Path, n_per_class=(12, 9, 15), seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    for c, n in zip(("benign", "malignant", "normal"), n_per_class):
        (root / c).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / c / f"{c} ({i + 1}).png"), rng.integers(0, 255, (16, 16), dtype=np.uint8))


def test_folder_on_generated_busi_layout_never_takes_masks_as_images(tmp_path):
    import shutil

    plain = tmp_path / "plain"
    _write_class_tree(plain)
    shutil.copytree(plain, tmp_path / "busi")
    _add_busi_masks(tmp_path / "busi")
    s = _assert_masks_change_nothing(plain, tmp_path / "busi")
    assert (s.summary() > 0).all().all()  # every class in every part


def test_folder_refuses_the_synthetic_root_and_official_datasets(synth_eval):
    with pytest.raises(UsfmaeError, match=r"synth\.json.*--dataset bus-bra --root \S*BUSBRA"):
        datasets.load_folder(synth_eval)
    for dataset, folder in datasets.SYNTHETIC_FOLDERS.items():
        with pytest.raises(UsfmaeError, match=f"use --dataset {dataset} --root"):
            datasets.load_folder(synth_eval / folder)


def test_folder_refuses_images_in_subfolders(tmp_path):
    import cv2

    img = np.zeros((8, 8), np.uint8)
    for rel in ("pretrain/breast/images/a.png", "pretrain/liver/images/b.png", "other/c.png", "other/d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), img)
    with pytest.raises(UsfmaeError, match=r"pretrain/ holds 0 image\(s\) directly and 2 in subfolders"):
        datasets.load_folder(tmp_path)


def test_folder_with_too_few_classes_or_images_names_the_counts(tmp_path):
    _write_class_tree(tmp_path / "two", n_per_class=(12, 3))
    with pytest.raises(UsfmaeError, match=r"\{'malignant': 3\} have fewer than 7 images"):
        datasets.load_folder(tmp_path / "two")
    _write_class_tree(tmp_path / "one", n_per_class=(12,))
    with pytest.raises(UsfmaeError, match=r"found 1 class folder\(s\) \{'benign': 12\}"):
        datasets.load_folder(tmp_path / "one")


# ---------------------------------------------------------------------------- official splits checked whole
def _busbra_copy(synth_eval, tmp_path):
    root = tmp_path / "BUSBRA"
    root.mkdir()
    (root / "Images").symlink_to(synth_eval / "BUSBRA" / "Images")
    (root / "bus_data.csv").symlink_to(synth_eval / "BUSBRA" / "bus_data.csv")
    return root, pd.read_csv(synth_eval / "BUSBRA" / "5-fold-cv.csv")


def test_busbra_patient_on_both_sides_of_validation_is_kept_whole(synth_eval, tmp_path):
    root, cv = _busbra_copy(synth_eval, tmp_path)
    cv = cv.merge(pd.read_csv(root / "bus_data.csv")[["ID", "Case"]], on="ID")
    views = cv[(cv["kFold"] != 1) & (cv["valid_1"] == 1)].groupby("Case")["ID"].apply(sorted)
    most = views[views.map(len) >= 2].iloc[0]  # will have most views in training
    tie = views[(views.map(len) == 2) & ~views.index.isin([views[views.map(len) >= 2].index[0]])].iloc[0]
    cv.loc[cv["ID"].isin([most[-1], tie[0]]), "valid_1"] = 0  # the official table marks images, not patients
    cv.drop(columns="Case").to_csv(root / "5-fold-cv.csv", index=False)
    s = datasets.load_busbra(root, fold=1)
    ids = {name: {Path(p).stem for p in df["path"]} for name, df in s.parts().items()}
    assert set(most) <= ids["train"]  # the side of most of its views (or, for two, of its first)
    assert set(tie) <= ids["val"]  # a tie follows the first view
    official_val = set(cv.loc[(cv["kFold"] != 1) & (cv["valid_1"] == 0), "ID"])
    assert ids["val"] == official_val - {most[-1]} | {tie[1]}
    assert "2 moved" in s.split


def test_real_busbra_folds_keep_every_patient_on_one_side(real):
    root = real("busbra_sample") / "BUSBRA"
    cv = pd.read_csv(root / "5-fold-cv.csv")
    for fold in range(1, 6):
        s = datasets.load_busbra(root, fold=fold)
        groups = {name: set(df["group"]) for name, df in s.parts().items()}
        assert not groups["train"] & groups["val"] and not groups["test"] & (groups["train"] | groups["val"])
        ids = {name: {Path(p).stem for p in df["path"]} for name, df in s.parts().items()}
        assert ids["test"] == set(cv.loc[cv["kFold"] == fold, "ID"])
        assert sum(len(v) for v in ids.values()) == len(cv)  # no image dropped


def test_real_mmotu_otu2d_is_read_with_its_official_lists(real):
    root = real("mmotu_otu2d_sample") / "OTU_2d"
    lists = {name: dict(line.split() for line in (root / f"{name}_cls.txt").read_text().splitlines() if line.strip())
             for name in ("train", "val")}
    s = datasets.load_split("mmotu-2d", root, val_fraction=0.25, seed=0)
    ids = {name: {Path(p).name for p in df["path"]} for name, df in s.parts().items()}
    assert ids["test"] == set(lists["val"])  # MMOTU's val_cls.txt is the test set
    assert ids["train"] | ids["val"] == set(lists["train"]) and not ids["train"] & ids["val"]
    labels = {Path(p).name: int(y) for df in s.parts().values() for p, y in zip(df["path"], df["label"])}
    assert labels == {k: int(v) for d in lists.values() for k, v in d.items()}  # the lists' labels, unchanged


@pytest.mark.parametrize("value", [2, None])
def test_busbra_bad_valid_mark_is_an_error_not_a_dropped_row(synth_eval, tmp_path, value):
    root, cv = _busbra_copy(synth_eval, tmp_path)
    victim = cv.index[cv["kFold"] != 1][0]
    cv["valid_1"] = cv["valid_1"].astype(object)
    cv.loc[victim, "valid_1"] = value
    cv.to_csv(root / "5-fold-cv.csv", index=False)
    row = f"{cv.loc[victim, 'ID']} ({'2' if value == 2 else 'empty'})"
    with pytest.raises(UsfmaeError, match=rf"5-fold-cv.csv: 1 row\(s\) .* valid_1 .*{re.escape(row)}"):
        datasets.load_busbra(root, fold=1)


def test_busbra_missing_test_fold_is_an_error(synth_eval, tmp_path):
    root, cv = _busbra_copy(synth_eval, tmp_path)
    cv["kFold"] = cv["kFold"].astype(object)
    cv.loc[3, "kFold"] = None
    cv.to_csv(root / "5-fold-cv.csv", index=False)
    with pytest.raises(UsfmaeError, match=rf"kFold that is missing .*{cv.loc[3, 'ID']} \(empty\)"):
        datasets.load_busbra(root, fold=2)


def test_mmotu_image_in_training_and_test_list_is_an_error(synth_eval, tmp_path):
    import shutil

    root = tmp_path / "OTU_2d"
    shutil.copytree(synth_eval / "OTU_2d", root)
    tested = (root / "val_cls.txt").read_text().splitlines()[0]
    with open(root / "train_cls.txt", "a") as f:
        f.write(tested + "\n")
    with pytest.raises(UsfmaeError, match=rf"both the training list .*train_cls.txt.*{tested.split()[0]}"):
        datasets.load_mmotu(root)
    # listed twice in one list with two labels: which one is right is not the loader's guess
    name, label = tested.split()
    (root / "val_cls.txt").write_text(f"{tested}\n{name} {(int(label) + 1) % 8}\n")
    with pytest.raises(UsfmaeError, match=rf"val_cls.txt lists 1 image\(s\) more than once with different labels"
                                          rf".*{name}"):
        datasets.load_mmotu(root)


def test_gist_image_in_training_and_test_annotations_is_an_error(synth_eval, tmp_path):
    import shutil

    root = tmp_path / "usd514_jpeg_roi"
    shutil.copytree(synth_eval / "usd514_jpeg_roi", root)
    ann = root / "annotations"
    train = json.loads((ann / "train_anno_crop_split_0.json").read_text())
    test = json.loads((ann / "val_anno_crop_split_0.json").read_text())
    image = dict(test["images"][0], id=10**6)
    train["images"].append(image)
    train["annotations"].append({"id": 10**6, "image_id": 10**6, "category_id": 1})
    (ann / "train_anno_crop_split_0.json").write_text(json.dumps(train))
    with pytest.raises(UsfmaeError, match=rf"both the training list .*{image['file_name']}"):
        datasets.load_gist514(root, fold=0)


def test_final_check_refuses_a_patient_in_two_parts(synth_eval):
    s = datasets.load_busbra(synth_eval / "BUSBRA", fold=1)
    leaked = s.train.iloc[[0]]
    with pytest.raises(UsfmaeError, match=rf"patient\(s\) in both train and test, e\.g\. {leaked['group'].iloc[0]}"):
        datasets._check_images(datasets.Split(s.dataset, s.split, s.classes, s.positive,
                                              s.train, s.val, pd.concat([s.test, leaked])))


def test_binary_metrics_match_sklearn_on_positive_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    prob1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    prob = np.stack([1 - prob1, prob1], 1)
    m = metrics.classification_metrics(y, prob, positive=1)
    pred = prob.argmax(1)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, prob1))
    # the other class as positive gives other numbers: the positive class matters
    assert metrics.classification_metrics(1 - y, prob[:, ::-1], positive=0)["f1"] == pytest.approx(m["f1"])


def test_multiclass_headline_is_micro_so_p_r_f_agree():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 8, 300)
    logits = rng.normal(size=(300, 8)) + 2 * np.eye(8)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = metrics.classification_metrics(y, prob)
    assert m["precision"] == pytest.approx(m["recall"]) == pytest.approx(m["f1"]) == pytest.approx(m["accuracy"])
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, prob.argmax(1), average="macro"))
    assert 0.5 < m["roc_auc"] <= 1


def test_bootstrap_interval_contains_point_and_narrows_with_more_data():
    rng = np.random.default_rng(2)

    def scores(n):
        y = rng.integers(0, 2, n)
        p1 = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)  # overlapping classes
        return y, np.stack([1 - p1, p1], 1)

    small = metrics.bootstrap_intervals(*scores(60), positive=1, n_resamples=300)
    large = metrics.bootstrap_intervals(*scores(1200), positive=1, n_resamples=300)
    for t in (small, large):
        assert (t["low"] <= t["value"] + 1e-12).all() and (t["value"] <= t["high"] + 1e-12).all()
    width = lambda t: (t["high"] - t["low"])["f1"]  # noqa: E731
    assert width(large) < width(small)


def test_seed_summary():
    runs = pd.DataFrame({"model": ["a", "a", "b"], "seed": [0, 1, 0], "precision": [0.5, 0.7, 0.9],
                         "recall": [1, 1, 1], "f1": [0.6, 0.8, 0.9]})
    s = metrics.summarise_seeds(runs, ["model"]).set_index("model")
    assert s.loc["a", "f1_mean"] == pytest.approx(0.7) and s.loc["a", "f1_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert s.loc["a", "n_seeds"] == 2 and np.isnan(s.loc["b", "f1_sd"])
