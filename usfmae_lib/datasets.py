"""The three evaluation sets in their official layouts and splits, plus any labelled folder.

Every loader returns a `Split`: three tables (train / val / test) of `path, label, group`,
where `group` is the unit that must not cross splits (the patient for BUS-BRA, the image
elsewhere). Loaders only read the index files and check that images exist; pixels are read
by the fine-tuning step. The same loaders read the real datasets and the synthetic twins
written by `usfmae synth` (layouts as published: docs/data.md):

    BUSBRA/Images/<ID>.png, bus_data.csv (ID, Case, ...), 5-fold-cv.csv (ID, kFold, valid_k)
    OTU_2d/images/<id>.JPG, train_cls.txt, val_cls.txt ("<id>.JPG <label>")
    usd514_jpeg_roi/images/*.jpg, annotations/{train,val}_anno_crop_split_<k>.json (COCO)
    ROOT/<class>/*.png|jpg|...  (folder: a stratified, seeded split by image)

The official MMOTU-2D and GIST514-DB splits have no validation part; the validation set used
for model selection and early stopping is a stratified, seeded part of their training set
(`val_fraction`). MMOTU-2D with val_fraction=0 keeps its whole official training list for training
and has an empty validation part (notebook 05's mmotu_selection="all", the paper's "1000 images for
training and 469 for validation"); its users then select nothing on validation (finetune.train).

Splits are checked whole, because a leak inflates every metric without any other sign: no
group in two parts (every loader), every row of an index file used or refused (never dropped),
no image in both the training and the test list, and, for folders, mask/annotation files never
taken as samples.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from . import UsfmaeError
from .curation import is_mask_name

MMOTU_CLASSES = ("chocolate cyst", "serous cystadenoma", "teratoma", "theca cell tumour",
                 "simple cyst", "normal ovary", "mucinous cystadenoma",
                 "high-grade serous cystadenocarcinoma")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DATASETS = ("bus-bra", "mmotu-2d", "gist514", "folder")
GROUP_UNIT = {"bus-bra": "patient"}  # what a group is, for messages; "image" elsewhere


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
    fold: int = 0  # the official fold (BUS-BRA 1-5) or split (GIST514-DB 0-4); 0 where there is one split
    images: str = "as published"  # or "annotations removed" (finetune.remove_annotations)

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


def _few(values, n: int = 5) -> str:
    """The first n of some IDs, sorted, for an error message."""
    values = sorted({str(v) for v in values})
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(values[:n]) + more


def _cell(value) -> str:
    """A CSV cell as the user typed it: 2 not 2.0, and 'empty' for a blank."""
    if pd.isna(value):
        return "empty"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(paths, labels, groups) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [int(v) for v in labels],
                         "group": [str(g) for g in groups]})


def _check_groups_apart(split: Split) -> None:
    """The final check of every loader: a group (patient, image) on two sides of a split leaks."""
    unit = GROUP_UNIT.get(split.dataset, "image")
    for (a, df_a), (b, df_b) in combinations(split.parts().items(), 2):
        shared = set(df_a["group"]) & set(df_b["group"])
        if shared:
            raise UsfmaeError(f"{split.dataset} {split.split}: {len(shared)} {unit}(s) in both {a} and {b}, "
                              f"e.g. {_few(shared)}; a {unit} on two sides of a split inflates its scores. "
                              "The split files under the dataset root contradict each other: fix or re-download them")


def _check_images(split: Split, may_be_empty: tuple = ()) -> Split:
    for name, df in split.parts().items():
        if df.empty and name not in may_be_empty:
            raise UsfmaeError(f"{split.dataset} {split.split}: the {name} part is empty; "
                              "check the split files under the dataset root")
    _check_groups_apart(split)
    for df in split.parts().values():
        missing = [p for p in df["path"] if not Path(p).is_file()]
        if missing:
            raise UsfmaeError(f"{split.dataset}: {len(missing)} image(s) listed in the split files "
                              f"are missing, e.g. {missing[0]}; the root is partial or wrong")
    return split


def _split_by_group(df: pd.DataFrame, fraction: float, seed: int):
    """(rest, part): a stratified, seeded `fraction` of the groups, so that no group crosses."""
    groups = df.drop_duplicates("group")
    counts = groups["label"].value_counts()
    stratify = groups["label"] if counts.min() >= 2 else None  # tiny sets: plain random split
    rest_g, part_g = train_test_split(groups["group"], test_size=fraction,
                                      random_state=seed, stratify=stratify)
    return df[df["group"].isin(set(rest_g))], df[df["group"].isin(set(part_g))]


# ---------------------------------------------------------------------------- BUS-BRA
def _unique_ids(table: pd.DataFrame, path: Path) -> None:
    repeated = table.loc[table["ID"].duplicated(), "ID"]
    if len(repeated):
        raise UsfmaeError(f"{path}: {repeated.nunique()} ID(s) have more than one row, e.g. {_few(repeated)}; "
                          "each image needs exactly one row: re-download BUS-BRA")


def _busbra_test_folds(cv: pd.DataFrame, path: Path, n_folds: int) -> pd.Series:
    """kFold as integers 1..n_folds; anything else would silently leave an image out of every test fold."""
    k = pd.to_numeric(cv["kFold"], errors="coerce")
    bad = ~k.isin(range(1, n_folds + 1))
    if bad.any():
        rows = [f"{i} ({_cell(v)})" for i, v in zip(cv.loc[bad, "ID"], cv.loc[bad, "kFold"])]
        raise UsfmaeError(f"{path}: {bad.sum()} row(s) have a kFold that is missing or not a fold number "
                          f"1..{n_folds}, e.g. {_few(rows)}; every image needs its test fold: fix those rows "
                          "or re-download BUS-BRA")
    return k.astype(int)


def _busbra_roles(rest: pd.DataFrame, valid: str, path: Path) -> pd.Series:
    """valid_<k> of the non-test rows as 1 (train) / 0 (validation); other values are refused, not dropped."""
    v = pd.to_numeric(rest[valid], errors="coerce")
    bad = ~v.isin([0, 1])
    if bad.any():
        rows = [f"{i} ({_cell(x)})" for i, x in zip(rest.loc[bad, "ID"], rest.loc[bad, valid])]
        raise UsfmaeError(f"{path}: {bad.sum()} row(s) outside the test fold have {valid} other than 1 (train) "
                          f"or 0 (validation), e.g. {_few(rows)}; they would be left out of training: set them "
                          "to 0 or 1, or re-download BUS-BRA")
    return v.astype(int)


def _keep_patients_whole(rest: pd.DataFrame, in_val: pd.Series) -> tuple[pd.Series, list[str]]:
    """(in_val by patient, patients moved). BUS-BRA's valid_<k> marks images, not patients: in the
    shipped 5-fold-cv.csv every fold has patients with one view in training and another in
    validation. Such a patient goes whole to the side of most of its views; a tie follows its
    first view by ID, which keeps the official validation share on average."""
    order = rest["ID"].argsort(kind="stable")
    by_patient = in_val.iloc[order].astype(float).groupby(rest["group"].iloc[order], sort=False)
    share, first = by_patient.mean(), by_patient.first()
    to_val = (share > 0.5) | ((share == 0.5) & (first == 1))
    moved = sorted(share.index[(share > 0) & (share < 1)], key=int)
    return rest["group"].map(to_val).astype(bool), moved


def load_busbra(root, fold: int = 1, cv_file: str = "5-fold-cv.csv", **_) -> Split:
    """BUS-BRA official k-fold CV: test = kFold == fold; train/val from valid_<fold> (1/0).

    Positive class: malignant. Groups are patients (Case in bus_data.csv); the official folds
    keep every patient in one test fold, and this loader checks it. The official train /
    validation marks do not keep patients whole; such patients are kept whole here (see
    `_keep_patients_whole`) and the split's name says how many moved.
    """
    root = Path(root)
    cv_path, info_path = root / cv_file, root / "bus_data.csv"
    cv = pd.read_csv(_need(cv_path, "BUS-BRA's cross-validation table; pass the BUSBRA "
                                    "folder that holds Images/, bus_data.csv and 5-fold-cv.csv"))
    info = pd.read_csv(_need(info_path, "BUS-BRA's case table (ID, Case, Pathology, ...)"))
    valid = f"valid_{fold}"
    n_folds = sum(c.startswith("valid_") for c in cv.columns)
    for col in ("ID", "Pathology", "kFold", valid):
        if col not in cv.columns:
            raise UsfmaeError(f"{cv_path} has no column {col!r}; fold must be one of "
                              f"{sorted(int(c[6:]) for c in cv.columns if c.startswith('valid_'))}")
    _unique_ids(cv, cv_path)
    _unique_ids(info, info_path)
    cv = cv.merge(info[["ID", "Case"]], on="ID", how="left", validate="one_to_one")
    if cv["Case"].isna().any():
        raise UsfmaeError(f"{info_path} lacks the Case of {cv.loc[cv['Case'].isna(), 'ID'].iloc[0]}")
    classes = ["benign", "malignant"]
    bad = set(cv["Pathology"]) - set(classes)
    if bad:
        raise UsfmaeError(f"{cv_path}: unknown Pathology value(s) {sorted(bad)}")
    cv["path"] = [root / "Images" / f"{i}.png" for i in cv["ID"]]
    cv["label"] = cv["Pathology"].map({c: i for i, c in enumerate(classes)})
    cv["group"] = cv["Case"].astype(int).astype(str)
    is_test = _busbra_test_folds(cv, cv_path, n_folds) == fold
    test, rest = cv[is_test], cv[~is_test]
    crossing = set(test["group"]) & set(rest["group"])
    if crossing:
        raise UsfmaeError(f"{cv_path}: patient(s) {_few(crossing)} appear in the test fold {fold} and in training "
                          f"or validation; the fold table does not match the Case column of {info_path.name}: "
                          "re-download BUS-BRA")
    in_val, moved = _keep_patients_whole(rest, _busbra_roles(rest, valid, cv_path) == 0)
    parts = {"train": rest[~in_val], "val": rest[in_val], "test": test}
    parts = {k: _table(v["path"], v["label"], v["group"]) for k, v in parts.items()}
    name = f"fold {fold} of {cv_file}"
    if moved:
        name += f", {valid} kept whole by patient ({len(moved)} moved)"
    return _check_images(Split("bus-bra", name, classes, 1, **parts, fold=fold))


# ---------------------------------------------------------------------------- MMOTU-2D and GIST514-DB lists
def _one_label_per_image(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """An image listed twice must agree with itself; a repeated identical entry counts once."""
    labels = table.groupby("group")["label"].nunique()
    conflicting = labels.index[labels > 1]
    if len(conflicting):
        raise UsfmaeError(f"{path} lists {len(conflicting)} image(s) more than once with different labels, "
                          f"e.g. {_few(conflicting)}; keep one entry with the right label")
    return table.drop_duplicates("group")


def _check_lists_disjoint(train: pd.DataFrame, test: pd.DataFrame, train_path: Path, test_path: Path) -> None:
    both = set(train["group"]) & set(test["group"])
    if both:
        raise UsfmaeError(f"{len(both)} image(s) are in both the training list {train_path} and the test list "
                          f"{test_path}, e.g. {_few(both)}; testing on training images inflates every metric: "
                          "remove them from one list, or re-download the dataset if you did not edit it")


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
    return _one_label_per_image(_table(*zip(*rows)) if rows else _table([], [], []), path)


def load_mmotu(root, val_fraction: float = 0.15, seed: int = 0, **_) -> Split:
    """MMOTU-2D official split: train_cls.txt (train, minus a validation part), val_cls.txt (test).
    val_fraction=0: no validation part, every image of train_cls.txt trains (the paper's "official
    split of 1000 images for training and 469 for validation"); the split's name says so.

    Eight classes; there is no positive class, so report micro and macro averages.
    """
    if not 0 <= val_fraction < 1:
        raise UsfmaeError(f"val_fraction must be in [0, 1) for mmotu-2d (0 = no validation part), got {val_fraction}")
    root = Path(root)
    images = _need(root / "images", "MMOTU-2D's images folder; pass the OTU_2d folder")
    train_path = _need(root / "train_cls.txt", "MMOTU-2D's training list")
    test_path = _need(root / "val_cls.txt", "MMOTU-2D's test list (official 'val')")
    train, test = _read_cls_txt(train_path, images), _read_cls_txt(test_path, images)
    bad = sorted((set(train["label"]) | set(test["label"])) - set(range(len(MMOTU_CLASSES))))
    if bad:
        raise UsfmaeError(f"{root}: labels {bad} are outside 0..{len(MMOTU_CLASSES) - 1}")
    _check_lists_disjoint(train, test, train_path, test_path)
    if not val_fraction:  # the official lists as they are: nothing carved out, an empty validation part
        return _check_images(Split("mmotu-2d", "train_cls.txt / val_cls.txt, no validation part", list(MMOTU_CLASSES),
                                   None, train, train.iloc[:0], test), may_be_empty=("val",))
    train, val = _split_by_group(train, val_fraction, seed)
    return _check_images(Split("mmotu-2d", "train_cls.txt / val_cls.txt", list(MMOTU_CLASSES), None,
                               train, val, test))


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
    return _one_label_per_image(_table(*zip(*rows)) if rows else _table([], [], []), path)


def load_gist514(root, fold: int = 0, val_fraction: float = 0.15, seed: int = 0, **_) -> Split:
    """GIST514-DB split k: train_anno_crop_split_k.json (train + validation part),
    val_anno_crop_split_k.json (test, as in the public code). Positive class: GIST."""
    if not 0 < val_fraction < 1:
        raise UsfmaeError(f"val_fraction must be in (0, 1) for gist514, got {val_fraction}: its validation part picks "
                          "the epoch and the config (only MMOTU-2D can train on its whole training list)")
    root = Path(root)
    images = _need(root / "images", "GIST514-DB's images folder; pass the usd514_jpeg_roi folder")
    ann = root / "annotations"
    train_path = _need(ann / f"train_anno_crop_split_{fold}.json", f"GIST514-DB's split {fold} "
                       "training annotations (folds are 0..4)")
    test_path = _need(ann / f"val_anno_crop_split_{fold}.json", f"GIST514-DB's split {fold} test annotations")
    train, test = _read_coco(train_path, images), _read_coco(test_path, images)
    _check_lists_disjoint(train, test, train_path, test_path)
    train, val = _split_by_group(train, val_fraction, seed)
    return _check_images(Split("gist514", f"split {fold}", ["leiomyoma", "GIST"], 1, train, val, test, fold=fold))


# ---------------------------------------------------------------------------- any folder
OFFICIAL_FOLDERS = {"BUSBRA": "bus-bra", "OTU_2d": "mmotu-2d", "usd514_jpeg_roi": "gist514"}
OFFICIAL_FILES = {"5-fold-cv.csv": "bus-bra", "bus_data.csv": "bus-bra",
                  "train_cls.txt": "mmotu-2d", "val_cls.txt": "mmotu-2d"}
FOLDER_LAYOUT = "ROOT/<class>/<image files>"


def _is_sample_image(path: Path) -> bool:
    """An image file that is not hidden and not a mask/annotation (curation's rule, the same words)."""
    return (not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            and not is_mask_name(path.name.split(".")[0]) and path.is_file())


def _refuse_official_layouts(root: Path) -> None:
    """A root of the official datasets (or of `usfmae synth`) would train on dataset folders as classes."""
    inside = {name: d for name, d in OFFICIAL_FOLDERS.items() if (root / name).is_dir()}
    synth = (root / "synth.json").is_file()
    if inside or synth:
        found = [f"{name}/" for name in inside] + (["synth.json (a tree written by `usfmae synth`)"] if synth else [])
        use = "; ".join(f"--dataset {d} --root {root / name}" for name, d in (inside or OFFICIAL_FOLDERS).items())
        raise UsfmaeError(f"{root} is not {FOLDER_LAYOUT}: it holds {', '.join(found)}. "
                          f"Load each evaluation set with its own loader: {use}")
    files = [name for name in OFFICIAL_FILES if (root / name).is_file()]
    files += [f"annotations/{p.name}" for p in sorted((root / "annotations").glob("*_anno_crop_split_*.json"))][:1]
    if files:
        dataset = OFFICIAL_FILES.get(files[0], "gist514")
        raise UsfmaeError(f"{root} is not {FOLDER_LAYOUT}: it holds {', '.join(files)} ({dataset}'s split "
                          f"files); use --dataset {dataset} --root {root}")


def _scan_class(folder: Path) -> tuple[list[Path], int, list[Path]]:
    """(sample images directly in a class folder, mask/annotation files skipped, images in subfolders)."""
    images, masks, nested = [], 0, []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not is_mask_name(path.name):  # a masks/ folder beside the images is fine
                nested += sorted(p for p in path.rglob("*") if _is_sample_image(p))
        elif _is_sample_image(path):
            images.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:  # an image-type file that is a mask/annotation
            masks += 1
    return images, masks, nested


def _scan_folder_tree(root: Path) -> tuple[dict[str, list[Path]], int]:
    """({class: images}, mask files skipped) of ROOT/<class>/<images>; any other shape is an error."""
    loose = [p for p in root.iterdir() if _is_sample_image(p)]
    if loose:
        raise UsfmaeError(f"{root} is not {FOLDER_LAYOUT}: {len(loose)} image(s) lie directly in it, e.g. "
                          f"{sorted(loose)[0].name}, and belong to no class; move them into a class folder, or "
                          "pass the folder above as --root if this is one class")
    classes, masks, nested = {}, 0, {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_mask_name(folder.name):  # ROOT/masks/: annotations, not a class
            continue
        classes[folder.name], n_masks, nested[folder.name] = _scan_class(folder)
        masks += n_masks
    offenders = {c: files for c, files in nested.items() if files}
    if offenders:
        found = "; ".join(f"{c}/ holds {len(classes[c])} image(s) directly and {len(files)} in subfolders "
                          f"(e.g. {files[0].relative_to(root)})" for c, files in offenders.items())
        raise UsfmaeError(f"{root} is not {FOLDER_LAYOUT}: {found}. Images must lie directly in each class "
                          "folder, because a split by image cannot tell which images of a subfolder belong "
                          "together (a patient, a video, a source). If the subfolders are the classes, pass "
                          "their parent folder as --root; otherwise move the images up into the class folder")
    return classes, masks


def load_folder(root, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0,
                positive: str | None = None, **_) -> Split:
    """ROOT/<class>/<images>: classes sorted by name, a stratified seeded split.

    Only image files directly in a class folder are samples; hidden files and mask/annotation
    files and folders (`x_mask.png`, `x_mask_1.png`, `masks/`: curation's `is_mask_name`) are
    not. The group of an image is `<class>/<stem>`, and the split is by group.
    `positive` names the positive class of a binary task (e.g. "malignant"); without it a
    binary task is scored like a multi-class one (micro and macro averages).
    """
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root} is not a folder; expected {FOLDER_LAYOUT}")
    _refuse_official_layouts(root)
    images_of, n_masks = _scan_folder_tree(root)
    counts = {c: len(files) for c, files in images_of.items()}
    if len(counts) < 2:
        raise UsfmaeError(f"{root}: found {len(counts)} class folder(s) {counts}; need at least two "
                          f"{FOLDER_LAYOUT} folders with images")
    # enough images that each class can have one in each of train, val and test
    needed = max(3, math.ceil(1 / test_fraction), math.ceil(1 / val_fraction))
    small = {c: n for c, n in counts.items() if n < needed}
    if small:
        raise UsfmaeError(f"{root}: class folder(s) {small} have fewer than {needed} images, too few to put one "
                          f"in each of train, val and test (test_fraction {test_fraction}, val_fraction "
                          f"{val_fraction}); images per class: {counts}. Add images or leave that folder out")
    classes = sorted(counts)
    if positive is not None and positive not in classes:
        raise UsfmaeError(f"positive class {positive!r} is not a folder of {root}; classes: {classes}")
    rows = [(p, i, f"{c}/{p.stem}") for i, c in enumerate(classes) for p in images_of[c]]
    df = _table(*zip(*rows))
    rest, test = _split_by_group(df, test_fraction, seed)
    train, val = _split_by_group(rest, val_fraction / (1 - test_fraction), seed)
    # "by image group" also tells finetune's resume that this is not the older split by file
    name = f"seed {seed} by image group ({root.name}" + (f"; {n_masks} mask/annotation files not used)"
                                                         if n_masks else ")")
    split = Split("folder", name, classes, classes.index(positive) if positive else None, train, val, test)
    _check_every_class_in_every_part(split, root, seed)
    return _check_images(split)


def _check_every_class_in_every_part(split: Split, root: Path, seed: int) -> None:
    """A class missing from a part leaves its scores undefined (no positives in test: no recall)."""
    table = split.summary()
    if (table == 0).any().any():
        raise UsfmaeError(f"{root}: the split with seed {seed} leaves a class out of a part "
                          f"(images per class and part: {table.to_dict()}); add images to the small classes "
                          "or try another --split-seed")


LOADERS = {"bus-bra": load_busbra, "mmotu-2d": load_mmotu, "gist514": load_gist514, "folder": load_folder}
SYNTHETIC_FOLDERS = {"bus-bra": "BUSBRA", "mmotu-2d": "OTU_2d", "gist514": "usd514_jpeg_roi"}


def resolve_root(dataset: str, root=None, out_dir=None) -> Path:
    """The dataset root: `root` if given, else the synthetic twin written by notebook 01."""
    if root:
        return Path(root)
    from .synthetic import tree_dir

    synthetic = tree_dir(out_dir)
    if dataset not in SYNTHETIC_FOLDERS:
        raise UsfmaeError(f"dataset {dataset!r} has no synthetic twin; pass its root")
    path = synthetic / SYNTHETIC_FOLDERS[dataset]
    if not path.exists():
        raise UsfmaeError(f"{path} not found: run notebook 01 (curation, which writes the synthetic tree) "
                          f"for this out_dir first, or pass data_root / --root")
    return path


# The paper evaluates BUS-BRA "on the official split in 5-fold cross-validation": every fold is a
# test set once. GIST514-DB ships five split files (train/val_anno_crop_split_0..4.json); the paper
# does not say how it used them: the study runs all five by default (gist_splits=[0] runs one). The
# others have one official split.
OFFICIAL_FOLDS = {"bus-bra": (1, 2, 3, 4, 5), "gist514": (0, 1, 2, 3, 4)}


def official_folds(dataset: str, folds=None) -> list[int]:
    """The folds to run: every official fold by default (BUS-BRA: the paper's protocol; GIST514-DB: the
    study's choice, the paper is silent), or those asked,
    checked against the dataset's folds. Datasets with one split have the single fold 0."""
    known = OFFICIAL_FOLDS.get(dataset, (0,))
    if folds is None or (isinstance(folds, (list, tuple)) and not folds):
        return list(known)
    folds = [int(f) for f in (folds if isinstance(folds, (list, tuple)) else [folds])]
    bad = [f for f in folds if f not in known]
    if bad:
        raise UsfmaeError(f"{dataset} has no fold {bad[0]}; its official folds are {list(known)}")
    return folds


def load_split(dataset: str, root, **options) -> Split:
    """Dispatch by name: bus-bra, mmotu-2d, gist514 or folder. Options go to the loader."""
    if dataset not in LOADERS:
        raise UsfmaeError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return LOADERS[dataset](root, **options)


def cap_split(split: Split, max_images: int, seed: int = 0) -> Split:
    """The split with at most `max_images` images in each part (train, val, test): a seeded sample
    that takes the classes in turn (so every class a part has stays in it while max_images allows),
    rows kept in their order. 0 = the split unchanged. For dry runs and quick checks: the parts stay
    disjoint (subsets of a checked split), and the split's name says it was capped."""
    if max_images < 0:
        raise UsfmaeError(f"max_images must be >= 0 (0 = every image), got {max_images}")
    if not max_images or all(len(df) <= max_images for df in split.parts().values()):
        return split
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = {}
    for name, df in split.parts().items():
        if len(df) <= max_images:
            parts[name] = df
            continue
        by_class = [rng.permutation(np.flatnonzero(df["label"].to_numpy() == c)).tolist()
                    for c in sorted(df["label"].unique())]
        turns = [rows[i] for i in range(max(map(len, by_class))) for rows in by_class if i < len(rows)]
        parts[name] = df.iloc[sorted(turns[:max_images])].reset_index(drop=True)
    return replace(split, split=f"{split.split}, capped at {max_images} images per part", **parts)
