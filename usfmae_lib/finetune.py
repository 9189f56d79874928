"""Fine-tuning and evaluation: one cell of Table 2 per call (`usfmae finetune`), the grid in notebook 05.

    usfmae finetune --dataset bus-bra --root data/BUSBRA --model usf-mae \\
        --checkpoint outputs/quick/03_mae_pretraining/checkpoints/checkpoint-last.pth --out runs

Models (`build_classifier`), all timm:
    usf-mae    timm VisionTransformer with the MAE config's dims, encoder weights from the MAE
               checkpoint (strict: only the new head may be missing); cls token -> head as in the
               paper, or global average pooling (pool="avg": the encoder's final norm becomes fc_norm)
    scratch    the same architecture, random init: the control that says what pretraining adds
    vit-b      vit_base_patch16_224.augreg_in1k   resnet-50  resnet50.tv_in1k   vgg-19  vgg19.tv_in1k
               (ImageNet-1k weights, as the paper describes its baselines; each fed inputs normalised
               with its own tag's mean/std, e.g. 0.5 for the ViT)
    ultrasam   samvit_base_patch16 (SAM ViT-B image encoder + neck) from a user-supplied UltraSam or
               SAM checkpoint; see load_sam_encoder for the key layouts read
ImageNet weights come from a local file (`weights=`) or timm's Hugging Face cache (looked up offline);
otherwise the model starts from random weights, a warning is printed, and the `init` column says so
(or, with missing_weights="skip", it is not run).

Data: every image of a split is decoded and resized once (cv2.INTER_AREA, squashed to a square as the
paper does) into a uint8 cache [N, 3, S, S]; training batches are augmented per sample (rotation
0-90 deg, flips, resized crop) by the pretraining step's batched affine resample (store.augment_batch)
on the training device, and normalised with the model's own input statistics (ImageNet's for
USF-MAE and scratch, as the paper says).
Training: AdamW (no decay on biases and norms; optional layer-wise lr decay), linear warmup then cosine per
step, early stopping on a validation score (balanced accuracy by default: positive-class F1 rewards calling
everything positive) with the best weights kept, bf16 autocast on CUDA. `head_norm` puts MAE's linear-probe
BatchNorm in front of the head (see add_head_norm for why the quick checkpoint needs it). The seed sets
init, data order and augmentation. A split without a validation part (MMOTU-2D under mmotu_selection="all")
runs a fixed schedule: every epoch, the last one tested, the first config of the grid (fixed_schedule).
Selection of the sweep's config: per fold (select_config) or one per model and dataset, the best mean
validation score over the folds (choose_configs, select_per="dataset"). Every run writes RUNS/<dataset>/<model>/<mode>/<config>/seed<k>_frac<f>/{metrics.json,
test_predictions.csv} atomically (metrics.json last) and is skipped when present with the same config.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UsfmaeError, atomic_write_text, help_with_defaults, mae
from .datasets import SYNTHETIC_FOLDERS, Split, load_split
from .metrics import bootstrap_intervals, classification_metrics
from .store import N_AUG, AugmentConfig, augment_batch

MODELS = ("usf-mae", "scratch", "vit-b", "resnet-50", "vgg-19", "ultrasam")
# The exact timm tag of each baseline: the ImageNet-1k weights it loads, and so the input statistics
# (pretrained_cfg mean/std) it is fed. The paper: VGG-19 and ResNet-50 "pre-trained on ImageNet ILSVRC-2012",
# ViT-Base "pre-trained on ImageNet (the same 1.2M images, 1000-class dataset)". See docs/finetuning.md.
#   vit-b      vit_base_patch16_224.augreg_in1k  ViT-B/16 trained on ImageNet-1k only (AugReg); mean/std 0.5
#   resnet-50  resnet50.tv_in1k                  torchvision's classic ResNet-50 (V1); ImageNet mean/std
#   vgg-19     vgg19.tv_in1k                     torchvision's plain VGG-19 (no batch norm); ImageNet mean/std
#   ultrasam   samvit_base_patch16               architecture only: the weights come from --checkpoint
TIMM_NAMES = {"vit-b": "vit_base_patch16_224.augreg_in1k", "resnet-50": "resnet50.tv_in1k",
              "vgg-19": "vgg19.tv_in1k", "ultrasam": "samvit_base_patch16"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A baseline whose ImageNet weights are neither given nor in the cache: "random" trains it from random
# init (init column "random: no ImageNet weights found ..."), "skip" leaves it out (build_classifier raises
# MissingWeights; callers check imagenet_weights_available first).
MISSING_WEIGHTS = ("random", "skip")
PAPER_IMG_SIZE = 224  # the paper resizes every image to 224 x 224 (section 2.2)
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


_said_once: collections.Counter | None = None  # inside warnings_once: message -> times it came


def warn(message: str):
    """A visible line in notebooks and logs (no silent fallbacks); inside warnings_once, counted and
    said once at its end."""
    if _said_once is not None:
        _said_once[message] += 1
        return
    print(f"WARNING: {message}", flush=True)


@contextlib.contextmanager
def warnings_once():
    """Within: each distinct warning is said once, when the block ends, with the number of runs it
    came from ("... [15 runs]"), instead of once per run (notebook 05's loops: one baseline without
    ImageNet weights warns in every fold)."""
    global _said_once
    outer, _said_once = _said_once, collections.Counter()
    try:
        yield
    finally:
        said, _said_once = _said_once, outer
        for message, n in said.items():
            warn(f"{message} [{n} runs]" if n > 1 else message)


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


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ============================================================================ models
def _file_id(path) -> str:
    """Path + size + mtime: a changed checkpoint makes finished runs stale."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def mae_checkpoint_info(checkpoint) -> tuple[dict, str, int, dict]:
    """(state dict, MAE config name, pretraining img_size, constructor overrides) of an MAE checkpoint."""
    obj = mae._read_checkpoint(checkpoint)
    state = mae._unwrap(obj, checkpoint)
    params = obj.get("params") if isinstance(obj.get("params"), dict) else {}
    name = params.get("model") or mae._infer_config(state, checkpoint)
    if name not in mae.CONFIGS:
        raise UsfmaeError(f"checkpoint {checkpoint} names MAE config {name!r}; valid: {', '.join(mae.CONFIGS)}")
    overrides = dict(params.get("model_overrides") or {}) if name == params.get("model") else {}
    patch = overrides.get("patch_size", mae.CONFIGS[name]["patch_size"])
    if not params.get("img_size") and "pos_embed" not in state:
        raise UsfmaeError(f"checkpoint {checkpoint}: not an MAE checkpoint: no pos_embed to read its image size "
                          "from; pass an MAE checkpoint (notebook 03's checkpoint-last.pth or the released weights)")
    size = params.get("img_size") or mae._grid_of(state["pos_embed"]) * patch
    return state, name, int(size), overrides


