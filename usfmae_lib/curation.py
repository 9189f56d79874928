"""Curation: dataset folders -> one deduplicated, leakage-audited manifest of 2D frames.

    curate(roots, out_dir, video_fps=3.0, slice_axis=0, slice_step=1, phash_threshold=20, workers=0,
           deduplicate=True, remove_leakage=True)
    usfmae curate ROOT [ROOT ...] --out DIR [--no-deduplicate] [--no-remove-leakage]

How roots map to datasets (`discover_datasets`):
  1. a ROOT that holds synth.json and pretrain/ is a synthetic tree (`usfmae synth`): every
     pretrain/<anatomy>/ is the pretraining dataset "synth_<anatomy>" with that anatomy;
     annotated/ is skipped (it is notebook 02's test bed: its clean twins and masks are not
     scans, and its annotated scans carry no anatomy); the other first-level folders follow 3.
  2. a ROOT whose own name matches the OpenUS-46 registry (name or alias, compared without case
     and punctuation: "BUS-BRA" = "BUSBRA" = "bus_bra") is that one dataset.
  3. otherwise every first-level folder of ROOT is a dataset: matched to the registry by name or
     alias (anatomy and evaluation flag from the registry), or, unmatched, curated under the
     folder's own name with anatomy "unknown" and reported (datasets.csv, in_registry False).
     Files lying directly in ROOT form a dataset named after ROOT.
  Registry datasets with is_eval (BUS-BRA, MMOTU-2D, GIST514-DB) are evaluation sets: their
  images are read and hashed for the leakage audit, never put in the manifest.
  Inside a dataset, hidden files and folders are skipped, and so are folders and files whose
  name has a mask/annotation word (mask, annotation, label, gt, seg, ... see MASK_WORDS:
  BUSBRA/Masks, OTU_2d/annotations, "benign (1)_mask.png", "000_HC_Annotation.png"); files
  with no image/video/volume extension (csv, json, txt, .raw data of an .mhd) are skipped too.
  Skipped files are listed in skipped.csv.

Reading (curation_readers): images, videos sampled at video_fps per second of video time,
volumes sliced along slice_axis every slice_step slices. Every frame is converted to uint8 RGB
(`load_frame` gives the same array back) and hashed: content_hash = BLAKE2b-128 of its shape and
RGB bytes (identical as the model would see it); phash and phash256 = imagehash.phash with 64
and 256 bits (16 and 64 hex digits). Files that cannot be read go to rejects.csv with a reason;
the run goes on.

Near duplicates ("the same frame resized or re-encoded"): 64-bit phashes within CANDIDATE_BITS
(6) AND 256-bit phashes within phash_threshold (20). The 64-bit hash alone cannot tell apart
distinct scans of one standard view (sector outline, apical four-chamber, fetal head): on the
quick synthetic tree, 1,264 pairs of distinct scans from different files are within 6 bits, 3
of them at 0, while their 256-bit hashes are >= 28 bits apart. Of 400 copies resized (0.4-2x)
and re-encoded as JPEG (quality 50-90), all are within 6 bits (64-bit) and 99% within 14 bits
(256-bit; the worst 24, missed at 20). Numbers in docs/curation.md. Distances are even.

Audit, in this order, over frames in manifest order (dataset, file path, frame):
  1. leakage: a pretraining frame near an evaluation frame is dropped and listed in
     leakage.csv with its nearest evaluation frame (leakage_pairs.csv: counts per pretraining
     dataset x evaluation set);
  2. exact duplicates: frames with the same content_hash, the first kept;
  3. near duplicates among frames of different files; going through frames in order, a frame is
     dropped when it is near an earlier kept frame (the first such is recorded). Frames of one
     video or volume are not compared with each other: sampling at video_fps and slice_step is
     what controls redundancy inside a file, as in the paper.
  Both duplicate kinds go to duplicates.csv with the kept frame; distances are 256-bit ones.
  Both steps are this study's additions: the paper describes no deduplication, and says only that
  the evaluation images were "reserved for evaluation" and "none of these datasets were included
  in the pretraining corpus" (whole datasets, which stay out of the manifest whatever the switches
  say).
  deduplicate=False keeps the duplicates (step 2-3) and remove_leakage=False keeps the frames near
  an evaluation frame (step 1) in the manifest: the audit still runs and lists them (the `dropped`
  column of duplicates.csv and leakage.csv is then False; data/frames.parquet's `audit` column
  says what the audit found, `status` what happened), and a warning is printed and recorded in
  summary.json (SWITCH_WARNINGS). Switching either never re-reads a file (the cache is per file).

Resuming: each file's result is stored in OUT/cache/files.sqlite (keyed by path, size,
mtime and the settings that change its frames) as soon as it is read, committed every fraction
of a second; a killed run starts again where it stopped and reads no finished file twice.
The outputs are sorted, so they do not depend on worker count, order of completion or resumes.

Outputs in OUT (written atomically): manifest.parquet, manifest.csv, rejects.csv,
duplicates.csv, leakage.csv, leakage_pairs.csv, datasets.csv, skipped.csv, table1.{csv,md,tex},
summary.json, data/frames.parquet (every frame read, with its status and audit), cache/files.sqlite.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import UsfmaeError, atomic_write, help_with_defaults
from .safety import check_output, end_with_parent, folder_lock
from .curation_readers import (content_hash, file_kind, load_frame, perceptual_hash,  # noqa: F401 (public)
                               read_file, init_worker)

PAPER_TOTAL = 374_192  # paper section 2.1: "374,192 images exactly" (the sum of Table 1, eval sets included)
PAPER_TEXT_EVAL = 10_578  # paper section 2.1: "An additional 10,578 images were reserved for evaluation"
US43D_SIZE = 43  # paper section 1: "US-43d, a collection of 43 open-access US datasets"
PAPER_TEXT_US43D_KEPT = 36  # paper section 1: "Of the datasets originally included in US-43d, 36 were incorporated"
READER_VERSION = 3  # part of the cache key: bump when a reader changes what it returns
CANDIDATE_BITS = 6  # near-duplicate candidates: 64-bit phashes at most this far apart (then phash256 decides)
MASK_WORDS = {"mask", "masks", "annotation", "annotations", "anno", "annot", "label", "labels", "gt",
              "groundtruth", "seg", "segmentation", "segmentations"}
SYNTH_SKIP = {"annotated"}  # first-level folders of a synthetic tree that are not pretraining data
# printed and recorded in summary.json when a switch of curate is off: what is kept, what it risks
SWITCH_WARNINGS = {
    "deduplicate": "deduplicate is off: exact and near duplicate pretraining frames stay in the manifest "
                   "({n} found, listed in duplicates.csv with dropped=False); repeated images weight the corpus "
                   "toward what they repeat (the MAE sees those images more often than the others)",
    "remove_leakage": "remove_leakage is off: pretraining frames that are near copies of an evaluation image stay "
                      "in the manifest ({n} found, listed in leakage.csv with dropped=False); evaluation images may "
                      "then enter pretraining, so notebooks 05-07 would no longer be a fair test on unseen images "
                      "(the evaluation datasets' own folders are still never in the manifest)",
}
MANIFEST_COLUMNS = ["frame_id", "dataset", "anatomy", "source", "kind", "frame", "axis", "width", "height",
                    "channels", "bit_depth", "content_hash", "phash", "phash256"]


# ============================================================================ registry
def load_registry() -> pd.DataFrame:
    """OpenUS-46 (usfmae_lib/data/openus46.csv): name, anatomy, paper_count, link, licence,
    file_kinds, is_eval, us43d (bold in the paper's Table 1: "also included in US-43d"), aliases
    (';'-separated folder names), notes. 46 rows."""
    with resources.files("usfmae_lib").joinpath("data/openus46.csv").open("r", encoding="utf-8") as f:
        reg = pd.read_csv(f, keep_default_na=False, dtype=str)
    reg["paper_count"] = reg["paper_count"].astype(int)
    reg["is_eval"] = reg["is_eval"].astype(int).astype(bool)
    bad = sorted(set(reg["us43d"]) - {"true", "false"})
    if bad:
        raise UsfmaeError(f"registry openus46.csv: us43d must be true or false, found {bad}")
    reg["us43d"] = reg["us43d"] == "true"
    return reg


def normalise_name(name: str) -> str:
    """Lower case, letters and digits only: how folder names are matched to the registry."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def registry_index(registry: pd.DataFrame) -> dict[str, dict]:
    """normalised name or alias -> registry row (as a dict)."""
    index = {}
    for row in registry.to_dict("records"):
        for key in [row["name"], *[a for a in row["aliases"].split(";") if a.strip()]]:
            norm = normalise_name(key)
            if norm in index and index[norm]["name"] != row["name"]:
                raise UsfmaeError(f"registry openus46.csv: {key!r} names both {index[norm]['name']} and {row['name']}")
            index[norm] = row
    return index


def registry_summary(registry: pd.DataFrame) -> dict:
    """The registry's totals beside the paper's text (they disagree; see notebook 01)."""
    total = int(registry["paper_count"].sum())
    eval_sum = int(registry.loc[registry["is_eval"], "paper_count"].sum())
    gap = PAPER_TEXT_EVAL - eval_sum
    return {"datasets": len(registry), "table1_sum": total, "paper_total": PAPER_TOTAL,
            "eval_sets_in_table1": eval_sum, "table1_sum_without_eval": total - eval_sum,
            "paper_text_eval_held_out": PAPER_TEXT_EVAL, "text_minus_table1_eval": gap,
            "datasets_with_that_count": registry.loc[registry["paper_count"] == gap, "name"].tolist(),
            "us43d_bold_in_table1": int(registry["us43d"].sum()),
            "us43d_not_bold": registry.loc[~registry["us43d"], "name"].tolist(),
            "us43d_kept_in_text": PAPER_TEXT_US43D_KEPT}


def us43d_note(registry: pd.DataFrame) -> str:
    """The footnote of the US-43d marker: it copies the paper's bold, which disagrees with its text."""
    s = registry_summary(registry)
    excluded = US43D_SIZE - s["us43d_kept_in_text"]
    return (f"US-43d: yes where the paper's Table 1 prints the name in bold (\"Datasets in bold are also included "
            f"in US-43d\"): {s['us43d_bold_in_table1']} of {s['datasets']} rows, all but "
            f"{', '.join(s['us43d_not_bold'])}. The paper's introduction says instead that only "
            f"{s['us43d_kept_in_text']} of US-43d's {US43D_SIZE} datasets were incorporated into OpenUS-46 and "
            f"{excluded} excluded: {s['us43d_bold_in_table1']} bold rows and {s['us43d_kept_in_text']} "
            f"incorporated datasets disagree, and the paper does not say which {excluded} are meant. "
            "The marker copies the bold.")


# ============================================================================ roots -> datasets
@dataclass(frozen=True)
class DatasetDir:
    name: str  # dataset name in the manifest (the registry name when matched)
    anatomy: str
    path: Path  # its folder
    root: Path  # the ROOT it was found under
    is_eval: bool = False
    in_registry: bool = False
    recursive: bool = True  # False: only the files directly in `path` (loose files of a ROOT)


def _from_folder(folder: Path, root: Path, index: dict, recursive: bool = True) -> DatasetDir:
    row = index.get(normalise_name(folder.name))
    if row is None:
        return DatasetDir(folder.name, "unknown", folder, root, recursive=recursive)
    return DatasetDir(row["name"], row["anatomy"], folder, root, bool(row["is_eval"]), True, recursive)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover_datasets(roots, registry: pd.DataFrame | None = None) -> list[DatasetDir]:
    """Map data roots to datasets by the rules in the module docstring."""
    index = registry_index(load_registry() if registry is None else registry)
    if isinstance(roots, (str, Path)):
        roots = [roots]
    resolved = []
    for root in roots:
        p = Path(root).expanduser()
        if not p.exists():
            raise UsfmaeError(f"data root {root} does not exist: check the path (or leave data_roots empty "
                              f"to curate the synthetic tree)")
        if not p.is_dir():
            raise UsfmaeError(f"data root {root} is not a folder: pass the folder that holds the dataset(s)")
        resolved.append(p.resolve())
    for a, b in itertools.permutations(resolved, 2):
        if a == b or b.is_relative_to(a):
            raise UsfmaeError(f"data root {b} is {'the same as' if a == b else 'inside'} data root {a}: "
                              f"pass each folder once")
    found: list[DatasetDir] = []
    for root in resolved:
        if (root / "synth.json").is_file() and (root / "pretrain").is_dir():
            for sub in _subdirs(root / "pretrain"):
                found.append(DatasetDir(f"synth_{sub.name}", sub.name, sub, root))
            found += [_from_folder(sub, root, index) for sub in _subdirs(root)
                      if sub.name not in SYNTH_SKIP | {"pretrain"}]
        elif normalise_name(root.name) in index:
            found.append(_from_folder(root, root, index))
        else:
            found += [_from_folder(sub, root, index) for sub in _subdirs(root)]
            if any(f.is_file() and file_kind(f) for f in root.iterdir() if not f.name.startswith(".")):
                found.append(_from_folder(root, root, index, recursive=False))
    by_name: dict[str, DatasetDir] = {}
    for ds in found:
        if ds.name in by_name:
            raise UsfmaeError(f"folders {by_name[ds.name].path} and {ds.path} both map to dataset {ds.name!r}: "
                              f"pass only one of them, or rename one")
        by_name[ds.name] = ds
    return found


def is_mask_name(name: str) -> bool:
    """True for a file stem or folder name that holds a mask/annotation word (MASK_WORDS), e.g.
    `benign (1)_mask`, `masks`, `GT`: such files are never frames, nor fine-tuning samples."""
    return bool(set(re.split(r"[^a-z0-9]+", name.lower())) & MASK_WORDS)


def list_dataset_files(ds: DatasetDir) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(frame files, [(skipped path, why)]) of one dataset, both sorted.

    Every entry below the dataset's folder ends up in one of the two lists, so that curation
    accounts for each file: a frame file (later a frame, a duplicate or a reject) or a skip with
    its reason (mask/annotation, hidden, not a frame file, broken link, unreadable folder, a
    link back to a folder already read). Links to folders are followed once."""
    files, skipped = [], []

    def unreadable(err: OSError):
        skipped.append((Path(err.filename or ds.path), f"unreadable folder ({err.strerror or err})"))

    if ds.recursive:
        walker = os.walk(ds.path, onerror=unreadable, followlinks=True)
    else:  # loose files of a ROOT: its folders are datasets of their own
        try:
            names = [n for n in os.listdir(ds.path) if not (ds.path / n).is_dir()]
        except OSError as err:
            unreadable(err)
            names = []
        walker = [(str(ds.path), [], names)]
    seen = {os.path.realpath(ds.path)}
    for dirpath, dirnames, filenames in walker:
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            path = here / d
            real = os.path.realpath(path)
            if d.startswith("."):
                skipped.append((path, "hidden folder"))
            elif is_mask_name(d):
                skipped.append((path, "mask/annotation folder"))
            elif real in seen:
                skipped.append((path, "link to a folder already read (a symlink loop or a second name)"))
            else:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = here / name
            stem = name.split(".")[0]
            if name.startswith("."):
                skipped.append((path, "hidden file"))
            elif path.is_symlink() and not path.exists():
                skipped.append((path, "broken link (its target is missing, or the link points to itself)"))
            elif not path.is_file():
                skipped.append((path, "not a regular file"))
            elif file_kind(path) is None:
                skipped.append((path, f"not an image, video or volume ({path.suffix or 'no extension'})"))
            elif is_mask_name(stem):
                skipped.append((path, "mask/annotation file"))
            else:
                files.append(path)
    return sorted(files), sorted(skipped)


# ============================================================================ reading one file
def _settings_key(path: Path, video_fps: float, slice_axis: int, slice_step: int) -> str:
    """What, besides the bytes, decides a file's frames (part of the cache key)."""
    kind = file_kind(path)
    if kind == "video":
        return f"r{READER_VERSION} video_fps={video_fps:g}"
    if kind == "volume":
        return f"r{READER_VERSION} axis={slice_axis} step={slice_step}"
    return f"r{READER_VERSION}"


# ============================================================================ cache (resume)
class FileCache:
    """Per-file results in SQLite: written by the main process only, committed every
    `commit_every_s` seconds, so a kill loses at most that much work and never leaves junk."""

    def __init__(self, path: Path, commit_every_s: float = 0.25):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT NOT NULL, settings TEXT NOT NULL, "
                        "size INTEGER, mtime_ns INTEGER, result TEXT, PRIMARY KEY (path, settings))")
        self.db.commit()
        self.commit_every_s, self.last_commit, self.pending = commit_every_s, time.monotonic(), 0

    def load(self) -> dict:
        rows = self.db.execute("SELECT path, settings, size, mtime_ns, result FROM files")
        return {(p, s): (size, mtime, res) for p, s, size, mtime, res in rows}

    def put(self, path: str, settings: str, size: int, mtime_ns: int, result: dict):
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                        (path, settings, size, mtime_ns, json.dumps(result)))
        self.pending += 1
        if time.monotonic() - self.last_commit >= self.commit_every_s:
            self.commit()

    def commit(self):
        self.db.commit()
        self.last_commit, self.pending = time.monotonic(), 0

    def close(self):
        self.commit()
        self.db.close()


