"""Fine-tuning and evaluation: one cell of Table 2 per call (`usfmae finetune`), the grid in notebook 05.

    usfmae finetune --dataset bus-bra --root data/BUSBRA --model usf-mae \\
        --checkpoint outputs/quick/03_mae_pretraining/checkpoints/checkpoint-last.pth --out runs

Models (`build_classifier`: USF-MAE's encoder, the scratch control, the ImageNet baselines, UltraSam), their
weights and input statistics: usfmae_lib.classifiers. The inputs of notebook 05's grid (its MAE checkpoints,
the ImageNet weights of weights_dir, the baselines left out under missing_weights="skip"): resolve_inputs.

Data: every image of a split is decoded and resized once (cv2.INTER_AREA, squashed to a square as the
paper does) into a uint8 cache [N, 3, S, S]; training batches are augmented per sample (rotation
0-90 deg, flips, resized crop) by the pretraining step's batched affine resample (store.augment_batch)
on the training device, and normalised with the model's own input statistics (ImageNet's for
USF-MAE and scratch, as the paper says).
Training: AdamW (no decay on biases and norms; optional layer-wise lr decay), linear warmup from 0 then
half-cycle cosine per step (pretrain.lr_factor, the reference MAE's schedule, as pretraining), early stopping on a validation score (balanced accuracy by default: positive-class F1 rewards calling
everything positive) with the best weights kept, bf16 autocast on CUDA. `head_norm` puts MAE's linear-probe
BatchNorm in front of the head (see classifiers.add_head_norm for why the quick checkpoint needs it). The seed sets
init, data order and augmentation. A split without a validation part (MMOTU-2D under mmotu_selection="all")
runs a fixed schedule: every epoch, the last one tested, the first config of the grid (fixed_schedule).
Selection of the sweep's config: per fold (select_config) or one per model and dataset, the best mean
validation score over the folds (choose_configs, select_per="dataset"). Every run writes RUNS/<dataset>/<model>/<mode>/<config>/seed<k>_frac<f>/{metrics.json,
test_predictions.csv} atomically (metrics.json last) and is skipped when present with the same config.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UsfmaeError, amp, atomic_write_text, help_with_defaults, mae, provenance
from .classifiers import (IMAGENET_MEAN, IMAGENET_STATS, IMAGENET_STD, MISSING_WEIGHTS, MODELS, PAPER_IMG_SIZE,
                          TIMM_NAMES, InputStats, add_head_norm, build_classifier, file_id, imagenet_weights_available,
                          imagenet_weights_file, input_size, input_stats, mae_checkpoint_info, pick_device)
from .datasets import Split, load_split
from .parameters import parse_shard
from .safety import claim
from .metrics import bootstrap_intervals, classification_metrics
from .pretrain import lr_factor  # one warmup-cosine for both trainings (the reference MAE's)
from .store import N_AUG, AugmentConfig, augment_batch

# the paper's baseline sweep (STUDY.md section 5)
SWEEP = dict(lr=[3e-4, 1e-3], weight_decay=[0.01, 0.001], batch_size=[32, 64])
LABEL_FRACTIONS = (0.01, 0.1, 0.25, 1.0)
# Validation scores that can pick the epoch (early stopping) and the sweep's config. F1 of the positive
# class rewards a predictor that calls everything positive (F1 = 2p / (1 + p) at prevalence p), which a
# barely trained model is; balanced accuracy gives that 0.5 and the loss is smooth on small val sets.
SELECT_ON = ("f1", "balanced_accuracy", "loss")
# Where the sweep's config is chosen (notebook 05's select_per, --select-per): "fold" = on each fold's own
# validation score; "dataset" = one config per model and dataset, the best mean validation score over the
# dataset's folds (the paper tunes "to identify the optimal settings for each model and dataset", 2.6).
SELECT_PER = ("fold", "dataset")
# MMOTU-2D's validation (notebook 05's mmotu_selection, --mmotu-selection): "carve" = val_fraction of the
# official training list validates; "all" = all 1,000 official training images train (the paper: "the official
# split of 1000 images for training and 469 for validation", 2.5), with no validation set: a fixed schedule
# (every epoch runs, the last is tested) and the first config of the grid (fixed_schedule).
MMOTU_SELECTION = ("carve", "all")


def check_choice(name: str, value, choices) -> None:
    """A parameter with a fixed set of values: anything else is an error naming the parameter."""
    if value not in choices:
        raise UsfmaeError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def run_tally(rows: pd.DataFrame, runs, since: float) -> str:
    """How many of the distinct runs behind `rows` (their `run` folders under `runs`) were trained
    since the time `since` and how many were already finished and reused: one line for a loop that
    prints nothing per run (a run the loop trained and then reused, e.g. a sweep's seed-0 run as
    the chosen config's seed 0, counts once, as trained)."""
    done = [Path(runs) / run / "metrics.json" for run in dict.fromkeys(rows["run"])] if len(rows) else []
    trained = sum(path.stat().st_mtime >= since for path in done)
    return f"{len(done)} runs: {trained} trained, {len(done) - trained} already finished, reused"


# ============================================================================ configuration
@dataclass
class TrainConfig:
    """Every knob of one fine-tuning run (stored in metrics.json; part of the run's identity)."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 20
    patience: int = 5  # epochs without a better validation score before stopping (0 = never stop early)
    warmup_fraction: float = 0.1  # linear warmup over this fraction of the steps, then cosine
    img_size: int = 224
    pool: str = "token"  # ViT models: "token" (cls token -> head, the paper) or "avg"
    rotate_degrees: float = 90.0  # rotation drawn from [0, rotate_degrees] (paper: 0-90)
    crop_scale: tuple = (0.5, 1.0)  # resized-crop area / image area (RandomResizedCrop's meaning)
    label_smoothing: float = 0.0
    select_on: str = "balanced_accuracy"  # validation score that picks the epoch and the sweep's config: one of SELECT_ON
    head_norm: bool = False  # BatchNorm (no affine) in front of the head, as MAE's linear probe; see add_head_norm
    layer_decay: float = 1.0  # ViT lr x this per block from the head down (MAE fine-tuning: 0.65-0.75); 1 = off
    max_steps: int = 0  # stop after this many optimiser steps, then validate that epoch (0 = no limit; the dry run)
    min_steps: int = 0  # at least this many optimiser steps: a small training set (a label fraction) is passed over several times per epoch

    def __post_init__(self):
        if self.select_on not in SELECT_ON:
            raise UsfmaeError(f"select_on must be one of {', '.join(SELECT_ON)}, got {self.select_on!r}")
        if self.max_steps < 0:
            raise UsfmaeError(f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")
        if self.min_steps < 0:
            raise UsfmaeError(f"min_steps must be >= 0 (0 = one pass over the training images per epoch), got {self.min_steps}")

    def identity(self) -> dict:
        """The config as a run's identity records it: every knob, except max_steps and min_steps when
        they are 0 (off), so that runs finished before they existed keep theirs and are reused."""
        knobs = asdict(self)
        for knob in ("max_steps", "min_steps"):
            if not knobs[knob]:
                knobs.pop(knob)
        return knobs

    def passes_for(self, steps_per_epoch: int) -> int:
        """Passes over the training set per epoch: 1, or more when epochs x one pass gives fewer than
        min_steps optimiser steps. The epochs (and so the validations) stay cfg.epochs: 10% of the labels
        is one batch, and validating after every single step would cost more than the training."""
        return max(1, math.ceil(self.min_steps / (max(1, steps_per_epoch) * self.epochs)))

    def tag(self) -> str:
        """Folder name of the knobs that differ between runs of a sweep."""
        return (f"lr{self.lr:g}_wd{self.weight_decay:g}_bs{self.batch_size}_ep{self.epochs}_px{self.img_size}_{self.pool}"
                + (f"_ld{self.layer_decay:g}" if self.layer_decay != 1 else "")
                + (f"_sel-{self.select_on}" if self.select_on != "balanced_accuracy" else "")
                + ("_bnhead" if self.head_norm else "")
                + (f"_max{self.max_steps}steps" if self.max_steps else "")
                + (f"_min{self.min_steps}steps" if self.min_steps else ""))

    def score(self, val: dict) -> float:
        """The validation score to maximise (loss is negated)."""
        return -val["loss"] if self.select_on == "loss" else val[self.select_on]


def sweep_configs(base: TrainConfig, lrs=None, weight_decays=None, batch_sizes=None) -> list[TrainConfig]:
    """The grid lr x wd x batch around `base` (defaults: the paper's 2 x 2 x 2)."""
    grid = itertools.product(lrs or SWEEP["lr"], weight_decays or SWEEP["weight_decay"],
                             batch_sizes or SWEEP["batch_size"])
    return [TrainConfig(**{**asdict(base), "lr": float(lr), "weight_decay": float(wd), "batch_size": int(bs)})
            for lr, wd, bs in grid]


# ============================================================================ data
def read_image(path, size: int) -> np.ndarray:
    """uint8 RGB [size, size, 3]: decoded by curation's one policy (`read_image_file`: a file
    curation or cleaning refuses is refused here, for the same reason, except that a side under
    MIN_SIDE is accepted: an official split's small ROI crop is still one of its test images),
    squashed to a square with cv2.INTER_AREA."""
    from .curation_readers import Reject, read_image_file

    try:
        rgb = read_image_file(path, min_side=1)
    except Reject as rej:  # never train or score on a half-grey or mis-sized image
        raise UsfmaeError(f"{path}: not a readable image: {rej}; remove or replace the file, "
                          "or take it out of the split") from None
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def remove_annotations(split: Split, cache_dir, workers: int = 0, progress: bool = False) -> Split:
    """The split on annotation-removed images (`clean_eval`): every image of its folder passes once
    through the pretraining corpus's cleaning (`preprocess.clean_tree`, default CleanConfig: OCR
    text, colour and grey marks, Navier-Stokes inpainting, 224 px), cached and resumed in cache_dir;
    the split's paths then point to the cleaned PNGs. The paper is silent on evaluation images
    (docs/finetuning.md says why the default leaves them as published). An image cleaning refuses
    is an error naming it, as with an unreadable image."""
    import os

    from .preprocess import clean_tree

    paths = pd.concat([df["path"] for df in split.parts().values()]).map(lambda p: str(Path(p).resolve()))
    folder = Path(os.path.commonpath(paths.tolist()))
    folder = folder if folder.is_dir() else folder.parent
    report = clean_tree(folder, cache_dir, workers=workers, progress=progress)
    failed = report[report["status"] != "ok"]
    index = pd.read_csv(Path(cache_dir) / "index.csv")
    cleaned = {str(Path(src).resolve()): str(Path(cache_dir) / rel) for src, rel in zip(index["source"], index["path"])}
    missing = sorted(set(paths) - set(cleaned))
    if missing:
        why = failed.iloc[0].to_dict() if len(failed) else {}
        raise UsfmaeError(f"{split.dataset}: annotation removal gave no image for {len(missing)} file(s) of the split, "
                          f"e.g. {missing[0]} ({why.get('error', 'see the report')}); report: {Path(cache_dir) / 'report.csv'}")
    parts = {name: df.assign(path=[cleaned[str(Path(p).resolve())] for p in df["path"]])
             for name, df in split.parts().items()}
    return replace(split, split=f"{split.split}; annotations removed", images="annotations removed", **parts)


def load_images(paths, size: int, workers: int = 4) -> torch.Tensor:
    """Decode every image once: uint8 [N, 3, size, size] (cv2 releases the GIL: threads suffice);
    no paths (a split without a validation part): [0, 3, size, size]."""
    if not len(paths):
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(lambda p: read_image(p, size), paths))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@dataclass
class Data:
    """A split decoded at one size: uint8 images and int64 labels per part."""
    split: Split
    img_size: int
    images: dict = field(repr=False)  # part -> uint8 [N, 3, S, S]
    labels: dict = field(repr=False)  # part -> int64 [N]


def has_validation(data: Data) -> bool:
    """Whether the split has a validation part to pick epochs, configs and probe C's by (MMOTU-2D under
    mmotu_selection="all" has none)."""
    return len(data.labels["val"]) > 0


def prepare_data(split: Split, img_size: int) -> Data:
    images, labels = {}, {}
    for part, df in split.parts().items():
        try:
            images[part] = load_images(df["path"].tolist(), img_size)
        except UsfmaeError as err:  # say which part of the split holds the refused file
            raise UsfmaeError(f"{split.dataset} {part} images: {err}") from None
        labels[part] = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
    return Data(split, img_size, images, labels)


def subsample_labels(labels: torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified `fraction` of the training labels, at least one per class."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    keep = [rng.choice(np.flatnonzero(y == c), max(1, round(fraction * (y == c).sum())), replace=False)
            for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def make_augment(cfg: TrainConfig) -> AugmentConfig:
    """The paper's augmentations (rotation, flips, resized crop) as the pretraining step draws them:
    per-sample parameters, one batched affine resample (store.augment_batch)."""
    return AugmentConfig(rot_degrees=(0.0, float(cfg.rotate_degrees)), crop_scale=tuple(cfg.crop_scale))


def _stats_of(stats) -> InputStats:
    """InputStats from InputStats, a model (its input_stats) or None (ImageNet's)."""
    if stats is None:
        return IMAGENET_STATS
    return stats if isinstance(stats, InputStats) else input_stats(stats)


def normalise(images: torch.Tensor, device, stats: InputStats | nn.Module | None = None) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float (x / 255 - mean) / std on `device`, with `stats` (InputStats, or a model
    whose input_stats are read; None: ImageNet's)."""
    stats = _stats_of(stats)
    mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
    return (images.to(device, non_blocking=True).float() / 255 - mean) / std


@functools.lru_cache(maxsize=None)
def _imagenet_to(stats: InputStats, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, 3, 1, 1] on device that turn ImageNet-normalised x into `stats`-normalised x,
    made once per device (a host-to-device copy every step would make the host wait)."""
    m0, s0 = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    m1, s1 = torch.tensor(stats.mean, dtype=torch.float64), torch.tensor(stats.std, dtype=torch.float64)
    # (x * s0 + m0 - m1) / s1 = x * (s0 / s1) + (m0 - m1) / s1
    return ((s0 / s1).float().view(1, 3, 1, 1).to(device), ((m0 - m1) / s1).float().view(1, 3, 1, 1).to(device))


def renormalise(x: torch.Tensor, stats: InputStats | nn.Module | None) -> torch.Tensor:
    """ImageNet-normalised float (what store.augment_batch returns) -> normalised with `stats`
    (unchanged, not even copied, when they are ImageNet's)."""
    stats = _stats_of(stats)
    if tuple(stats.mean) == IMAGENET_MEAN and tuple(stats.std) == IMAGENET_STD:
        return x
    scale, shift = _imagenet_to(stats, x.device)
    return x * scale + shift


# ============================================================================ training
@torch.no_grad()
def _in_batches(model, images: torch.Tensor, device, batch_size: int, fn, precision: str = "auto") -> torch.Tensor:
    """fn(model, normalised batch) over images in eval mode, under the autocast of `precision`
    (amp.autocast_dtype: fp32 on a CPU). Batches are normalised with the model's own input statistics."""
    model.eval()
    stats = input_stats(model)
    dtype = amp.autocast_dtype(precision, device)
    out = []
    for i in range(0, len(images), batch_size):
        with amp.autocast(device, dtype):
            out.append(fn(model, normalise(images[i:i + batch_size], device, stats)).float().cpu())
    return torch.cat(out)


def predict(model, images: torch.Tensor, device, batch_size: int = 128, precision: str = "auto") -> np.ndarray:
    """Class probabilities [N, C] (float64) of uint8 images, normalised with the model's input statistics."""
    logits = _in_batches(model, images, device, batch_size, lambda m, x: m(x), precision)
    return F.softmax(logits, 1).double().numpy()


def features(model, images: torch.Tensor, device, batch_size: int = 128, precision: str = "auto") -> np.ndarray:
    """Pooled features [N, D] of a classifier's trunk (its head bypassed), inputs normalised with the
    model's input statistics."""
    pooled = _in_batches(model, images, device, batch_size,
                         lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True).flatten(1), precision)
    return pooled.numpy()


def make_optimiser(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm AdamW: no weight decay on biases and norms; with cfg.layer_decay < 1, block k of a ViT
    (of `depth`) gets lr x layer_decay ** (depth + 1 - k), the head the full lr (MAE's fine-tuning recipe)."""
    from timm.optim import create_optimizer_v2
    optimiser = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay if cfg.layer_decay != 1 else None)
    for group in optimiser.param_groups:  # timm leaves lr_scale to its own schedulers; LambdaLR scales lr
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return optimiser


def train(model, data: Data, cfg: TrainConfig, seed: int, train_index=None, device="auto",
          positive: int | None = None, log=print, precision: str = "auto") -> dict:
    """Fine-tune `model` in place on data.images["train"][train_index]; keep the weights of the
    epoch with the best validation score (cfg.select_on; ties: lower validation loss). Returns the history.

    cfg.max_steps > 0 stops after that many optimiser steps: the epoch they end in is validated like
    any other (and kept if it is the best); the lr schedule stays that of all cfg.epochs.
    A split without a validation part (MMOTU-2D under mmotu_selection="all"): a fixed schedule, every
    epoch runs and the last one's weights are kept (its val_* are NaN); cfg.patience must then be 0."""
    validate = has_validation(data)
    if not validate and cfg.patience:
        raise UsfmaeError(f"patience = {cfg.patience} (early stopping) needs a validation set, and {data.split.dataset} "
                          f"({data.split.split}) has none; set patience to 0 (every epoch runs, the last is tested: "
                          "finetune.fixed_schedule), or give the split a validation part (val_fraction > 0, "
                          "mmotu_selection = 'carve')")
    device = pick_device(device) if isinstance(device, str) else device
    amp_dtype = amp.autocast_dtype(precision, device)
    scaler = amp.grad_scaler(device, amp_dtype)  # fp16 only: scales the loss, skips steps whose gradients overflowed
    order_rng = torch.Generator().manual_seed(seed)  # data order
    aug_rng = torch.Generator().manual_seed(seed + 1_000_003)  # augmentation parameters
    model.to(device)
    index = torch.arange(len(data.labels["train"])) if train_index is None else torch.as_tensor(train_index)
    x_train = data.images["train"][index].to(device)  # uint8 [n, 3, S, S], on the device once
    y_train = data.labels["train"][index].to(device)
    n = len(x_train)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop the ragged last batch (batch norm needs > 1 sample)
    passes = cfg.passes_for(steps_per_epoch)  # > 1 only for a small training set under min_steps
    total = steps_per_epoch * passes * cfg.epochs
    optimiser = make_optimiser(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: lr_factor(s, max(1, int(cfg.warmup_fraction * total)), total))  # pretraining's schedule
    augment = make_augment(cfg)
    y_val = data.labels["val"].numpy()
    best = dict(score=-float("inf"), loss=float("inf"), epoch=-1, state=None, val=None)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        t0, losses = time.time(), []
        for s in range(steps_per_epoch * passes):
            if cfg.max_steps and step >= cfg.max_steps:
                break
            if s % steps_per_epoch == 0:  # a new pass over the training set
                perm = torch.randperm(n, generator=order_rng)
            first = (s % steps_per_epoch) * batch
            idx = perm[first:first + batch]
            u = torch.rand(len(idx), N_AUG, generator=aug_rng).to(device)  # [B, N_AUG] uniforms
            x = renormalise(augment_batch(x_train[idx].permute(0, 2, 3, 1), u, augment, cfg.img_size),
                            model)  # [B, 3, S, S], ImageNet-normalised -> the model's input statistics
            with amp.autocast(device, amp_dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=cfg.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)  # skipped when fp16 gradients overflowed
            scaler.update()
            schedule.step()
            step += 1
            losses.append(loss.item())
        if validate:
            prob = predict(model, data.images["val"], device, precision=precision)
            val = classification_metrics(y_val, prob, positive)
            val["loss"] = float(F.nll_loss(torch.log(torch.from_numpy(prob).clamp_min(1e-12)), data.labels["val"]))
        else:  # no validation set: nothing to score, the last epoch is kept (below)
            val = dict.fromkeys((*SELECT_ON, "roc_auc"), float("nan"))
        val_loss = val["loss"]
        history.append(dict(epoch=epoch, train_loss=float(np.mean(losses)), val_loss=val_loss, val_f1=val["f1"],
                            val_balanced_accuracy=val["balanced_accuracy"], val_roc_auc=val["roc_auc"],
                            steps=step, grad_scale=scaler.get_scale() if scaler.is_enabled() else 1.0,
                            seconds=time.time() - t0))
        if validate:
            score = cfg.score(val)
            if score > best["score"] or (score == best["score"] and val_loss < best["loss"]):
                best = dict(score=score, loss=val_loss, epoch=epoch, val=val,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            best = dict(score=float("nan"), loss=val_loss, epoch=epoch, val=val, state=None)  # the model as it is
        if log:
            log(f"  epoch {epoch}: train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}  "
                f"val f1 {val['f1']:.3f}  val bal. acc {val['balanced_accuracy']:.3f}  ({history[-1]['seconds']:.1f} s)")
        if cfg.patience and epoch - best["epoch"] >= cfg.patience:
            break
        if cfg.max_steps and step >= cfg.max_steps:
            if log:
                log(f"  stopped after max_steps = {cfg.max_steps} optimiser steps (of {total})")
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return dict(history=history, best_epoch=best["epoch"], best_val=best["val"], epochs_run=len(history),
                steps_run=step, computed_in=amp.precision_name(amp_dtype))


# ============================================================================ runs on disk
def run_dir(runs, dataset: str, fold: int, model: str, mode: str, tag: str, seed: int, fraction: float,
            images: str = "as published", validation: bool = True) -> Path:
    """One run's folder: every fold, model, mode, config, seed and label fraction has its own, runs on
    annotation-removed evaluation images a folder of their own (<dataset>_annotations_removed), and so do
    runs on a split without a validation part (<dataset>_no_validation: MMOTU-2D's whole training list,
    mmotu_selection="all"), so that they never replace the runs of the carved split."""
    folder = dataset if images == "as published" else f"{dataset}_{images.replace(' ', '_')}"
    folder += "" if validation else "_no_validation"
    return Path(runs) / folder / f"fold{fold}" / model / mode / tag / f"seed{seed}_frac{fraction:g}"


_trained_here: set[Path] = set()  # runs this process trained: reusing one right after is not news, not logged


def _finished(directory: Path, identity: dict) -> dict | None:
    """The stored metrics of a finished run with the same identity, else None."""
    path = directory / "metrics.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return stored if stored.get("identity") == identity else None


def run_claim(runs, directory: Path, wait: bool = True):
    """The claim on one run folder (safety.claim): its lock lives in runs/.claims/, beside the run folders,
    so that a claimed run that never finished leaves no folder of its own."""
    name = directory.relative_to(runs).as_posix().replace("/", "__")
    return claim(Path(runs) / ".claims" / f"{name}.lock", f"fine-tuning {directory.name}", wait)


@contextlib.contextmanager
def claimed_run(runs, directory: Path, identity: dict, wait: bool, log=print):
    """Claim a run (run_claim) and yield (to_train, row): (False, its stored row) when it is finished,
    here or by another process; (False, None) when another process holds it and wait is False; (True,
    None) when this process is to train it, which it does under the claim."""
    with run_claim(runs, directory, wait) as held:
        if not held:
            yield False, None
            return
        done = _finished(directory, identity)
        if done and log and directory not in _trained_here:
            log(f"already finished, reused: {directory}")
        yield (False, done["row"]) if done else (True, None)


TRAINED_LOG = "trained.jsonl"  # runs/trained.jsonl: one line per run this grid trained (which process, when)


@functools.lru_cache(maxsize=None)
def _provenance(device: str) -> dict:
    return provenance.record(device=device)


def _score_and_save(directory: Path, identity: dict, row: dict, data: Data, prob: np.ndarray,
                    n_bootstrap: int, seed: int, runs=None, device="cpu") -> dict:
    """Test metrics with bootstrap intervals; predictions then metrics.json (last = finished), with the
    provenance of the process that made it (row["commit"]: the commit, +dirty when the tree was); a line
    in runs/trained.jsonl says which process trained it."""
    split = data.split
    made = _provenance(str(device))
    row["commit"] = provenance.commit_label(made)
    y = data.labels["test"].numpy()
    ci = bootstrap_intervals(y, prob, split.positive, n_resamples=n_bootstrap, seed=seed)
    for metric, r in ci.iterrows():
        row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = r["value"], r["low"], r["high"]
    directory.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({"path": split.test["path"].to_numpy(), "label": y, "pred": prob.argmax(1)})
    for c, name in enumerate(split.classes):
        preds[f"prob_{name}"] = prob[:, c]
    atomic_write_text(directory / "test_predictions.csv", preds.to_csv(index=False))
    atomic_write_text(directory / "metrics.json", json.dumps(dict(identity=identity, row=row, provenance=made),
                                                             indent=1, default=float))
    _trained_here.add(directory)
    if runs is not None:  # O_APPEND: the shards' lines never interleave (each far below PIPE_BUF)
        line = json.dumps(dict(run=directory.relative_to(runs).as_posix(), pid=os.getpid(), host=socket.gethostname(),
                               finished=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n"
        with open(Path(runs) / TRAINED_LOG, "a") as f:
            f.write(line)
    return row


def finetune_run(data: Data, model_name: str, cfg: TrainConfig, seed: int, runs, fraction: float = 1.0,
                 checkpoint=None, weights=None, mae_config=None, device="auto", n_bootstrap: int = 1000,
                 log=print, run_name: str | None = None, precision: str = "auto", wait: bool = True) -> dict | None:
    """One fine-tuning run (resumable): returns its results row (also in metrics.json). run_name: the
    run folder's model name when one model has several starts (USF-MAE from each pretraining run:
    "usf-mae", "usf-mae-seed1", ...); the row's model stays model_name. precision: see train.
    The run is claimed before it trains (run_claim), so processes sharing `runs` (a grid's shards)
    never train it twice: one that finds it claimed waits and reuses its result, or with wait=False
    returns None at once (the caller comes back to it later: run_shared)."""
    split = data.split
    cfg = TrainConfig(**{**asdict(cfg), "img_size": data.img_size})
    directory = run_dir(runs, split.dataset, split.fold, run_name or model_name, "finetune", cfg.tag(), seed, fraction,
                        split.images, has_validation(data))
    device = pick_device(device) if isinstance(device, str) else device
    computes_in = amp.precision_name(amp.autocast_dtype(precision, device))
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    weights_id = (file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights))
    identity = dict(config=cfg.identity(), split=split.split, n=[len(df) for df in split.parts().values()],
                    tag=TIMM_NAMES.get(model_name),  # the weights' tag sets the input statistics
                    weights=weights_id, mae_config=mae_config if model_name == "scratch" else None,
                    n_bootstrap=n_bootstrap, schedule="lr_factor")  # runs of the old warmup ((step+1)/warmup) are redone
    if computes_in != "fp32":  # runs finished in fp32 before precision was a knob keep their identity
        identity["precision"] = computes_in
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as stored
    with claimed_run(runs, directory, identity, wait, log) as (to_train, row):
        if not to_train:
            return row  # finished (here or by another process), or None: another process holds it
        torch.manual_seed(seed)  # the head's (and scratch models') init
        model, init, _ = build_classifier(model_name, len(split.classes), data.img_size, ckpt, weights, cfg.pool,
                                          mae_config)
        if cfg.head_norm:
            add_head_norm(model)
        index = subsample_labels(data.labels["train"], fraction, seed)
        if log:
            log(f"{split.dataset} {model_name} {cfg.tag()} seed {seed} fraction {fraction:g}: "
                f"{len(index)} training images; init {init}; {computes_in}")
        t0 = time.time()
        result = train(model, data, cfg, seed, index, device, split.positive, log, precision)
        prob = predict(model, data.images["test"], device, precision=precision)
        row = dict(dataset=split.dataset, fold=split.fold, split=split.split, images=split.images, model=model_name,
                   mode="finetune", init=init,
                   seed=seed,
                   fraction=fraction, n_classes=len(split.classes), n_train=len(index), n_val=len(split.val),
                   n_test=len(split.test),
                   img_size=data.img_size, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                   epochs=cfg.epochs, pool=cfg.pool, epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
                   max_steps=cfg.max_steps, min_steps=cfg.min_steps, steps_run=result["steps_run"],
                   select_on=cfg.select_on, **{f"val_{k}": result["best_val"][k] for k in SELECT_ON},  # select_config's
                   computed_in=result["computed_in"], train_seconds=time.time() - t0,
                   run=directory.relative_to(runs).as_posix())
        directory.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(result["history"]).to_csv(directory / "history.csv", index=False)
        return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed, runs, device)


def linear_probe(data: Data, model_name: str, seed: int, runs, checkpoint=None, weights=None, mae_config=None,
                 pool: str = "token", device="auto", n_bootstrap: int = 1000, cs=(0.01, 0.1, 1.0, 10.0),
                 log=print, run_name: str | None = None, wait: bool = True, precision: str = "auto") -> dict | None:
    """Frozen encoder -> features -> LogisticRegression (C picked on validation balanced accuracy, as
    fine-tuning selects; without a validation part, the first C of `cs`: fit_probe); resumable.
    run_name, wait: as finetune_run's."""
    split = data.split
    tag = f"C{'-'.join(f'{c:g}' for c in cs)}_px{data.img_size}_{pool}"
    directory = run_dir(runs, split.dataset, split.fold, run_name or model_name, "probe", tag, seed, 1.0, split.images,
                        has_validation(data))
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    identity = dict(split=split.split, n=[len(df) for df in split.parts().values()], n_bootstrap=n_bootstrap,
                    tag=TIMM_NAMES.get(model_name), select_on="balanced_accuracy",  # a probe chosen on F1 is redone
                    weights=(file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights)))
    with claimed_run(runs, directory, identity, wait, log) as (to_train, row):
        if not to_train:
            return row  # finished (here or by another process), or None: another process holds it
        device = pick_device(device) if isinstance(device, str) else device
        torch.manual_seed(seed)
        model, init, _ = build_classifier(model_name, len(split.classes), data.img_size, ckpt, weights, pool, mae_config)
        model.to(device)
        parts = ("train", "val", "test") if has_validation(data) else ("train", "test")
        feats = {part: features(model, data.images[part], device, precision=precision) for part in parts}
        y = {part: data.labels[part].numpy() for part in feats}
        val_score, c, clf = fit_probe(feats["train"], y["train"], feats.get("val"), y.get("val"), len(split.classes),
                                      split.positive, seed, cs)
        prob = full_proba(clf, feats["test"], len(split.classes))
        if log:
            chosen = (f"val balanced accuracy {val_score:.3f}" if has_validation(data)
                      else "the first of its grid: no validation set")
            log(f"{split.dataset} {model_name} linear probe: C={c:g}, {chosen}; init {init}")
        row = dict(dataset=split.dataset, fold=split.fold, split=split.split, images=split.images, model=model_name,
                   mode="probe", init=init,
                   seed=seed,
                   fraction=1.0, n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
                   img_size=data.img_size, probe_C=c, pool=pool, val_balanced_accuracy=val_score, run=directory.relative_to(runs).as_posix())
        return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed, runs, device)


def fit_probe(train_x, train_y, val_x, val_y, n_classes: int, positive, seed: int,
              cs=(0.01, 0.1, 1.0, 10.0)) -> tuple[float, float, object]:
    """(validation balanced accuracy, C, fitted pipeline) of the logistic regression on standardised
    features whose C (of `cs`) scores the best validation balanced accuracy, the score fine-tuning
    selects on (F1 of the positive class rewards calling everything positive): the linear probe of
    notebooks 05 and 07; ties: the first C. Without validation features (None or none: MMOTU-2D under
    mmotu_selection="all") nothing can pick C: the first of `cs`, as the sweep takes the first config
    of its grid (fixed_schedule); the score NaN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if val_x is None or not len(val_x):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=cs[0], max_iter=2000, random_state=seed))
        return float("nan"), cs[0], clf.fit(train_x, train_y)
    best = None
    for c in cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        clf.fit(train_x, train_y)
        score = classification_metrics(val_y, full_proba(clf, val_x, n_classes), positive)["balanced_accuracy"]
        if best is None or score > best[0]:
            best = (score, c, clf)
    return best


def full_proba(clf, x, n_classes) -> np.ndarray:
    """predict_proba over all classes, zeros for classes absent from the training labels."""
    prob = np.zeros((len(x), n_classes))
    prob[:, clf.classes_] = clf.predict_proba(x)
    return prob


def _first_best(scores) -> int:
    """Index of the highest score, the first of equal ones (grid order); NaN never wins (all NaN: 0)."""
    scores = np.asarray(scores, dtype=float)
    return 0 if np.isnan(scores).all() else int(np.nanargmax(scores))


def sweep_scores(configs: list[TrainConfig], table: pd.DataFrame) -> np.ndarray:
    """Each config's validation score (its select_on, loss negated) from select_config's sweep rows,
    in grid order."""
    rows = table.to_dict("records")
    if len(rows) != len(configs):
        raise UsfmaeError(f"a sweep of {len(configs)} configs has {len(rows)} rows; pass select_config's table")
    return np.array([cfg.score({k: row["val_" + k] for k in SELECT_ON}) for cfg, row in zip(configs, rows)])


def fixed_schedule(configs: list[TrainConfig]) -> list[TrainConfig]:
    """The configs for a split without a validation part (MMOTU-2D under mmotu_selection="all"): nothing
    can choose among the grid or stop a run early, so one config, the first of the grid in grid order,
    with patience 0 (every epoch runs and the last is tested)."""
    return [replace(configs[0], patience=0)]


def select_config(data: Data, model_name: str, configs: list[TrainConfig], runs, **kw) -> tuple[TrainConfig, pd.DataFrame]:
    """The paper's sweep: every config with seed 0 on all labels; the best validation score wins
    (each config's select_on; ties: the first in grid order). Returns (chosen config, sweep rows).
    A split without a validation part runs no sweep: one config (fixed_schedule) is returned as it is,
    with no rows; several are an error, since nothing could choose among them."""
    if not has_validation(data):
        if len(configs) > 1:
            raise UsfmaeError(f"{data.split.dataset} ({data.split.split}) has no validation set to choose among "
                              f"{len(configs)} configs by; pass one config (finetune.fixed_schedule(configs): the first "
                              "of the grid, patience 0), or give the split a validation part (mmotu_selection = 'carve')")
        return TrainConfig(**{**asdict(configs[0]), "img_size": data.img_size}), pd.DataFrame()
    rows = [finetune_run(data, model_name, cfg, 0, runs, **kw) for cfg in configs]
    table = pd.DataFrame(rows)
    best = _first_best(sweep_scores(configs, table))
    return TrainConfig(**{**asdict(configs[best]), "img_size": data.img_size}), table


def best_over_folds(configs: list[TrainConfig], tables: list[pd.DataFrame]) -> tuple[int, np.ndarray]:
    """select_per="dataset": the index in `configs` of the config whose validation score, averaged over
    the folds' sweeps (select_config's tables, one per fold, each in grid order), is the best (ties:
    the first in grid order; a config with a NaN score on any fold never wins), and those means."""
    if not tables:
        raise UsfmaeError("best_over_folds needs the sweep of at least one fold")
    mean = np.vstack([sweep_scores(configs, t) for t in tables]).mean(0)
    return _first_best(mean), mean


def choose_configs(sweeps: dict, configs: dict, select_per: str = "fold") -> dict:
    """{key: chosen config} for select_config's sweep tables keyed (dataset, fold, *start) (start: the
    model and run name), configs = {dataset: the grid it ran}. select_per "fold": each key's own best;
    "dataset": every fold of a (dataset, *start) gets the config with the best mean validation score
    over that dataset's folds (best_over_folds). A dataset without validation (an empty table) gets
    its one config (fixed_schedule)."""
    check_choice("select_per", select_per, SELECT_PER)
    groups = {}
    for key in sweeps:
        groups.setdefault((key[0], *key[2:]) if select_per == "dataset" else key, []).append(key)
    chosen = {}
    for keys in groups.values():
        grid = configs[keys[0][0]]
        tables = [sweeps[key] for key in keys]
        best = 0 if any(t.empty for t in tables) else best_over_folds(grid, tables)[0]
        chosen.update({key: grid[best] for key in keys})
    return chosen


def selection(select_per: str, select_on: str, n_folds: int, n_configs: int, validation: bool = True) -> dict:
    """The columns that say how a row's config was chosen: selected_per ("fold", "dataset", or "none"
    without a validation set) and selected_by (in words)."""
    check_choice("select_per", select_per, SELECT_PER)
    if not validation:
        return dict(selected_per="none", selected_by="first config of the grid, every epoch run and the last "
                                                      "tested: no validation set (mmotu_selection = 'all')")
    configs = f"seed 0 of {n_configs} config{'s' if n_configs != 1 else ''}"
    if select_per == "dataset":
        return dict(selected_per="dataset",
                    selected_by=f"best mean validation {select_on} over the dataset's {n_folds} fold(s), {configs}")
    return dict(selected_per="fold", selected_by=f"best validation {select_on} of this fold, {configs}")


def run_cell(data: Data, model_name: str, configs: list[TrainConfig], runs, n_seeds: int = 3,
             chosen: TrainConfig | None = None, select_per: str = "fold", n_folds: int = 1, **kw) -> pd.DataFrame:
    """One cell of Table 2 on one fold: sweep on validation with seed 0, then n_seeds seeds of the chosen
    config (`chosen`: a config chosen over the folds already, select_per="dataset" of n_folds folds: no
    sweep here). Returns one row per seed, with `selected` = the chosen config's tag and how it was
    chosen (selection's columns)."""
    cfg = chosen if chosen is not None else select_config(data, model_name, configs, runs, **kw)[0]
    rows = [finetune_run(data, model_name, cfg, s, runs, **kw) for s in range(n_seeds)]
    out = pd.DataFrame(rows)
    out["selected"] = TrainConfig(**{**asdict(cfg), "img_size": data.img_size}).tag()
    out["n_configs"] = len(configs)
    return out.assign(**selection(select_per, cfg.select_on, n_folds, len(configs), has_validation(data)))


# ============================================================================ the grid, shared between processes
def shard_order(n_tasks: int, shard: tuple[int, int] | None) -> list[int]:
    """The order a process takes a list of tasks in: shard (I, N) first its own share (every N-th task
    from the I-th), then the others' (so that a share whose process never starts, or dies, is still
    done); None: in order."""
    if shard is None:
        return list(range(n_tasks))
    i, n = shard
    own = list(range(i - 1, n_tasks, n))
    return own + [t for t in range(n_tasks) if (t - (i - 1)) % n]


def run_shared(tasks: list, run, shard: tuple[int, int] | None = None, bar=None) -> list:
    """[run(task, wait) for task in tasks], each task once among every process sharing the runs folder:
    `run` claims its run (finetune_run, linear_probe) and returns None when another process holds it
    and wait is False. One pass in shard_order without waiting, then a second that waits for the runs
    others were training (and reuses their results, or trains one whose process died). Results in
    task order; `bar` (tqdm) advances once per task."""
    results, held = [None] * len(tasks), []
    for t in shard_order(len(tasks), shard):
        results[t] = run(tasks[t], wait=shard is None)
        if results[t] is None:
            held.append(t)
        elif bar is not None:
            bar.update()
    for t in held:
        results[t] = run(tasks[t], wait=True)
        if bar is not None:
            bar.update()
    return results


def run_grid(data: dict, model_starts: list, grids: dict, seeds: dict, runs, select_per: str, run_kw,
             shard: tuple[int, int] | None = None, progress: bool = True) -> tuple[dict, dict, pd.DataFrame]:
    """Notebook 05's grid: for every (dataset, fold) of `data` and every start (model, run_name,
    checkpoint) of `model_starts` (starts()), the sweep (seed 0 of every config of grids[dataset]; none without a
    validation part), the config chosen per fold or per dataset (choose_configs), then seeds[dataset]
    seeds of it (seed 0 is the sweep's run, reused). run_kw(model, run_name, checkpoint): the keyword
    arguments of that start's finetune_run calls. shard (I, N): this process's share first, the rest
    after (run_shared); N processes so started fill one runs folder, each run trained once, and each
    returns every row. Returns ({(dataset, fold, model, run_name): sweep table}, {the same keys: the
    config chosen}, one row per seed run with the columns selected, selected_per and selected_by)."""
    from tqdm.auto import tqdm

    grid = [(key, start) for key in data for start in model_starts]
    sweep_tasks = [(key, start, cfg) for key, start in grid if has_validation(data[key]) for cfg in grids[key[0]]]
    bar = tqdm(total=len(sweep_tasks) + sum(seeds[key[0]] for key, _ in grid), desc="grid", disable=not progress)

    def sweep_run(task, wait):
        key, (m, name, ckpt), cfg = task
        return finetune_run(data[key], m, cfg, 0, runs, wait=wait, **run_kw(m, name, ckpt))

    rows = run_shared(sweep_tasks, sweep_run, shard, bar)
    sweeps = {(*key, m, name): [] for key, (m, name, _) in grid}
    for (key, (m, name, _), _), row in zip(sweep_tasks, rows):
        sweeps[(*key, m, name)].append(row)
    sweeps = {key: pd.DataFrame(table) for key, table in sweeps.items()}  # grid order, as select_config's
    chosen = choose_configs(sweeps, grids, select_per)
    seed_tasks = [(key, start, s) for key, start in grid for s in range(seeds[key[0]])]

    def seed_run(task, wait):
        key, (m, name, ckpt), s = task
        return finetune_run(data[key], m, chosen[(*key, m, name)], s, runs, wait=wait, **run_kw(m, name, ckpt))

    rows = pd.DataFrame(run_shared(seed_tasks, seed_run, shard, bar))
    bar.close()
    n_folds = {d: len({k for (dd, k) in data if dd == d}) for d in grids}
    info = []
    for (d, k), (m, name, _), _ in seed_tasks:
        cfg = chosen[(d, k, m, name)]
        info.append(dict(selected=TrainConfig(**{**asdict(cfg), "img_size": data[(d, k)].img_size}).tag(),
                         **selection(select_per, cfg.select_on, n_folds[d], len(grids[d]), has_validation(data[(d, k)]))))
    return sweeps, chosen, pd.concat([rows, pd.DataFrame(info)], axis=1)


def mmotu_note(mmotu_selection: str, configs: list[TrainConfig], n_train: int | None = None) -> str:
    """The one line that says what mmotu_selection = "all" does to MMOTU-2D ('' for "carve"); configs:
    the whole grid (its first config is the one used, its patience the one not applied)."""
    check_choice("mmotu_selection", mmotu_selection, MMOTU_SELECTION)
    if mmotu_selection == "carve":
        return ""
    first = configs[0]
    images = f"all {n_train} official training images" if n_train is not None else "every official training image"
    schedule = f"every run runs all {first.epochs} epochs"
    if first.patience:
        schedule += f" (patience {first.patience} is not applied here: nothing to stop on)"
    if first.max_steps:
        schedule += f" unless max_steps ({first.max_steps}) ends it sooner"
    return (f"mmotu_selection = 'all': MMOTU-2D trains on {images}, no validation part; {schedule}, and its last "
            f"epoch is tested; config: the first of the grid of {len(configs)}, lr {first.lr:g}, wd {first.weight_decay:g}, "
            f"batch {first.batch_size} (no validation to choose by: no sweep), and the probe's C the first of its grid")


class Inputs(NamedTuple):
    """What notebook 05's grid starts from (resolve_inputs)."""
    models: list  # the models to fine-tune (under missing_weights="skip", without those lacking ImageNet weights)
    probe_models: list  # the encoders to probe (likewise)
    mae_checkpoints: list  # the last checkpoint of every pretraining run, the first run's first (starts)
    mae_checkpoint: Path  # the first of them (where notebook 03 leaves it when there is none)
    mae_size: int  # its pretraining image size (PAPER_IMG_SIZE when no model needs an MAE checkpoint)
    checkpoints: dict  # model -> checkpoint: usf-mae and scratch the first MAE checkpoint, ultrasam its own
    weights: dict  # model -> its ImageNet weights file in weights_dir, or None (timm's cache, else random)


def resolve_inputs(out_dir, models, probe_models=(), checkpoint=None, ultrasam_checkpoint=None, weights_dir=None,
                   missing_weights: str = "random") -> Inputs:
    """Notebook 05's checkpoints and weights (and so `usfmae finetune -f / -p / --profile`'s, which runs it):
    the MAE checkpoints are [checkpoint] when given, else every pretraining run notebook 03 wrote under
    out_dir (pretrain.pretraining_runs; none while usf-mae or scratch is to run, fine-tuned or probed, is
    an error); each model's ImageNet weights file is looked up in weights_dir (imagenet_weights_file);
    under missing_weights="skip" the models and probe models whose ImageNet weights are neither there nor
    in timm's cache are left out, and one line says which."""
    from .pretrain import CHECKPOINT, pretraining_runs

    models, probe_models = list(models), list(probe_models)
    step_dir = Path(out_dir) / "03_mae_pretraining"
    needs_mae = bool({"usf-mae", "scratch"} & set(models + probe_models))
    mae_checkpoints = [Path(checkpoint)] if checkpoint else pretraining_runs(step_dir)
    mae_checkpoint = mae_checkpoints[0] if mae_checkpoints else step_dir / "checkpoints" / CHECKPOINT
    if needs_mae and not mae_checkpoint.exists():
        raise UsfmaeError(f"{mae_checkpoint} not found: run notebook 03 (MAE pretraining) for this out_dir first, "
                          "or set the checkpoint parameter")
    mae_size = mae_checkpoint_info(mae_checkpoint)[2] if needs_mae else PAPER_IMG_SIZE
    weights = {m: imagenet_weights_file(weights_dir, m) for m in models}
    checkpoints = {"usf-mae": mae_checkpoint, "scratch": mae_checkpoint, "ultrasam": ultrasam_checkpoint}
    unavailable = [m for m in dict.fromkeys(models + probe_models) if not imagenet_weights_available(m, weights.get(m))]
    if unavailable and missing_weights == "skip":
        print(f"skipped, no ImageNet weights here (missing_weights = 'skip'): {', '.join(unavailable)}")
        models = [m for m in models if m not in unavailable]
        probe_models = [m for m in probe_models if m not in unavailable]
    return Inputs(models, probe_models, mae_checkpoints, mae_checkpoint, mae_size, checkpoints, weights)


def starts(models, checkpoints: dict, pretraining_runs: list) -> list[tuple[str, str | None, Path | None]]:
    """(model, run_name, checkpoint) of every model to train: USF-MAE once per pretraining run (the
    first in the plain usf-mae run folders, the others in usf-mae-run2, usf-mae-run3, ...), every other
    model once, with its checkpoints entry (scratch: the first pretraining run, for its architecture)."""
    out = []
    for m in models:
        if m == "usf-mae":
            out += [(m, None if i == 0 else f"usf-mae-run{i + 1}", c) for i, c in enumerate(pretraining_runs)]
        else:
            out.append((m, None, checkpoints.get(m)))
    return out


def seeds_per_fold(n_seeds: int, n_folds: int, min_runs: int = 0) -> int:
    """Seeds per fold so that a cell has at least min_runs runs: n_seeds, or more on a dataset with
    few folds (MMOTU-2D's one split: min_runs seeds), so every cell has a spread."""
    return max(n_seeds, math.ceil(min_runs / max(1, n_folds)))


def label_efficiency(data: Data, model_name: str, cfg: TrainConfig, runs, fractions=LABEL_FRACTIONS,
                     n_seeds: int = 3, **kw) -> pd.DataFrame:
    """Test metrics at each fraction of training labels (stratified, >= 1 per class), n_seeds each."""
    return pd.DataFrame([finetune_run(data, model_name, cfg, s, runs, fraction=f, **kw)
                         for f in fractions for s in range(n_seeds)])


# ============================================================================ command line
def add_cli(subparsers):
    """Register `usfmae finetune`."""
    p = subparsers.add_parser(
        "finetune", formatter_class=help_with_defaults,
        help="fine-tune and evaluate one model on one dataset (one cell of Table 2)",
        description="Two forms. One cell (--dataset, --root, --model and the options below): sweep lr x wd x batch "
                    "on validation with seed 0 (chosen per fold, or over the folds with --select-per dataset), then "
                    "train --seeds seeds of the best config on every official fold and "
                    "report test metrics with bootstrap 95% intervals; resumable: OUT/runs/<dataset>/... with "
                    "metrics.json and test_predictions.csv. The whole step (-f, -p, --profile): notebook 05's grid "
                    "of datasets x models x folds, probes and label efficiency, with the notebook's parameter names "
                    "(listed at the end), e.g. usfmae finetune --profile smoke -p 'datasets=[bus-bra]'.")
    p.add_argument("--dataset", choices=["bus-bra", "mmotu-2d", "gist514", "folder"], help="one-cell form (required there): the dataset")
    p.add_argument("--root", help="that dataset's own folder (BUSBRA/, OTU_2d/, usd514_jpeg_roi/ or ROOT/<class>/; "
                                  "notebook 05's data_root is the folder holding them; required in the one-cell form)")
    p.add_argument("--model", choices=MODELS, help="one-cell form (required there): the model")
    p.add_argument("--checkpoint", help="MAE checkpoint (usf-mae; scratch takes its architecture) or UltraSam/SAM checkpoint")
    p.add_argument("--weights", help="local ImageNet weights file for vit-b / resnet-50 / vgg-19")
    p.add_argument("--mae-config", default=None, help=f"scratch without --checkpoint: one of {', '.join(mae.CONFIGS)}")
    p.add_argument("--out", help="folder for runs/ and results.csv (default finetune_runs; with -f/-p/--profile: the "
                                 "study folder, default outputs/<profile>)")
    p.add_argument("--img-size", type=int, default=0,
                   help="input side (default 0: the model's own: the MAE checkpoint's pretraining size for usf-mae and "
                        "scratch, the ImageNet tag's for the baselines, 224 for ultrasam)")
    p.add_argument("--missing-weights", choices=MISSING_WEIGHTS, default="random",
                   help="a baseline whose ImageNet weights are not here: random = run from random init, labelled "
                        "so in every row (default); skip = stop without running")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs per run (paper profile: 50)")
    p.add_argument("--patience", type=int, default=5,
                   help="early stopping: epochs without a better validation score (0 = run every epoch; paper profile: 10)")
    p.add_argument("--lr", type=float, nargs="+", default=SWEEP["lr"], help="learning rates of the sweep (the paper's)")
    p.add_argument("--weight-decay", type=float, nargs="+", default=SWEEP["weight_decay"],
                   help="weight decays of the sweep (the paper's)")
    p.add_argument("--batch-size", type=int, nargs="+", default=SWEEP["batch_size"], help="batch sizes of the sweep (the paper's)")
    p.add_argument("--pool", choices=["token", "avg"], default="token",
                   help="ViT models: cls token -> head (the paper) or global average pooling")
    p.add_argument("--head-norm", action="store_true",
                   help="BatchNorm (no affine) before the head, as MAE's linear probe (the quick profile uses it)")
    p.add_argument("--select-on", choices=SELECT_ON, default=TrainConfig.select_on,
                   help="validation score that picks the epoch and the sweep's config")
    p.add_argument("--layer-decay", type=float, default=1.0, help="ViT layer-wise lr decay (1 = off, the paper)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop each run after this many optimiser steps, then validate (0 = no limit; a dry run)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the chosen config per fold")
    p.add_argument("--min-runs", type=int, default=0,
                   help="at least this many runs per cell: fewer folds than that get more seeds")
    p.add_argument("--min-steps", type=int, default=0,
                   help="at least this many optimiser steps per run: a small training set (--fraction) is passed "
                        "over several times per epoch (0: one pass)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of training labels")
    p.add_argument("--probe", action="store_true", help="also a linear probe of the frozen encoder")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--fold", type=int, nargs="+", default=None,
                   help="only these official folds: BUS-BRA 1-5, GIST514-DB 0-4 (default: all of them: BUS-BRA's 5-fold "
                        "cross-validation as the paper; GIST514-DB's five split files, the paper does not say how it used "
                        "them; one Table 2 cell is the mean over folds)")
    p.add_argument("--select-per", choices=SELECT_PER, default="fold",
                   help="where the sweep's config is chosen: fold = on each fold's validation score; dataset = one config "
                        "for every fold, the best mean validation score over the folds (the paper: 'for each model and "
                        "dataset'; paper profile)")
    p.add_argument("--mmotu-selection", choices=MMOTU_SELECTION, default="carve",
                   help="mmotu-2d: carve = --val-fraction of train_cls.txt validates; all = every official training "
                        "image trains (the paper's 1000 / 469 split; paper profile): no validation, all --epochs run, the "
                        "last tested, the first config of the sweep (nothing to choose by), --patience not applied")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="MMOTU-2D, GIST514-DB, folder: share of the training set carved out for validation (0.15; "
                        "the paper does not say); BUS-BRA uses its official valid_k marks")
    p.add_argument("--clean-eval", action="store_true",
                   help="remove burned-in annotations from the evaluation images first, as from the pretraining "
                        "corpus (cached in OUT/clean_eval/<dataset>); default: the images as published (the paper is silent)")
    p.add_argument("--positive", default=None, help="folder dataset: name of the positive class")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation (and folder test) split")
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--precision", choices=amp.PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU, fp16 with a GradScaler on a GPU without bf16, fp32 on a CPU "
                        "(usfmae_lib/amp.py)")
    from . import runner

    runner.add_step_options(p, "05_finetuning")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="with --profile / -f / -p: run share I of N of the grid first, then what is left; N processes "
                        "(one per GPU, or Slurm array tasks) into one --out fill one results folder, each run trained "
                        "once (docs/gpu.md)")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    from . import runner
    from .datasets import official_folds
    from .results import add_replicates, fold_summary
    from .safety import check_output

    if runner.step_mode(args):
        if args.shard:
            parse_shard(args.shard)  # a malformed share stops here, before a kernel starts
            args.step_params = [*args.step_params, f"shard={args.shard}"]
        return runner.run_step_cli(args, "05_finetuning")
    if args.shard:
        raise UsfmaeError("--shard spreads notebook 05's grid over processes: give it with --profile, -f or -p (the "
                          "one-cell form runs one model on one dataset)")
    missing = [flag for flag in ("dataset", "root", "model") if not getattr(args, flag)]
    if missing:
        raise UsfmaeError(f"usfmae finetune: give --{', --'.join(missing)} for one cell (one model on one dataset), or "
                          "-f / -p / --profile to run notebook 05's whole grid; see --help")
    args.out = args.out or "finetune_runs"
    check_output(args.out, [args.root], "output folder")
    out = Path(args.out)
    runs = out / "runs"
    images = "annotations removed" if args.clean_eval else "as published"
    _check_one_image_policy(out / "results.csv", args.dataset, images)
    kw = dict(checkpoint=args.checkpoint, weights=args.weights, mae_config=args.mae_config, device=args.device,
              n_bootstrap=args.bootstrap, precision=args.precision)
    if args.missing_weights == "skip" and not imagenet_weights_available(args.model, args.weights):
        print(f"{args.model}: no ImageNet weights ({TIMM_NAMES[args.model]}) given or in the Hugging Face cache; "
              "skipped (--missing-weights skip)")
        return 0
    img_size = input_size(args.model, args.img_size, args.checkpoint)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, img_size=img_size, pool=args.pool,
                       head_norm=args.head_norm, select_on=args.select_on, layer_decay=args.layer_decay,
                       max_steps=args.max_steps, min_steps=args.min_steps)
    configs = sweep_configs(base, args.lr, args.weight_decay, args.batch_size)
    val_fraction = args.val_fraction
    if args.dataset == "mmotu-2d" and args.mmotu_selection == "all":  # the official lists, no validation part
        print(mmotu_note("all", configs))
        configs, val_fraction = fixed_schedule(configs), 0.0
    tables = []
    folds = official_folds(args.dataset, args.fold)
    n_seeds = seeds_per_fold(args.seeds, len(folds), args.min_runs)

    def fold_data(fold: int, say: bool = True) -> Data:
        options = dict(seed=args.split_seed, val_fraction=val_fraction, fold=fold)
        if args.positive:
            options["positive"] = args.positive
        split = load_split(args.dataset, args.root, **options)
        if args.clean_eval:
            split = remove_annotations(split, out / "clean_eval" / args.dataset, progress=say)
        if say:
            print(f"\n{split.dataset} ({split.split}): {len(split.train)} train / {len(split.val)} val / "
                  f"{len(split.test)} test, classes {split.classes}; decoding at {img_size} px")
        return prepare_data(split, img_size)

    chosen = {}  # select_per dataset: the sweep on every fold first (seed 0 of each config), then one config for all
    if args.select_per == "dataset" and len(configs) > 1 and val_fraction:
        sweeps = {(args.dataset, fold): select_config(fold_data(fold, say=False), args.model, configs, runs, **kw)[1]
                  for fold in folds}
        chosen = choose_configs(sweeps, {args.dataset: configs}, "dataset")
        print(f"select_per dataset: {chosen[(args.dataset, folds[0])].tag()} for every fold, the best mean validation "
              f"{args.select_on} over {len(folds)} fold(s)")
    for fold in folds:
        data = fold_data(fold)
        cfg = chosen.get((args.dataset, fold))
        if args.fraction < 1:
            cfg = cfg or select_config(data, args.model, configs, runs, **kw)[0]
            table = label_efficiency(data, args.model, cfg, runs, fractions=[args.fraction], n_seeds=n_seeds, **kw)
        else:
            table = run_cell(data, args.model, configs, runs, n_seeds=n_seeds, chosen=cfg, select_per=args.select_per,
                             n_folds=len(folds), **kw)
        if args.probe:
            table = pd.concat([table, pd.DataFrame([linear_probe(data, args.model, 0, runs, pool=args.pool, **kw)])])
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    merged = merge_results(out / "results.csv", table)
    metrics = [m for m in ("precision", "recall", "f1", "precision_macro", "recall_macro", "f1_macro",
                           "accuracy", "balanced_accuracy", "roc_auc") if m in table.columns]
    print(f"\ninit: {'; '.join(table['init'].unique())}")
    for (mode, fraction), g in table.groupby(["mode", "fraction"], sort=False):
        g = add_replicates(g, runs)  # one split: every run scored on the same test-image resamples
        s = fold_summary(g, metrics[0])
        print(f"\n{args.model} {mode} on {args.dataset}, {fraction:g} of the labels: {s['n_folds']} fold(s) x "
              f"{s['n_seeds']} seed(s); mean over folds of each fold's mean over seeds, sd of the single runs, "
              f"and for precision, recall and F1 the 95% interval of the mean ({s['method']})")
        for m in metrics:
            s = fold_summary(g, m)
            sd = f"sd {s['sd']:.3f}" if np.isfinite(s["sd"]) else "one run: no sd"
            interval = f"  [{s['low']:.3f}, {s['high']:.3f}]" if m in ("precision", "recall", "f1") else ""
            print(f"  {m:18s} {s['mean']:.3f} ({sd}){interval}")
    print(f"\nresults: {out / 'results.csv'} ({len(merged)} rows: this call's {len(table)} and the runs already there)")
    return 0