def mae_vit(config: str, num_classes: int, img_size: int, pool: str = "token", overrides: dict | None = None):
    """timm VisionTransformer with the encoder dims of a named MAE config (+ the checkpoint's
    constructor overrides); LayerNorm eps 1e-6 and qkv bias, as the MAE encoder."""
    import timm.models.vision_transformer as tvit
    if pool not in ("token", "avg"):
        raise UsfmaeError(f"pool must be 'token' or 'avg', got {pool!r}")
    cfg = {**mae.CONFIGS[config], **(overrides or {})}
    return tvit.VisionTransformer(img_size=img_size, patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                                  depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                                  qkv_bias=True, num_classes=num_classes, global_pool=pool)


def load_mae_encoder(model: nn.Module, checkpoint) -> nn.Module:
    """Copy the MAE encoder of `checkpoint` into a timm VisionTransformer; only the new head
    (head.*) may stay missing, any other missing or unexpected key is an error."""
    state = mae.encoder_state_dict(mae.load_checkpoint(checkpoint))
    state = mae.interpolate_pos_embed(state, model)  # another img_size: bicubic, as the reference
    if isinstance(model.fc_norm, nn.LayerNorm):  # global average pooling: norm after the pool
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    wrong = _shape_mismatches(model, state)
    if wrong:
        raise UsfmaeError(f"{checkpoint}: the MAE encoder does not fit the classifier (wrong shapes: "
                          f"{'; '.join(wrong[:3])}); pass the checkpoint's own config")
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - {"head.weight", "head.bias"}
    if missing or result.unexpected_keys:
        raise UsfmaeError(f"{checkpoint}: the MAE encoder does not fit the classifier (missing "
                          f"{sorted(missing)[:4]}, unexpected {sorted(result.unexpected_keys)[:4]}); "
                          "pass the checkpoint's own config")
    return model


def _shape_mismatches(model: nn.Module, state: dict) -> list[str]:
    """'key: file [..], model [..]' for every tensor of `state` the model holds in another shape."""
    expected = model.state_dict()
    return [f"{k}: file {list(v.shape)}, model {list(expected[k].shape)}" for k, v in sorted(state.items())
            if k in expected and v.shape != expected[k].shape]


class MissingWeights(UsfmaeError):
    """A baseline's ImageNet weights are not available and missing_weights="skip" was asked for."""


