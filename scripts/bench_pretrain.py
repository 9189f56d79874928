"""Benchmark the MAE pretraining step for every named config, as a markdown table.

    python scripts/bench_pretrain.py                 # CPU configs at 112 px, batch 32
    python scripts/bench_pretrain.py --threads 1     # on a shared machine, see docs/pretraining.md
    python scripts/bench_pretrain.py --device cuda --configs mae_vit_base_patch16_dec512d8b

Each row is `usfmae bench pretrain` (usfmae_lib.bench.bench_pretrain); paste the table into
docs/pretraining.md with the machine and its load (printed first).
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from usfmae_lib import bench, mae


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[c for c in mae.CONFIGS if c != mae.PAPER_CONFIG])
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average before {os.getloadavg()[0]:.1f}\n")
    print("| config | px | batch | device | dtype | images/s | ms/step | GFLOP/step | TFLOP/s | matmul peak TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        r = bench.bench_pretrain(config, args.img_size, args.batch, args.steps, args.warmup,
                                 device=args.device, dtype=args.dtype, compile=args.compile)
        print(f"| {config} | {r['img_size']} | {r['batch']} | {r['device']} | {r['dtype']} | "
              f"{r['images_per_s']:.1f} | {r['step_s'] * 1e3:.0f} | {r['gflop_per_step']:.1f} | "
              f"{r['achieved_tflops']:.4f} | {r['matmul_peak_tflops']:.4f} | {r['mfu']:.1%} |", flush=True)
    print(f"\nload average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