def _check_one_image_policy(results_csv: Path, dataset: str, images: str) -> None:
    """One results.csv holds one kind of evaluation image per dataset, so that Table 2 never averages
    runs on images as published with runs on annotation-removed ones."""
    if not results_csv.exists() or results_csv.stat().st_size <= 1:
        return
    old = pd.read_csv(results_csv)
    kinds = set(old.loc[old["dataset"] == dataset, "images"].fillna("as published")) if "images" in old else \
        ({"as published"} if (old["dataset"] == dataset).any() else set())
    if kinds - {images}:
        raise UsfmaeError(f"{results_csv} holds {dataset} runs on images {', '.join(sorted(kinds))}; this call would add "
                          f"runs on images {images}, and Table 2 would average the two. Give this call another --out")


def merge_results(path, table: pd.DataFrame) -> pd.DataFrame:
    """Add this call's rows to results.csv: a run already listed (same `run` folder) is replaced, every
    other row is kept, so repeated `usfmae finetune` calls (other folds, models, datasets) accumulate."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 1:
        old = pd.read_csv(path)
        if "run" in old:
            old = old[~old["run"].isin(set(table["run"]))]
        table = pd.concat([old, table], ignore_index=True)
    atomic_write_text(path, table.to_csv(index=False))
    return table