@dataclass(frozen=True)
class InputStats:
    """How a model's inputs are normalised, as its weights were trained: (x / 255 - mean) / std per
    channel. interpolation and crop_pct are the tag's, for the record only: images here are squashed to a
    square with cv2.INTER_AREA (read_image), as the paper resizes them, never centre-cropped."""
    mean: tuple
    std: tuple
    source: str
    interpolation: str = ""
    crop_pct: float | None = None


IMAGENET_STATS = InputStats(IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std (the paper's, section 2.2)")
STATS_ATTR = "usfmae_input_stats"  # the model attribute build_classifier sets


def input_stats(model: nn.Module) -> InputStats:
    """The statistics `model` is fed (set by build_classifier); ImageNet's for a model built elsewhere."""
    return getattr(model, STATS_ATTR, None) or IMAGENET_STATS


def set_input_stats(model: nn.Module, stats: InputStats) -> nn.Module:
    """Attach the input statistics to the model (in place): normalise/train/predict/features read them."""
    setattr(model, STATS_ATTR, stats)  # a plain attribute: not a parameter, not in the state dict
    return model


def _pretrained_cfg(timm_name: str):
    import timm
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise UsfmaeError(f"timm {timm.__version__} knows no pretrained weights {timm_name!r}; "
                          f"pick one of timm.list_pretrained({timm_name.partition('.')[0] + '*'!r})")
    return cfg


def timm_tag(timm_name: str) -> str:
    """'arch.tag' of the weights timm resolves `timm_name` to (an untagged name gets timm's default tag)."""
    cfg = _pretrained_cfg(timm_name)
    arch = timm_name.partition(".")[0]
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def in1k_only(timm_name: str) -> bool:
    """True for weights trained on ImageNet-1k alone (tag ends in in1k, no in21k/in12k or fine-tune step)."""
    parts = (_pretrained_cfg(timm_name).tag or "").split("_")
    return parts[-1] == "in1k" and "ft" not in parts and not {"in21k", "in22k", "in12k"} & set(parts)


def _weights_label(timm_name: str) -> str:
    return "imagenet-1k" if in1k_only(timm_name) else "imagenet"


def tag_input_stats(timm_name: str) -> InputStats:
    """The mean/std (and interpolation, crop) in the pretrained_cfg of the exact tag `timm_name`."""
    cfg = _pretrained_cfg(timm_name)
    return InputStats(tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std),
                      f"pretrained_cfg of {timm_tag(timm_name)}", cfg.interpolation or "", cfg.crop_pct)


def _hub_repo(timm_name: str) -> str:
    """The Hugging Face repo of the tag's weights ('' when timm names none)."""
    cfg = _pretrained_cfg(timm_name)
    repo = (getattr(cfg, "hf_hub_id", None) or "").partition("@")[0]
    if repo.endswith("/"):  # timm's shorthand "timm/" + model name
        repo += timm_tag(timm_name)
    return repo


def find_imagenet_weights(timm_name: str) -> Path | None:
    """The file of the tag's weights already in the Hugging Face cache, in its layout
    (hub/models--timm--<arch>.<tag>/snapshots/<rev>/model.safetensors); never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import try_to_load_from_cache
    repo = _hub_repo(timm_name)
    if not repo:
        return None
    extra = getattr(_pretrained_cfg(timm_name), "hf_hub_filename", None)
    for filename in ("model.safetensors", "pytorch_model.bin", *([extra] if extra else [])):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str) and Path(hit).is_file():  # a link to a deleted blob is no file
            return Path(hit)
    return None


def imagenet_weights_available(model_name: str, weights=None) -> bool:
    """Whether build_classifier would start `model_name` from the weights it is meant to have: always
    for usf-mae, scratch and ultrasam (no ImageNet weights involved: their checkpoint is required
    elsewhere); for a timm baseline, a given `weights` file exists or the cache holds its tag's file."""
    if model_name in ("usf-mae", "scratch", "ultrasam"):
        return True
    if model_name not in TIMM_NAMES:
        raise UsfmaeError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    if weights:
        return Path(weights).is_file()
    return find_imagenet_weights(TIMM_NAMES[model_name]) is not None


def input_size(model_name: str, requested: int = 0, checkpoint=None) -> int:
    """The input side: `requested` when > 0, else the model's own: the MAE checkpoint's pretraining size
    for usf-mae and scratch (224, the paper's, for scratch without a checkpoint), the tag's
    pretrained_cfg input_size for vit-b / resnet-50 / vgg-19, and 224 for ultrasam (SAM's native 1024 is
    ~20x the compute; the paper resizes every image to 224: pass requested=1024 for SAM's own)."""
    if requested and requested > 0:
        return int(requested)
    if model_name in ("usf-mae", "scratch"):
        if checkpoint:
            return mae_checkpoint_info(checkpoint)[2]
        if model_name == "usf-mae":
            raise UsfmaeError("model usf-mae needs --checkpoint (its input size is the checkpoint's)")
        return PAPER_IMG_SIZE
    if model_name == "ultrasam":
        return PAPER_IMG_SIZE
    if model_name not in TIMM_NAMES:
        raise UsfmaeError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    return int(_pretrained_cfg(TIMM_NAMES[model_name]).input_size[-1])


def _resize_sam_state(state: dict, model: nn.Module) -> dict:
    """SAM tables are sized for 1024 px: resample pos_embed [1, H, W, C] and the global blocks'
    relative position tables [2G-1, C] to the model's grid (linear, as SAM's get_rel_pos does)."""
    from timm.layers import resample_abs_pos_embed_nhwc
    target = model.state_dict()
    out = {}
    for k, v in state.items():
        if k in target and v.shape != target[k].shape:
            if k == "pos_embed":
                v = resample_abs_pos_embed_nhwc(v.float(), list(target[k].shape[1:3]))
            elif k.endswith(("rel_pos_h", "rel_pos_w")):
                v = F.interpolate(v.float().T[None], size=target[k].shape[0], mode="linear")[0].T
        out[k] = v
    return out


def load_sam_encoder(model: nn.Module, checkpoint) -> nn.Module:
    """Load a SAM ViT-B image encoder into timm's samvit_base_patch16. Key layouts read:
    timm (blocks.*, neck.*), original SAM (image_encoder.*, mlp.lin1/2) and mmdet/mmpretrain, the
    format of the released UltraSam.pth (backbone.patch_embed.projection, backbone.layers.N.ln1/ln2,
    attn.*, ffn.layers.0.0 / ffn.layers.1, backbone.neck.*). Everything but the head must load."""
    raw = mae._read_checkpoint(checkpoint, fix="pass the UltraSam weights (UltraSam.pth) or a SAM ViT-B checkpoint")
    state = raw.get("state_dict") if isinstance(raw.get("state_dict"), dict) else mae._unwrap(raw, checkpoint)
    state = {(k[4:] if k.startswith("sam.") else k): v for k, v in state.items()}
    renamed = {}
    for k, v in state.items():
        if k.startswith("image_encoder."):  # original SAM
            k = k[len("image_encoder."):].replace("mlp.lin", "mlp.fc")
        elif k.startswith("backbone."):  # mmdet / mmpretrain (UltraSam)
            k = (k[len("backbone."):].replace("patch_embed.projection", "patch_embed.proj")
                 .replace("layers.", "blocks.", 1).replace(".ln1.", ".norm1.").replace(".ln2.", ".norm2.")
                 .replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2."))
        elif not k.startswith(("blocks.", "patch_embed.", "pos_embed", "neck.")):
            continue  # prompt encoder, mask decoder, optimiser...
        renamed[k] = v
    renamed = _resize_sam_state(renamed, model)
    wrong = _shape_mismatches(model, renamed)
    if wrong:  # e.g. a SAM ViT-L or ViT-H checkpoint
        raise UsfmaeError(f"{checkpoint}: not a SAM ViT-B image encoder: {len(wrong)} tensors have other shapes "
                          f"({'; '.join(wrong[:3])}); pass the UltraSam weights or a SAM ViT-B checkpoint")
    result = model.load_state_dict(renamed, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys or not renamed:
        raise UsfmaeError(f"{checkpoint}: not a SAM ViT-B image encoder in a layout this loader reads "
                          f"(missing {missing[:4]}, unexpected {list(result.unexpected_keys)[:4]}); "
                          "see usfmae_lib.finetune.load_sam_encoder for the supported key layouts")
    return model


def build_classifier(name: str, num_classes: int, img_size: int, checkpoint=None, weights=None,
                     pool: str = "token", mae_config: str | None = None,
                     missing_weights: str = "random") -> tuple[nn.Module, str, str]:
    """(model, init, weights_id). `init` says where the weights came from, for every results row:
    "usf-mae: <checkpoint>", "random (scratch control, <config>)", "imagenet-1k <tag> (file: ...)",
    "imagenet-1k <tag> (timm cache: ...)", "random: no ImageNet weights found (<tag>)",
    "ultrasam: <checkpoint>". The model carries its input statistics (input_stats(model)): ImageNet
    mean/std for usf-mae and scratch (the paper's), the tag's pretrained_cfg mean/std for a timm baseline,
    SAM's (ImageNet's) for ultrasam. A baseline without weights: missing_weights="random" trains it from
    random init, loudly; "skip" raises MissingWeights."""
    import timm
    if missing_weights not in MISSING_WEIGHTS:
        raise UsfmaeError(f"missing_weights must be one of {', '.join(MISSING_WEIGHTS)}, got {missing_weights!r}")
    if name in ("usf-mae", "scratch"):
        if name == "usf-mae" and not checkpoint:
            raise UsfmaeError("model usf-mae needs --checkpoint (an MAE checkpoint from notebook 03, e.g. "
                              "OUT/03_mae_pretraining/checkpoints/checkpoint-last.pth)")
        config, overrides = (mae_checkpoint_info(checkpoint)[1::2] if checkpoint
                             else (mae_config or mae.CPU_CONFIG, {}))
        model = set_input_stats(mae_vit(config, num_classes, img_size, pool, overrides), IMAGENET_STATS)
        if name == "scratch":
            changed = "".join(f", {k}={v}" for k, v in sorted(overrides.items()))  # e.g. the quick profile's depth=6
            return model, f"random (scratch control, {config}{changed})", f"random:{config}"
        return load_mae_encoder(model, checkpoint), f"usf-mae: {checkpoint}", _file_id(checkpoint)
    if name not in TIMM_NAMES:
        raise UsfmaeError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    timm_name = TIMM_NAMES[name]
    stats = tag_input_stats(timm_name)
    kwargs = dict(num_classes=num_classes)
    if name in ("vit-b", "ultrasam"):
        kwargs["img_size"] = img_size
    if name == "vit-b":
        kwargs["global_pool"] = pool
    if name == "ultrasam":
        if not checkpoint:
            raise UsfmaeError("model ultrasam needs --checkpoint: the UltraSam weights (UltraSam.pth from "
                              "github.com/CAMMA-public/UltraSam, saved as a plain state dict) or any SAM ViT-B "
                              "checkpoint; no public copy is fetched")
        model = set_input_stats(timm.create_model(timm_name, **kwargs), stats)  # SAM's pixel mean/std: ImageNet's
        return load_sam_encoder(model, checkpoint), f"ultrasam: {checkpoint}", _file_id(checkpoint)
    tag = timm_tag(timm_name)
    source = Path(weights) if weights else find_imagenet_weights(timm_name)
    if weights and not source.is_file():
        raise UsfmaeError(f"ImageNet weights file {weights} for {name} does not exist; fix the path or leave it "
                          f"empty (it must hold {_expected_imagenet_file(timm_name)})")
    if source is None:
        where = f"no --weights file, and not in the Hugging Face cache as {_hub_repo(timm_name) or 'any repo'}"
        if missing_weights == "skip":
            raise MissingWeights(f"{name}: no ImageNet weights {tag}: {where}; skipped (missing_weights='skip')")
        warn(f"{name}: no ImageNet weights {tag}: {where}; starting from RANDOM weights (init column says so); "
             f"pass {_expected_imagenet_file(timm_name)} as --weights, or skip missing baselines")
        model = set_input_stats(timm.create_model(timm_name, **kwargs), stats)
        return model, f"random: no ImageNet weights found ({tag})", f"random:{tag}"
    model = _timm_with_imagenet_weights(name, timm_name, source, from_cache=not weights, **kwargs)
    kind = f"file: {source}, taken to hold {tag}" if weights else f"timm cache: {source}"
    return set_input_stats(model, stats), f"{_weights_label(timm_name)} {tag} ({kind})", f"{tag}:{_file_id(source)}"


def _expected_imagenet_file(timm_name: str) -> str:
    """What an ImageNet weights file for `timm_name` is, for messages: the exact tag and its Hugging Face repo."""
    repo = _hub_repo(timm_name)
    data = "ImageNet-1k" if in1k_only(timm_name) else "ImageNet"
    return (f"timm's {timm_tag(timm_name)} {data} weights"
            + (f" (model.safetensors of Hugging Face {repo})" if repo else ""))


def _timm_with_imagenet_weights(name: str, timm_name: str, source: Path, from_cache: bool, **kwargs) -> nn.Module:
    """timm's model with the ImageNet weights of `source`, read safely (mae._read_checkpoint) and
    passed to timm as a state dict (so its filters still resize position tables and drop the 1000-class
    head). A file that is unreadable, or whose tensors do not become the model's, is an error naming
    the keys and the file it should be."""
    import logging

    import timm
    expected = _expected_imagenet_file(timm_name)
    fix = (f"delete it from the Hugging Face cache and download {expected} again" if from_cache
           else f"--weights for {name} must be {expected} (read as that tag's weights, fed its input statistics)")
    raw = mae._read_checkpoint(source, fix=fix)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # the wrappers timm reads
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in raw.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsfmaeError(f"ImageNet weights {source} hold no state dict of tensors (keys: "
                          f"{', '.join(map(str, list(raw)[:6]))}); {fix}")
    # timm would log every unexpected key of a foreign file; the check below reports what matters
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state)),
                                  **kwargs)
    except (RuntimeError, KeyError, ValueError, IndexError) as err:  # size mismatch, or a filter choking on the file
        fresh = timm.create_model(timm_name, **kwargs)
        raise UsfmaeError(_weights_mismatch(source, name, fresh, state, fix, err)) from err
    finally:
        builder_log.setLevel(level)
    if _unloaded_keys(model, state):  # timm loads non-strictly once the head differs: check every tensor arrived
        raise UsfmaeError(_weights_mismatch(source, name, model, state, fix))
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or "head"
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _unloaded_keys(model: nn.Module, state: dict) -> list[str]:
    """Model tensors (not the new head) that did not come from `state`: absent by name, and not a
    renamed or reshaped copy of a file tensor (as timm's filters make, e.g. VGG's pre_logits)."""
    by_numel = {}
    for v in state.values():
        by_numel.setdefault(v.numel(), []).append(v)
    unloaded = []
    for k, v in model.state_dict().items():
        if k in state or k.startswith(_classifier_prefixes(model)) or k.endswith("num_batches_tracked"):
            continue
        if not any(torch.equal(v.flatten().cpu(), f.flatten().to(v.dtype)) for f in by_numel.get(v.numel(), [])):
            unloaded.append(k)
    return unloaded


