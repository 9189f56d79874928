"""Synthetic ultrasound: a deterministic miniature of the study's data.

`generate_tree(out_dir, seed, profile)` writes
    pretrain/<anatomy>/{images/*.png, videos/*.avi, volumes/*.nii.gz|*.mhd+*.raw}
    annotated/{images,clean,masks}/*.png
    BUSBRA/{Images,Masks,bus_data.csv,5-fold-cv.csv,10-fold-cv.csv}
    OTU_2d/{images/*.JPG,annotations/*.PNG,train_cls.txt,val_cls.txt}
    usd514_jpeg_roi/{images/*.jpg,annotations/*.json}
    synth.json
Image formation is in `synth_physics`, scenes in `synth_scenes`, marks in
`synth_annotations`. Every item takes its random numbers from
SeedSequence([seed, kind, index, ...]) so bytes never depend on workers, order or resume.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from . import UsfmaeError, __version__, atomic_write, atomic_write_bytes
from .synth_annotations import annotate
from .synth_physics import Physics, make_geometry, random_physics, simulate  # noqa: F401 (public)
from .synth_scenes import (ANATOMIES, OTU_CLASSES, Canvas, build_scene, breast_lesion, gi_tumour,
                           random_probe, scene_breast, scene_gi_wall, scene_otu)

# item kinds (part of every seed: never renumber)
K_STILL, K_VIDEO, K_VOLUME, K_ANNOT, K_BUSBRA, K_OTU, K_GIST, K_PLAN = range(8)

PROFILES = {
    "smoke": dict(n_pretrain=40, n_videos=2, video_frames=24, n_volumes=2, volume_shape=(24, 96, 96),
                  n_annotated=24, n_busbra=60, n_otu=80, n_gist=40),
    "quick": dict(n_pretrain=2000, n_videos=10, video_frames=48, n_volumes=6, volume_shape=(48, 128, 128),
                  n_annotated=300, n_busbra=600, n_otu=800, n_gist=400),
    "paper": dict(n_pretrain=30000, n_videos=100, video_frames=72, n_volumes=40, volume_shape=(64, 160, 160),
                  n_annotated=2000, n_busbra=1875, n_otu=1469, n_gist=514),
}
PROFILES["official"] = PROFILES["paper"]  # the study's official profile: another MAE recipe, the same data
DEFAULTS = dict(image_size=224, size_jitter=0.25, difficulty=0.5, fps=24, jpeg_quality=92,
                annotated_size=(256, 320), eval_size=(224, 320))
BUS_DEVICES = ("SYN-L12", "SYN-L9", "SONO-L7", "ECHO-14L", "U-LINEAR-10")


def _rng(seed: int, kind: int, index: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), kind, int(index), *extra]))


# ============================================================================ file IO
def _write_img(path: pathlib.Path, img: np.ndarray, quality: int = 92):
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, img, params)
    assert ok, path
    atomic_write_bytes(path, buf.tobytes())


def _write_video(path: pathlib.Path, frames: list[np.ndarray], fps: float):
    """MJPG in AVI via OpenCV's built-in writer (no timestamps: byte-reproducible)."""
    H, W = frames[0].shape[:2]

    def write(tmp):
        vw = cv2.VideoWriter(str(tmp), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H), True)
        assert vw.isOpened(), "cannot open MJPG writer"
        for f in frames:
            vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f)
        vw.release()
    atomic_write(path, write)


