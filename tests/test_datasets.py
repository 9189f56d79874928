"""Evaluation-set loaders on trees in each real layout, and the metrics of Table 2."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from usfmae_lib import UsfmaeError, datasets, metrics, synthetic

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def synth_eval(tmp_path_factory):
    """The three evaluation sets of the synthetic tree, nothing else."""
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate_tree(root, seed=3, profile="smoke", workers=1, progress=False, n_pretrain=0,
                            n_videos=0, n_volumes=0, n_annotated=0)
    return root


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


def test_folder_dataset_on_real_busi():
    root = REAL / "busi_sample"
    s = datasets.load_split("folder", root, seed=1, positive="malignant")
    assert s.classes == ["benign", "malignant", "normal"] and s.positive == 1
    n = sum(len(df) for df in s.parts().values())
    assert n == 60 and len(set(pd.concat(s.parts().values())["path"])) == 60
    assert (s.summary()["test"] == 4).all()  # 20 per class, 20% stratified
    with pytest.raises(UsfmaeError, match="not a folder"):
        datasets.load_folder(root / "nope")


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