def _weights_mismatch(source: Path, name: str, model: nn.Module, state: dict, fix: str, err=None) -> str:
    """The message for ImageNet weights that do not fit: which keys are missing, extra, or of other shapes."""
    expected = model.state_dict()
    head = _classifier_prefixes(model)
    missing = _unloaded_keys(model, state)
    unexpected = [k for k in state if k not in expected and not k.startswith(head)]
    wrong = [w for w in _shape_mismatches(model, state) if not w.startswith(head) and "pos_embed" not in w]
    lines = [f"ImageNet weights {source} do not fit {name} ({model.pretrained_cfg.get('architecture')}):"]
    if missing:
        lines.append(f"  model tensors not in the file: {mae._describe(missing)}")
    if unexpected:
        lines.append(f"  file tensors the model lacks: {mae._describe(unexpected)}")
    if wrong:
        lines.append(f"  wrong shapes: {len(wrong)} (e.g. {wrong[0]})")
    if err is not None and not (missing or unexpected or wrong):
        lines.append(f"  timm: {(str(err).strip().splitlines() or [''])[0][:300]}")
    lines.append(f"  fix: {fix}")
    return "\n".join(lines)


def add_head_norm(model: nn.Module) -> nn.Module:
    """Put BatchNorm1d(affine=False) in front of the classifier of a timm model (in place).

    MAE features share a large image-independent component: on the quick checkpoint the cls token
    varies ~1% as much across images as across channels, so a plain linear head sees a near-constant
    input, its gradient mostly moves the bias, and the encoder gets gradients ~30x smaller than a
    random-init one. Standardising each feature over the batch (what MAE's linear probe does, and
    what the logistic-regression probe here does with its scaler) lets the head see the differences."""
    name = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    *parents, leaf = name.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    head = getattr(owner, leaf)
    if not isinstance(head, nn.Linear):
        raise UsfmaeError(f"head_norm needs a linear classifier at {name!r}, found {type(head).__name__}")
    setattr(owner, leaf, nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head))
    return model


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
def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _in_batches(model, images: torch.Tensor, device, batch_size: int, fn) -> torch.Tensor:
    """fn(model, normalised batch) over images in eval mode, under autocast; float32 on the CPU.
    Batches are normalised with the model's own input statistics (input_stats(model))."""
    model.eval()
    stats = input_stats(model)
    out = []
    for i in range(0, len(images), batch_size):
        with _autocast(device):
            out.append(fn(model, normalise(images[i:i + batch_size], device, stats)).float().cpu())
    return torch.cat(out)


