"""Paper scale on one machine: each data step timed on a synthetic corpus of N frames, then
extrapolated to the paper's 374,192 frames on 16 cores (docs/scale.md holds the table).

    python scripts/paper_scale.py --frames 20000 --out /tmp/scale      # ~40 min on 2 cores
    python scripts/paper_scale.py --frames 500 --out /tmp/scale_small  # a check of the script

Steps, each the real command in its own process (time, peak memory of its whole process tree
sampled every 0.2 s with psutil, bytes it leaves on disk):
  synth     usfmae synth (the corpus; not a step of the study, timed for reference)
  curate    usfmae curate: reading + hashing every file (read_seconds in summary.json), then the
            leakage audit, exact and near-duplicate search and outputs (the rest of its time)
  clean     usfmae clean of the manifest: annotation removal, 224 px PNG tree
  pack      store.pack_store at 224 px (grey images in one channel)
  load      one epoch of the pretraining loader over the store, uint8 batches of 64 as a GPU run
            loads them (augmentation runs on the GPU), --workers loader processes
Extrapolation: time x (374,192 / frames) x (cores here / 16) for the steps that run on every core
(all but the duplicate search, whose multi-index hashing grows about linearly with the frames and
runs on one core); disk x (374,192 / frames); memory: measured, with what grows with N named.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

PAPER_FRAMES = 374_192
TARGET_CORES = 16
USFMAE = [sys.executable, "-m", "usfmae_lib.cli"]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measured(cmd: list[str], env=None) -> dict:
    """Run cmd; wall seconds and the peak of the summed RSS of its process tree."""
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                tree = [proc] + proc.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            stop.wait(0.2)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak[0] / 2**20), "log": out[-600:]}


LOAD_EPOCH = """
import json, sys, time
from usfmae_lib import store
d, workers = sys.argv[1], int(sys.argv[2])
ds = store.StoreDataset(d, seed=0, num_patches=196)
sampler = store.EpochSampler(len(ds), seed=0)
loader = store.make_loader(ds, sampler, 64, workers)
sampler.set_position(0)
t0, n = time.perf_counter(), 0
for b in loader:
    n += len(b["index"])
print(json.dumps({"images": n, "seconds": time.perf_counter() - t0}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000, help="pretraining stills to synthesise (default 20000)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes per step (default: all cores)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    out, w = args.out, str(args.workers)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    syn, cur, cln, sto = out / "synthetic", out / "curation", out / "clean", out / "store"
    rows["synth"] = measured(USFMAE + ["synth", "--out", str(syn), "--profile", "quick", "--n-pretrain",
                                       str(args.frames), "--n-annotated", "0", "--workers", w, "--no-progress"], env)
    rows["curate"] = measured(USFMAE + ["curate", str(syn), "--out", str(cur), "--workers", w, "--no-progress"], env)
    summary = json.loads((cur / "summary.json").read_text())
    rows["curate"].update(read_seconds=summary["read_seconds"], total_seconds=summary["total_seconds"],
                          frames=summary["frames"], kept=summary["kept"],
                          frames_pretraining=summary["frames_pretraining"])
    rows["clean"] = measured(USFMAE + ["clean", str(cur / "manifest.parquet"), str(cln), "--workers", w,
                                       "--no-progress"], env)
    rows["pack"] = measured([sys.executable, "-c", "import sys; from usfmae_lib import store; "
                             f"store.pack_store(sys.argv[1], sys.argv[2], {args.size}, workers={w}, progress=False)",
                             str(cln), str(sto)], env)
    meta = json.loads((sto / "store.json").read_text())
    load = measured([sys.executable, "-c", LOAD_EPOCH, str(sto), w], env)
    load.update(json.loads(load.pop("log").strip().splitlines()[-1]))
    rows["load"] = load
    for step, path in (("synth", syn), ("curate", cur), ("clean", cln), ("pack", sto)):
        rows[step]["disk_bytes"] = du(path)
    result = {"frames_requested": args.frames, "workers": args.workers, "cpu": os.cpu_count(),
              "loadavg_end": os.getloadavg(), "store": {k: meta[k] for k in ("n_images", "n_grey", "bytes")},
              "steps": rows}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def table(r: dict) -> str:
    """The markdown table of docs/scale.md from scale.json."""
    steps, n = r["steps"], r["steps"]["curate"]["frames_pretraining"]
    per = PAPER_FRAMES / n
    cores = r["workers"] / TARGET_CORES
    dedupe = steps["curate"]["total_seconds"] - steps["curate"]["read_seconds"]  # in-process: no start-up
    lines = [f"measured on {n:,} pretraining frames with {r['workers']} workers; extrapolated to "
             f"{PAPER_FRAMES:,} frames on {TARGET_CORES} cores",
             "", "| step | time here | peak RAM here | disk here | time at 374k, 16 cores | disk at 374k |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(name, seconds, rss, disk, scaled_s):
        d374 = f"{disk * per / 1e9:.1f} GB" if disk is not None else ""
        d_here = f"{disk / 1e9:.2f} GB" if disk is not None else ""
        lines.append(f"| {name} | {seconds:,.0f} s | {rss:,} MB | {d_here} | {scaled_s / 60:,.1f} min | {d374} |")

    c = steps["curate"]
    row("curate: read + hash", c["read_seconds"], c["peak_rss_mb"], c["disk_bytes"], c["read_seconds"] * per * cores)
    row("curate: audit + duplicates + outputs", dedupe, c["peak_rss_mb"], None, dedupe * per)
    row("clean (annotation removal, 224 px PNG)", steps["clean"]["seconds"], steps["clean"]["peak_rss_mb"],
        steps["clean"]["disk_bytes"], steps["clean"]["seconds"] * per * cores)
    row("pack store (224 px)", steps["pack"]["seconds"], steps["pack"]["peak_rss_mb"], steps["pack"]["disk_bytes"],
        steps["pack"]["seconds"] * per * cores)
    ld = steps["load"]
    rate = ld["images"] / ld["seconds"]
    lines.append(f"| one epoch's loading (uint8, batch 64) | {ld['seconds']:,.0f} s ({rate:,.0f} images/s) | "
                 f"{ld['peak_rss_mb']:,} MB |  | {PAPER_FRAMES / (rate / cores) / 60:,.1f} min "
                 f"({rate / cores:,.0f} images/s) |  |")
    s = r["store"]
    lines += ["", f"store: {s['n_images']:,} images, {s['n_grey']:,} grey, {s['bytes'] / s['n_images']:,.0f} bytes "
                  f"per image -> {s['bytes'] / s['n_images'] * PAPER_FRAMES / 1e9:.1f} GB for {PAPER_FRAMES:,} "
                  f"(RGB: {3 * 224 * 224 * PAPER_FRAMES / 1e9:.1f} GB)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