def _pool_worker_init():
    end_with_parent()  # a killed run leaves no worker behind
    init_worker()


def _read_all(tasks: list[tuple], workers: int, progress: bool, on_result) -> None:
    """Run read_file over tasks on `workers` processes, calling on_result(path, result) in the
    main process as each file finishes (order of completion; the caller sorts later)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="curate", unit="file", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            import cv2

            threads, log_level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
            init_worker()
            try:
                for t in tasks:
                    on_result(*read_file(t))
                    bar.update(1)
            finally:
                cv2.setNumThreads(threads)
                cv2.utils.logging.setLogLevel(log_level)
        else:
            # spawn, not fork: a forked child can inherit locked OpenCV/BLAS thread pools and hang
            ctx = multiprocessing.get_context("spawn")
            chunk = max(1, min(8, len(tasks) // (workers * 16)))
            with ctx.Pool(workers, initializer=_pool_worker_init) as pool:
                for path, result in pool.imap_unordered(read_file, tasks, chunksize=chunk):
                    on_result(path, result)
                    bar.update(1)
    finally:
        bar.close()


# ============================================================================ hash neighbours
def phash_to_int(hexes) -> np.ndarray:
    """64-bit phashes (16 hex digits) -> uint64 [N]."""
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def phash256_words(hexes) -> np.ndarray:
    """256-bit phashes (64 hex digits) -> uint64 [N, 4]."""
    raw = b"".join(bytes.fromhex(h) for h in hexes)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 4)


def near_pairs(a: pd.DataFrame, b: pd.DataFrame | None, threshold: int):
    """Near-duplicate frame pairs (i, j, distance): candidates whose 64-bit phashes are within
    CANDIDATE_BITS (found by `hamming_pairs`), kept when their 256-bit phashes are within
    `threshold` bits (the distance returned). With b None: pairs i < j inside a."""
    i, j, _ = hamming_pairs(phash_to_int(a["phash"]), None if b is None else phash_to_int(b["phash"]), CANDIDATE_BITS)
    wa = phash256_words(a["phash256"])
    wb = wa if b is None else phash256_words(b["phash256"])
    d = np.bitwise_count(wa[i] ^ wb[j]).sum(axis=1).astype(np.int64) if len(i) else np.zeros(0, np.int64)
    keep = d <= threshold
    return i[keep], j[keep], d[keep]


def hamming_pairs(a, b=None, max_distance: int = 4, block: int = 1 << 16):
    """All pairs of 64-bit hashes within max_distance bits: (i, j, distance) arrays sorted by
    (i, j); with b None, pairs i < j inside a. Multi-index hashing: split hashes into four
    16-bit words; two hashes within d bits have a word within d // 4 bits (pigeonhole), so
    candidates come from exact look-ups of each word with up to d // 4 bits flipped, then are
    checked on all 64 bits. Exact, and far faster than comparing every pair (a BallTree with
    the hamming metric took 9 minutes for 50k hashes; this takes well under a second)."""
    a = np.asarray(a, dtype=np.uint64)
    self_join = b is None
    b = a if self_join else np.asarray(b, dtype=np.uint64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(a) == 0 or len(b) == 0:
        return empty
    r = max_distance // 4
    flips = np.array([sum(1 << k for k in c) for n in range(r + 1) for c in itertools.combinations(range(16), n)],
                     dtype=np.uint64)
    word = np.uint64(0xFFFF)
    found_i, found_j, found_d = [], [], []
    for w in range(4):
        shift = np.uint64(16 * w)
        kb = (b >> shift) & word
        order = np.argsort(kb, kind="stable")
        sorted_kb = kb[order]
        for s in range(0, len(a), block):
            qa = a[s:s + block]
            ka = (qa >> shift) & word
            for f in flips:
                q = ka ^ f
                lo = np.searchsorted(sorted_kb, q, "left")
                n = np.searchsorted(sorted_kb, q, "right") - lo
                total = int(n.sum())
                if total == 0:
                    continue
                qi = np.repeat(np.arange(len(qa)), n)
                j = order[lo[qi] + np.arange(total) - (np.cumsum(n) - n)[qi]]
                d = np.bitwise_count(qa[qi] ^ b[j]).astype(np.int64)
                i = qi + s
                keep = (d <= max_distance) & ((i < j) if self_join else True)
                found_i.append(i[keep])
                found_j.append(j[keep])
                found_d.append(d[keep])
    if not found_i:
        return empty
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    _, first = np.unique(i * len(b) + j, return_index=True)  # a pair is found once per matching word
    return i[first], j[first], d[first]


# ============================================================================ audit
def audit_leakage(pre: pd.DataFrame, ev: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Pretraining frames near an evaluation frame (`near_pairs`), each with its nearest
    evaluation frame (ties: the first in manifest order)."""
    cols = ["frame_id", "dataset", "source", "frame", "eval_dataset", "eval_frame_id", "eval_source", "distance"]
    i, j, d = near_pairs(pre, ev, threshold)
    if len(i) == 0:
        return pd.DataFrame(columns=cols)
    best = pd.DataFrame({"i": i, "j": j, "d": d}).sort_values(["i", "d", "j"]).drop_duplicates("i")
    p, e = pre.iloc[best["i"].to_numpy()], ev.iloc[best["j"].to_numpy()]
    return pd.DataFrame({"frame_id": p["frame_id"].to_numpy(), "dataset": p["dataset"].to_numpy(),
                         "source": p["source"].to_numpy(), "frame": p["frame"].to_numpy(),
                         "eval_dataset": e["dataset"].to_numpy(), "eval_frame_id": e["frame_id"].to_numpy(),
                         "eval_source": e["source"].to_numpy(), "distance": best["d"].to_numpy()})[cols]