def predict(model, images: torch.Tensor, device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities [N, C] (float64) of uint8 images, normalised with the model's input statistics."""
    logits = _in_batches(model, images, device, batch_size, lambda m, x: m(x))
    return F.softmax(logits, 1).double().numpy()


def features(model, images: torch.Tensor, device, batch_size: int = 128) -> np.ndarray:
    """Pooled features [N, D] of a classifier's trunk (its head bypassed), inputs normalised with the
    model's input statistics."""
    pooled = _in_batches(model, images, device, batch_size,
                         lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True).flatten(1))
    return pooled.numpy()


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """lr multiplier: linear warmup, then half-cycle cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
          positive: int | None = None, log=print) -> dict:
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
        optimiser, lambda s: warmup_cosine(s, total, max(1, int(cfg.warmup_fraction * total))))
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
            with _autocast(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=cfg.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
        if validate:
            prob = predict(model, data.images["val"], device)
            val = classification_metrics(y_val, prob, positive)
            val["loss"] = float(F.nll_loss(torch.log(torch.from_numpy(prob).clamp_min(1e-12)), data.labels["val"]))
        else:  # no validation set: nothing to score, the last epoch is kept (below)
            val = dict.fromkeys((*SELECT_ON, "roc_auc"), float("nan"))
        val_loss = val["loss"]
        history.append(dict(epoch=epoch, train_loss=float(np.mean(losses)), val_loss=val_loss, val_f1=val["f1"],
                            val_balanced_accuracy=val["balanced_accuracy"], val_roc_auc=val["roc_auc"],
                            steps=step, seconds=time.time() - t0))
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
                steps_run=step)


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


def _score_and_save(directory: Path, identity: dict, row: dict, data: Data, prob: np.ndarray,
                    n_bootstrap: int, seed: int) -> dict:
    """Test metrics with bootstrap intervals; predictions then metrics.json (last = finished)."""
    split = data.split
    y = data.labels["test"].numpy()
    ci = bootstrap_intervals(y, prob, split.positive, n_resamples=n_bootstrap, seed=seed)
    for metric, r in ci.iterrows():
        row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = r["value"], r["low"], r["high"]
    directory.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({"path": split.test["path"].to_numpy(), "label": y, "pred": prob.argmax(1)})
    for c, name in enumerate(split.classes):
        preds[f"prob_{name}"] = prob[:, c]
    atomic_write_text(directory / "test_predictions.csv", preds.to_csv(index=False))
    atomic_write_text(directory / "metrics.json", json.dumps(dict(identity=identity, row=row), indent=1, default=float))
    _trained_here.add(directory)
    return row


def finetune_run(data: Data, model_name: str, cfg: TrainConfig, seed: int, runs, fraction: float = 1.0,
                 checkpoint=None, weights=None, mae_config=None, device="auto", n_bootstrap: int = 1000,
                 log=print, run_name: str | None = None) -> dict:
    """One fine-tuning run (resumable): returns its results row (also in metrics.json). run_name: the
    run folder's model name when one model has several starts (USF-MAE from each pretraining run:
    "usf-mae", "usf-mae-seed1", ...); the row's model stays model_name."""
    split = data.split
    cfg = TrainConfig(**{**asdict(cfg), "img_size": data.img_size})
    directory = run_dir(runs, split.dataset, split.fold, run_name or model_name, "finetune", cfg.tag(), seed, fraction,
                        split.images, has_validation(data))
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    weights_id = (_file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights))
    identity = dict(config=cfg.identity(), split=split.split, n=[len(df) for df in split.parts().values()],
                    tag=TIMM_NAMES.get(model_name),  # the weights' tag sets the input statistics
                    weights=weights_id, mae_config=mae_config if model_name == "scratch" else None,
                    n_bootstrap=n_bootstrap)
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as stored
    done = _finished(directory, identity)
    if done:
        if log and directory not in _trained_here:
            log(f"already finished, reused: {directory}")
        return done["row"]
    torch.manual_seed(seed)  # the head's (and scratch models') init
    model, init, _ = build_classifier(model_name, len(split.classes), data.img_size, ckpt, weights, cfg.pool, mae_config)
    if cfg.head_norm:
        add_head_norm(model)
    index = subsample_labels(data.labels["train"], fraction, seed)
    if log:
        log(f"{split.dataset} {model_name} {cfg.tag()} seed {seed} fraction {fraction:g}: "
            f"{len(index)} training images; init {init}")
    t0 = time.time()
    result = train(model, data, cfg, seed, index, device, split.positive, log)
    device_ = next(model.parameters()).device
    prob = predict(model, data.images["test"], device_)
    row = dict(dataset=split.dataset, fold=split.fold, split=split.split, images=split.images, model=model_name,
               mode="finetune", init=init,
               seed=seed,
               fraction=fraction, n_classes=len(split.classes), n_train=len(index), n_val=len(split.val),
               n_test=len(split.test),
               img_size=data.img_size, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
               epochs=cfg.epochs, pool=cfg.pool, epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
               max_steps=cfg.max_steps, min_steps=cfg.min_steps, steps_run=result["steps_run"],
               select_on=cfg.select_on, **{f"val_{k}": result["best_val"][k] for k in SELECT_ON},  # select_config's
               train_seconds=time.time() - t0, run=directory.relative_to(runs).as_posix())
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result["history"]).to_csv(directory / "history.csv", index=False)
    return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed)


