"""Cleaning a whole folder tree or curation manifest on all cores (`clean_tree`), resumably, with a
per-image report and an index; and the `usfmae clean` command that runs it. The method for one image
is in `detectors`.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import cv2
import numpy as np

from .. import UsfmaeError, atomic_write, atomic_write_bytes, help_with_defaults
from ..safety import check_output, end_with_parent, folder_lock
from .detectors import (CLEANERS, DETECTORS, IMAGE_SUFFIXES, INTERPOLATIONS, STAGES, CleanConfig, check_tesseract,
                        clean_image, cleaner_name, make_config)


# ============================================================================ batch mode
MANIFEST_COLUMNS = ("frame_id", "dataset", "anatomy", "source", "kind", "frame", "axis")
REPORT_COLUMNS = (["path", "source", "frame", "status", "error", "height", "width", "mask_fraction"]
                  + [f"{d}_fraction" for d in DETECTORS] + ["fired", "words"]
                  + [f"t_{s}" for s in STAGES] + ["t_total"])
INDEX_COLUMNS = ("path", "dataset", "anatomy", "source", "frame")


def safe_name(text: str) -> str:
    """A file-system-safe version of text (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "_"


def list_jobs(inp) -> list[dict]:
    """What to clean: one dict per image (src, kind, frame, axis, rel, dataset, anatomy).

    inp: a folder (every image file under it; rel mirrors the tree, suffix .png; dataset = the
    first folder below inp, or inp's name; anatomy "unknown") or a curation manifest
    (.parquet/.csv; rel = <dataset>/<frame_id made file-system-safe>.png)."""
    inp = Path(inp)
    if not inp.exists():
        raise UsfmaeError(f"{inp}: no such folder or manifest; give an image folder or a manifest.parquet/.csv "
                          f"written by `usfmae curate`")
    jobs = []
    if inp.is_dir():
        files = sorted(p for p in inp.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        taken = set()
        for f in files:
            rel = f.relative_to(inp)
            out = rel.with_suffix(".png").as_posix()
            if out in taken:  # a.jpg beside a.png: keep both
                out = rel.as_posix() + ".png"
            taken.add(out)
            dataset = rel.parts[0] if len(rel.parts) > 1 else inp.name
            jobs.append(dict(src=str(f.resolve()), kind="file", frame=0, axis=-1, rel=out, dataset=dataset,
                             anatomy="unknown"))
        return jobs
    import pandas as pd

    if inp.suffix.lower() == ".parquet":
        df = pd.read_parquet(inp)
    elif inp.suffix.lower() == ".csv":
        df = pd.read_csv(inp)
    else:
        raise UsfmaeError(f"{inp}: not a folder, .parquet or .csv manifest")
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise UsfmaeError(f"{inp}: manifest lacks column(s) {missing}; write it with `usfmae curate`")
    taken = set()
    for r in df.itertuples(index=False):
        stem = str(r.frame_id)
        if Path(stem).suffix.lower() in IMAGE_SUFFIXES:  # an image file's id ends in its own extension
            stem = stem[:-len(Path(stem).suffix)]
        rel = f"{safe_name(r.dataset)}/{safe_name(stem)}.png"  # one extension: x.png, never x.png.png
        if rel in taken:  # two ids that differ only in unsafe characters
            import hashlib

            rel = rel[:-4] + "_" + hashlib.sha1(str(r.frame_id).encode()).hexdigest()[:8] + ".png"
        taken.add(rel)
        jobs.append(dict(src=str(r.source), kind=str(r.kind), frame=int(r.frame), axis=int(r.axis), rel=rel,
                         dataset=str(r.dataset), anatomy=str(r.anatomy)))
    return jobs


def read_image(path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] by curation's one decode policy (`read_image_file`):
    the same checks (truncation, size limits) and 8-bit conversion, so what curation refuses
    cleaning refuses too, for the same reason."""
    from ..curation_readers import Reject, read_image_file

    try:
        return read_image_file(path)
    except Reject as rej:  # the report row's error: "<path>: not a readable image: <reason>: <detail>"
        raise UsfmaeError(f"{path}: not a readable image: {rej}") from None


def read_job(job: dict) -> np.ndarray:
    """Pixels of one job: files of a folder directly, manifest rows through `curation.load_frame`
    (still images, video frames and volume slices, converted to 8-bit RGB as curation hashed them)."""
    if job["kind"] == "file":
        return read_image(job["src"])
    from ..curation import load_frame

    return np.ascontiguousarray(load_frame(job["src"], job["kind"], job["frame"], job["axis"]))


def write_png(path: Path, img: np.ndarray, compression: int = 3):
    """Write an RGB (or single-channel) uint8 PNG atomically (temp file + os.replace)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img,
                           [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise UsfmaeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def clean_job(job: dict, cfg: CleanConfig, out_dir, masks_dir=None, compression: int = 3) -> dict:
    """Clean one job and write its PNG (and mask); never raises: errors become the row's status."""
    t: dict[str, float] = {}
    row = dict(path=job["rel"], source=job["src"], frame=job["frame"], status="ok", error="")
    start = time.perf_counter()
    try:
        rgb = read_job(job)
        t["read"] = time.perf_counter() - start
        out, det = clean_image(rgb, cfg, t)
        clock = time.perf_counter()
        write_png(Path(out_dir) / job["rel"], out, compression)
        if masks_dir is not None:
            write_png(Path(masks_dir) / job["rel"], det["mask"], compression)
        t["write"] = time.perf_counter() - clock
        row.update(height=rgb.shape[0], width=rgb.shape[1], mask_fraction=float((det["mask"] > 0).mean()),
                   words=det["words"])
        fired = []
        for d in DETECTORS:
            m = det[d]
            row[f"{d}_fraction"] = np.nan if m is None else float((m > 0).mean())
            if m is not None and m.any():
                fired.append(d)
        row["fired"] = "+".join(fired) or "none"
    except Exception as err:  # one bad image must not stop a run of thousands: record it
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
    for s_ in STAGES:
        row[f"t_{s_}"] = t.get(s_, 0.0)
    row["t_total"] = time.perf_counter() - start
    return row


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_init():
    cv2.setNumThreads(1)  # one process per core: no thread oversubscription
    os.environ["OMP_THREAD_LIMIT"] = "1"  # Tesseract's OpenMP threads, read by the tesseract program


def pool_worker_init():
    """A worker process of a cleaning pool (here and in evaluate.py): one thread, ends with its parent."""
    end_with_parent()  # a killed run leaves no worker behind
    _worker_init()


def _run_job(args):
    return clean_job(*args)


class _ReportWriter:
    """Appends one report row per finished image and flushes it at once, so that a run killed
    with kill -9 keeps the row of every image it finished (the rerun redoes only the rest)."""

    def __init__(self, path: Path):
        _drop_partial_line(path)
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def write(self, row: dict):
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        self.file.close()


def _drop_partial_line(path: Path):
    """Cut a half-written last line (a kill during a write), so the next row starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _reported_paths(path: Path) -> set[str]:
    """Output paths that already have a complete row in the report."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {r["path"] for r in csv.DictReader(f) if r.get("t_total") not in (None, "")}


def _write_csv_atomic(path: Path, df):
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _input_locations(inp, jobs) -> list[Path]:
    """What `clean` reads: the input folder, or a manifest, the data roots it was curated from
    (summary.json beside it) and its source files' folders, so no output can land among them."""
    inp = Path(inp)
    if inp.is_dir():
        return [inp]
    found = [inp] + sorted({Path(j["src"]).parent for j in jobs})
    summary = inp.parent / "summary.json"
    if summary.is_file():
        try:
            found += [Path(r) for r in json.loads(summary.read_text()).get("roots", [])]
        except (ValueError, AttributeError):
            pass
    return found


def _clean_jobs(jobs, out_dir: Path, cfg: CleanConfig, workers: int, report: Path, masks_dir, progress: bool,
                compression: int):
    """clean_tree's work, under the output folder's lock."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.part*"):  # temp files of a killed run
        stale.unlink()
    # a PNG counts as finished only when it was made with these very parameters (every setting, and the
    # name of the cleaner preset they match, so a folder never mixes images of two presets)
    settings = out_dir / "clean_config.json"
    wanted = json.dumps({"cleaner": cleaner_name(cfg), **asdict(cfg)}, sort_keys=True, indent=1)
    same = settings.exists() and settings.read_text() == wanted
    if not same and report.exists():
        report.unlink()  # rows of a run with other parameters
    # done = its PNG exists and its report row too (a kill can fall between the two)
    reported = _reported_paths(report) if same else set()
    todo = [j for j in jobs if not (same and j["rel"] in reported and (out_dir / j["rel"]).exists())]
    settings.write_text(wanted)
    workers = max(1, min(int(workers or cpu_count()), len(todo) or 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="clean", unit="img")
    args = [(j, cfg, out_dir, masks_dir, compression) for j in todo]
    writer = _ReportWriter(report)

    def done(row):
        writer.write(row)
        if bar is not None:
            bar.update(1)

    try:
        if workers == 1:
            old_threads, old_omp = cv2.getNumThreads(), os.environ.get("OMP_THREAD_LIMIT")
            _worker_init()
            try:
                for a in args:
                    done(_run_job(a))
            finally:
                cv2.setNumThreads(old_threads)
                if old_omp is None:
                    os.environ.pop("OMP_THREAD_LIMIT", None)
                else:
                    os.environ["OMP_THREAD_LIMIT"] = old_omp
        elif args:
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked child can inherit locked OpenCV / OpenMP thread pools
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=pool_worker_init) as ex:
                for row in ex.map(_run_job, args, chunksize=max(1, min(16, len(args) // (8 * workers)))):
                    done(row)
    finally:
        writer.close()
        if bar is not None:
            bar.close()


def clean_tree(inp, out_dir, cfg: CleanConfig = CleanConfig(), workers: int = 0, report=None, masks_dir=None,
               progress: bool = True, compression: int = 3):
    """Clean every image of a folder tree or manifest into out_dir (PNG tree + index.csv).

    Uses `workers` processes (0 = all cores). Resumes: a PNG already in out_dir is not redone
    when out_dir/clean_config.json shows it was made with the same `cfg` (every setting, and the
    cleaner preset's name, `cleaner_name`); otherwise all are redone.
    Writes the report (default out_dir/report.csv; one row per image: status and error, mask
    area fraction, each detector's fraction, which fired, words, seconds per stage) and
    out_dir/index.csv (path relative to out_dir, dataset, anatomy, source, frame; one row per
    PNG). A bad image is listed with its error and the run goes on. Returns the report
    (pandas DataFrame) of this input.

    Refuses an output (folder, report, masks) that is, lies inside, or holds an input, and a
    second run into the same out_dir while one is going (see usfmae_lib.safety)."""
    out_dir = Path(out_dir)
    report = Path(report) if report is not None else out_dir / "report.csv"
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    jobs = list_jobs(inp)
    inputs = _input_locations(inp, jobs)
    for path, what in ((out_dir, "output folder"), (report, "report file"), (masks_dir, "masks folder")):
        if path is not None:
            check_output(path, inputs, what)
    if cfg.ocr:
        check_tesseract()  # fail at the start, not on image 1 of 374k
    with folder_lock(out_dir, "usfmae clean"):
        _clean_jobs(jobs, out_dir, cfg, workers, report, masks_dir, progress, compression)
        return _write_report_and_index(jobs, out_dir, report)


def _write_report_and_index(jobs, out_dir: Path, report: Path):
    """One report row per job (the last one wins) and index.csv of the PNGs there are."""
    import pandas as pd

    rep = pd.read_csv(report, keep_default_na=False, na_values=[""]) if report.exists() else pd.DataFrame(
        columns=REPORT_COLUMNS)
    rep = rep.drop_duplicates("path", keep="last")
    rels = {j["rel"] for j in jobs}
    rep = rep[rep["path"].isin(rels)]
    _write_csv_atomic(report, rep)
    index = pd.DataFrame([{"path": j["rel"], "dataset": j["dataset"], "anatomy": j["anatomy"], "source": j["src"],
                           "frame": j["frame"]} for j in jobs if (out_dir / j["rel"]).exists()],
                         columns=list(INDEX_COLUMNS))
    _write_csv_atomic(out_dir / "index.csv", index)
    return rep.reset_index(drop=True)



# ============================================================================ CLI
def _parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise UsfmaeError(f"--config {text!r}: write KEY=VALUE, e.g. --config clahe_clip=3.0")
    types = {f.name: f.type for f in fields(CleanConfig)}
    if key not in types:
        raise UsfmaeError(f"--config {key}: unknown; known: {sorted(types)}")
    default = getattr(CleanConfig(), key)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return key, value.lower() in ("true", "1")
        return key, type(default)(value)
    except ValueError:
        raise UsfmaeError(f"--config {key}={value}: expected a {type(default).__name__}") from None


def add_cli(subparsers):
    """Register `usfmae clean`."""
    p = subparsers.add_parser(
        "clean", formatter_class=help_with_defaults,
        help="remove burned-in annotations and write the 224 px PNG tree",
        description="Remove burned-in annotations (Tesseract text, HSV + K-Means colour marks, Canny grey "
                    "marks; Navier-Stokes inpainting) and resize, for every image of a folder tree or a "
                    "curation manifest, on all cores. Resumes: finished PNGs are not redone. Writes "
                    "OUT_DIR/index.csv and a per-image report; a bad image is listed, never fatal.")
    p.add_argument("input", metavar="IN_DIR_OR_MANIFEST", nargs="?", help="image folder, or manifest.parquet/.csv")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="output folder of the PNG tree")
    p.add_argument("--workers", type=int, default=0, help="processes (default 0: all cores)")
    p.add_argument("--cleaner", choices=list(CLEANERS), default="study",
                   help="annotation cleaner preset: study (this study's tuned settings) or official (the official "
                        "notebook's thresholds and operations); table in docs/preprocessing.md")
    p.add_argument("--image-size", type=int, default=CleanConfig.image_size, help="output side in px")
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=CleanConfig.interpolation,
                   help="resize filter")
    p.add_argument("--keep-aspect", action="store_true", help="scale the long side and pad (default: squash)")
    p.add_argument("--no-ocr", action="store_true", help="no text detection (no Tesseract needed)")
    p.add_argument("--save-masks", action="store_true", help="also write each annotation mask")
    p.add_argument("--masks-dir", help="where masks go (default: OUT_DIR beside, named OUT_DIR_masks)")
    p.add_argument("--report", help="per-image report CSV (default: OUT_DIR/report.csv)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any other cleaning parameter, applied over the --cleaner preset (see CleanConfig, "
                        "defaults in docs/preprocessing.md), e.g. --config clahe_clip=3.0")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", help=argparse.SUPPRESS)  # the study folder, with -f / -p / --profile only
    from .. import runner

    runner.add_step_options(p, "02_preprocessing")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    from .. import runner

    if runner.step_mode(args):
        return runner.run_step_cli(args, "02_preprocessing")
    if args.out:
        raise UsfmaeError("usfmae clean: --out is the study folder of -f / -p / --profile; give OUT_DIR as the second "
                          "argument")
    if not args.input or not args.out_dir:
        raise UsfmaeError("usfmae clean: give IN_DIR_OR_MANIFEST and OUT_DIR (or -f / -p / --profile to run notebook "
                          "02's whole step; see --help)")
    over = dict(_parse_param(t) for t in args.config)
    over.update(image_size=args.image_size, interpolation=args.interpolation)
    if args.keep_aspect:
        over["keep_aspect"] = True
    if args.no_ocr:
        over["ocr"] = False
    cfg = make_config(args.cleaner, **over)
    out = Path(args.out_dir)
    masks = None
    if args.save_masks:
        masks = Path(args.masks_dir) if args.masks_dir else out.with_name(out.name + "_masks")
    rep = clean_tree(args.input, out, cfg, workers=args.workers, report=args.report, masks_dir=masks,
                     progress=not args.no_progress)
    bad = rep[rep["status"] != "ok"]
    print(f"{len(rep) - len(bad)} images cleaned into {out} (index.csv, report: {args.report or out / 'report.csv'})")
    if len(bad):
        print(f"{len(bad)} image(s) failed; they are listed with their error in the report:", file=sys.stderr)
        for r in bad.head(10).itertuples():
            print(f"  {r.source}: {r.error}", file=sys.stderr)
    return 0
