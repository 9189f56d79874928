"""Throughput of an MAE training step on this machine (`usfmae bench pretrain --config NAME`).

Prints images/s, the achieved TFLOP/s (matmul FLOPs of the step counted by mae.mae_flops, over
the measured step time) and that as a fraction of this machine's measured matmul peak: the time
of a large torch.matmul in the same dtype on the same device (MFU against what the device
really delivers, not a datasheet). The step is the real one: bf16 autocast and fused AdamW on
a GPU, fp32 on a CPU, gradient clipping, optimizer step; inputs are random tensors already on
the device, so the loader is out of the picture (scripts/loader_speed.py measures that).
CUDA work is asynchronous, so timings synchronise before and after the timed loop only.
"""
from __future__ import annotations

import time

import torch

from . import UsfmaeError, mae
from .classifiers import pick_device


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    device = pick_device(device or "auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsfmaeError("--device cuda: no CUDA device here; use --device cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                       min_seconds: float = 1.0) -> float:
    """Measured TFLOP/s of an [n, n] @ [n, n] matmul (2 n^3 FLOPs) in dtype on device."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):  # warm-up: kernel selection, caches, clocks
        torch.matmul(a, b)
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or reps < 3:
        torch.matmul(a, b)
        reps += 1
        if device.type == "cuda" and reps % 10:
            continue
        _sync(device)
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def bench_pretrain(config: str = mae.CPU_CONFIG, img_size: int | None = None, batch: int | None = None,
                   steps: int = 10, warmup: int = 3, mask_ratio: float = 0.25, device: str | None = None,
                   dtype: str = "auto", compile: bool = False, clip_grad: float = 1.0,
                   peak_size: int | None = None, compile_backend: str = "inductor") -> dict:
    """Time `steps` MAE training steps after `warmup` ones; returns the figures as a dict.

    Defaults: 224 px and batch 64 (the paper) on CUDA; 112 px and batch 32 on a CPU.
    peak_size: side of the matmul that measures the peak (default 8192 on CUDA, 2048 on CPU).
    compile_backend: torch.compile's backend (inductor; aot_eager traces the same graph without
    compiling, for a quick dry run).
    """
    dev, amp_dtype = _pick(device, dtype)
    img_size = img_size or (224 if dev.type == "cuda" else 112)
    batch = batch or (64 if dev.type == "cuda" else 32)
    torch.manual_seed(0)
    model = mae.build_model(config, img_size=img_size).to(dev)
    step_model = torch.compile(model, backend=compile_backend) if compile else model
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                                  betas=(0.9, 0.95), weight_decay=0.01, fused=dev.type == "cuda" or None)
    images = torch.randn(batch, 3, img_size, img_size, device=dev)  # [B, 3, H, W], normalised-like
    noise = torch.rand(batch, model.patch_embed.num_patches, device=dev)  # [B, L]
    autocast = amp_dtype != torch.float32

    def one_step():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=autocast):
            loss, _, _ = step_model(images, mask_ratio=mask_ratio, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        return loss

    model.train()
    for _ in range(warmup):
        one_step()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()  # no .item() inside the loop: no host sync per step
    _sync(dev)
    step_s = (time.perf_counter() - start) / steps
    if not torch.isfinite(loss):
        raise UsfmaeError(f"bench: the loss became {loss.item()}; try --dtype fp32")
    flops = mae.mae_flops(config, img_size, mask_ratio, batch)
    achieved = flops / step_s / 1e12
    peak = matmul_peak_tflops(dev, amp_dtype, peak_size)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"config": config, "img_size": img_size, "batch": batch, "mask_ratio": mask_ratio,
            "device": name, "dtype": str(amp_dtype).replace("torch.", ""), "compile": compile,
            "step_s": step_s, "images_per_s": batch / step_s, "gflop_per_step": flops / 1e9,
            "achieved_tflops": achieved, "matmul_peak_tflops": peak, "mfu": achieved / peak}


def format_result(r: dict) -> str:
    return (f"{r['config']} {r['img_size']}px batch {r['batch']} mask {r['mask_ratio']} on {r['device']} "
            f"({r['dtype']}{', compiled' if r['compile'] else ''}): {r['images_per_s']:.1f} images/s, "
            f"{r['step_s'] * 1e3:.1f} ms/step, {r['achieved_tflops']:.3f} TFLOP/s achieved "
            f"({r['gflop_per_step']:.1f} GFLOP/step), matmul peak {r['matmul_peak_tflops']:.3f} TFLOP/s, "
            f"MFU {r['mfu']:.1%}")


# ============================================================================ command line
def add_cli(subparsers):
    """Register `usfmae bench pretrain`."""
    p = subparsers.add_parser("bench", help="measure images/s, TFLOP/s and MFU of a step on this machine")
    kinds = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    b = kinds.add_parser("pretrain", help="one MAE pretraining step (forward, backward, AdamW)",
                         description=__doc__.split("\n\n")[0])
    b.add_argument("--config", default=mae.CPU_CONFIG, choices=sorted(mae.CONFIGS))
    b.add_argument("--img-size", type=int, help="default 224 on CUDA, 112 on CPU")
    b.add_argument("--batch", type=int, help="default 64 on CUDA, 32 on CPU")
    b.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup ones)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--mask-ratio", type=float, default=0.25)
    b.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when present")
    b.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    b.add_argument("--compile", action="store_true", help="torch.compile the model")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--csv", help="append the result as a row to this CSV file")
    b.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    r = bench_pretrain(args.config, args.img_size, args.batch, args.steps, args.warmup, args.mask_ratio,
                       args.device, args.dtype, args.compile)
    print(format_result(r))
    if args.csv:
        import pandas as pd
        from pathlib import Path

        row = pd.DataFrame([r])
        path = Path(args.csv)
        row.to_csv(path, mode="a", header=not path.exists(), index=False)
    return 0
