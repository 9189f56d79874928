"""Curation throughput: files/s and frames/s of `usfmae curate` on this machine.

    python scripts/curation_speed.py                      # synthetic tree, 2 workers
    python scripts/curation_speed.py --workers 4 --n-pretrain 2000
    python scripts/curation_speed.py --root /data/openus46 --workers 16

Without --root it writes a synthetic tree (quick profile counts, scaled by the options) to a
temporary folder first; that generation is not timed. Each measured run starts from an empty
output folder (no cache), so every file is read. A second run over the same output folder shows
the resume path (every file from the cache). The machine's load average is printed beside the
numbers: on a shared machine they are lower bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from usfmae_lib import curation, synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="data root to curate (default: a synthetic tree)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="cold runs to time (the best is reported)")
    ap.add_argument("--n-pretrain", type=int, default=600, help="synthetic stills")
    ap.add_argument("--n-videos", type=int, default=4, help="synthetic videos (48 frames at 24 fps: 6 samples)")
    ap.add_argument("--n-volumes", type=int, default=2, help="synthetic volumes (48 slices each)")
    ap.add_argument("--n-eval", type=int, default=100, help="images per synthetic evaluation set")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="curation_speed_"))
    try:
        root = args.root
        if root is None:
            root = tmp / "synthetic"
            t = time.perf_counter()
            synthetic.generate_tree(root, seed=0, profile="quick", workers=os.cpu_count(), progress=False,
                                    n_pretrain=args.n_pretrain, n_videos=args.n_videos, n_volumes=args.n_volumes,
                                    n_annotated=0, n_busbra=args.n_eval, n_otu=args.n_eval, n_gist=args.n_eval)
            print(f"synthetic tree written in {time.perf_counter() - t:.1f} s (not timed below)")
        best = None
        for r in range(args.repeats):
            out = tmp / f"out{r}"
            load = os.getloadavg()[0]
            t = time.perf_counter()
            c = curation.curate([root], out, workers=args.workers, progress=False)
            wall = time.perf_counter() - t
            s = c.summary
            run = {"workers": args.workers, "files": s["files_read"], "frames": s["frames"],
                   "read_s": s["read_seconds"], "files_per_s": s["files_per_s"], "frames_per_s": s["frames_per_s"],
                   "total_s": round(wall, 2), "load_avg_1min": round(load, 2), "cpus": os.cpu_count(),
                   "frames_by_kind": c.frames["kind"].value_counts().to_dict()}
            print("cold run:", json.dumps(run))
            if best is None or run["read_s"] < best["read_s"]:
                best, best_out = run, out
        t = time.perf_counter()
        c = curation.curate([root], best_out, workers=args.workers, progress=False)
        print(f"resumed run over the same output: {c.summary['files_from_cache']} files from the cache, "
              f"{c.summary['files_read']} read, {time.perf_counter() - t:.2f} s")
        print(f"\nbest of {args.repeats}: {best['files_per_s']} files/s, {best['frames_per_s']} frames/s with "
              f"{best['workers']} workers ({best['files']} files, {best['frames']} frames; read {best['read_s']} s, "
              f"whole curation {best['total_s']} s; load average {best['load_avg_1min']} on {best['cpus']} CPUs)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
