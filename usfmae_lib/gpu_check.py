"""`usfmae check gpu`: one prepared check that this machine runs the study, with the figures to show it.

On a GPU (under 8 minutes on one H100-class card) it measures and writes `gpu_check.json` and
`gpu_check.md` (the table of docs/gpu.md):

1. the machine: device, driver, torch, CUDA, bf16 support, memory (provenance.record);
2. `usfmae bench pretrain` for the paper's ViT-B/16 at 224 px in bf16, eager and torch.compile'd:
   images/s, TFLOP/s, MFU against the measured matmul peak, peak memory;
3. 200 pretraining steps (pretrain.train, the notebooks' code) on a store of synthetic scans at
   224 px: the loss must fall, and the loader's images/s is measured beside the model's, so a GPU
   the loader starves shows;
4. the released-weights path: a ViT-B/16 MAE state dict saved as the official code saves it (bare,
   reference MAE key names) fine-tuned on one fold of a folder dataset;
5. every model of Table 2 (USF-MAE, scratch, ViT-B, ResNet-50, VGG-19, UltraSam) fine-tuned a few
   steps in bf16 and in fp16 (GradScaler), with images/s and peak memory.

`--dry` runs the same code paths with the sizes shrunk (a tiny MAE, 32 px, a step or two; torch.compile
with the `aot_eager` backend, which traces like inductor without compiling C++), on a CPU too: there
the GPU's precision rule is applied (amp.cpu_as_gpu) so bf16 and fp16 autocast and the GradScaler run.
CI runs it (tests/test_gpu_check.py); a failing step fails the check, its error in the JSON.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from . import UsfmaeError, amp, atomic_write_text, provenance

PAPER_CONFIG = "mae_vit_base_patch16_dec512d8b"
BASELINES = ("usf-mae", "scratch", "vit-b", "resnet-50", "vgg-19", "ultrasam")
# full size (a GPU) and dry (CI) sizes of every part
SIZES = {
    False: dict(config=PAPER_CONFIG, img_size=224, bench_batch=64, bench_steps=10, bench_warmup=3, backend="inductor",
                store_images=512, pretrain_steps=200, pretrain_batch=64, loader_batches=30, finetune_images=48,
                finetune_steps=5, finetune_batch=16, fp16_models=BASELINES),
    True: dict(config="mae_vit_tiny_patch16_dec128d2b", img_size=32, bench_batch=4, bench_steps=2, bench_warmup=1,
               backend="aot_eager", store_images=32, pretrain_steps=12, pretrain_batch=8, loader_batches=3,
               finetune_images=24, finetune_steps=1, finetune_batch=8,
               # fp16 of VGG-19's 100 M-parameter head takes 30 s on a CPU: the fp16 path (GradScaler) is the
               # same code for every model, so the dry form runs it on the ViTs and every model in bf16
               fp16_models=("usf-mae", "scratch", "vit-b")),
}


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def machine() -> dict:
    import torch

    rec = provenance.record(device="auto")
    out = dict(device=rec["device"], driver=rec.get("driver"), torch=rec["torch"], cuda=rec["cuda"],
               commit=provenance.commit_label(rec), python=rec["python"], timm=rec["timm"])
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1), bf16=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version())
    else:
        out.update(gpus=0, cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return out


def bench_part(s: dict) -> list[dict]:
    """bench.bench_pretrain in bf16, eager then compiled, with peak memory."""
    from .bench import bench_pretrain

    rows = []
    for compiled in (False, True):
        _peak_reset()
        r = bench_pretrain(s["config"], s["img_size"], s["bench_batch"], s["bench_steps"], s["bench_warmup"],
                           device="cuda" if _cuda() else "cpu", dtype="bf16", compile=compiled,
                           compile_backend=s["backend"], peak_size=None if _cuda() else 256)
        rows.append({**r, "peak_memory_gib": _peak_gib(), "compile_backend": s["backend"] if compiled else None})
    return rows


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def synthetic_scans(folder: Path, n: int, size: int, classes=("breast", "liver")) -> Path:
    """n synthetic scans (synthetic.render) as folder/<anatomy>/<i>.png, classes alternating: a store's
    source and a folder dataset (one class per anatomy) at once."""
    import cv2

    from .synthetic import render

    for i in range(n):
        anatomy = classes[i % len(classes)]
        path = folder / anatomy / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = render(anatomy, 0, 0, i, size, size)
        cv2.imwrite(str(path), img if img.ndim == 2 else img[..., ::-1])
    return folder


def pretrain_part(s: dict, work: Path) -> dict:
    """pretrain.train for pretrain_steps on a store of synthetic scans; the loader's images/s alone."""
    from . import mae, pretrain
    from .store import pack_store

    scans = synthetic_scans(work / "scans", s["store_images"], s["img_size"])
    store = pack_store(scans, work / "store", s["img_size"], progress=False)
    steps_per_epoch = s["store_images"] // s["pretrain_batch"]
    params = dict(model=s["config"], img_size=s["img_size"], batch_size=s["pretrain_batch"], lr=1e-3,  # the paper's
                  epochs=-(-s["pretrain_steps"] // steps_per_epoch), max_steps=s["pretrain_steps"], warmup_fraction=0.1,
                  precision="bf16", log_every=max(1, s["pretrain_steps"] // 10), checkpoint_every=s["pretrain_steps"])
    p = pretrain.resolve_params(**params)
    rank, world, device = pretrain.init_distributed()
    num_patches = (s["img_size"] // mae.CONFIGS[s["config"]]["patch_size"]) ** 2
    dataset, sampler, loader = pretrain.make_data(store, p, num_patches, rank, world, device)
    n, start = 0, None
    for batch in loader:  # the loader alone: what it can feed, with the first batch (worker start-up) untimed
        if start is None:
            start = time.perf_counter()
            continue
        batch["images"].to(device, non_blocking=True)
        n += len(batch["images"])
        if n >= s["loader_batches"] * p["batch_size"]:
            break
    _sync()
    loader_ips = n / (time.perf_counter() - start) if n else float("nan")
    workers = loader.num_workers
    del loader
    _peak_reset()
    summary = pretrain.train(store, work / "run", progress=False, **params)
    log = np.genfromtxt(work / "run" / "log.csv", delimiter=",", names=True)
    window = max(1, len(log) // 4)  # the first and last quarter of the steps
    first, last = float(np.mean(log["loss"][:window])), float(np.mean(log["loss"][-window:]))
    return dict(steps=summary["last_step"], images_per_s=summary["images_per_s"], loader_images_per_s=loader_ips,
                precision=summary["precision_run"], loss_first=first, loss_last=last, loss_falls=last < first,
                peak_memory_gib=_peak_gib(), device=summary["device"], loader_workers=workers)


def released_layout(s: dict, work: Path) -> Path:
    """An MAE of the check's config saved as the official code saves it: a bare state dict."""
    import torch

    from . import mae

    torch.manual_seed(0)
    path = work / "USF-MAE_released_layout.pth"
    torch.save(mae.build_model(s["config"], img_size=s["img_size"]).state_dict(), path)
    return path


def sam_checkpoint(s: dict, work: Path) -> Path:
    """A random SAM ViT-B encoder in timm's key layout (no UltraSam weights can be fetched)."""
    import timm
    import torch

    path = work / "sam_vit_b_random.pth"
    torch.save(timm.create_model("samvit_base_patch16", img_size=s["img_size"], num_classes=0).state_dict(), path)
    return path


def finetune_part(s: dict, work: Path, models=BASELINES, precisions=("bf16", "fp16")) -> list[dict]:
    """finetune_run of each model for a few steps in each precision, on one fold of a folder dataset."""
    from . import classifiers
    from . import finetune as ft
    from .datasets import load_split

    folder = synthetic_scans(work / "folder", s["finetune_images"], s["img_size"])
    data = ft.prepare_data(load_split("folder", folder, positive="liver", seed=0), s["img_size"])
    released = released_layout(s, work)
    checkpoints = {"usf-mae": released, "scratch": released, "ultrasam": sam_checkpoint(s, work)}
    cfg = ft.TrainConfig(epochs=1, patience=0, batch_size=s["finetune_batch"], img_size=s["img_size"],
                         max_steps=s["finetune_steps"], min_steps=s["finetune_steps"])
    rows = []
    with classifiers.warnings_once():  # a baseline without ImageNet weights: said once
        rows += _finetune_models(s, work, data, checkpoints, cfg, models, precisions)
    return rows


def _finetune_models(s, work, data, checkpoints, cfg, models, precisions) -> list[dict]:
    import torch

    from . import finetune as ft

    rows = []
    for model in models:
        for precision in [p for p in precisions if p != "fp16" or model in s["fp16_models"]]:
            _peak_reset()
            t0 = time.perf_counter()
            row = ft.finetune_run(data, model, cfg, 0, work / "runs" / precision, checkpoint=checkpoints.get(model),
                                  n_bootstrap=10, log=None, precision=precision)
            _sync()
            history = pd.read_csv(work / "runs" / precision / row["run"] / "history.csv")
            rows.append(dict(model=model, precision=precision, computed_in=row["computed_in"], steps=row["steps_run"],
                             train_loss=float(history["train_loss"].iloc[-1]),
                             finite=bool(np.isfinite(history["train_loss"]).all()),
                             images_per_s=row["steps_run"] * s["finetune_batch"] / max(row["train_seconds"], 1e-9),
                             seconds=time.perf_counter() - t0, peak_memory_gib=_peak_gib(), init=row["init"]))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def run_check(out_dir, dry: bool = False, keep: bool = False) -> dict:
    """Every part in turn (a failing part is recorded with its error, and the check goes on); writes
    out_dir/gpu_check.json and gpu_check.md; returns the record. ok: every part ran and the loss fell."""
    s = SIZES[dry]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="usfmae-gpu-check-", dir=out_dir))
    record = dict(dry=dry, sizes=s, machine=machine(), started=time.strftime("%Y-%m-%d %H:%M:%S"), errors={})
    parts = [("bench", lambda: bench_part(s)), ("pretrain", lambda: pretrain_part(s, work / "pretrain")),
             ("finetune", lambda: finetune_part(s, work / "finetune"))]
    t_all = time.perf_counter()
    context = amp.cpu_as_gpu() if not _cuda() else contextlib.nullcontext()
    with context:
        for name, part in parts:
            t0 = time.perf_counter()
            print(f"check gpu: {name} ...", flush=True)
            try:
                record[name] = part()
            except Exception as err:  # the check reports every part; the error is the finding
                record["errors"][name] = "".join(traceback.format_exception_only(type(err), err)).strip()
                traceback.print_exc()
            record[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    finetune_ok = all(r["finite"] and r["steps"] > 0 for r in record.get("finetune", [])) and "finetune" in record
    record["ok"] = not record["errors"] and record.get("pretrain", {}).get("loss_falls", False) and finetune_ok
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(record, indent=1, default=str))
    atomic_write_text(out_dir / "gpu_check.md", to_markdown(record))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _f(x, fmt=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"## `usfmae check gpu`{' --dry' if r['dry'] else ''}: {m['device']}", "",
             f"torch {m['torch']}, CUDA {m.get('cuda')}, driver {m.get('driver')}, "
             + (f"compute capability {m.get('capability')}, {m.get('memory_gib')} GiB, bf16 {m.get('bf16')}"
                if m.get("gpus") else f"CPU capability {m.get('cpu_capability')}, {m.get('threads')} threads")
             + f"; commit {m['commit']}; {r['started']}; the whole check {r['seconds']:.0f} s"
             + (" (DRY: sizes shrunk, the figures measure nothing)" if r["dry"] else ""), ""]
    if r.get("bench"):
        lines += ["| pretraining step (bench) | images/s | TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]
        for b in r["bench"]:
            how = f"{b['config']} {b['img_size']} px, batch {b['batch']}, {b['dtype']}" + (
                f", torch.compile ({b['compile_backend']})" if b["compile"] else ", eager")
            lines.append(f"| {how} | {_f(b['images_per_s'])} | {_f(b['achieved_tflops'], '.2f')} | {_f(100 * b['mfu'])}% "
                         f"| {_f(b['peak_memory_gib'], '.2f')} |")
        lines.append("")
    if r.get("pretrain"):
        p = r["pretrain"]
        lines += [f"Pretraining, {p['steps']} steps of pretrain.train on synthetic scans ({p['precision']}): model "
                  f"{_f(p['images_per_s'])} images/s, loader alone {_f(p['loader_images_per_s'])} images/s "
                  f"({p['loader_workers']} workers){' (the loader is slower: the GPU waits for data)' if p['loader_images_per_s'] < p['images_per_s'] else ''}; "
                  f"loss {p['loss_first']:.4f} -> {p['loss_last']:.4f} ({'falls' if p['loss_falls'] else 'DOES NOT FALL'}); "
                  f"peak memory {_f(p['peak_memory_gib'], '.2f')} GiB", ""]
    if r.get("finetune"):
        lines += ["Fine-tuning (finetune_run, one fold of synthetic scans; USF-MAE from a ViT MAE state dict in the "
                  "released layout, UltraSam from a random SAM ViT-B; images/s over the run's training and validation):",
                  "",
                  "| model | asked | computed in | steps | images/s | last loss | peak memory (GiB) |",
                  "|---|---|---|---|---|---|---|"]
        for f in r["finetune"]:
            lines.append(f"| {f['model']} | {f['precision']} | {f['computed_in']} | {f['steps']} | {_f(f['images_per_s'])} "
                         f"| {_f(f['train_loss'], '.3f')}{'' if f['finite'] else ' NOT FINITE'} | {_f(f['peak_memory_gib'], '.2f')} |")
        lines.append("")
    for name, err in r["errors"].items():
        lines.append(f"- **{name} failed**: `{err}`")
    lines.append(f"Result: {'ok' if r['ok'] else 'FAILED'}.")
    return "\n".join(lines) + "\n"


# ============================================================================ command line
def add_cli(subparsers):
    """Register `usfmae check gpu`."""
    p = subparsers.add_parser("check", help="prove this machine runs the study (usfmae check gpu)",
                              description=__doc__.split("\n\n")[0])
    kinds = p.add_subparsers(dest="check", metavar="WHAT", required=True)
    g = kinds.add_parser("gpu", help="bench, 200 pretraining steps, the released-weights path, every baseline in "
                                     "bf16 and fp16; --dry: the same paths, shrunk (CI)")
    g.add_argument("--dry", action="store_true", help="same code paths, sizes shrunk: runs on a CPU in about a minute")
    g.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    g.add_argument("--keep", action="store_true", help="keep the check's scratch files (store, runs) under --out")
    g.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    import torch

    if not args.dry and not torch.cuda.is_available():
        raise UsfmaeError("usfmae check gpu: no CUDA GPU here; on a CPU run the dry form, usfmae check gpu --dry")
    record = run_check(args.out, args.dry, args.keep)
    print(to_markdown(record))
    print(f"written: {Path(args.out) / 'gpu_check.json'}, {Path(args.out) / 'gpu_check.md'}")
    return 0 if record["ok"] else 1
