"""The three evaluation sets in their official layouts and splits, plus any labelled folder.

Every loader returns a `Split`: three tables (train / val / test) of `path, label, group`,
where `group` is the unit that must not cross splits (the patient for BUS-BRA, the image
elsewhere). Loaders only read the index files and check that images exist; pixels are read
by the fine-tuning step. The same loaders read the real datasets and the synthetic twins
written by `usfmae synth` (layouts in ../shared/docs/STUDY.md section 4):

    BUSBRA/Images/<ID>.png, bus_data.csv (ID, Case, ...), 5-fold-cv.csv (ID, kFold, valid_k)
    OTU_2d/images/<id>.JPG, train_cls.txt, val_cls.txt ("<id>.JPG <label>")
    usd514_jpeg_roi/images/*.jpg, annotations/{train,val}_anno_crop_split_<k>.json (COCO)
    ROOT/<class>/*.png|jpg|...  (folder: a stratified, seeded split)

The official MMOTU-2D and GIST514-DB splits have no validation part; the validation set used
for model selection and early stopping is a stratified, seeded part of their training set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from . import UsfmaeError

MMOTU_CLASSES = ("chocolate cyst", "serous cystadenoma", "teratoma", "theca cell tumour",
                 "simple cyst", "normal ovary", "mucinous cystadenoma",
                 "high-grade serous cystadenocarcinoma")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DATASETS = ("bus-bra", "mmotu-2d", "gist514", "folder")


@dataclass
class Split:
    """One train / val / test split of a classification dataset."""
    dataset: str  # e.g. "bus-bra"
    split: str  # which official split, e.g. "fold 1 of 5-fold-cv.csv"
    classes: list[str]  # label index -> class name
    positive: int | None  # index of the positive class of a binary task; None = multi-class
    train: pd.DataFrame = field(repr=False)  # columns: path, label, group
    val: pd.DataFrame = field(repr=False)
    test: pd.DataFrame = field(repr=False)

    def parts(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> pd.DataFrame:
        """Images per class in each part: the first thing to look at in a notebook."""
        rows = {name: df["label"].map(dict(enumerate(self.classes))).value_counts()
                for name, df in self.parts().items()}
        return pd.DataFrame(rows).reindex(self.classes).fillna(0).astype(int)


# ---------------------------------------------------------------------------- helpers
def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsfmaeError(f"{path} not found: {what}")
    return path


def _table(paths, labels, groups) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [int(v) for v in labels],
                         "group": [str(g) for g in groups]})


def _check_images(split: Split) -> Split:
    for name, df in split.parts().items():
        if df.empty:
            raise UsfmaeError(f"{split.dataset} {split.split}: the {name} part is empty; "
                              "check the split files under the dataset root")
        missing = [p for p in df["path"] if not Path(p).is_file()]
        if missing:
            raise UsfmaeError(f"{split.dataset}: {len(missing)} image(s) listed in the split files "
                              f"are missing, e.g. {missing[0]}; the root is partial or wrong")
    return split


def _carve_val(df: pd.DataFrame, val_fraction: float, seed: int):
    """Stratified, seeded validation part of a training table (by group, so none crosses)."""
    groups = df.drop_duplicates("group")
    counts = groups["label"].value_counts()
    stratify = groups["label"] if counts.min() >= 2 else None  # tiny sets: plain random split
    train_g, val_g = train_test_split(groups["group"], test_size=val_fraction,
                                      random_state=seed, stratify=stratify)
    return df[df["group"].isin(set(train_g))], df[df["group"].isin(set(val_g))]


# ---------------------------------------------------------------------------- BUS-BRA
def load_busbra(root, fold: int = 1, cv_file: str = "5-fold-cv.csv", **_) -> Split:
    """BUS-BRA official k-fold CV: test = kFold == fold; train/val from valid_<fold> (1/0).

    Positive class: malignant. Groups are patients (Case in bus_data.csv); the official folds
    keep every patient in one fold, and this loader checks it.
    """
    root = Path(root)
    cv = pd.read_csv(_need(root / cv_file, "BUS-BRA's cross-validation table; pass the BUSBRA "
                                          "folder that holds Images/, bus_data.csv and 5-fold-cv.csv"))
    info = pd.read_csv(_need(root / "bus_data.csv", "BUS-BRA's case table (ID, Case, Pathology, ...)"))
    valid = f"valid_{fold}"
    for col in ("ID", "Pathology", "kFold", valid):
        if col not in cv.columns:
            raise UsfmaeError(f"{root / cv_file} has no column {col!r}; fold must be one of "
                              f"{sorted(int(c[6:]) for c in cv.columns if c.startswith('valid_'))}")
    cv = cv.merge(info[["ID", "Case"]], on="ID", how="left", validate="one_to_one")
    if cv["Case"].isna().any():
        raise UsfmaeError(f"{root / 'bus_data.csv'} lacks the Case of {cv.loc[cv['Case'].isna(), 'ID'].iloc[0]}")
    classes = ["benign", "malignant"]
    bad = set(cv["Pathology"]) - set(classes)
    if bad:
        raise UsfmaeError(f"{root / cv_file}: unknown Pathology value(s) {sorted(bad)}")
    cv["path"] = [root / "Images" / f"{i}.png" for i in cv["ID"]]
    cv["label"] = cv["Pathology"].map({c: i for i, c in enumerate(classes)})
    cv["group"] = cv["Case"].astype(int).astype(str)
    parts = {"train": cv[(cv["kFold"] != fold) & (cv[valid] == 1)],
             "val": cv[(cv["kFold"] != fold) & (cv[valid] == 0)],
             "test": cv[cv["kFold"] == fold]}
    parts = {k: _table(v["path"], v["label"], v["group"]) for k, v in parts.items()}
    split = Split("bus-bra", f"fold {fold} of {cv_file}", classes, 1, **parts)
    crossing = set(split.test["group"]) & (set(split.train["group"]) | set(split.val["group"]))
    if crossing:
        raise UsfmaeError(f"{root / cv_file}: patient(s) {sorted(crossing)[:5]} appear in the test fold "
                          "and in training; the fold table does not match bus_data.csv")
    return _check_images(split)


# ---------------------------------------------------------------------------- MMOTU-2D
def _read_cls_txt(path: Path, images: Path) -> pd.DataFrame:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, label = line.split()
            rows.append((images / name, int(label), name))
        except ValueError:
            raise UsfmaeError(f"{path} line {n}: expected '<id>.JPG <label>', got {line!r}") from None
    return _table(*zip(*rows)) if rows else _table([], [], [])


def load_mmotu(root, val_fraction: float = 0.15, seed: int = 0, **_) -> Split:
    """MMOTU-2D official split: train_cls.txt (train, minus a validation part), val_cls.txt (test).

    Eight classes; there is no positive class, so report micro and macro averages.
    """
    root = Path(root)
    images = _need(root / "images", "MMOTU-2D's images folder; pass the OTU_2d folder")
    train = _read_cls_txt(_need(root / "train_cls.txt", "MMOTU-2D's training list"), images)
    test = _read_cls_txt(_need(root / "val_cls.txt", "MMOTU-2D's test list (official 'val')"), images)
    bad = sorted((set(train["label"]) | set(test["label"])) - set(range(len(MMOTU_CLASSES))))
    if bad:
        raise UsfmaeError(f"{root}: labels {bad} are outside 0..{len(MMOTU_CLASSES) - 1}")
    train, val = _carve_val(train, val_fraction, seed)
    return _check_images(Split("mmotu-2d", "train_cls.txt / val_cls.txt", list(MMOTU_CLASSES), None,
                               train, val, test))


# ---------------------------------------------------------------------------- GIST514-DB
def _read_coco(path: Path, images: Path) -> pd.DataFrame:
    try:
        coco = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsfmaeError(f"{path} is not valid JSON ({err}); re-download the annotations") from None
    label_of: dict[int, set] = {}
    for ann in coco.get("annotations", []):
        label_of.setdefault(ann["image_id"], set()).add(int(ann["category_id"]))
    rows = []
    for img in coco.get("images", []):
        cats = label_of.get(img["id"], set())
        if len(cats) != 1 or not cats <= {1, 2}:
            raise UsfmaeError(f"{path}: image {img['file_name']} has categories {sorted(cats)}; "
                              "expected exactly one of 1 (leiomyoma) or 2 (GIST)")
        rows.append((images / img["file_name"], cats.pop() - 1, img["file_name"]))
    return _table(*zip(*rows)) if rows else _table([], [], [])


def load_gist514(root, fold: int = 0, val_fraction: float = 0.15, seed: int = 0, **_) -> Split:
    """GIST514-DB split k: train_anno_crop_split_k.json (train + validation part),
    val_anno_crop_split_k.json (test, as in the public code). Positive class: GIST."""
    root = Path(root)
    images = _need(root / "images", "GIST514-DB's images folder; pass the usd514_jpeg_roi folder")
    ann = root / "annotations"
    train = _read_coco(_need(ann / f"train_anno_crop_split_{fold}.json", f"GIST514-DB's split {fold} "
                             "training annotations (folds are 0..4)"), images)
    test = _read_coco(_need(ann / f"val_anno_crop_split_{fold}.json", f"GIST514-DB's split {fold} "
                            "test annotations"), images)
    train, val = _carve_val(train, val_fraction, seed)
    return _check_images(Split("gist514", f"split {fold}", ["leiomyoma", "GIST"], 1, train, val, test))


# ---------------------------------------------------------------------------- any folder
def load_folder(root, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0,
                positive: str | None = None, **_) -> Split:
    """ROOT/<class>/<images>: classes sorted by name, a stratified seeded split.

    `positive` names the positive class of a binary task (e.g. "malignant"); without it a
    binary task is scored like a multi-class one (micro and macro averages).
    """
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root} is not a folder; expected ROOT/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [i] * len(files)
    if len(classes) < 2 or not paths:
        raise UsfmaeError(f"{root}: found {len(classes)} class folder(s) and {len(paths)} image(s); "
                          "need at least two ROOT/<class>/ folders with images")
    if positive is not None and positive not in classes:
        raise UsfmaeError(f"positive class {positive!r} is not a folder of {root}; classes: {classes}")
    df = _table(paths, labels, [Path(p).relative_to(root) for p in paths])
    rest, test = train_test_split(df, test_size=test_fraction, random_state=seed, stratify=df["label"])
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed, stratify=rest["label"])
    return _check_images(Split("folder", f"seed {seed} ({root.name})", classes,
                               classes.index(positive) if positive else None, train, val, test))


LOADERS = {"bus-bra": load_busbra, "mmotu-2d": load_mmotu, "gist514": load_gist514, "folder": load_folder}
SYNTHETIC_FOLDERS = {"bus-bra": "BUSBRA", "mmotu-2d": "OTU_2d", "gist514": "usd514_jpeg_roi"}


def load_split(dataset: str, root, **options) -> Split:
    """Dispatch by name: bus-bra, mmotu-2d, gist514 or folder. Options go to the loader."""
    if dataset not in LOADERS:
        raise UsfmaeError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return LOADERS[dataset](root, **options)
