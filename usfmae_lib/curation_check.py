"""`usfmae data check ROOT ...`: what a data folder holds, in seconds, before a day-long curation.

No pixel is decoded. For each dataset curation would find under the roots (same mapping,
`curation.discover_datasets`; same file listing, `curation.list_dataset_files`) it reports the
registry name, its files by kind and extension, the frames curation would make, counted from
headers only, and Table 1's count beside it:

    image                          1
    video (OpenCV container)       ceil(n_frames / fps x video_fps)   (header: frame count, rate)
    animated GIF                   ceil(sum of its frame delays x video_fps)
    volume (NIfTI, MetaImage,      ceil(slices / slice_step)   (header: shape; DICOM NumberOfFrames)
    NRRD, DICOM)

A header that cannot be read counts 0 frames and one "unreadable header"; curation will say why.
The three evaluation sets found are loaded by the fine-tuning loaders on every official fold
(split files parsed and checked, image files' existence checked, not decoded); a layout error
there makes the command exit 1, so a script can stop before spending a GPU day.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from . import UsfmaeError
from .curation import DatasetDir, discover_datasets, list_dataset_files, load_registry
from .curation_readers import file_kind, gif_delays_shown

EVAL_LOADERS = {"BUS-BRA": "bus-bra", "MMOTU-2D": "mmotu-2d", "GIST514-DB": "gist514"}  # registry -> loader
SPLIT_FILES = {"bus-bra": ["bus_data.csv", "5-fold-cv.csv"], "mmotu-2d": ["train_cls.txt", "val_cls.txt"],
               "gist514": []}  # GIST514-DB's split files are found by its loader (names vary by release)


# ---------------------------------------------------------------------------- frames from headers
def _video_frames(path: Path, video_fps: float) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError("OpenCV cannot open it")
        n, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if not (n > 0 and fps > 0):
        raise ValueError("no frame count or rate in the container")
    return int(n) if video_fps <= 0 else min(int(n), math.ceil(n / fps * video_fps - 1e-9))


def _gif_frames(path: Path, video_fps: float) -> int:
    from PIL import Image

    with Image.open(path) as im:
        n, delays = im.n_frames, []
        for i in range(n):
            im.seek(i)  # frame headers only: Pillow decodes pixels on load()
            delays.append(int(im.info.get("duration", 0) or 0))
    total_ms = sum(gif_delays_shown(delays))
    if n == 1 or video_fps <= 0:
        return n
    return min(n, math.ceil(total_ms / 1000 * video_fps - 1e-9))


def _volume_slices(path: Path) -> int:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        shape = nib.load(str(path)).header.get_data_shape()  # (x, y, z, ...): z is sliced
        return int(shape[2]) if len(shape) >= 3 else 1
    if name.endswith((".mhd", ".mha", ".nrrd")):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()  # (x, y[, z])
        return int(size[2]) if len(size) >= 3 else 1
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return int(ds.get("NumberOfFrames", 1) or 1)


def expected_frames(path: Path, video_fps: float = 3.0, slice_step: int = 1) -> int:
    """Frames curation would make of one file, from its header (module docstring). Raises on a
    header that cannot be read."""
    kind = file_kind(path)
    if kind == "image":
        return 1
    if kind == "video":
        return _gif_frames(path, video_fps) if path.suffix.lower() == ".gif" else _video_frames(path, video_fps)
    n = _volume_slices(path)
    return 1 if n == 1 else math.ceil(n / max(1, slice_step))


# ---------------------------------------------------------------------------- evaluation sets
def check_eval_set(ds: DatasetDir) -> tuple[bool, str]:
    """(ok, one line): the fine-tuning loader of this evaluation set on every official fold."""
    from . import datasets

    key = EVAL_LOADERS[ds.name]
    present = [f for f in SPLIT_FILES[key] if (ds.path / f).is_file()]
    try:
        sizes = []
        for fold in datasets.official_folds(key):
            split = datasets.load_split(key, ds.path, **({"fold": fold} if key != "mmotu-2d" else {}))
            sizes.append(f"{len(split.train)}/{len(split.val)}/{len(split.test)}")
    except UsfmaeError as err:
        return False, f"LAYOUT ERROR: {err}"
    folds = datasets.official_folds(key)
    files = f"split files {', '.join(present)}; " if present else ""
    return True, (f"ok: {files}{len(folds)} fold(s) {folds}, train/val/test "
                  f"{sizes[0] if len(set(sizes)) == 1 else ' | '.join(sizes)}")


# ---------------------------------------------------------------------------- all roots
def _extension(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else (path.suffix.lower() or "(none)")


def check_roots(roots, video_fps: float = 3.0, slice_step: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per dataset folder found, one row per evaluation set found). Raises UsfmaeError
    for what stops curation too (a missing root, two folders mapping to one dataset)."""
    registry = load_registry().set_index("name")
    rows, evals = [], []
    for ds in discover_datasets(roots):
        files, skipped = list_dataset_files(ds)
        by_ext = Counter(f"{file_kind(f)} {_extension(f)}" for f in files)
        frames, bad = 0, 0
        for f in files:
            try:
                frames += expected_frames(f, video_fps, slice_step)
            except Exception:  # noqa: BLE001 - any header error: curation will reject it with the reason
                bad += 1
        table1 = int(registry.loc[ds.name, "paper_count"]) if ds.in_registry else None
        rows.append({"dataset": ds.name, "in_registry": ds.in_registry, "is_eval": ds.is_eval,
                     "folder": str(ds.path), "files": len(files), "skipped": len(skipped),
                     "kinds": ", ".join(f"{k} {n}" for k, n in sorted(by_ext.items())),
                     "expected_frames": frames, "unreadable_headers": bad, "table1": table1,
                     "of_table1": round(frames / table1, 3) if table1 else None})
        if ds.name in EVAL_LOADERS:
            ok, line = check_eval_set(ds)
            evals.append({"dataset": ds.name, "folder": str(ds.path), "ok": ok, "check": line})
    found = pd.DataFrame(rows, columns=["dataset", "in_registry", "is_eval", "folder", "files", "skipped", "kinds",
                                        "expected_frames", "unreadable_headers", "table1", "of_table1"])
    found["table1"] = found["table1"].astype("Int64")
    return found, pd.DataFrame(evals, columns=["dataset", "folder", "ok", "check"])


