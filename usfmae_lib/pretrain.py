"""MAE pretraining: the paper's recipe, resumable, single process or DDP (`usfmae pretrain`).

    usfmae pretrain -f params/quick/03_mae_pretraining.yaml --out outputs/quick [--resume]
    torchrun --nproc_per_node 8 -m usfmae_lib.pretrain -f params/paper/03_mae_pretraining.yaml --out OUT

Both pack OUT/02_preprocessing/clean into OUT/03_mae_pretraining/store (once, see store.py) and
call `train`, which notebook 03 calls too. Defaults are the paper's recipe (docs/pretraining.md):
mask 25%, AdamW lr 1e-3 wd 0.01 betas (0.9, 0.95), batch 64, linear warmup over 10% of the
steps then half-cycle cosine (per step), gradient clipping 1.0, rotation 0-90 deg, flips,
resized crop 0.5-2.0x (zoom-out padded black), 100 epochs. Each difference of the official code
is a parameter: mask_ratio=0.75, blr_scaling=True with blr_batch=128 (lr x 128/256),
betas=[0.9, 0.999] with decay_all=True (AdamW defaults, decay on every parameter), min_lr=1e-5,
and init_checkpoint=<local ImageNet MAE file> (a missing file stops the run before any work);
params/official/03_mae_pretraining.yaml sets them all.

Outputs in run_dir: checkpoints/checkpoint-last.pth (every `checkpoint_every` steps and at the
end, atomic) and log.csv (step, epoch, loss, lr, images_per_s; one row per step). A checkpoint
is a dict of tensors and plain python values, so torch.load(weights_only=True) reads it:
model, optimizer, scheduler, scaler, step, epoch, rng (per rank), params. Resume is exact: a
sample's augmentation and mask noise come from (seed, epoch, index) and the epoch's order from
(seed, epoch), and the batches already done in the epoch are skipped. `max_steps` stops a run
early (the dry run of `usfmae reproduce`) with the full run's schedule, so it can be resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import UsfmaeError, amp, atomic_write, checkpoints, mae
from .safety import check_output, folder_lock
from .store import AugmentConfig, EpochSampler, StoreDataset, augment_batch, make_loader, pack_store

STEP = "03_mae_pretraining"
CHECKPOINT = "checkpoint-last.pth"
# The ImageNet MAE the official USF-MAE code starts from (its init_checkpoint; nothing downloads it)
IMAGENET_MAE_FILE = "mae_pretrain_vit_base_full.pth"
IMAGENET_MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base_full.pth"

# Every knob of a run, with the paper's values (plain python types: they go into checkpoints).
DEFAULTS = dict(
    model=mae.CPU_CONFIG,  # named configuration (paper: mae_vit_base_patch16_dec512d8b)
    img_size=112,  # input side (paper: 224)
    mask_ratio=0.25,  # paper: 0.25; official code: 0.75
    norm_pix_loss=False,  # paper: raw pixels; reference MAE: True
    epochs=100,
    batch_size=64,  # per process; the global batch is batch_size x processes
    lr=1e-3,  # peak learning rate (or base lr when blr_scaling)
    blr_scaling=False,  # lr x batch / 256 (reference MAE rule); official code: True
    blr_batch=0,  # batch used in that rule; 0 = the global batch (official code: 128)
    weight_decay=0.01,
    decay_all=False,  # False: no decay on biases and norms (reference MAE); official code: True
    betas=[0.9, 0.95],  # reference MAE; official code: AdamW default [0.9, 0.999]
    warmup_fraction=0.1,  # linear warmup over this fraction of all steps, then half-cycle cosine
    min_lr=0.0,  # the cosine's floor (reference MAE: 0; official code: 1e-5)
    clip_grad=1.0,  # max gradient norm (0 = off)
    rot_degrees=[0.0, 90.0],  # rotation range (paper: 0-90)
    flip_p=0.5,  # horizontal and vertical flips, each
    crop_scale=[0.5, 2.0],  # crop area / image area; above 1 zooms out (black padding)
    crop_ratio=[0.75, 4 / 3],  # crop aspect ratio range
    init_checkpoint=None,  # local MAE checkpoint to start from (official code: ImageNet MAE)
    seed=0,
    precision="auto",  # auto | fp32 | bf16 | fp16: bf16 autocast on a GPU (fp16 + GradScaler without bf16), fp32 on a CPU (usfmae_lib/amp.py)
    compile=False,  # torch.compile the model
    checkpoint_every=0,  # steps between checkpoints; 0 = at the end of every epoch
    log_every=20,  # steps between host syncs (loss to CSV, NaN check); rows are per step
    workers=-1,  # DataLoader processes; -1 = auto, 0 = load in the main process
    threads=0,  # torch CPU threads of the training process; 0 = torch's default (all cores)
    pos_embed="fixed",  # position tables: fixed sin-cos (reference MAE, official code) | learnable (the paper's
    # text, section 2.3: "learnable positional encodings"; they start as the sin-cos tables)
    model_overrides={},  # constructor overrides of the named config (e.g. depth=2 for tests)
    heldout_per_anatomy=20,  # images per anatomy kept out of the store for notebook 04 (paper: 0)
    snapshot_epochs=[],  # also keep the model (no optimiser) after these epochs: checkpoints/epoch-NNNN.pth,
    # read by notebook 07 (downstream score along pretraining); the end is checkpoint-last.pth
    max_steps=0,  # stop after this many optimiser steps (0 = the whole schedule); the lr schedule is still
    # that of all `epochs`, so the steps run are the full run's first steps and a resume can go on from them
)
# parameters added after runs were made, with the value those runs computed with (so they still resume)
ADDED_LATER = dict(pos_embed="fixed")
# parameters that may change when a run is resumed (they do not change what is computed)
RUN_ONLY = ("compile", "checkpoint_every", "log_every", "workers", "threads", "max_steps", "snapshot_epochs")


# ============================================================================ recipe pieces
def resolve_params(**params) -> dict:
    """DEFAULTS updated with params; unknown names are refused, tuples become lists."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise UsfmaeError(f"unknown pretraining parameter(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **params}
    for key in ("betas", "rot_degrees", "crop_scale", "crop_ratio"):
        out[key] = [float(v) for v in out[key]]
        if len(out[key]) != 2:
            raise UsfmaeError(f"parameter {key} must hold two numbers, got {out[key]}")
    out["model_overrides"] = dict(out["model_overrides"] or {})
    allowed = set(inspect.signature(mae.MaskedAutoencoderViT).parameters) - {"img_size", "norm_pix_loss", "pos_embed"}
    if set(out["model_overrides"]) - allowed:
        raise UsfmaeError(f"model_overrides: unknown name(s) {sorted(set(out['model_overrides']) - allowed)}; "
                          f"valid: {', '.join(sorted(allowed))} (YAML needs a space after ':')")
    if out["pos_embed"] not in mae.POS_EMBED:
        raise UsfmaeError(f"pos_embed must be one of {', '.join(mae.POS_EMBED)}, got {out['pos_embed']!r}")
    amp.check_precision(out["precision"])
    if not 0 <= out["mask_ratio"] < 1:
        raise UsfmaeError(f"mask_ratio must be in [0, 1), got {out['mask_ratio']}")
    return out