def linear_probe(data: Data, model_name: str, seed: int, runs, checkpoint=None, weights=None, mae_config=None,
                 pool: str = "token", device="auto", n_bootstrap: int = 1000, cs=(0.01, 0.1, 1.0, 10.0),
                 log=print, run_name: str | None = None) -> dict:
    """Frozen encoder -> features -> LogisticRegression (C picked on validation F1; without a validation
    part, the first C of `cs`: fit_probe); resumable. run_name: as finetune_run's."""
    split = data.split
    tag = f"C{'-'.join(f'{c:g}' for c in cs)}_px{data.img_size}_{pool}"
    directory = run_dir(runs, split.dataset, split.fold, run_name or model_name, "probe", tag, seed, 1.0, split.images,
                        has_validation(data))
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    identity = dict(split=split.split, n=[len(df) for df in split.parts().values()], n_bootstrap=n_bootstrap,
                    tag=TIMM_NAMES.get(model_name),
                    weights=(_file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights)))
    done = _finished(directory, identity)
    if done:
        if log and directory not in _trained_here:
            log(f"already finished, reused: {directory}")
        return done["row"]
    device = pick_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    model, init, _ = build_classifier(model_name, len(split.classes), data.img_size, ckpt, weights, pool, mae_config)
    model.to(device)
    parts = ("train", "val", "test") if has_validation(data) else ("train", "test")
    feats = {part: features(model, data.images[part], device) for part in parts}
    y = {part: data.labels[part].numpy() for part in feats}
    val_f1, c, clf = fit_probe(feats["train"], y["train"], feats.get("val"), y.get("val"), len(split.classes),
                               split.positive, seed, cs)
    prob = _full_proba(clf, feats["test"], len(split.classes))
    if log:
        chosen = f"val f1 {val_f1:.3f}" if has_validation(data) else "the first of its grid: no validation set"
        log(f"{split.dataset} {model_name} linear probe: C={c:g}, {chosen}; init {init}")
    row = dict(dataset=split.dataset, fold=split.fold, split=split.split, images=split.images, model=model_name,
               mode="probe", init=init,
               seed=seed,
               fraction=1.0, n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
               img_size=data.img_size, probe_C=c, pool=pool, val_f1=val_f1, run=directory.relative_to(runs).as_posix())
    return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed)


