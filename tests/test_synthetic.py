"""Tests of the synthetic ultrasound generator (usfmae_lib.synthetic). ~30 s on 2 cores."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, __version__, synthetic
from usfmae_lib.synth_physics import Physics, make_geometry, random_probe, simulate
from usfmae_lib.synth_scenes import Canvas

# a tiny tree for the byte-level tests (every kind of item, few of each)
TINY = dict(n_pretrain=10, n_videos=2, video_frames=5, n_volumes=2, volume_shape=(5, 64, 64), n_annotated=4,
            n_busbra=8, n_otu=8, n_gist=6)


def _hashes(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".synth_cache" not in p.parts}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "a"
    synthetic.generate_tree(root, seed=0, workers=2, progress=False, **TINY)
    return root


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    synthetic.generate_tree(root, seed=3, profile="smoke", workers=2, progress=False)
    return root


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    b = synthetic.generate_tree(tmp_path / "b", seed=0, workers=1, progress=False, **TINY)
    c = synthetic.generate_tree(tmp_path / "c", seed=1, workers=2, progress=False, **TINY)
    ha, hb, hc = _hashes(tiny), _hashes(b), _hashes(c)
    assert ha == hb  # worker count does not matter either
    kinds = {".png", ".JPG", ".jpg", ".avi", ".gz", ".raw"}
    assert any(k.endswith(".avi") for k in ha) and any(k.endswith(".nii.gz") for k in ha)
    assert any(k.endswith(".mhd") for k in ha)
    media = [k for k in ha if pathlib.Path(k).suffix in kinds]
    assert media and all(ha[k] != hc.get(k) for k in media)
    info = json.loads((tiny / "synth.json").read_text())
    assert info["version"] == __version__ and info["seed"] == 0 and info["params"]["n_busbra"] == 8
    assert "time" not in json.dumps(info).lower()


def test_resume_skips_finished_files(tiny, tmp_path):
    root = synthetic.generate_tree(tmp_path / "r", seed=0, workers=1, progress=False, **TINY)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    removed = [root / "pretrain/breast/images/breast_000000.png", root / "annotated/images/ann_00001.png",
               root / "pretrain/fetal_head/volumes/fetal_head_0001.mhd", root / "BUSBRA/Masks/mask_0002-l.png",
               root / "usd514_jpeg_roi/images/usd_0003.jpg"]
    for p in removed:
        p.unlink()
    (root / "pretrain/liver/images/.liver_000005.png.part123").write_bytes(b"half")  # a killed write
    # files of untouched items must not be rewritten (an item's files are rewritten together)
    sibling = ("ann_00001", "0002-l", "fetal_head_0001", "usd_0003")
    kept = {p: p.stat().st_mtime_ns for p in files
            if p not in removed and not any(s in p.name for s in sibling)
            and p.suffix in (".png", ".PNG", ".JPG", ".jpg", ".avi", ".gz", ".raw", ".mhd")}
    synthetic.generate_tree(root, seed=0, workers=2, progress=False, **TINY)
    assert all(p.exists() for p in removed)
    assert [p for p, t in kept.items() if p.stat().st_mtime_ns != t] == []  # not rewritten
    assert not (root / "pretrain/liver/images/.liver_000005.png.part123").exists()  # stale temp removed
    assert _hashes(root) == _hashes(tiny)


def _homogeneous(kind: str, seed: int):
    r = np.random.default_rng(seed)
    probe = random_probe(r, kind, 40.0 if kind == "linear" else 120.0)
    cv = Canvas(make_geometry(probe, 256, 256), r)  # uniform 0 dB tissue, full scatterer density
    return cv, r


@pytest.mark.parametrize("kind", ["linear", "phased"])
def test_speckle_is_rayleigh(kind):
    """Envelope SNR (mean/std) of fully developed speckle: sqrt(pi/(4-pi)) = 1.913."""
    rayleigh = np.sqrt(np.pi / (4 - np.pi))
    snrs = []
    for seed in range(4):
        cv, r = _homogeneous(kind, seed)
        img, env = simulate(cv, r, Physics(), return_envelope=True)
        assert img.dtype == np.uint8 and img.shape == (256, 256)
        reg = env[64:192, 48:208].astype(np.float64)  # homogeneous region, before log compression
        snrs.append(reg.mean() / reg.std())
    assert abs(np.mean(snrs) / rayleigh - 1) < 0.10, snrs
    assert all(abs(s / rayleigh - 1) < 0.10 for s in snrs), snrs


def test_probe_geometry():
    r = np.random.default_rng(0)
    lin = make_geometry(random_probe(r, "linear", 40.0), 200, 240)
    assert lin.fan.all() and lin.px_mm == pytest.approx(40.0 / 200)
    for kind in ("curvilinear", "phased", "endocavity"):
        cv, rr = _homogeneous(kind, 1)
        img = simulate(cv, rr, Physics())
        fan = cv.geom.fan
        assert 0.2 < fan.mean() < 0.9
        assert (img[~fan] == 0).all()  # black outside the sector
        assert img[fan].mean() > 40  # tissue inside
        assert not fan[0, 0] and not fan[0, -1] and not fan[-1, 0] and not fan[-1, -1]
        assert (fan == fan[:, ::-1]).mean() > 0.99  # symmetric about the centre line
        rows, cols = np.nonzero(fan.any(1))[0], np.nonzero(fan.any(0))[0]
        assert rows[0] <= 0.05 * fan.shape[0]  # starts at the top
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) >= 0.9 * fan.shape[0]  # fitted to height or width


def test_annotation_mask_is_exact(smoke):
    names = sorted(p.name for p in (smoke / "annotated/images").glob("*.png"))
    assert len(names) == 24
    for n in names:
        ann = cv2.imread(str(smoke / "annotated/images" / n), cv2.IMREAD_UNCHANGED)
        clean = cv2.imread(str(smoke / "annotated/clean" / n), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(smoke / "annotated/masks" / n), cv2.IMREAD_UNCHANGED)
        assert ann.shape == clean.shape and ann.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 255}
        off = mask == 0
        assert (ann[off] == clean[off]).all()
        assert (ann[~off] != clean[~off]).any(axis=-1).mean() > 0.5  # marks are visible where the mask is
        assert (clean[..., 0] == clean[..., 2]).all()  # the clean twin is grey


def test_pretrain_corpus(smoke):
    import nibabel as nib
    import SimpleITK as sitk

    info = json.loads((smoke / "synth.json").read_text())
    for a in info["anatomies"]:
        ims = sorted((smoke / "pretrain" / a / "images").glob("*.png"))
        assert len(ims) == 4, a
        im = cv2.imread(str(ims[0]), cv2.IMREAD_UNCHANGED)
        assert im.dtype == np.uint8 and im.ndim == 2 and min(im.shape) >= 224
        assert 8 < im.mean() < 200 and im.std() > 15  # neither blank nor saturated
    vids = sorted((smoke / "pretrain").glob("*/videos/*.avi"))
    assert len(vids) == 2
    cap = cv2.VideoCapture(str(vids[0]))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(24) and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 24
    ok, f0 = cap.read()
    assert ok and f0.shape == (224, 224, 3)
    nii = sorted((smoke / "pretrain").glob("*/volumes/*.nii.gz"))
    mhd = sorted((smoke / "pretrain").glob("*/volumes/*.mhd"))
    assert len(nii) == 1 and len(mhd) == 1
    v = nib.load(str(nii[0]))
    assert v.shape == (96, 96, 24) and v.get_fdata().max() > 100
    im = sitk.ReadImage(str(mhd[0]))
    assert im.GetSize() == (96, 96, 24) and sitk.GetArrayFromImage(im).std() > 10


def test_busbra_layout(smoke):
    root = smoke / "BUSBRA"
    df = pd.read_csv(root / "bus_data.csv")
    assert {"ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "BBOX"} <= set(df.columns)
    assert len(df) == 60 and set(df.Pathology) == {"benign", "malignant"}
    assert df.ID.str.fullmatch(r"bus_\d{4}-[lrs]").all() and df.Case.nunique() < len(df)
    for i in df.ID[:10]:
        im = cv2.imread(str(root / "Images" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        m = cv2.imread(str(root / "Masks" / f"mask_{i[4:]}.png"), cv2.IMREAD_GRAYSCALE)
        assert im.shape == m.shape and 224 <= min(im.shape) and max(im.shape) <= 320 and m.max() == 255
        x, y, w, h = json.loads(df.set_index("ID").BBOX[i])
        ys, xs = np.nonzero(m)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    for k, name in ((5, "5-fold-cv.csv"), (10, "10-fold-cv.csv")):
        cv = pd.read_csv(root / name)
        assert list(cv.columns) == ["ID", "Pathology", "kFold"] + [f"valid_{j}" for j in range(1, k + 1)]
        assert list(cv.ID) == list(df.ID) and set(cv.kFold) == set(range(1, k + 1))
        for j in range(1, k + 1):
            col = cv[f"valid_{j}"]
            assert (col.isna() == (cv.kFold == j)).all()
            assert set(col.dropna().unique()) <= {0, 1} and (col == 1).any()
        assert (cv.assign(Case=df.Case).groupby("Case").kFold.nunique() == 1).all()  # patients never cross folds


def test_otu_layout(smoke):
    root = smoke / "OTU_2d"
    rows = []
    for split in ("train", "val"):
        for line in (root / f"{split}_cls.txt").read_text().splitlines():
            name, lab = line.split()
            rows.append((split, name, int(lab)))
    df = pd.DataFrame(rows, columns=["split", "name", "label"])
    assert len(df) == 80 and df.name.is_unique and df.label.between(0, 7).all() and df.label.nunique() >= 6
    assert (df.split == "train").mean() > 0.5
    for name in df.name[:8]:
        sid = name[:-4]
        assert name.endswith(".JPG") and sid.isdigit()
        im = cv2.imread(str(root / "images" / name))
        b = cv2.imread(str(root / "annotations" / f"{sid}_binary.PNG"), cv2.IMREAD_GRAYSCALE)
        c = cv2.imread(str(root / "annotations" / f"{sid}.PNG"))
        assert im.shape[:2] == b.shape == c.shape[:2] and set(np.unique(b)) == {0, 255}
        assert ((c.sum(-1) > 0) == (b > 0)).all()


def test_gist_layout(smoke):
    root = smoke / "usd514_jpeg_roi"
    allj = json.loads((root / "annotations/all_anno_crop.json").read_text())
    assert {c["id"]: c["name"] for c in allj["categories"]} == {1: "leiomyoma", 2: "GIST"}
    ids = {im["id"] for im in allj["images"]}
    assert len(ids) == 40 and {a["category_id"] for a in allj["annotations"]} == {1, 2}
    seen = []
    for k in range(5):
        tr = json.loads((root / f"annotations/train_anno_crop_split_{k}.json").read_text())
        va = json.loads((root / f"annotations/val_anno_crop_split_{k}.json").read_text())
        t, v = {i["id"] for i in tr["images"]}, {i["id"] for i in va["images"]}
        assert not t & v and t | v == ids
        seen += sorted(v)
    assert sorted(seen) == sorted(ids)  # each image validates exactly once
    sizes = {im["id"]: (im["width"], im["height"], im["file_name"]) for im in allj["images"]}
    for a in allj["annotations"][:10]:
        w, h, fn = sizes[a["image_id"]]
        im = cv2.imread(str(root / "images" / fn))
        assert im.shape[:2] == (h, w)
        x, y, bw, bh = a["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw * bh > 0


def test_cli_registers_and_runs(tmp_path):
    ap = argparse.ArgumentParser(prog="usfmae")
    sub = ap.add_subparsers(dest="cmd")
    synthetic.add_cli(sub)
    args = ap.parse_args(["synth", "--out", str(tmp_path / "t"), "--seed", "5", "--n-pretrain", "3", "--n-busbra", "4",
                          "--n-otu", "4", "--n-gist", "4", "--n-annotated", "1", "--n-videos", "0",
                          "--n-volumes", "0", "--workers", "1", "--no-progress"])
    assert args.func(args) == 0
    info = json.loads((tmp_path / "t/synth.json").read_text())
    assert info["seed"] == 5 and info["params"]["n_pretrain"] == 3 and info["profile"] == "smoke"
    assert len(list((tmp_path / "t/pretrain").rglob("*.png"))) == 3
    assert not [p for p in (tmp_path / "t").rglob("*") if ".part" in p.name]
    assert os.path.exists(tmp_path / "t/BUSBRA/5-fold-cv.csv")


def test_bad_parameters_are_user_errors(tmp_path):
    for kw in (dict(profile="huge"), dict(n_pretrain=-1), dict(difficulty=1.5), dict(colour="red")):
        with pytest.raises(UsfmaeError):
            synthetic.generate_tree(tmp_path, progress=False, **kw)