def find_duplicates(frames: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Exact then near duplicates among frames (in manifest order); one row per dropped frame."""
    cols = ["frame_id", "dataset", "source", "frame", "duplicate", "distance", "kept_frame_id", "kept_dataset",
            "kept_source"]
    rows = []
    first_of = frames.groupby("content_hash", sort=False)["frame_id"].transform("first")
    exact = frames["frame_id"] != first_of
    by_id = frames.set_index("frame_id")
    for fid, kept in zip(frames.loc[exact, "frame_id"], first_of[exact]):
        rows.append((fid, "exact", 0, kept))
    rest = frames[~exact]
    i, j, d = near_pairs(rest, None, threshold)
    src = rest["source"].to_numpy()
    other_file = src[i] != src[j]
    dropped: dict[int, tuple[int, int]] = {}
    for a, b, dist in zip(i[other_file], j[other_file], d[other_file]):  # sorted by (a, b)
        if a not in dropped and b not in dropped:
            dropped[b] = (a, dist)
    ids = rest["frame_id"].to_numpy()
    for b, (a, dist) in sorted(dropped.items()):
        rows.append((ids[b], "near", int(dist), ids[a]))
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows, columns=["frame_id", "duplicate", "distance", "kept_frame_id"])
    for col, src_col in (("dataset", "dataset"), ("source", "source"), ("frame", "frame")):
        out[col] = by_id.loc[out["frame_id"], src_col].to_numpy()
    out["kept_dataset"] = by_id.loc[out["kept_frame_id"], "dataset"].to_numpy()
    out["kept_source"] = by_id.loc[out["kept_frame_id"], "source"].to_numpy()
    order = pd.Series(range(len(frames)), index=frames["frame_id"])
    return out.iloc[np.argsort(order[out["frame_id"]].to_numpy(), kind="stable")][cols].reset_index(drop=True)


# ============================================================================ outputs
def write_csv(df: pd.DataFrame, path: Path):
    atomic_write(path, lambda t: df.to_csv(t, index=False))


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:,.0f}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, not a dependency)."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def table1(registry: pd.DataFrame, datasets: pd.DataFrame) -> pd.DataFrame:
    """Table 1 regenerated: the paper's count of every registry dataset beside what this run
    found (frames read) and kept (manifest rows; evaluation sets are never kept), with the paper's
    US-43d marker (`us43d`: its bold), plus the datasets found that are not in OpenUS-46."""
    found = datasets.set_index("dataset")
    rows = []
    for r in registry.itertuples(index=False):
        hit = found.loc[r.name] if r.name in found.index else None
        rows.append({"dataset": r.name, "anatomy": r.anatomy, "paper_count": r.paper_count,
                     "found_frames": int(hit["frames"]) if hit is not None else 0,
                     "kept_frames": (int(hit["kept"]) if hit is not None else 0) if not r.is_eval else np.nan,
                     "role": "evaluation" if r.is_eval else "pretraining", "us43d": bool(r.us43d),
                     "in_registry": True})
    for d in datasets[~datasets["in_registry"]].itertuples(index=False):
        rows.append({"dataset": d.dataset, "anatomy": d.anatomy, "paper_count": np.nan, "found_frames": int(d.frames),
                     "kept_frames": np.nan if d.is_eval else int(d.kept),
                     "role": "evaluation" if d.is_eval else "pretraining", "us43d": pd.NA, "in_registry": False})
    out = pd.DataFrame(rows)
    out["us43d"] = out["us43d"].astype("boolean")
    out["paper_count"] = out["paper_count"].astype("Int64")
    out["kept_frames"] = out["kept_frames"].astype("Int64")
    return out


def write_table1(t1: pd.DataFrame, out_dir: Path, note: str = "", registry: pd.DataFrame | None = None,
                 kept: str = "after the leakage audit and deduplication") -> list[Path]:
    """table1.csv (numbers), table1.md and table1.tex (with a total row, the US-43d marker as
    "yes"/blank and its footnote, and the note). `kept` says what kept_frames were kept after."""
    out_dir = Path(out_dir)
    write_csv(t1, out_dir / "table1.csv")
    show = t1.drop(columns=["in_registry", "us43d"]).copy()
    show["dataset"] = [n if reg else f"{n} *" for n, reg in zip(t1["dataset"], t1["in_registry"])]
    show.insert(1, "US-43d", ["yes" if m is True else "" for m in t1["us43d"].astype(object)])
    total = {"dataset": "Total", "US-43d": str(int(t1["us43d"].fillna(False).sum())), "anatomy": "",
             "paper_count": int(t1["paper_count"].sum()), "found_frames": int(t1["found_frames"].sum()),
             "kept_frames": int(t1["kept_frames"].sum()), "role": ""}
    show = pd.concat([show, pd.DataFrame([total])], ignore_index=True).astype(object)
    show = show.where(show.notna(), "")
    foot = ("\\* not in OpenUS-46 (found under the data roots). paper_count: the paper's Table 1; found_frames: "
            "frames read in this run (videos sampled, volumes sliced); kept_frames: frames in the manifest "
            f"(evaluation sets are never kept) {kept}. " + note).strip()
    foot += "\n\n" + us43d_note(load_registry() if registry is None else registry)
    md = markdown_table(show) + "\n" + foot + "\n"
    atomic_write(out_dir / "table1.md", lambda t: Path(t).write_text(md))
    tex_df = show.map(lambda v: _fmt(v).replace("_", r"\_").replace("&", r"\&").replace("#", r"\#"))
    tex_df.columns = [c.replace("_", r"\_") for c in tex_df.columns]
    tex = tex_df.to_latex(index=False, escape=False, caption="OpenUS-46: the paper's image counts and the frames "
                          "found by usfmae curate. " + foot.replace("\\*", "*").replace("_", r"\_")
                          .replace("\n\n", " "), label="tab:openus46", column_format="lllrrrl")
    atomic_write(out_dir / "table1.tex", lambda t: Path(t).write_text(tex))
    return [out_dir / f"table1.{s}" for s in ("csv", "md", "tex")]


# ============================================================================ the run
@dataclass
class Curation:
    out_dir: Path
    manifest: pd.DataFrame
    frames: pd.DataFrame  # every frame read (pretraining and evaluation) with its status
    rejects: pd.DataFrame
    duplicates: pd.DataFrame
    leakage: pd.DataFrame
    leakage_pairs: pd.DataFrame
    datasets: pd.DataFrame
    skipped: pd.DataFrame
    table1: pd.DataFrame
    summary: dict = field(default_factory=dict)


def _frame_id(dataset: str, rel: str, kind: str, frame: int, axis: int) -> str:
    if kind == "video":
        return f"{dataset}/{rel}#f{frame}"
    if kind == "volume":
        return f"{dataset}/{rel}#a{axis}s{frame}"
    return f"{dataset}/{rel}"


def _kept_rule(deduplicate: bool, remove_leakage: bool) -> str:
    """What kept_frames were kept after, in the words of Table 1's footnote."""
    if deduplicate and remove_leakage:
        return "after the leakage audit and deduplication"
    if deduplicate:
        return "after deduplication; remove_leakage was off, so frames near an evaluation image were kept"
    if remove_leakage:
        return "after the leakage audit; deduplicate was off, so duplicates were kept"
    return ("with nothing dropped: deduplicate and remove_leakage were off, so duplicates and frames near an "
            "evaluation image were kept")


def _check_settings(video_fps, slice_axis, slice_step, phash_threshold):
    if not float(video_fps) >= 0:
        raise UsfmaeError(f"video_fps must be >= 0 (0 = every frame), got {video_fps}")
    if int(slice_axis) not in (0, 1, 2):
        raise UsfmaeError(f"slice_axis must be 0, 1 or 2 (axis of the (z, y, x) volume), got {slice_axis}")
    if int(slice_step) < 1:
        raise UsfmaeError(f"slice_step must be >= 1, got {slice_step}")
    if not 0 <= int(phash_threshold) <= 64:
        raise UsfmaeError(f"phash_threshold must be in 0..64 bits (of the 256-bit phash), got {phash_threshold}")


def curate(roots, out_dir, video_fps: float = 3.0, slice_axis: int = 0, slice_step: int = 1,
           phash_threshold: int = 20, workers: int = 0, progress: bool = True, deduplicate: bool = True,
           remove_leakage: bool = True) -> Curation:
    """Read every dataset under `roots`, audit leakage, deduplicate, write the outputs listed in
    the module docstring to out_dir and return them. workers 0 = all cores. Resumable.

    deduplicate: drop exact and near duplicates among pretraining frames (False: keep them);
    remove_leakage: drop pretraining frames near an evaluation frame (False: keep them). Both are
    this study's additions (the paper describes neither); with either off the audit still lists
    what it found, and a warning says what is kept and what it risks (SWITCH_WARNINGS). The
    evaluation datasets themselves never enter the manifest."""
    t_start = time.perf_counter()
    _check_settings(video_fps, slice_axis, slice_step, phash_threshold)
    for name, value in (("deduplicate", deduplicate), ("remove_leakage", remove_leakage)):
        if not isinstance(value, (bool, np.bool_)):
            raise UsfmaeError(f"{name} must be true or false, got {value!r}")
    deduplicate, remove_leakage = bool(deduplicate), bool(remove_leakage)
    try:
        import imagehash  # noqa: F401 (workers need it; fail here, not as one reject per file)
    except ImportError:
        raise UsfmaeError("curation needs the imagehash package for perceptual hashes: pip install imagehash") from None
    video_fps, slice_axis, slice_step, phash_threshold = float(video_fps), int(slice_axis), int(slice_step), \
        int(phash_threshold)
    workers = int(workers) or os.cpu_count() or 1
    out = Path(out_dir)
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    registry = load_registry()
    datasets = discover_datasets(roots, registry)
    check_output(out, roots, "output folder")
    if not datasets:
        raise UsfmaeError(f"no dataset folder and no image, video or volume file under {', '.join(map(str, roots))}: "
                          "pass the folder that holds the dataset folders (docs/curation.md, 'roots')")
    with folder_lock(out, "usfmae curate"):
        return _curate_locked(roots, out, datasets, registry, video_fps, slice_axis, slice_step, phash_threshold,
                              workers, progress, t_start, deduplicate, remove_leakage)


def _curate_locked(roots, out: Path, datasets, registry, video_fps, slice_axis, slice_step, phash_threshold,
                   workers, progress, t_start, deduplicate=True, remove_leakage=True) -> Curation:
    """curate's work, under the output folder's lock."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for stale in itertools.chain(out.glob(".*.part*"), (out / "data").glob(".*.part*")):
        stale.unlink()  # temp files of a killed run

    # ---- list files; the cache says which are done
    listing, skipped = [], []
    for ds in datasets:
        files, skip = list_dataset_files(ds)
        listing += [(ds, f) for f in files]
        skipped += [(ds.name, str(p), why) for p, why in skip]
    cache = FileCache(out / "cache" / "files.sqlite")
    cached = cache.load()
    results, todo, meta = {}, [], {}
    for ds, f in listing:
        st = f.stat()
        key = (str(f), _settings_key(f, video_fps, slice_axis, slice_step))
        meta[str(f)] = (key[1], st.st_size, st.st_mtime_ns)
        hit = cached.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            results[str(f)] = json.loads(hit[2])
        else:
            todo.append(f)
    n_cached = len(results)
    # heavy files first so the pool stays busy at the end
    rank = {"video": 0, "volume": 1, "image": 2}
    todo.sort(key=lambda f: (rank.get(file_kind(f), 3), str(f)))
    tasks = [(str(f), video_fps, slice_axis, slice_step) for f in todo]

    def on_result(path, result):
        results[path] = result
        settings, size, mtime = meta[path]
        cache.put(path, settings, size, mtime, result)

    t_read = time.perf_counter()
    try:
        _read_all(tasks, workers, progress, on_result)
    finally:
        cache.close()
    read_s = time.perf_counter() - t_read

    # ---- frames table, in manifest order
    rows, rejects = [], []
    for ds, f in listing:
        rel = f.relative_to(ds.path).as_posix()
        res = results[str(f)]
        if res["status"] != "ok":
            rejects.append((ds.name, str(f), res["reason"], res.get("detail", "")))
            continue
        for kind, frame, axis, w, h, c, bits, chash, phash, phash256 in res["frames"]:
            rows.append((_frame_id(ds.name, rel, kind, frame, axis), ds.name, ds.anatomy, str(f), kind, frame, axis,
                         w, h, c, bits, chash, phash, phash256, ds.is_eval, rel, res["frames_in_file"]))
    frames = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["is_eval", "rel_path", "frames_in_file"])
    frames = frames.astype({"frame": "int64", "axis": "int64", "width": "int64", "height": "int64",
                            "channels": "int64", "bit_depth": "int64", "frames_in_file": "int64", "is_eval": bool})
    frames = frames.sort_values(["dataset", "rel_path", "axis", "frame"], kind="stable").reset_index(drop=True)
    if frames["frame_id"].duplicated().any():
        dup = frames.loc[frames["frame_id"].duplicated(), "frame_id"].iloc[0]
        raise UsfmaeError(f"frame id {dup} appears twice: two roots hold the same dataset folder; pass one")

    # ---- audit: leakage, then exact and near duplicates among what is left. The audit always runs;
    # the switches decide whether what it finds is dropped (status) or only listed (audit, dropped=False).
    pre, ev = frames[~frames["is_eval"]], frames[frames["is_eval"]]
    leakage = audit_leakage(pre, ev, phash_threshold)
    remaining = pre[~pre["frame_id"].isin(set(leakage["frame_id"]))] if remove_leakage else pre
    duplicates = find_duplicates(remaining, phash_threshold)
    leakage.insert(len(leakage.columns), "dropped", remove_leakage)
    duplicates.insert(len(duplicates.columns), "dropped", deduplicate)
    leakage, duplicates = leakage.astype({"dropped": bool}), duplicates.astype({"dropped": bool})
    audit = np.full(len(frames), "", dtype=object)
    is_leak = frames["frame_id"].isin(set(leakage["frame_id"])).to_numpy()
    audit[is_leak] = "leakage"
    dup_kind = frames["frame_id"].map(dict(zip(duplicates["frame_id"], duplicates["duplicate"])))
    is_dup = dup_kind.notna().to_numpy()
    audit[is_dup] = [f"{k} duplicate" for k in dup_kind[is_dup]]  # leakage off: a leaked frame may be one too
    status = np.where(frames["is_eval"].to_numpy(), "evaluation", "kept").astype(object)
    if remove_leakage:
        status[is_leak] = "leakage"
    if deduplicate:
        status[is_dup] = audit[is_dup]
    frames["status"] = status
    frames["audit"] = audit
    manifest = frames.loc[frames["status"] == "kept", MANIFEST_COLUMNS].reset_index(drop=True)
    pair_cols = ["dataset", "eval_dataset", "frames"]
    leakage_pairs = (leakage.groupby(["dataset", "eval_dataset"]).size().reset_index(name="frames")
                     if len(leakage) else pd.DataFrame(columns=pair_cols))
    rejects = pd.DataFrame(rejects, columns=["dataset", "source", "reason", "detail"]).sort_values(
        ["dataset", "source"], kind="stable").reset_index(drop=True)
    skipped = pd.DataFrame(skipped, columns=["dataset", "path", "reason"])

    # ---- per dataset
    files_per = Counter(d.name for d, _ in listing)
    per = []
    for ds in datasets:
        fr = frames[frames["dataset"] == ds.name]
        per.append({"dataset": ds.name, "anatomy": ds.anatomy, "folder": str(ds.path), "root": str(ds.root),
                    "in_registry": ds.in_registry, "is_eval": ds.is_eval,
                    "files": files_per[ds.name],
                    "skipped": int((skipped["dataset"] == ds.name).sum()),
                    "rejects": int((rejects["dataset"] == ds.name).sum()), "frames": len(fr),
                    "kept": int((fr["status"] == "kept").sum()),
                    "exact_duplicates": int((fr["audit"] == "exact duplicate").sum()),
                    "near_duplicates": int((fr["audit"] == "near duplicate").sum()),
                    "leakage": int(fr["frame_id"].isin(set(leakage["frame_id"])).sum()),
                    "kinds": ";".join(sorted(set(fr["kind"])))})
    per_ds = pd.DataFrame(per)
    t1 = table1(registry, per_ds)

    # ---- write (each file atomically)
    atomic_write(out / "manifest.parquet", lambda t: manifest.to_parquet(t, index=False))
    write_csv(manifest, out / "manifest.csv")
    atomic_write(out / "data" / "frames.parquet", lambda t: frames.to_parquet(t, index=False))
    for name, df in (("rejects", rejects), ("duplicates", duplicates), ("leakage", leakage),
                     ("leakage_pairs", leakage_pairs), ("datasets", per_ds), ("skipped", skipped)):
        write_csv(df, out / f"{name}.csv")
    eval_names = [d.name for d in datasets if d.is_eval]
    write_table1(t1, out, "" if any(d.in_registry and not d.is_eval for d in datasets) else
                 "No OpenUS-46 pretraining dataset was among the roots: found counts are not comparable with the "
                 "paper's (the synthetic tree is a miniature).", registry, kept=_kept_rule(deduplicate, remove_leakage))
    switch_warnings = ([SWITCH_WARNINGS["deduplicate"].format(n=len(duplicates))] if not deduplicate else []) + \
        ([SWITCH_WARNINGS["remove_leakage"].format(n=len(leakage))] if not remove_leakage else [])
    for w in switch_warnings:
        print(f"WARNING: {w}", flush=True)
    n_frames_read = sum(len(results[str(f)].get("frames", [])) for f in todo)
    summary = {
        "roots": [str(Path(r).expanduser().resolve()) for r in roots],
        "settings": {"video_fps": video_fps, "slice_axis": slice_axis, "slice_step": slice_step,
                     "phash_threshold": phash_threshold, "workers": workers, "deduplicate": deduplicate,
                     "remove_leakage": remove_leakage},
        "datasets": len(datasets), "eval_datasets": eval_names,
        "unmatched_datasets": [d.name for d in datasets if not d.in_registry],
        "files": len(listing), "files_read": len(todo), "files_from_cache": n_cached, "skipped": len(skipped),
        "rejects": len(rejects), "rejects_by_reason": rejects["reason"].value_counts().sort_index().to_dict(),
        "frames": len(frames), "frames_pretraining": len(pre), "frames_evaluation": len(ev),
        "kept": len(manifest), "leakage": len(leakage), "leakage_dropped": int(leakage["dropped"].sum()),
        "exact_duplicates": int((duplicates["duplicate"] == "exact").sum()) if len(duplicates) else 0,
        "near_duplicates": int((duplicates["duplicate"] == "near").sum()) if len(duplicates) else 0,
        "duplicates_dropped": int(duplicates["dropped"].sum()),
        "read_seconds": round(read_s, 3), "files_per_s": round(len(todo) / read_s, 2) if todo and read_s > 0 else None,
        "frames_per_s": round(n_frames_read / read_s, 2) if todo and read_s > 0 else None,
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "warnings": switch_warnings
        + ([] if eval_names else ["no evaluation set (BUS-BRA, MMOTU-2D, GIST514-DB) among the roots: "
                                  "the leakage audit compared against nothing"])
        + ([] if len(manifest) else ["the manifest is empty: no pretraining frame was found under the roots"]),
    }
    atomic_write(out / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=2) + "\n"))
    return Curation(out, manifest, frames, rejects, duplicates, leakage, leakage_pairs, per_ds, skipped, t1, summary)


def describe(c: Curation) -> str:
    """A few lines for the terminal and the notebook."""
    s = c.summary
    lines = [f"{s['files']} files in {s['datasets']} datasets ({s['files_read']} read now, "
             f"{s['files_from_cache']} from the cache of an earlier run), {s['skipped']} skipped (masks, non-images)",
             f"{s['frames']} frames read: {s['frames_pretraining']} pretraining, {s['frames_evaluation']} evaluation",
             f"rejects: {s['rejects']} {s['rejects_by_reason'] or ''}".rstrip(),
             f"leakage: {s['leakage']} pretraining frames near an evaluation frame, "
             + ("dropped" if s["settings"].get("remove_leakage", True) else "KEPT (remove_leakage off)"),
             f"duplicates: {s['exact_duplicates']} exact, {s['near_duplicates']} near (256-bit phash <= "
             f"{s['settings']['phash_threshold']} bits), "
             + ("dropped" if s["settings"].get("deduplicate", True) else "KEPT (deduplicate off)"),
             f"manifest: {s['kept']} frames -> {Path(c.out_dir).name}/manifest.parquet"]
    if s["unmatched_datasets"]:
        lines.append(f"not in OpenUS-46 (anatomy from the folder or 'unknown'): {', '.join(s['unmatched_datasets'])}")
    lines += [f"warning: {w}" for w in s["warnings"]]
    return "\n".join(lines)


# ============================================================================ figures
def is_grey(img: np.ndarray) -> bool:
    """A 2D array, or RGB whose three channels are equal: a grey scan, where colour means nothing."""
    return img.ndim == 2 or (img.shape[-1] == 3 and (img[..., 0] == img[..., 1]).all()
                             and (img[..., 1] == img[..., 2]).all())


def draw_scan(ax, img: np.ndarray, title: str = "", fontsize: float = 9, **title_kw) -> None:
    """One image on `ax` as it is: a grey scan (or mask) on the fixed 0-255 grey scale, so black is
    black and no contrast is stretched; colour (Doppler, marks) as RGB. No axes."""
    if is_grey(img):
        ax.imshow(img if img.ndim == 2 else img[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)
    ax.set_title(title, fontsize=fontsize, **title_kw)
    ax.axis("off")


def plot_montage(c: Curation, max_cols: int = 8):
    """Fig. 1: one frame per dataset (the first kept one; the first image of an evaluation set)."""
    import matplotlib.pyplot as plt

    picks = []
    for d in c.datasets.itertuples(index=False):
        fr = c.frames[(c.frames["dataset"] == d.dataset) & c.frames["status"].isin(["kept", "evaluation"])]
        if len(fr):
            picks.append((d, fr.iloc[0]))
    n = max(len(picks), 1)
    rows = -(-n // max_cols)
    cols = -(-n // rows)  # balanced rows: 13 panels -> 2 x 7, 46 -> 6 x 8
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (d, row) in zip(axes.ravel(), picks):
        count = f"{d.frames} eval images" if d.is_eval else f"{d.kept} frames kept"
        draw_scan(ax, load_frame(row["source"], row["kind"], int(row["frame"]), int(row["axis"])),
                  f"{d.dataset}\n{d.anatomy} · {count}", fontsize=8, color="tab:red" if d.is_eval else "black")
    fig.suptitle("One frame per dataset (Fig. 1; evaluation sets in red)", fontsize=11)
    fig.tight_layout()
    return fig


def images_per_anatomy(c: Curation, registry: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per anatomy: frames kept in this run and the paper's pretraining images (Table 1 without
    the evaluation sets), each as a count and as a share of its own total."""
    registry = load_registry() if registry is None else registry
    found = c.manifest.groupby("anatomy").size().rename("run")
    paper = registry[~registry["is_eval"]].groupby("anatomy")["paper_count"].sum().rename("paper")
    table = pd.concat([found, paper], axis=1).fillna(0).astype(int)
    table.index = table.index.astype(str)
    for col in ("run", "paper"):
        table[f"{col}_share"] = table[col] / max(int(table[col].sum()), 1)
    return table


def plot_images_per_anatomy(c: Curation, registry: pd.DataFrame | None = None):
    """Bars: frames kept per anatomy in this run, beside the paper's pretraining images per
    anatomy (Table 1 without the evaluation sets). Both panels show shares of their own total on
    the same linear axis (the totals differ by orders of magnitude, the mixes can be compared);
    each bar is labelled with its count."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    table = images_per_anatomy(c, registry)
    panels = [(table[table["run"] > 0].sort_values("run_share"), "run", "tab:blue", "this run: {:,} frames kept"),
              (table[table["paper"] > 0].sort_values("paper_share"), "paper", "tab:gray",
               "paper, Table 1 without the evaluation sets: {:,} images")]
    top = max(float(table[["run_share", "paper_share"]].max().max()), 0.01)
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4.0, 0.28 * len(panels[1][0]))))
    for ax, (rows, col, colour, title) in zip(axes, panels):
        shares = rows[f"{col}_share"].to_numpy()
        ax.barh(rows.index, shares, color=colour)
        ax.set_xlim(0, top * 1.3)  # room for the labels; one scale for both panels
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("share of the panel's images")
        ax.set_title(title.format(int(rows[col].sum())))
        ax.tick_params(axis="y", labelsize=8)
        for y, (share, count) in enumerate(zip(shares, rows[col].to_numpy())):
            ax.text(share, y, f" {share:.1%} ({count:,})" if share >= 0.001 else f" <0.1% ({count:,})",
                    va="center", fontsize=7)
    fig.suptitle("Images per anatomy, as shares of each total")
    fig.tight_layout()
    return fig


# ============================================================================ CLI
def add_cli(subparsers):
    """Register `usfmae curate`."""
    p = subparsers.add_parser(
        "curate", formatter_class=help_with_defaults,
        help="read dataset roots into one deduplicated, leakage-audited frame manifest",
        description="Read every image, video (sampled) and volume (sliced) under the roots into one manifest "
                    "of 2D frames; record rejects; drop pretraining frames near an evaluation image (leakage) "
                    "and exact/near duplicates (this study's additions: the paper describes no deduplication and no "
                    "frame-level leakage check; --no-deduplicate and --no-remove-leakage keep them and warn). "
                    "Evaluation sets never enter the manifest. Re-running resumes. "
                    "See docs/curation.md.")
    p.add_argument("roots", nargs="*", default=[], help="dataset folders (see docs/curation.md: how roots map to datasets)")
    p.add_argument("--out", help="output folder (the notebook uses OUT/01_curation; with -f/-p/--profile: the study "
                                 "folder OUT)")
    p.add_argument("--video-fps", type=float, default=3.0, help="frames sampled per second of video (0: all)")
    p.add_argument("--slice-axis", type=int, default=0, help="volume axis to slice, of (z, y, x)")
    p.add_argument("--slice-step", type=int, default=1, help="keep every n-th slice")
    p.add_argument("--phash-threshold", type=int, default=20,
                   help="near duplicates: 256-bit perceptual hashes at most this many bits apart")
    p.add_argument("--deduplicate", action=argparse.BooleanOptionalAction, default=True,
                   help="drop exact and near duplicates among pretraining frames (notebook 01's deduplicate; "
                        "--no-deduplicate keeps them, as the paper describes no deduplication)")
    p.add_argument("--remove-leakage", action=argparse.BooleanOptionalAction, default=True,
                   help="drop pretraining frames near an evaluation image (notebook 01's remove_leakage; "
                        "--no-remove-leakage keeps them: the evaluation sets' own folders stay out either way)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    p.add_argument("--no-progress", action="store_true")
    from . import runner

    runner.add_step_options(p, "01_curation")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    from . import runner

    if runner.step_mode(args):
        return runner.run_step_cli(args, "01_curation")
    if not args.roots or not args.out:
        raise UsfmaeError("usfmae curate: give the dataset folders and --out OUT (or -f / -p / --profile to run "
                          "notebook 01's whole step; see --help)")
    c = curate(args.roots, args.out, video_fps=args.video_fps, slice_axis=args.slice_axis,
               slice_step=args.slice_step, phash_threshold=args.phash_threshold, workers=args.workers,
               progress=not args.no_progress, deduplicate=args.deduplicate, remove_leakage=args.remove_leakage)
    print(describe(c))
    return 0