def fit_probe(train_x, train_y, val_x, val_y, n_classes: int, positive, seed: int,
              cs=(0.01, 0.1, 1.0, 10.0)) -> tuple[float, float, object]:
    """(validation F1, C, fitted pipeline) of the logistic regression on standardised features whose
    C (of `cs`) scores the best validation F1: the linear probe of notebooks 05 and 07. Without
    validation features (None or none: MMOTU-2D under mmotu_selection="all") nothing can pick C: the
    first of `cs`, as the sweep takes the first config of its grid (fixed_schedule); F1 NaN."""
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
        f1 = classification_metrics(val_y, _full_proba(clf, val_x, n_classes), positive)["f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    return best


def _full_proba(clf, x, n_classes) -> np.ndarray:
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


def resolve_root(dataset: str, root=None, out_dir=None) -> Path:
    """The dataset root: `root` if given, else the synthetic twin written by notebook 01."""
    if root:
        return Path(root)
    from .synthetic import tree_dir

    synthetic = tree_dir(out_dir)
    if dataset not in SYNTHETIC_FOLDERS:
        raise UsfmaeError(f"dataset {dataset!r} has no synthetic twin; pass its root")
    path = synthetic / SYNTHETIC_FOLDERS[dataset]
    if not path.exists():
        raise UsfmaeError(f"{path} not found: run notebook 01 (curation, which writes the synthetic tree) "
                          f"for this out_dir first, or pass data_root / --root")
    return path


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
    from . import runner

    runner.add_step_options(p, "05_finetuning")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    from . import runner
    from .datasets import official_folds
    from .results import add_replicates, fold_summary
    from .safety import check_output

    if runner.step_mode(args):
        return runner.run_step_cli(args, "05_finetuning")
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
              n_bootstrap=args.bootstrap)
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