def params_of(namespace: dict) -> dict:
    """The pretraining parameters a namespace defines (notebook 03's globals: its parameters cell),
    by DEFAULTS' names; the rest of the namespace is left out. What notebook 03 passes to `train`."""
    return {name: namespace[name] for name in DEFAULTS if name in namespace}


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Learning rate / peak at `step` (0-based): linear warmup from 0, then half-cycle cosine down
    to min_factor at total_steps (the reference MAE's schedule, evaluated per step)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_lr(p: dict, world: int) -> float:
    """The lr the schedule peaks at: lr, or lr x batch / 256 with blr_scaling."""
    if not p["blr_scaling"]:
        return p["lr"]
    return p["lr"] * (p["blr_batch"] or p["batch_size"] * world) / 256


def build_optimizer(model: torch.nn.Module, p: dict, lr: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; without decay_all, biases and norm weights (1-D) get no weight decay (reference
    MAE, via timm's param_groups_weight_decay), nor do learnable position tables (as timm's ViT).
    Fixed position tables are not trained."""
    from timm.optim import param_groups_weight_decay

    if p["decay_all"]:
        groups = [{"params": [q for q in model.parameters() if q.requires_grad], "weight_decay": p["weight_decay"]}]
    else:
        groups = param_groups_weight_decay(model, p["weight_decay"], no_weight_decay_list=("pos_embed", "decoder_pos_embed"))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(p["betas"]), fused=fused or None)


def check_init_checkpoint(init_checkpoint, run_dir) -> None:
    """Stop before any work when a run would start from `init_checkpoint` and that file is
    missing: UsfmaeError naming the file (absolute) and where it comes from. A run that resumes
    from run_dir/checkpoints/checkpoint-last.pth never reads it, so it is not checked then."""
    if not init_checkpoint or (Path(run_dir) / "checkpoints" / CHECKPOINT).exists():
        return
    path = Path(init_checkpoint)
    if path.is_file():
        return
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    origin = (f"{path.name} is the ImageNet MAE (ViT-B/16 with its decoder) of facebookresearch/mae, "
              f"{IMAGENET_MAE_URL}, which the official USF-MAE code starts from"
              if path.name == IMAGENET_MAE_FILE else
              f"it must be a local MAE checkpoint of the same config (the official code's recipe starts "
              f"from facebookresearch/mae's {IMAGENET_MAE_FILE}, {IMAGENET_MAE_URL})")
    raise UsfmaeError(f"init_checkpoint {path.absolute()} {what}: {origin}; nothing here downloads it: "
                      f"fetch it yourself and put it there, pass init_checkpoint=PATH (-p init_checkpoint=PATH), "
                      "or set init_checkpoint to null to start from random weights")


def load_init_checkpoint(model: torch.nn.Module, path) -> None:
    """Start from a local MAE checkpoint (e.g. the ImageNet MAE the official code starts from).
    Position tables are resized to this img_size; an encoder-only file leaves the decoder fresh;
    any other mismatch is an error naming the keys."""
    state = mae.interpolate_pos_embed(checkpoints.load_checkpoint(path), model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if unexpected or wrong or any(not k.startswith(("decoder", "mask_token")) for k in missing):
        raise UsfmaeError(f"init_checkpoint {path} does not fit this model: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}; pass a checkpoint "
                          "of the same MAE config (or set init_checkpoint=None)")
    if missing:
        print(f"init_checkpoint {path}: encoder only; the decoder starts from scratch")
    model.load_state_dict(state, strict=False)


# ============================================================================ state
def rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(obj: dict, path) -> Path:
    """torch.save to a temporary file, then rename: neither a kill nor a failed write (a full disk)
    ever replaces the last good checkpoint. A full disk, or another OS error while writing, is a
    UsfmaeError naming the disk, its free space, the file and the last good checkpoint."""
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as a RuntimeError
        cause = _write_failure_cause(err, path.parent, _tensor_bytes(obj))
        if cause is None:
            raise  # neither a full disk nor an OS error: a bug, which keeps its traceback
        fix = "free space" if cause.startswith(("no space", "disk quota")) else "fix that"
        raise UsfmaeError(f"{cause} writing {path}; {_last_good_checkpoint(path)}; {fix} and rerun with --resume"
                          ) from err


def _write_failure_cause(err: Exception, folder: Path, needed: int) -> str | None:
    """'no space left on ...' when the disk is full (errno ENOSPC, or less free space than the
    checkpoint needs: torch's C++ writer loses the errno), the OS error for other OSErrors, else None."""
    import errno
    import shutil

    disk = folder
    while not disk.exists() and disk != disk.parent:  # the folder itself may not have been made
        disk = disk.parent
    free = shutil.disk_usage(disk).free
    mount = disk.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    where = f"the disk holding {folder} (mounted at {mount}, {_size(free)} free, about {_size(needed)} needed)"
    code = getattr(err, "errno", None)
    if code == errno.EDQUOT:
        return f"disk quota exceeded on {where}"
    if code == errno.ENOSPC or free < needed:
        return f"no space left on {where}"
    if isinstance(err, OSError):
        return f"cannot write ({err.strerror or err})"
    return None


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Joins the process group torchrun describes (nccl on CUDA,
    gloo on CPU) or one that is already initialised; a plain process is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


def _auto_workers(device: torch.device, world: int) -> int:
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    per_process = cpus // world
    return min(8, per_process) if device.type == "cuda" else (1 if per_process >= 2 else 0)


def batch_loss(model, batch: dict, p: dict, device: torch.device, augment: AugmentConfig | None,
               amp_dtype=None) -> torch.Tensor:
    """MAE loss of one loader batch: augment on the device unless the loader already did."""
    images = batch["images"].to(device, non_blocking=True)
    noise = batch["noise"].to(device, non_blocking=True)  # [B, L] per-sample mask noise
    if images.dtype == torch.uint8:  # [B, S, S, 3] -> normalised [B, 3, img, img]
        images = augment_batch(images, batch["aug"].to(device, non_blocking=True), augment, p["img_size"])
    with amp.autocast(device, amp_dtype):
        loss, _, _ = model(images, mask_ratio=p["mask_ratio"], noise=noise)
    return loss


def make_data(store_dir, p: dict, num_patches: int, rank: int = 0, world: int = 1,
              device: torch.device = torch.device("cpu")):
    """(dataset, sampler, loader) of rank `rank`: on a CPU the loader workers augment, on a GPU
    they only read uint8 and batch_loss augments on the device."""
    workers = _auto_workers(device, world) if p["workers"] < 0 else p["workers"]
    dataset = StoreDataset(store_dir, p["seed"], num_patches, augment_config(p),
                           augment_here=device.type == "cpu", out_size=p["img_size"])
    sampler = EpochSampler(len(dataset), rank, world, p["seed"])
    loader = make_loader(dataset, sampler, p["batch_size"], workers, pin_memory=device.type == "cuda")
    return dataset, sampler, loader


def augment_config(p: dict) -> AugmentConfig:
    return AugmentConfig(rot_degrees=tuple(p["rot_degrees"]), flip_p=p["flip_p"],
                         crop_scale=tuple(p["crop_scale"]), crop_ratio=tuple(p["crop_ratio"]))


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log rows past the checkpoint a run resumes from (written before the kill)."""
    if not log_file.exists():
        return
    with open(log_file) as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
    atomic_write(log_file, write)


# ============================================================================ training
def train(store_dir, run_dir, resume: bool = False, progress: bool = True, **params) -> dict:
    """Pretrain an MAE on a packed store; write checkpoints and log.csv under run_dir.

    params: see DEFAULTS. resume: continue from run_dir/checkpoints/checkpoint-last.pth when it
    exists (same parameters required, except RUN_ONLY ones; the process count may change if the
    global batch does not); without resume an existing checkpoint is an error. Under torchrun
    every process calls this; rank 0 writes. Returns a summary: checkpoint, steps, final_loss,
    seconds, images_per_s, ...

    Rank 0 holds run_dir's lock: a second run into the same folder stops with a message.
    """
    rank = int(os.environ.get("RANK", 0))
    with folder_lock(run_dir, "usfmae pretrain") if rank == 0 else contextlib.nullcontext():
        return _train(store_dir, run_dir, resume, progress, **params)


def _train(store_dir, run_dir, resume: bool, progress: bool, **params) -> dict:
    """train's work (under run_dir's lock on rank 0)."""
    p = resolve_params(**params)
    rank, world, device = init_distributed()
    if p["threads"]:  # on a shared CPU, fewer threads than cores can be much faster
        torch.set_num_threads(p["threads"])
    run_dir = Path(run_dir)
    ckpt_file, log_file = run_dir / "checkpoints" / CHECKPOINT, run_dir / "log.csv"
    if ckpt_file.exists() and not resume:
        raise UsfmaeError(f"{ckpt_file} exists: pass resume=True (--resume) to continue it, or use "
                          "another output folder (or delete it) to start over")
    check_init_checkpoint(p["init_checkpoint"], run_dir)  # before the model and the data are built
    amp_dtype = amp.autocast_dtype(p["precision"], device)  # bf16; fp16 + GradScaler without bf16; fp32 on a CPU
    if p["precision"] in ("bf16", "fp16") and amp_dtype is None and rank == 0:
        print(f"precision {p['precision']} requested: autocast is for a CUDA GPU (as the official code's "
              f"torch.cuda.amp.autocast); on this {device.type} the steps compute in fp32", flush=True)

    # --- data: the permutation and every sample's randomness follow from (seed, epoch, index)
    model = _build(p)  # seeded, so every rank starts from the same weights
    dataset, sampler, loader = make_data(store_dir, p, model.patch_embed.num_patches, rank, world, device)
    steps_per_epoch = sampler.num_samples // p["batch_size"]
    if steps_per_epoch == 0:
        raise UsfmaeError(f"{store_dir}: {len(dataset)} images are fewer than one global batch "
                          f"({p['batch_size']} x {world}); lower batch_size or add images")
    total_steps = p["epochs"] * steps_per_epoch
    if p["max_steps"] < 0:
        raise UsfmaeError(f"max_steps must be >= 0 (0 = no limit), got {p['max_steps']}")
    stop_step = min(total_steps, p["max_steps"]) if p["max_steps"] else total_steps  # the schedule's steps run
    warmup_steps = int(p["warmup_fraction"] * total_steps)
    checkpoint_every = p["checkpoint_every"] or steps_per_epoch

    # --- model, optimiser, schedule, and the state of an interrupted run
    model.to(device)
    base_lr = peak_lr(p, world)
    optimizer = build_optimizer(model, p, base_lr, fused=device.type == "cuda")
    min_factor = p["min_lr"] / base_lr if base_lr else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_factor))
    scaler = amp.grad_scaler(device, amp_dtype)  # fp16 only
    start_step = 0
    if ckpt_file.exists():
        start_step = _resume(ckpt_file, p, world, rank, model, optimizer, scheduler, scaler)
        if rank == 0:
            _truncate_log(log_file, start_step)
            print(f"resumed from {ckpt_file.relative_to(run_dir).as_posix()} at step {start_step} of {stop_step}"
                  + (f" (max_steps; the schedule has {total_steps})" if stop_step < total_steps else ""))
    elif p["init_checkpoint"]:
        load_init_checkpoint(model, p["init_checkpoint"])
        model.to(device)
    raw_model = model  # what checkpoints hold, without DDP or compile wrappers
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if p["compile"]:
        model = torch.compile(model)

    summary = {"checkpoint": str(ckpt_file), "steps": total_steps, "last_step": stop_step, "epochs": p["epochs"],
               "steps_per_epoch": steps_per_epoch, "images": len(dataset), "world_size": world,
               "global_batch": p["batch_size"] * world, "peak_lr": base_lr, "resumed_from": start_step or None,
               "device": str(device), "precision_run": amp.precision_name(amp_dtype)}
    if start_step >= stop_step:  # finished earlier (or at max_steps): nothing to do
        return {**summary, "final_loss": _last_logged_loss(log_file), "seconds": 0.0, "images_per_s": float("nan")}
    if rank == 0 and (start_step == 0 or not log_file.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w", newline="") as f:
            csv.writer(f).writerow(LOG_COLUMNS)
    log = _Log(log_file if rank == 0 else None, ckpt_file, steps_per_epoch, summary["global_batch"], world,
               start_step, stop_step, progress and rank == 0)

    # --- the loop: no host sync per step; losses stay on the device until the log flushes
    step, augment = start_step, augment_config(p)
    model.train()
    while step < stop_step:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, batch_in_epoch * p["batch_size"])  # skip batches done before a resume
        for batch in loader:
            loss = batch_loss(model, batch, p, device, augment, amp_dtype)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if p["clip_grad"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), p["clip_grad"])
            log.add(loss.detach(), scheduler.get_last_lr()[0])  # the lr this step used
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            save_now = step % checkpoint_every == 0 or step == stop_step
            if save_now or step % p["log_every"] == 0:
                log.flush(step)  # raises on a NaN/inf loss, before anything is saved
            if save_now:
                _save(ckpt_file, raw_model, optimizer, scheduler, scaler, step, steps_per_epoch, p, world, rank)
            if (rank == 0 and step % steps_per_epoch == 0 and step < total_steps  # the end is checkpoint-last.pth
                    and step // steps_per_epoch in p["snapshot_epochs"]):
                save_snapshot(ckpt_file.parent, raw_model, step, steps_per_epoch, p)
            if step >= stop_step:
                break
    return {**summary, **log.close()}


LOG_COLUMNS = ["step", "epoch", "loss", "lr", "images_per_s"]


class _Log:
    """Per-step losses kept on the device; `flush` syncs once: mean over ranks, NaN check, CSV."""

    def __init__(self, log_file, ckpt_file, steps_per_epoch, global_batch, world, start_step, total_steps, progress):
        self.log_file, self.ckpt_file, self.world = log_file, ckpt_file, world
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.losses, self.lrs, self.last_loss = [], [], float("nan")
        self.t_start = self.t_flush = time.perf_counter()
        self.start_step = self.step_at_flush = start_step
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretraining", unit="step")

    def add(self, loss: torch.Tensor, lr: float):
        self.losses.append(loss)
        self.lrs.append(lr)

    def flush(self, step: int):
        losses = torch.stack(self.losses).float()
        if self.world > 1:
            dist.all_reduce(losses)
            losses /= self.world
        losses = losses.tolist()  # the sync
        now = time.perf_counter()
        images_per_s = (step - self.step_at_flush) * self.global_batch / (now - self.t_flush)
        first = step - len(losses) + 1
        bad = [(first + i, v) for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            kept = (f"the last good checkpoint {self.ckpt_file} (step {_checkpoint_step(self.ckpt_file)}) is kept"
                    if self.ckpt_file.exists() else "no checkpoint had been written yet")
            raise UsfmaeError(
                f"loss became {bad[0][1]} at step {bad[0][0]} (epoch {(bad[0][0] - 1) // self.steps_per_epoch}); "
                f"training stopped and {kept}. Lower lr, raise warmup_fraction or use precision=fp32, "
                "then resume (--resume) or start over")
        if self.log_file is not None:
            with open(self.log_file, "a", newline="") as f:
                csv.writer(f).writerows(
                    [first + i, round((first + i) / self.steps_per_epoch, 4), f"{v:.6g}", f"{lr:.6g}", f"{images_per_s:.1f}"]
                    for i, (v, lr) in enumerate(zip(losses, self.lrs)))
        if self.bar is not None:
            self.bar.update(step - self.step_at_flush)
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images_per_s:.0f}")
        self.last_loss = losses[-1]
        self.losses, self.lrs, self.t_flush, self.step_at_flush = [], [], now, step

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.t_start
        return {"final_loss": self.last_loss, "seconds": seconds,
                "images_per_s": (self.step_at_flush - self.start_step) * self.global_batch / seconds}


def _resume(ckpt_file, p, world, rank, model, optimizer, scheduler, scaler) -> int:
    """Load an interrupted run's state into the fresh objects; returns its step. A checkpoint that
    cannot be resumed (truncated, corrupt, hostile, foreign) is an error that says how to go on."""
    try:
        ckpt = _read_run_checkpoint(ckpt_file)
    except UsfmaeError as err:
        raise UsfmaeError(f"cannot resume: {err}; {_resume_fix(ckpt_file)}") from err
    old = {**ADDED_LATER, **ckpt["params"]}
    changed = {k: (old.get(k), p[k]) for k in p if k not in (*RUN_ONLY, "batch_size") and old.get(k) != p[k]}
    if ckpt["world_size"] * old["batch_size"] != world * p["batch_size"]:
        changed["global batch"] = (ckpt["world_size"] * old["batch_size"], world * p["batch_size"])
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise UsfmaeError(f"{ckpt_file} was made with other parameters ({diff}); resume with the "
                          "same ones, or start over in another output folder")
    try:  # same parameters, so only a damaged or edited file fails here
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == world:  # same process count: each rank gets its own RNG state back
            set_rng_state(ckpt["rng"][rank])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsfmaeError(f"cannot resume: checkpoint {ckpt_file}: corrupt: its saved state does not fit "
                          f"this run ({type(err).__name__}: {first_line}); {_resume_fix(ckpt_file)}") from err
    return int(ckpt["step"])


# what _save writes; a file without these is not a pretraining checkpoint
RUN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "rng", "world_size", "params")


def _read_run_checkpoint(path) -> dict:
    """A pretraining checkpoint, read safely (checkpoints.read_checkpoint); UsfmaeError (without a fix)
    when it is unreadable or lacks what _save writes."""
    ckpt = checkpoints.read_checkpoint(path, fix="")
    missing = [k for k in RUN_CHECKPOINT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["params"], dict) or not isinstance(ckpt["step"], int):
        raise UsfmaeError(f"checkpoint {path}: not a pretraining checkpoint: it lacks "
                          f"{', '.join(missing) or 'a valid params dict and integer step'} "
                          "(a bare model state dict, or another tool's file?)")
    return ckpt


def _intact_step(path) -> int | None:
    """The step of a readable pretraining checkpoint, else None."""
    try:
        return _read_run_checkpoint(path)["step"]
    except UsfmaeError:
        return None


def _resume_fix(ckpt_file: Path) -> str:
    """How to go on when checkpoint-last.pth cannot be resumed. Pretraining keeps only that file,
    so name an intact copy beside it (a user's backup) if there is one, else starting over."""
    ckpt_file = Path(ckpt_file)
    start_over = f"delete {ckpt_file} and rerun to start over"
    copies = sorted((f for f in ckpt_file.parent.glob("*.pt*") if f != ckpt_file and not f.name.startswith(".")),
                    key=lambda f: f.stat().st_mtime, reverse=True)
    for copy in copies[:5]:  # newest first; reading a large checkpoint takes a while
        step = _intact_step(copy)
        if step is not None:
            return f"copy {copy} (intact, step {step}) to {ckpt_file} and rerun with --resume, or {start_over}"
    return (f"pretraining keeps only this one checkpoint and no intact copy of it is in {ckpt_file.parent}, "
            f"so {start_over} (or copy a backup of it there)")


def _last_good_checkpoint(path: Path) -> str:
    """For a failed save: the checkpoint that is still there (atomic_write never replaced it)."""
    if not path.exists():
        return "no checkpoint had been written yet"
    step = _intact_step(path)
    if step is None:
        return f"the checkpoint from before, {path}, is unreadable too"
    return f"the last good checkpoint is {path} at step {step} (kept)"


def _build(p: dict) -> torch.nn.Module:
    torch.manual_seed(p["seed"])
    return mae.build_model(p["model"], img_size=p["img_size"], norm_pix_loss=p["norm_pix_loss"],
                           pos_embed=p["pos_embed"], **p["model_overrides"])


def _save(ckpt_file, model, optimizer, scheduler, scaler, step, steps_per_epoch, p, world, rank):
    """Rank 0 writes; every rank contributes its RNG state."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if rank == 0:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "epoch": epoch, "sampler": {"epoch": epoch, "start_batch": batch_in_epoch},
            "rng": states, "world_size": world, "params": p,
        }, ckpt_file)


def snapshot_path(checkpoints_dir, epoch: int) -> Path:
    return Path(checkpoints_dir) / f"epoch-{epoch:04d}.pth"


def save_snapshot(checkpoints_dir, model, step: int, steps_per_epoch: int, p: dict) -> Path:
    """The model alone after an epoch of `snapshot_epochs` (an MAE checkpoint any step can load)."""
    epoch = step // steps_per_epoch
    return save_checkpoint({"model": model.state_dict(), "step": step, "epoch": epoch, "params": p},
                           snapshot_path(checkpoints_dir, epoch))


def seed_run_dir(step_dir, seed: int, first_seed: int) -> Path:
    """Where notebook 03 writes the pretraining run of `seed`: the first run (seed == first_seed) in
    step_dir itself, every further run (`pretrain_seeds` > 1) in step_dir/seed<seed>."""
    return Path(step_dir) if seed == first_seed else Path(step_dir) / f"seed{seed}"


def train_further_runs(store_dir, step_dir, pretrain_seeds: int, progress: bool = False, **params) -> list[dict]:
    """The pretraining runs after the first (`pretrain_seeds` > 1): notebook 03's recipe with seeds
    seed+1, ..., each in seed_run_dir (resumed if interrupted), without snapshots (notebook 07's
    length curve follows the first run). Returns each run's train() summary with its seed."""
    first_seed = params.get("seed", DEFAULTS["seed"])
    done = []
    for extra in range(first_seed + 1, first_seed + pretrain_seeds):
        run_dir = seed_run_dir(step_dir, extra, first_seed)
        summary = train(store_dir, run_dir, resume=True, progress=progress,
                        **{**params, "seed": extra, "snapshot_epochs": []})
        done.append({"seed": extra, **summary})
    return done


def pretraining_runs(step_dir) -> list[Path]:
    """The last checkpoint of every pretraining run notebook 03 wrote under step_dir, the first run's
    first, then the further seeds' in seed order: what notebooks 05 and 07 fine-tune and score."""
    step_dir = Path(step_dir)
    first = step_dir / "checkpoints" / CHECKPOINT
    more = sorted(step_dir.glob(f"seed[0-9]*/checkpoints/{CHECKPOINT}"), key=lambda p: int(p.parts[-3][4:]))
    return ([first] if first.exists() else []) + more


def snapshots(checkpoints_dir) -> dict[int, Path]:
    """{epoch: file} of the snapshots a run kept, in epoch order."""
    found = {int(f.stem.split("-")[1]): f for f in Path(checkpoints_dir).glob("epoch-[0-9][0-9][0-9][0-9].pth")}
    return dict(sorted(found.items()))


def _checkpoint_step(path) -> int:
    """The step a pretraining checkpoint was saved at; UsfmaeError when it is unreadable."""
    try:
        return int(_read_run_checkpoint(path)["step"])
    except UsfmaeError as err:
        raise UsfmaeError(f"{err}; {_resume_fix(path)}") from err


def _last_logged_loss(log_file: Path) -> float:
    if not log_file.exists():
        return float("nan")
    with open(log_file) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows else float("nan")


# ============================================================================ figures
def plot_augmentation(dataset: StoreDataset, indices, augment: AugmentConfig, img_size: int, epochs: int = 5):
    """Each stored image of `indices` (a row), as packed, then its views in the first `epochs` epochs
    (each sample's transform depends only on seed, epoch and index), then a fixed 2x zoom-out."""
    import matplotlib.pyplot as plt  # imported on use: training itself needs no display

    from .store import IMAGENET_MEAN, IMAGENET_STD, N_AUG

    def as_picture(x):  # normalised [3, H, W] -> displayable [H, W, 3]
        x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return x.clamp(0, 1).permute(1, 2, 0).numpy()

    zoom_out = AugmentConfig(rot_degrees=(0, 0), flip_p=0, crop_scale=(2, 2), crop_ratio=(1, 1))
    fig, axes = plt.subplots(len(indices), epochs + 2, figsize=(2 * (epochs + 2), 2.1 * len(indices)), squeeze=False)
    for r, i in enumerate(indices):
        stored = dataset.__getitems__([(0, int(i))])["images"]
        views = [augment_batch(stored, torch.zeros(1, N_AUG), None, img_size)[0]]
        for epoch in range(epochs):
            batch = dataset.__getitems__([(epoch, int(i))])
            views.append(augment_batch(batch["images"], batch["aug"], augment, img_size)[0])
        views.append(augment_batch(stored, torch.rand(1, N_AUG), zoom_out, img_size)[0])
        for c, v in enumerate(views):
            axes[r, c].imshow(as_picture(v))
            axes[r, c].set_axis_off()
    for c, title in enumerate(["stored image"] + [f"epoch {e}" for e in range(epochs)] + ["scale 2.0 (zoom-out)"]):
        axes[0, c].set_title(title, fontsize=9)
    fig.suptitle(f"Pretraining augmentation: rotation {augment.rot_degrees[0]:g}-{augment.rot_degrees[1]:g} deg, "
                 f"flips p {augment.flip_p:g}, crop {augment.crop_scale[0]:g}x-{augment.crop_scale[1]:g}x (black padding)")
    fig.tight_layout()
    return fig


def smoothing_window(n_steps: int) -> int:
    """Steps in the loss curve's running mean: ~2% of the run; 1 (none) under 100 steps."""
    return max(1, n_steps // 50)


def plot_loss_curve(log, model: str, model_overrides: dict, img_size: int, mask_ratio: float,
                    norm_pix_loss: bool = False):
    """The training loss of log.csv against the epoch: each step, and a running mean when there are
    enough steps to smooth; the title names the model trained (with its constructor overrides)."""
    import matplotlib.pyplot as plt  # imported on use: training itself needs no display

    window = smoothing_window(len(log))
    fig, ax = plt.subplots(figsize=(7, 4))
    if window > 1:
        ax.plot(log.epoch, log.loss, lw=0.6, alpha=0.4, label="per step")
        ax.plot(log.epoch, log.loss.rolling(window, min_periods=1).mean(), lw=2,
                label=f"running mean of {window} steps")
    else:  # too few steps to smooth: each step, marked
        ax.plot(log.epoch, log.loss, lw=1, marker="o", ms=3, label=f"per step ({len(log)} step{'s' * (len(log) != 1)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked-patch MSE (per-patch normalised)" if norm_pix_loss else "masked-patch MSE (normalised pixels)")
    changed = "".join(f", {k}={v}" for k, v in (model_overrides or {}).items())  # e.g. the quick profile's depth=6
    # two lines: ViT-B's name with an override runs off a one-line title
    ax.set_title(f"reconstruction loss, {img_size} px, mask {mask_ratio:.0%}\n{model}{changed}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_lr_schedule(log, warmup_fraction: float, total_steps: int):
    """The learning rate each logged step used."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(log.step, log.lr)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"linear warmup over {warmup_fraction:.0%} of {total_steps} steps, then half-cycle cosine")
    fig.tight_layout()
    return fig


# ============================================================================ command line
CLI_IGNORED = ("profile",)  # notebook parameters that mean nothing to the trainer


def add_cli(subparsers):
    """Register `usfmae pretrain`."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain the masked autoencoder (single process or torchrun DDP)",
        description="Pack OUT/02_preprocessing/clean into a uint8 store and pretrain an MAE, writing "
                    "OUT/03_mae_pretraining/{checkpoints/checkpoint-last.pth,log.csv}. Parameters come "
                    "from -f YAML files (notebook 03's names), then -p key=value, then --flags. "
                    "Multi-process: torchrun --nproc_per_node N -m usfmae_lib.pretrain <same arguments>.")
    _add_arguments(p)
    p.set_defaults(func=_run_cli)
    return p


def _add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-f", "--params-file", action="append", default=[], metavar="YAML",
                   help="parameter file, e.g. params/quick/03_mae_pretraining.yaml (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (YAML value: 3, 1e-3, true, [0.9, 0.999])")
    from .parameters import PROFILES

    p.add_argument("--profile", choices=PROFILES,
                   help="start from params/<profile>/03_mae_pretraining.yaml (then -f files, then -p)")
    p.add_argument("--out", help="study output folder OUT (default outputs/<profile>)")
    p.add_argument("--data", help="preprocessed images (default OUT/02_preprocessing/clean)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint-last.pth")
    p.add_argument("--no-progress", action="store_true")
    for key, default in DEFAULTS.items():  # one flag per parameter, typed like its default
        flag, kw = f"--{key.replace('_', '-')}", dict(dest=f"opt_{key}", help=f"(default {default!r})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif key == "snapshot_epochs":
            p.add_argument(flag, type=int, nargs="*", metavar="EPOCH", **kw)
        elif isinstance(default, list):
            p.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), **kw)
        elif isinstance(default, (int, float)):
            p.add_argument(flag, type=type(default), metavar="N", **kw)
        else:  # str, path or None, and the YAML mapping model_overrides
            p.add_argument(flag, metavar="YAML" if isinstance(default, dict) else "VALUE", **kw)


def _run_cli(args) -> int:
    from .parameters import check_params, load_params, parse_value, with_profile

    params, origin = load_params(with_profile(STEP, args.profile, args.params_file), args.param)
    for key, default in DEFAULTS.items():
        value = getattr(args, f"opt_{key}", None)
        if value is not None:
            params[key] = parse_value(value) if isinstance(default, dict) else value
            origin[key] = f"--{key.replace('_', '-')}"
    profile = params.get("profile", "quick")
    params = {k: v for k, v in params.items() if k not in CLI_IGNORED}
    params = check_params(params, _cli_defaults(), "usfmae pretrain", origin)
    pretrain_seeds = int(params.pop("pretrain_seeds", 1))
    out = Path(args.out or Path("outputs") / str(profile))
    run_dir = out / STEP
    data = Path(args.data) if args.data else out / "02_preprocessing" / "clean"
    rank, world, _ = init_distributed()
    store_dir = run_dir / "store"
    check_output(run_dir, [data], "pretraining folder")
    # rank 0 holds the folder from packing to the last checkpoint (train re-enters the same lock)
    with folder_lock(run_dir, "usfmae pretrain") if rank == 0 else contextlib.nullcontext():
        check_init_checkpoint(params.get("init_checkpoint"), run_dir)  # before packing, which takes long
        if rank == 0:
            if not data.exists():
                raise UsfmaeError(f"{data}: no preprocessed images; run notebook 02 (usfmae clean) first or pass "
                                  "--data")
            pack_store(data, store_dir, params.get("img_size", DEFAULTS["img_size"]),
                       progress=not args.no_progress,
                       heldout_per_anatomy=params.get("heldout_per_anatomy", DEFAULTS["heldout_per_anatomy"]),
                       seed=params.get("seed", DEFAULTS["seed"]))
        if world > 1:
            dist.barrier()
        summary = train(store_dir, run_dir, resume=args.resume, progress=not args.no_progress, **params)
        further = train_further_runs(store_dir, run_dir, pretrain_seeds, progress=not args.no_progress, **params)
    if rank == 0:
        for run in [summary, *further]:
            print(f"pretraining done: {run['last_step']} of {run['steps']} steps ({run['precision_run']}), "
                  f"final loss {run['final_loss']:.4f}, "
                  f"{run['images_per_s']:.1f} images/s; checkpoint {run['checkpoint']}")
    return 0


def _cli_defaults() -> dict:
    return {**DEFAULTS, "pretrain_seeds": 1}  # pretrain_seeds: the CLI's loop, not train()'s


def main(argv=None) -> int:
    """`python -m usfmae_lib.pretrain ...` (what torchrun runs): the `usfmae pretrain` arguments."""
    parser = argparse.ArgumentParser(prog="python -m usfmae_lib.pretrain")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run_cli(args)
    except (UsfmaeError, OSError) as err:
        from .cli import user_error

        message = user_error(err)
        if message is None:
            raise
        print(f"usfmae pretrain: error: {message}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