def _nifti_bytes(vol: np.ndarray, spacing: tuple) -> bytes:
    """NIfTI-1 single file (.nii) of a uint8 volume (D, H, W) -> stored x=W, y=H, z=D."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))
    aff = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm")
    return img.to_bytes()


def _write_nifti_gz(path: pathlib.Path, vol: np.ndarray, spacing: tuple):
    """.nii.gz with a fixed gzip header (mtime 0, no file name) so bytes are reproducible."""
    raw = _nifti_bytes(vol, spacing)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(raw) + comp.flush()
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    trailer = struct.pack("<II", zlib.crc32(raw) & 0xFFFFFFFF, len(raw) & 0xFFFFFFFF)
    atomic_write_bytes(path, header + body + trailer)


def _write_mhd(path: pathlib.Path, vol: np.ndarray, spacing: tuple):
    """MetaImage header + raw (what SimpleITK/ITK write, minus anything time-dependent).
    The raw file is written first; the .mhd (the 'done' marker) last."""
    raw = path.with_suffix(".raw")
    atomic_write_bytes(raw, np.ascontiguousarray(vol).tobytes())
    D, H, W = vol.shape
    hdr = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
           f"CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
           f"CenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
           f"ElementSpacing = {spacing[2]:.6g} {spacing[1]:.6g} {spacing[0]:.6g}\n"
           f"DimSize = {W} {H} {D}\nElementType = MET_UCHAR\nElementDataFile = {raw.name}\n")
    atomic_write_bytes(path, hdr.encode())


def _done(paths) -> bool:
    return all(pathlib.Path(p).exists() for p in paths)


# ============================================================================ rendering
def render(anatomy: str, seed: int, kind: int, index: int, H: int, W: int, t: float = 0.0, mode: str = "still",
           probe_kind: str | None = None, sweep: float = 0.0, frame: int = 0, scat=None, return_scene=False):
    """Render one frame of an anatomy. Parameters come from [seed, kind, index, 0] (the
    same for every frame), speckle/noise from [seed, kind, index, 1, frame]."""
    rp = _rng(seed, kind, index, 0)
    cv = build_scene(anatomy, rp, H, W, t=t, mode=mode, probe_kind=probe_kind, sweep=sweep)
    phys = random_physics(rp, cv.meta["probe"], cv.geom.probe.depth_mm, reverb=cv.meta.get("reverb", 0.0))
    img = simulate(cv, _rng(seed, kind, index, 1, frame), phys, scat=scat)
    return (img, cv) if return_scene else img


def _task_still(cfg, i):
    a = ANATOMIES[i % len(ANATOMIES)]
    path = cfg["root"] / "pretrain" / a / "images" / f"{a}_{i:06d}.png"
    if not _done([path]):
        r = _rng(cfg["seed"], K_STILL, i, 2)
        s, j = cfg["image_size"], cfg["size_jitter"]
        H, W = (int(s * (1 + r.uniform(0, j))), int(s * (1 + r.uniform(0, j)))) if j > 0 else (s, s)
        _write_img(path, render(a, cfg["seed"], K_STILL, i, H, W))
    return {}


VIDEO_SWEEPS = ("thyroid", "liver", "kidney", "breast", "muscle")


def _correlated(rng, prev, rho, shape):
    new = rng.standard_normal(shape, dtype=np.float32)
    return new if prev is None else (rho * prev + np.sqrt(1 - rho**2) * new).astype(np.float32)


def _task_video(cfg, i):
    """Even: beating heart (phased array, apical 4-chamber); odd: probe sweep."""
    heart = i % 2 == 0
    a = "heart" if heart else VIDEO_SWEEPS[(i // 2) % len(VIDEO_SWEEPS)]
    path = cfg["root"] / "pretrain" / a / "videos" / f"{a}_{i:04d}.avi"
    if _done([path]):
        return {}
    n, s = cfg["video_frames"], cfg["image_size"]
    rs = _rng(cfg["seed"], K_VIDEO, i, 3)
    frames, scat = [], None
    sweep = 0.0 if heart else 0.6
    Wd = int(s * (1 + sweep))
    for k in range(n):
        t = k / max(n - 1, 1)
        if heart:  # static tissue decorrelates slowly between frames
            scat = _correlated(rs, scat, 0.9, (s, s, 2))
            fs = scat
        else:  # scatterers move with the tissue under the sliding window
            scat = rs.standard_normal((s, Wd, 2), dtype=np.float32) if scat is None else scat
            off = int(round(t * (Wd - s)))
            fs = np.ascontiguousarray(scat[:, off:off + s])
        frames.append(render(a, cfg["seed"], K_VIDEO, i, s, s, t=t, mode="cine", sweep=sweep, frame=k, scat=fs))
    _write_video(path, frames, cfg["fps"])
    return {}


def _task_volume(cfg, i):
    """Even: ovary as NIfTI (.nii.gz); odd: fetal head as MetaImage (.mhd/.raw)."""
    a = "ovary" if i % 2 == 0 else "fetal_head"
    ext = ".nii.gz" if i % 2 == 0 else ".mhd"
    path = cfg["root"] / "pretrain" / a / "volumes" / f"{a}_{i:04d}{ext}"
    if _done([path]):
        return {}
    D, H, W = cfg["volume_shape"]
    rs = _rng(cfg["seed"], K_VOLUME, i, 3)
    scat, sl = None, []
    for k in range(D):
        scat = _correlated(rs, scat, 0.7, (H, W, 2))  # elevational speckle correlation
        img, cv = render(a, cfg["seed"], K_VOLUME, i, H, W, t=k / max(D - 1, 1), mode="volume", frame=k,
                         scat=scat, return_scene=True)
        sl.append(img)
    vol = np.stack(sl)
    px = cv.geom.px_mm
    spacing = (px * 1.5, px, px)  # (slice, row, col) mm: slices 1.5 px apart
    (_write_nifti_gz if ext == ".nii.gz" else _write_mhd)(path, vol, spacing)
    return {}


def _task_annot(cfg, i):
    """A screen capture: the scan on a black screen, with burned-in marks."""
    name = f"ann_{i:05d}.png"
    paths = [cfg["root"] / "annotated" / d / name for d in ("clean", "masks", "images")]
    if _done(paths):
        return {}
    a, r, clean, marks_at = annotated_screen(cfg["seed"], i, cfg["annotated_size"])
    ann, mask, kinds = annotate(clean, r, a, *marks_at)
    _write_img(paths[0], clean)
    _write_img(paths[1], mask)
    _write_img(paths[2], ann)
    return {}


def annotated_screen(seed: int, i: int, size) -> tuple:
    """Annotated scan i before its marks: (anatomy, rng, clean BGR screen, the rest of annotate's
    arguments). The rng is the one `annotate` must draw from next, so calling this and then
    `annotate(clean, rng, anatomy, *rest)` replays the generator exactly."""
    a = ANATOMIES[(i * 3) % len(ANATOMIES)]
    SH, SW = size
    r = _rng(seed, K_ANNOT, i, 2)
    top, left, right = 16, int(r.integers(6, 24)), 26
    H, W = SH - top - 4, SW - left - right
    img, cv = render(a, seed, K_ANNOT, i, H, W, return_scene=True)
    screen = np.zeros((SH, SW), np.uint8)
    screen[top:top + H, left:left + W] = img
    fan = np.zeros((SH, SW), bool)
    fan[top:top + H, left:left + W] = cv.geom.fan
    bb = cv.meta.get("lesion_bbox")
    if not bb or bb[2] < 4:
        bb = _label_bbox(cv) or None
    roi = (bb[0] + left, bb[1] + top, bb[2], bb[3]) if bb else None
    clean = cv2.cvtColor(screen, cv2.COLOR_GRAY2BGR)
    return a, r, clean, (cv.geom.probe.depth_mm, cv.geom.px_mm, roi, fan, (left, top, left + W, top + H))


def _label_bbox(cv: Canvas):
    ys, xs = np.nonzero(cv.labels)
    if xs.size < 16:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _eval_size(cfg, r):
    lo, hi = cfg["eval_size"]
    return int(r.integers(lo, (lo + hi) // 2 + 1)), int(r.integers((lo + hi) // 2, hi + 1))


def _mask_bbox(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _task_busbra(cfg, i, item):
    root = cfg["root"] / "BUSBRA"
    img_p, msk_p = root / "Images" / f"{item['ID']}.png", root / "Masks" / f"mask_{item['ID'][4:]}.png"
    if not _done([img_p, msk_p]):
        r = _rng(cfg["seed"], K_BUSBRA, i, 0)
        H, W = _eval_size(cfg, r)
        probe = random_probe(r, "linear", float(r.uniform(30, 50)))
        cv = Canvas(make_geometry(probe, H, W), r, base_alpha=10.0)
        scene_breast(cv, lesion=False)  # background breast, lesion drawn below
        cv.labels[:] = 0
        breast_lesion(cv, item["s"], center=(r.uniform(0.35, 0.6), r.uniform(0.35, 0.65)), size_mm=item["size_mm"],
                      view=item["view"] * np.pi / 2)
        dev = BUS_DEVICES.index(item["Device"])
        phys = random_physics(r, "linear", probe.depth_mm, dynamic_range_db=48 + 3 * dev, smooth_px=0.3 * dev)
        img = simulate(cv, _rng(cfg["seed"], K_BUSBRA, i, 1), phys)
        _write_img(msk_p, (cv.labels > 0).astype(np.uint8) * 255)
        _write_img(img_p, img)
    m = cv2.imread(str(msk_p), cv2.IMREAD_GRAYSCALE)
    return {"BBOX": _mask_bbox(m > 0)}


OTU_PALETTE = [(0, 0, 128), (0, 128, 0), (0, 128, 128), (128, 0, 0), (128, 0, 128), (128, 128, 0),
               (128, 128, 128), (0, 0, 64)]  # BGR colour of each class in annotations/<id>.PNG


def _task_otu(cfg, i, item):
    root = cfg["root"] / "OTU_2d"
    sid = str(item["id"])
    paths = [root / "annotations" / f"{sid}.PNG", root / "annotations" / f"{sid}_binary.PNG", root / "images" / f"{sid}.JPG"]
    if not _done(paths):
        r = _rng(cfg["seed"], K_OTU, i, 0)
        H, W = _eval_size(cfg, r)
        probe = random_probe(r, "endocavity", float(r.uniform(60, 90)))
        cv = Canvas(make_geometry(probe, H, W), r, base_alpha=6.5)
        m = scene_otu(cv, item["label"], cfg["difficulty"]) > 0.5
        phys = random_physics(r, "endocavity", probe.depth_mm)
        img = simulate(cv, _rng(cfg["seed"], K_OTU, i, 1), phys)
        col = np.zeros((H, W, 3), np.uint8)
        col[m] = OTU_PALETTE[item["label"]]
        _write_img(paths[0], col)
        _write_img(paths[1], m.astype(np.uint8) * 255)
        _write_img(paths[2], cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), cfg["jpeg_quality"])
    return {}


def _task_gist(cfg, i, item):
    root = cfg["root"] / "usd514_jpeg_roi"
    img_p = root / "images" / item["file_name"]
    # crop size + bbox, kept outside the dataset folder, so a resumed run can write the json
    side = cfg["root"] / ".synth_cache" / "gist" / f"{item['file_name']}.json"
    if not _done([img_p, side]):
        r = _rng(cfg["seed"], K_GIST, i, 0)
        S = int(r.integers(256, 321))
        probe = random_probe(r, str(r.choice(["linear", "endocavity"])), float(r.uniform(40, 60)))
        cv = Canvas(make_geometry(probe, S, S), r, base_alpha=8.0)
        scene_gi_wall(cv)
        cv.labels[:] = 0
        gi_tumour(cv, "gist" if item["category_id"] == 2 else "leiomyoma", item["s"], center=(r.uniform(0.5, 0.6), 0.5))
        img = simulate(cv, _rng(cfg["seed"], K_GIST, i, 1), random_physics(r, probe.kind, probe.depth_mm))
        x, y, w, h = _mask_bbox(cv.labels > 0)
        mg = r.uniform(0.15, 0.4)  # ROI crop around the tumour, as in the real set
        x0, y0 = max(int(x - mg * w), 0), max(int(y - mg * h), 0)
        x1, y1 = min(int(x + w + mg * w), S), min(int(y + h + mg * h), S)
        crop = img[y0:y1, x0:x1]
        meta = {"width": int(x1 - x0), "height": int(y1 - y0), "bbox": [x - x0, y - y0, w, h]}
        side.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(side, json.dumps(meta).encode())
        _write_img(img_p, cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR), cfg["jpeg_quality"])
    return json.loads(side.read_text())


def _dispatch(args):
    cfg, kind, i, item = args
    cv2.setNumThreads(1)
    if kind == K_STILL:
        return _task_still(cfg, i)
    if kind == K_VIDEO:
        return _task_video(cfg, i)
    if kind == K_VOLUME:
        return _task_volume(cfg, i)
    if kind == K_ANNOT:
        return _task_annot(cfg, i)
    return {K_BUSBRA: _task_busbra, K_OTU: _task_otu, K_GIST: _task_gist}[kind](cfg, i, item)


# ============================================================================ eval-set plans
def plan_busbra(seed: int, n: int, difficulty: float) -> list[dict]:
    """Patients with 1-3 views of one lesion each (mean ~1.8, like 1875 images / 1064 women);
    malignant ~1/3; malignancy score s ~ N(0.28 | 0.72, sd) with sd growing with difficulty."""
    r = _rng(seed, K_PLAN, K_BUSBRA)
    items, case = [], 0
    sd = 0.05 + 0.35 * difficulty
    while len(items) < n:
        case += 1
        k = min(int(r.choice([1, 2, 3], p=[0.4, 0.45, 0.15])), n - len(items))
        mal = bool(r.random() < 0.324)
        s = float(np.clip(r.normal(0.72 if mal else 0.28, sd), 0, 1))
        size = float(r.uniform(8, 24) if mal else r.uniform(6, 20))
        dev = BUS_DEVICES[int(r.integers(len(BUS_DEVICES)))]
        hist = (["invasive ductal carcinoma"] * 6 + ["invasive lobular carcinoma", "ductal carcinoma in situ", "mucinous carcinoma"]
                if mal else ["fibroadenoma"] * 5 + ["cyst", "fibrocystic change", "papilloma", "lipoma"])
        histo = hist[int(r.integers(len(hist)))]
        birads = int(r.choice([4, 5], p=[0.4, 0.6])) if mal else int(r.choice([2, 3, 4], p=[0.3, 0.5, 0.2]))
        for v in range(k):
            items.append(dict(ID=f"bus_{case:04d}-{'lrs'[v]}", Case=case, Histology=histo,
                              Pathology="malignant" if mal else "benign", BIRADS=birads, Device=dev,
                              s=s, size_mm=size, view=v))
    return items


def _patient_folds(r, cases: np.ndarray, strata: np.ndarray, k: int) -> dict:
    """Stratified assignment of patients to k folds (1-based)."""
    out = {}
    for st in np.unique(strata):
        cs = cases[strata == st]
        cs = cs[r.permutation(len(cs))]
        for j, c in enumerate(cs):
            out[int(c)] = j % k + 1
    return out


def _write_busbra_tables(root: pathlib.Path, seed: int, items: list[dict], metas: list[dict]):
    import pandas as pd

    cols = ("ID", "Case", "Histology", "Pathology", "BIRADS", "Device")
    df = pd.DataFrame([{k: it[k] for k in cols} for it in items], columns=list(cols))
    df["BBOX"] = [str(m["BBOX"]) for m in metas]
    df.to_csv(root / "bus_data.csv", index=False)
    pat = df.groupby("Case")["Pathology"].first()
    for k, fname in ((5, "5-fold-cv.csv"), (10, "10-fold-cv.csv")):
        r = _rng(seed, K_PLAN, K_BUSBRA, k)
        fold = _patient_folds(r, pat.index.to_numpy(), pat.to_numpy().astype(str), k)
        cv = pd.DataFrame({"ID": df["ID"], "Pathology": df["Pathology"], "kFold": df["Case"].map(fold)})
        for j in range(1, k + 1):  # 1 train, 0 validation (~15% of training patients), empty = test
            val_cases = {c for c in pat.index if fold[c] != j and r.random() < 0.15}
            col = [np.nan if f == j else (0 if c in val_cases else 1) for f, c in zip(cv["kFold"], df["Case"])]
            cv[f"valid_{j}"] = pd.array(col, dtype="Int64")
        cv.to_csv(root / fname, index=False)


def plan_otu(seed: int, n: int) -> list[dict]:
    """Ids 1..n, 8 classes with unequal frequencies, ~68% train (1000/1469)."""
    r = _rng(seed, K_PLAN, K_OTU)
    p = np.array([0.2, 0.14, 0.11, 0.06, 0.12, 0.1, 0.15, 0.12])
    labels = r.choice(8, size=n, p=p / p.sum())
    train = r.random(n) < 1000 / 1469
    return [dict(id=i + 1, label=int(labels[i]), train=bool(train[i])) for i in range(n)]


def plan_gist(seed: int, n: int, difficulty: float) -> list[dict]:
    """251 GIST / 263 leiomyoma proportions; s ~ N(0.3 | 0.7, sd); 5 stratified folds."""
    r = _rng(seed, K_PLAN, K_GIST)
    cat = np.where(r.random(n) < 251 / 514, 2, 1)
    sd = 0.05 + 0.35 * difficulty
    s = np.clip(r.normal(np.where(cat == 2, 0.7, 0.3), sd), 0, 1)
    fold = np.zeros(n, int)
    for c in (1, 2):
        idx = np.nonzero(cat == c)[0]
        idx = idx[r.permutation(len(idx))]
        fold[idx] = np.arange(len(idx)) % 5
    return [dict(file_name=f"usd_{i + 1:04d}.jpg", category_id=int(cat[i]), s=float(s[i]), fold=int(fold[i]))
            for i in range(n)]


def _write_gist_json(root: pathlib.Path, items: list[dict], metas: list[dict]):
    cats = [{"id": 1, "name": "leiomyoma"}, {"id": 2, "name": "GIST"}]

    def coco(sel):
        imgs, anns = [], []
        for i in sel:
            it, m = items[i], metas[i]
            imgs.append({"id": i + 1, "file_name": it["file_name"], "width": m["width"], "height": m["height"]})
            x, y, w, h = m["bbox"]
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": it["category_id"], "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        return {"images": imgs, "annotations": anns, "categories": cats}

    ann = root / "annotations"
    atomic_write_bytes(ann / "all_anno_crop.json", json.dumps(coco(range(len(items)))).encode())
    for k in range(5):
        val = [i for i, it in enumerate(items) if it["fold"] == k]
        tr = [i for i, it in enumerate(items) if it["fold"] != k]
        atomic_write_bytes(ann / f"train_anno_crop_split_{k}.json", json.dumps(coco(tr)).encode())
        atomic_write_bytes(ann / f"val_anno_crop_split_{k}.json", json.dumps(coco(val)).encode())


# ============================================================================ tree
def resolve_config(seed: int = 0, profile: str = "smoke", **overrides) -> dict:
    """Profile counts + defaults + overrides (None = keep), validated."""
    if profile not in PROFILES:
        raise UsfmaeError(f"synth profile {profile!r} unknown: use one of {sorted(PROFILES)}")
    cfg = {**DEFAULTS, **PROFILES[profile]}
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in cfg:
            raise UsfmaeError(f"unknown synth parameter {k!r}; known: {sorted(cfg)}")
        cfg[k] = v
    cfg.update(seed=int(seed), profile=profile)
    for k in ("volume_shape", "annotated_size", "eval_size"):
        cfg[k] = tuple(int(v) for v in cfg[k])
    if not 0.0 <= float(cfg["difficulty"]) <= 1.0:
        raise UsfmaeError(f"difficulty must be in [0, 1], got {cfg['difficulty']}")
    bad = [k for k in cfg if k.startswith("n_") and int(cfg[k]) < 0]
    if bad or cfg["image_size"] < 64 or cfg["video_frames"] < 1:
        raise UsfmaeError(f"counts must be >= 0 and image_size >= 64 (got {bad or cfg['image_size']})")
    return cfg


def tree_dir(out_dir) -> pathlib.Path:
    """Where the study keeps its synthetic raw data: `<out_dir>/synthetic/`, a raw root beside
    the step folders (not inside 01_curation/, whose outputs must not hold their own input)."""
    return pathlib.Path(out_dir) / "synthetic"


def generate_tree(out_dir, seed: int = 0, profile: str = "smoke", workers: int | None = None,
                  progress: bool = True, **overrides) -> pathlib.Path:
    """Write the whole synthetic tree under out_dir (see module docstring) and synth.json.

    Overrides (keyword): n_pretrain, n_videos, video_frames, n_volumes, volume_shape,
    n_annotated, n_busbra, n_otu, n_gist, image_size, size_jitter, difficulty, fps,
    jpeg_quality, annotated_size, eval_size. Finished files are skipped (resume).
    """
    cfg = resolve_config(seed, profile, **overrides)
    root = pathlib.Path(out_dir)
    workers = workers or os.cpu_count() or 1
    bus = plan_busbra(seed, cfg["n_busbra"], cfg["difficulty"])
    otu = plan_otu(seed, cfg["n_otu"])
    gist = plan_gist(seed, cfg["n_gist"], cfg["difficulty"])
    dirs = [f"pretrain/{a}/{d}" for a in ANATOMIES for d in ("images", "videos", "volumes")]
    dirs += ["annotated/images", "annotated/clean", "annotated/masks", "BUSBRA/Images", "BUSBRA/Masks",
             "OTU_2d/images", "OTU_2d/annotations", "usd514_jpeg_roi/images", "usd514_jpeg_roi/annotations"]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        for stale in (root / d).glob(".*.part*"):  # temp files of a killed run
            stale.unlink()
    wcfg = {**cfg, "root": root}
    # heavy items first so the pool stays busy at the end
    tasks = [(wcfg, K_VIDEO, i, None) for i in range(cfg["n_videos"])]
    tasks += [(wcfg, K_VOLUME, i, None) for i in range(cfg["n_volumes"])]
    tasks += [(wcfg, K_STILL, i, None) for i in range(cfg["n_pretrain"])]
    tasks += [(wcfg, K_ANNOT, i, None) for i in range(cfg["n_annotated"])]
    tasks += [(wcfg, K_BUSBRA, i, it) for i, it in enumerate(bus)]
    tasks += [(wcfg, K_OTU, i, it) for i, it in enumerate(otu)]
    tasks += [(wcfg, K_GIST, i, it) for i, it in enumerate(gist)]
    results = _run_tasks(tasks, workers, progress)
    nb, no = len(bus), len(otu)
    off = cfg["n_videos"] + cfg["n_volumes"] + cfg["n_pretrain"] + cfg["n_annotated"]
    _write_busbra_tables(root / "BUSBRA", seed, bus, results[off:off + nb])
    lines = {True: [], False: []}
    for it in otu:
        lines[it["train"]].append(f"{it['id']}.JPG {it['label']}\n")
    atomic_write_bytes(root / "OTU_2d" / "train_cls.txt", "".join(lines[True]).encode())
    atomic_write_bytes(root / "OTU_2d" / "val_cls.txt", "".join(lines[False]).encode())
    _write_gist_json(root / "usd514_jpeg_roi", gist, results[off + nb + no:])
    info = {"generator": "usfmae_lib.synthetic", "version": __version__, "seed": int(seed), "profile": profile,
            "params": {k: v for k, v in cfg.items() if k not in ("seed", "profile")},
            "anatomies": list(ANATOMIES), "otu_classes": list(OTU_CLASSES),
            "gist_categories": {"1": "leiomyoma", "2": "GIST"}, "busbra_devices": list(BUS_DEVICES),
            "video_fps": cfg["fps"], "video_format": "AVI (MJPG)",
            "volume_formats": {"ovary": "NIfTI .nii.gz", "fetal_head": "MetaImage .mhd/.raw"}}
    atomic_write_bytes(root / "synth.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return root


def _pool_worker_init():
    from .safety import end_with_parent

    end_with_parent()  # a killed run leaves no worker behind
    cv2.setNumThreads(1)  # one process per core


def _run_tasks(tasks, workers: int, progress: bool) -> list[dict]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="synth", unit="item")
    out = []
    if workers <= 1:
        old = cv2.getNumThreads()
        try:
            for t in tasks:
                out.append(_dispatch(t))
                if bar:
                    bar.update(1)
        finally:
            cv2.setNumThreads(old)
    else:
        # spawn, not fork: a forked child can inherit locked OpenCV/BLAS thread pools and hang
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_worker_init) as ex:
            for r in ex.map(_dispatch, tasks, chunksize=4):
                out.append(r)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return out


# ============================================================================ gallery
def plot_gallery(tree_dir):
    """Figure: one still per anatomy, linear vs sector examples, an annotated image beside
    its clean twin and its mask."""
    import matplotlib.pyplot as plt

    root = pathlib.Path(tree_dir)
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.6))
    for ax, a in zip(axes[:2].ravel(), ANATOMIES):
        files = sorted((root / "pretrain" / a / "images").glob("*.png"))
        if files:
            ax.imshow(cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE), cmap="gray", vmin=0, vmax=255)
        ax.set_title(a.replace("_", " "), fontsize=10)
    names = sorted((root / "annotated" / "images").glob("*.png"))
    row = axes[2]
    if names:
        n = names[0].name
        for ax, d, t in zip(row[:3], ("images", "clean", "masks"), ("annotated", "clean twin", "annotation mask")):
            im = cv2.imread(str(root / "annotated" / d / n), cv2.IMREAD_UNCHANGED)
            ax.imshow(im[..., ::-1] if im.ndim == 3 else im, cmap="gray", vmin=0, vmax=255)  # a mask of 0/255, grey scans on one scale
            ax.set_title(t, fontsize=10)
    for ax, kind in zip(row[3:], ("linear", "phased")):
        geo = make_geometry(random_probe(np.random.default_rng(0), kind, 40.0 if kind == "linear" else 140.0), 224, 224)
        img = render("breast" if kind == "linear" else "heart", 0, K_STILL, 10**6, 224, 224, probe_kind=kind)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{kind} probe ({'rectangle' if kind == 'linear' else 'sector'}; fan {geo.fan.mean():.0%})", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Synthetic B-mode ultrasound (usfmae synth)")
    fig.tight_layout()
    return fig


# ============================================================================ CLI
def add_cli(subparsers):
    """Register `usfmae synth` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "synth", help="write a synthetic ultrasound tree (pretraining corpus + eval sets)",
        description="Simulate B-mode ultrasound and write a miniature of the study's data, "
                    "deterministically from --seed: pretrain/, annotated/, BUSBRA/, OTU_2d/, "
                    "usd514_jpeg_roi/ and synth.json. Re-running resumes.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    p.add_argument("--n-pretrain", type=int, help="number of pretraining stills (all anatomies)")
    p.add_argument("--n-videos", type=int)
    p.add_argument("--n-volumes", type=int)
    p.add_argument("--n-annotated", type=int)
    p.add_argument("--n-busbra", type=int)
    p.add_argument("--n-otu", type=int)
    p.add_argument("--n-gist", type=int)
    p.add_argument("--image-size", type=int, help="pretraining still / video size (px)")
    p.add_argument("--difficulty", type=float, help="class overlap of the eval sets, 0 (easy) .. 1 (hard)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cli)
    return p


_CLI_KEYS = ("n_pretrain", "n_videos", "n_volumes", "n_annotated", "n_busbra", "n_otu", "n_gist", "image_size", "difficulty")


def _run_cli(args) -> int:
    over = {k: getattr(args, k) for k in _CLI_KEYS if getattr(args, k, None) is not None}
    root = generate_tree(args.out, seed=args.seed, profile=args.profile, workers=args.workers,
                         progress=not args.no_progress, **over)
    print(f"synthetic tree written to {root}")
    return 0
