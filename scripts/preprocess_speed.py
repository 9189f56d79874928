"""Measure annotation-removal speed (`usfmae clean`) against a straightforward serial version.

Both clean the same images in one run, with OCR on and 224 px output:

  serial:    one process, a plain loop over the images; every stage as in the study except the
             three speed choices: OCR on the whole grey image (ocr_regions="full"), K-Means fitted
             on every saturated pixel and run to 100 iterations, library thread defaults;
             also with the official notebook's OCR settings (no upscaling, --psm 3), which read
             less of the small text but are quicker: the more conservative baseline;
  optimised: `clean_tree` with --workers processes: OCR only on candidate text lines pasted
             into one mosaic (no Tesseract call at all when there is none), K-Means fitted on at
             most 4000 pixels for 10 iterations, one OpenCV / Tesseract thread per process;
             also with 1 worker, which separates what the algorithm gains from what the cores do.

Images: by default the first --n/2 annotated scans and the first --n/2 pretraining stills of a
synthetic tree (`usfmae synth --out TREE`), so both clean and annotated scans are timed. Prints
images/s, ms per image per stage and the speed-up, and writes them to --out (CSV + Markdown).
The machine's load average is recorded: timings on a shared machine are inflated.

    python scripts/preprocess_speed.py --tree outputs/quick/synthetic [--n 60] [--workers 2]
    python scripts/preprocess_speed.py --images DIR [--n 60]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from usfmae_lib import preprocess as pp


def pick_images(tree: Path | None, images: Path | None, n: int) -> list[Path]:
    if images is not None:
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in pp.IMAGE_SUFFIXES)
        return files[:n]
    ann = sorted((tree / "annotated" / "images").glob("*.png"))[: n // 2]
    still = sorted((tree / "pretrain").glob("*/images/*.png"))[: n - len(ann)]
    if not ann and not still:
        raise SystemExit(f"{tree}: no synthetic images; make them with `usfmae synth --out {tree}`")
    return ann + still


def serial(files: list[Path], cfg: pp.CleanConfig, out: Path) -> tuple[float, dict]:
    """The straightforward version: a loop in this process, library defaults."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for k, f in enumerate(files):
        clock = time.perf_counter()
        rgb = pp.read_image(f)
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - clock
        img, _ = pp.clean_image(rgb, cfg, timings)
        clock = time.perf_counter()
        pp.write_png(out / f"{k:05d}.png", img)
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - clock
    return time.perf_counter() - t0, {s: timings.get(s, 0.0) / len(files) for s in pp.STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path("outputs/quick/synthetic"), help="synthetic tree")
    ap.add_argument("--images", type=Path, help="time these images instead (a folder)")
    ap.add_argument("--n", type=int, default=60, help="images timed")
    ap.add_argument("--workers", type=int, default=2, help="processes of the optimised run")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=Path("outputs/preprocess_speed"), help="where the tables go")
    a = ap.parse_args()

    files = pick_images(a.tree, a.images, a.n)
    pp.check_tesseract()
    fast_cfg = pp.make_config(image_size=a.image_size)
    slow_cfg = pp.make_config(image_size=a.image_size, ocr_regions="full", kmeans_sample=0, kmeans_iters=100)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for k, f in enumerate(files):  # one flat folder of links: clean_tree reads a folder
            (src / f"{k:05d}{f.suffix}").symlink_to(f.resolve())
        t0 = time.perf_counter()
        rep = pp.clean_tree(src, tmp / "fast", fast_cfg, workers=a.workers, progress=False)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pp.clean_tree(src, tmp / "fast1", fast_cfg, workers=1, progress=False)
        fast1_s = time.perf_counter() - t0
        (tmp / "slow").mkdir()
        slow_s, slow_stage = serial(files, slow_cfg, tmp / "slow")
        official_s, _ = serial(files, pp.make_config(image_size=a.image_size, ocr_regions="full", ocr_scale=1.0,
                                                     ocr_psm=3, kmeans_sample=0, kmeans_iters=100), tmp / "slow")
    load_after = os.getloadavg()
    bad = rep[rep["status"] != "ok"]
    if len(bad):
        print(bad[["source", "error"]].to_string())
    fast_stage = {s: rep[f"t_{s}"].mean() for s in pp.STAGES}
    table = pd.DataFrame({"stage": pp.STAGES,
                          "serial_ms_per_image": [1000 * slow_stage[s] for s in pp.STAGES],
                          "optimised_ms_per_image_per_worker": [1000 * fast_stage[s] for s in pp.STAGES]})
    summary = {
        "images": len(files), "workers": a.workers, "image_size": a.image_size,
        "serial_images_per_s": len(files) / slow_s, "optimised_images_per_s": len(files) / fast_s,
        "optimised_1_worker_images_per_s": len(files) / fast1_s,
        "serial_official_ocr_images_per_s": len(files) / official_s,
        "speedup": slow_s / fast_s, "speedup_vs_serial_official_ocr": official_s / fast_s,
        "serial_s": slow_s, "optimised_s": fast_s, "optimised_1_worker_s": fast1_s,
        "load_average_before": load_before[0], "load_average_after": load_after[0], "cores": pp.cpu_count(),
        "ocr_calls_skipped_share": float((rep["t_text"] < 0.02).mean()),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out / "preprocess_speed_stages.csv", index=False)
    (a.out / "preprocess_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    (a.out / "preprocess_speed.md").write_text(
        f"{len(files)} images, OCR on, {a.image_size} px output, load average {load_before[0]:.1f} -> "
        f"{load_after[0]:.1f} on {summary['cores']} cores\n\n"
        f"| run | images/s |\n|---|---|\n| serial | {summary['serial_images_per_s']:.2f} |\n"
        f"| serial, official OCR settings (1x, psm 3) | {summary['serial_official_ocr_images_per_s']:.2f} |\n"
        f"| optimised, 1 worker | {summary['optimised_1_worker_images_per_s']:.2f} |\n"
        f"| optimised, {a.workers} workers | {summary['optimised_images_per_s']:.2f} |\n"
        f"| speed-up, {a.workers} workers vs serial | {summary['speedup']:.1f}x |\n"
        f"| speed-up, {a.workers} workers vs serial with official OCR settings | "
        f"{summary['speedup_vs_serial_official_ocr']:.1f}x |\n\n" + pp.markdown_table(table, ".1f"))
    print((a.out / "preprocess_speed.md").read_text())


if __name__ == "__main__":
    main()