def describe(found: pd.DataFrame, evals: pd.DataFrame) -> str:
    registry = load_registry()
    lines = []
    known = found[found["in_registry"].astype(bool)]
    lines.append(f"{len(known)} of the {len(registry)} OpenUS-46 datasets found"
                 + (f"; missing: {', '.join(sorted(set(registry['name']) - set(known['dataset'])))}"
                    if len(known) < len(registry) else ""))
    if found.empty:
        lines.append("no dataset folder and no image, video or volume file directly under the roots: "
                     "each dataset goes in a folder of its own under a root (docs/data.md)")
    for r in found.itertuples():
        vs = f"Table 1 {int(r.table1):,} ({r.of_table1:.0%})" if r.in_registry else "not in OpenUS-46"
        lines.append(f"  {r.dataset:<22} {r.files:>7,} files ({r.kinds or 'none'}), {r.expected_frames:>8,} frames "
                     f"expected; {vs}" + (f"; {r.unreadable_headers} unreadable header(s)" if r.unreadable_headers else "")
                     + (f"; {r.skipped} skipped (masks, non-images)" if r.skipped else ""))
    unmatched = found.loc[~found["in_registry"].astype(bool), "folder"].tolist()
    if unmatched:
        lines.append(f"folders that match no dataset (curated under their own name): {', '.join(unmatched)}")
    if len(evals):
        lines.append("evaluation sets:")
        lines += [f"  {e.dataset:<11} {e.folder}: {e.check}" for e in evals.itertuples()]
    else:
        lines.append("evaluation sets: none found (BUSBRA/, OTU_2d/, usd514_jpeg_roi/; see docs/data.md)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def add_cli(subparsers):
    """Register `usfmae data check`."""
    p = subparsers.add_parser("data", help="inspect data roots before curating them",
                              description="Inspect data roots. See docs/data.md.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="which OpenUS-46 datasets the roots hold, in what shape (no pixel decoded)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    c.add_argument("roots", nargs="+", help="data roots, as given to `usfmae curate`")
    c.add_argument("--video-fps", type=float, default=3.0, help="frames per second of video (default 3, the paper)")
    c.add_argument("--slice-step", type=int, default=1, help="keep every n-th volume slice (default 1)")
    c.add_argument("--csv", default=None, help="also write the per-dataset table to this CSV file")
    c.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    found, evals = check_roots(args.roots, args.video_fps, args.slice_step)
    print(describe(found, evals))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        found.to_csv(args.csv, index=False)
    return 1 if len(evals) and not evals["ok"].all() else 0
