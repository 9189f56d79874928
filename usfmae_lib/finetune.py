"""Fine-tuning and evaluation: one cell of Table 2 per call (`usfmae finetune`), the grid in notebook 05.

    usfmae finetune --dataset bus-bra --root data/BUSBRA --model usf-mae \\
        --checkpoint outputs/quick/03_mae_pretraining/checkpoints/checkpoint-last.pth --out runs

Models (`build_classifier`), all timm:
    usf-mae    timm VisionTransformer with the MAE config's dims, encoder weights from the MAE
               checkpoint (strict: only the new head may be missing); cls token -> head as in the
               paper, or global average pooling (pool="avg": the encoder's final norm becomes fc_norm)
    scratch    the same architecture, random init: the control that says what pretraining adds
    vit-b      vit_base_patch16_224        resnet-50  resnet50
    vgg-19     vgg19_bn (batch norm: VGG-19 without it rarely trains from random init with AdamW
               at these learning rates, which would make a random-init baseline look worse than it is)
    ultrasam   samvit_base_patch16 (SAM ViT-B image encoder + neck) from a user-supplied UltraSam or
               SAM checkpoint; see load_sam_encoder for the key layouts read
ImageNet weights come from a local file (`weights=`) or timm's Hugging Face cache (looked up offline);
otherwise the model starts from random weights, a warning is printed, and the `init` column says so.

Data: every image of a split is decoded and resized once (cv2.INTER_AREA, squashed to a square as the
paper does) into a uint8 cache [N, 3, S, S]; training batches are augmented per sample (rotation
0-90 deg, flips, resized crop) by the pretraining step's batched affine resample (store.augment_batch)
on the training device, and ImageNet-normalised.
Training: AdamW (no decay on biases and norms; optional layer-wise lr decay), linear warmup then cosine per
step, early stopping on a validation score (balanced accuracy by default: positive-class F1 rewards calling
everything positive) with the best weights kept, bf16 autocast on CUDA. `head_norm` puts MAE's linear-probe
BatchNorm in front of the head (see add_head_norm for why the quick checkpoint needs it). The seed sets
init, data order and augmentation. Every run writes RUNS/<dataset>/<model>/<mode>/<config>/seed<k>_frac<f>/{metrics.json,
test_predictions.csv} atomically (metrics.json last) and is skipped when present with the same config.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UsfmaeError, atomic_write_text, mae
from .datasets import SYNTHETIC_FOLDERS, Split, load_split
from .metrics import bootstrap_intervals, classification_metrics
from .store import N_AUG, AugmentConfig, augment_batch

MODELS = ("usf-mae", "scratch", "vit-b", "resnet-50", "vgg-19", "ultrasam")
TIMM_NAMES = {"vit-b": "vit_base_patch16_224", "resnet-50": "resnet50", "vgg-19": "vgg19_bn",
              "ultrasam": "samvit_base_patch16"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the paper's baseline sweep (STUDY.md section 5)
SWEEP = dict(lr=[3e-4, 1e-3], weight_decay=[0.01, 0.001], batch_size=[32, 64])
LABEL_FRACTIONS = (0.01, 0.1, 0.25, 1.0)
# Validation scores that can pick the epoch (early stopping) and the sweep's config. F1 of the positive
# class rewards a predictor that calls everything positive (F1 = 2p / (1 + p) at prevalence p), which a
# barely trained model is; balanced accuracy gives that 0.5 and the loss is smooth on small val sets.
SELECT_ON = ("f1", "balanced_accuracy", "loss")


def warn(message: str):
    """A visible line in notebooks and logs (no silent fallbacks)."""
    print(f"WARNING: {message}", flush=True)


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

    def __post_init__(self):
        if self.select_on not in SELECT_ON:
            raise UsfmaeError(f"select_on must be one of {', '.join(SELECT_ON)}, got {self.select_on!r}")

    def tag(self) -> str:
        """Folder name of the knobs that differ between runs of a sweep."""
        return (f"lr{self.lr:g}_wd{self.weight_decay:g}_bs{self.batch_size}_ep{self.epochs}_px{self.img_size}_{self.pool}"
                + (f"_ld{self.layer_decay:g}" if self.layer_decay != 1 else "")
                + (f"_sel-{self.select_on}" if self.select_on != "balanced_accuracy" else "")
                + ("_bnhead" if self.head_norm else ""))

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


def find_imagenet_weights(timm_name: str) -> Path | None:
    """A file of timm's ImageNet weights already in the Hugging Face cache (never downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    from huggingface_hub import try_to_load_from_cache
    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        return None
    repo, _, _rev = hub_id.partition("@")
    if repo.endswith("/"):  # timm's shorthand "timm/" + model name
        repo = repo + f"{timm_name}.{cfg.tag}" if cfg.tag else repo + timm_name
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str) and Path(hit).is_file():  # a link to a deleted blob is no file
            return Path(hit)
    return None


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
                     pool: str = "token", mae_config: str | None = None) -> tuple[nn.Module, str, str]:
    """(model, init, weights_id). `init` says where the weights came from, for every results row:
    "usf-mae: <checkpoint>", "random (scratch control)", "imagenet (file: ...)",
    "imagenet (timm cache: ...)", "random: no ImageNet weights found", "ultrasam: <checkpoint>"."""
    import timm
    if name in ("usf-mae", "scratch"):
        if name == "usf-mae" and not checkpoint:
            raise UsfmaeError("model usf-mae needs --checkpoint (an MAE checkpoint from notebook 03, e.g. "
                              "OUT/03_mae_pretraining/checkpoints/checkpoint-last.pth)")
        config, overrides = (mae_checkpoint_info(checkpoint)[1::2] if checkpoint
                             else (mae_config or mae.CPU_CONFIG, {}))
        model = mae_vit(config, num_classes, img_size, pool, overrides)
        if name == "scratch":
            return model, f"random (scratch control, {config})", f"random:{config}"
        return load_mae_encoder(model, checkpoint), f"usf-mae: {checkpoint}", _file_id(checkpoint)
    if name not in TIMM_NAMES:
        raise UsfmaeError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    timm_name = TIMM_NAMES[name]
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
        model = timm.create_model(timm_name, **kwargs)
        return load_sam_encoder(model, checkpoint), f"ultrasam: {checkpoint}", _file_id(checkpoint)
    source = Path(weights) if weights else find_imagenet_weights(timm_name)
    if weights and not source.is_file():
        raise UsfmaeError(f"ImageNet weights file {weights} for {name} does not exist; fix the path or leave it empty")
    if source is None:
        warn(f"{name}: no ImageNet weights ({timm_name}) given or in the Hugging Face cache; "
             "starting from RANDOM weights (init column says so)")
        return timm.create_model(timm_name, **kwargs), "random: no ImageNet weights found", f"random:{timm_name}"
    model = _timm_with_imagenet_weights(name, timm_name, source, from_cache=not weights, **kwargs)
    kind = "file" if weights else "timm cache"
    return model, f"imagenet ({kind}: {source})", _file_id(source)


def _expected_imagenet_file(timm_name: str) -> str:
    """What an ImageNet weights file for `timm_name` is, for messages: timm's Hugging Face repo and tag."""
    import timm
    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = (getattr(cfg, "hf_hub_id", None) or "").partition("@")[0] if cfg else ""
    if repo.endswith("/"):  # timm's shorthand "timm/" + model name, as find_imagenet_weights reads it
        repo += f"{timm_name}.{cfg.tag}" if cfg.tag else timm_name
    return f"timm's {timm_name} ImageNet weights" + (f" (model.safetensors of Hugging Face {repo})" if repo else "")


def _timm_with_imagenet_weights(name: str, timm_name: str, source: Path, from_cache: bool, **kwargs) -> nn.Module:
    """timm's model with the ImageNet weights of `source`, read safely (mae._read_checkpoint) and
    passed to timm as a state dict (so its filters still resize position tables and drop the 1000-class
    head). A file that is unreadable, or whose tensors do not become the model's, is an error naming
    the keys and the file it should be."""
    import logging

    import timm
    expected = _expected_imagenet_file(timm_name)
    fix = (f"delete it from the Hugging Face cache and download {expected} again" if from_cache
           else f"--weights for {name} must be {expected}")
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
    curation or cleaning refuses is refused here, for the same reason), squashed to a square
    with cv2.INTER_AREA."""
    from .curation_readers import Reject, read_image_file

    try:
        rgb = read_image_file(path)
    except Reject as rej:  # never train or score on a half-grey or mis-sized image
        raise UsfmaeError(f"{path}: not a readable image: {rej}; remove or replace the file, "
                          "or take it out of the split") from None
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def load_images(paths, size: int, workers: int = 4) -> torch.Tensor:
    """Decode every image once: uint8 [N, 3, size, size] (cv2 releases the GIL: threads suffice)."""
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


def normalise(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float ImageNet-normalised on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device, non_blocking=True).float() / 255 - mean) / std


# ============================================================================ training
def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _in_batches(model, images: torch.Tensor, device, batch_size: int, fn) -> torch.Tensor:
    """fn(model, normalised batch) over images in eval mode, under autocast; float32 on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        with _autocast(device):
            out.append(fn(model, normalise(images[i:i + batch_size], device)).float().cpu())
    return torch.cat(out)


def predict(model, images: torch.Tensor, device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities [N, C] (float64)."""
    logits = _in_batches(model, images, device, batch_size, lambda m, x: m(x))
    return F.softmax(logits, 1).double().numpy()


def features(model, images: torch.Tensor, device, batch_size: int = 128) -> np.ndarray:
    """Pooled features [N, D] of a classifier's trunk (its head bypassed)."""
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
    epoch with the best validation score (cfg.select_on; ties: lower validation loss). Returns the history."""
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
    total = steps_per_epoch * cfg.epochs
    optimiser = make_optimiser(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: warmup_cosine(s, total, max(1, int(cfg.warmup_fraction * total))))
    augment = make_augment(cfg)
    y_val = data.labels["val"].numpy()
    best = dict(score=-float("inf"), loss=float("inf"), epoch=-1, state=None, val=None)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0, losses = time.time(), []
        perm = torch.randperm(n, generator=order_rng)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            u = torch.rand(len(idx), N_AUG, generator=aug_rng).to(device)  # [B, N_AUG] uniforms
            x = augment_batch(x_train[idx].permute(0, 2, 3, 1), u, augment, cfg.img_size)  # [B, 3, S, S]
            with _autocast(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=cfg.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        prob = predict(model, data.images["val"], device)
        val = classification_metrics(y_val, prob, positive)
        val["loss"] = val_loss = float(F.nll_loss(torch.log(torch.from_numpy(prob).clamp_min(1e-12)), data.labels["val"]))
        history.append(dict(epoch=epoch, train_loss=float(np.mean(losses)), val_loss=val_loss, val_f1=val["f1"],
                            val_balanced_accuracy=val["balanced_accuracy"], val_roc_auc=val["roc_auc"],
                            seconds=time.time() - t0))
        score = cfg.score(val)
        if score > best["score"] or (score == best["score"] and val_loss < best["loss"]):
            best = dict(score=score, loss=val_loss, epoch=epoch, val=val,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        if log:
            log(f"  epoch {epoch}: train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}  "
                f"val f1 {val['f1']:.3f}  val bal. acc {val['balanced_accuracy']:.3f}  ({history[-1]['seconds']:.1f} s)")
        if cfg.patience and epoch - best["epoch"] >= cfg.patience:
            break
    model.load_state_dict(best["state"])
    return dict(history=history, best_epoch=best["epoch"], best_val=best["val"], epochs_run=len(history))


# ============================================================================ runs on disk
def run_dir(runs, dataset: str, model: str, mode: str, tag: str, seed: int, fraction: float) -> Path:
    return Path(runs) / dataset / model / mode / tag / f"seed{seed}_frac{fraction:g}"


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
    return row


def finetune_run(data: Data, model_name: str, cfg: TrainConfig, seed: int, runs, fraction: float = 1.0,
                 checkpoint=None, weights=None, mae_config=None, device="auto", n_bootstrap: int = 1000,
                 log=print) -> dict:
    """One fine-tuning run (resumable): returns its results row (also in metrics.json)."""
    split = data.split
    cfg = TrainConfig(**{**asdict(cfg), "img_size": data.img_size})
    directory = run_dir(runs, split.dataset, model_name, "finetune", cfg.tag(), seed, fraction)
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    weights_id = (_file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights))
    identity = dict(config=asdict(cfg), split=split.split, n=[len(df) for df in split.parts().values()],
                    weights=weights_id, mae_config=mae_config if model_name == "scratch" else None,
                    n_bootstrap=n_bootstrap)
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as stored
    done = _finished(directory, identity)
    if done:
        if log:
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
    row = dict(dataset=split.dataset, split=split.split, model=model_name, mode="finetune", init=init, seed=seed,
               fraction=fraction, n_classes=len(split.classes), n_train=len(index), n_val=len(split.val),
               n_test=len(split.test),
               img_size=data.img_size, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
               epochs=cfg.epochs, pool=cfg.pool, epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
               select_on=cfg.select_on, **{f"val_{k}": result["best_val"][k] for k in SELECT_ON},  # select_config's
               train_seconds=time.time() - t0, run=directory.relative_to(runs).as_posix())
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result["history"]).to_csv(directory / "history.csv", index=False)
    return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed)


def linear_probe(data: Data, model_name: str, seed: int, runs, checkpoint=None, weights=None, mae_config=None,
                 pool: str = "token", device="auto", n_bootstrap: int = 1000, cs=(0.01, 0.1, 1.0, 10.0),
                 log=print) -> dict:
    """Frozen encoder -> features -> LogisticRegression (C picked on validation F1); resumable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    split = data.split
    tag = f"C{'-'.join(f'{c:g}' for c in cs)}_px{data.img_size}_{pool}"
    directory = run_dir(runs, split.dataset, model_name, "probe", tag, seed, 1.0)
    ckpt = checkpoint if model_name in ("usf-mae", "ultrasam", "scratch") else None
    identity = dict(split=split.split, n=[len(df) for df in split.parts().values()], n_bootstrap=n_bootstrap,
                    weights=(_file_id(ckpt) if ckpt and Path(ckpt).exists() else None) or (weights and str(weights)))
    done = _finished(directory, identity)
    if done:
        if log:
            log(f"already finished, reused: {directory}")
        return done["row"]
    device = pick_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    model, init, _ = build_classifier(model_name, len(split.classes), data.img_size, ckpt, weights, pool, mae_config)
    model.to(device)
    feats = {part: features(model, data.images[part], device) for part in ("train", "val", "test")}
    y = {part: data.labels[part].numpy() for part in feats}
    best = None
    for c in cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        clf.fit(feats["train"], y["train"])
        prob = _full_proba(clf, feats["val"], len(split.classes))
        f1 = classification_metrics(y["val"], prob, split.positive)["f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    val_f1, c, clf = best
    prob = _full_proba(clf, feats["test"], len(split.classes))
    if log:
        log(f"{split.dataset} {model_name} linear probe: C={c:g}, val f1 {val_f1:.3f}; init {init}")
    row = dict(dataset=split.dataset, split=split.split, model=model_name, mode="probe", init=init, seed=seed,
               fraction=1.0, n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
               img_size=data.img_size, probe_C=c, pool=pool, val_f1=val_f1, run=directory.relative_to(runs).as_posix())
    return _score_and_save(directory, identity, row, data, prob, n_bootstrap, seed)


def _full_proba(clf, x, n_classes) -> np.ndarray:
    """predict_proba over all classes, zeros for classes absent from the training labels."""
    prob = np.zeros((len(x), n_classes))
    prob[:, clf.classes_] = clf.predict_proba(x)
    return prob


def select_config(data: Data, model_name: str, configs: list[TrainConfig], runs, **kw) -> tuple[TrainConfig, pd.DataFrame]:
    """The paper's sweep: every config with seed 0 on all labels; the best validation score wins
    (each config's select_on; ties: the first in grid order). Returns (chosen config, sweep rows)."""
    rows = [finetune_run(data, model_name, cfg, 0, runs, **kw) for cfg in configs]
    table = pd.DataFrame(rows)
    best = int(np.argmax([cfg.score({k: row["val_" + k] for k in SELECT_ON}) for cfg, row in zip(configs, rows)]))
    return TrainConfig(**{**asdict(configs[best]), "img_size": data.img_size}), table


def run_cell(data: Data, model_name: str, configs: list[TrainConfig], runs, n_seeds: int = 3, **kw) -> pd.DataFrame:
    """One cell of Table 2: sweep on validation with seed 0, then n_seeds seeds of the chosen config.
    Returns one row per seed, with `selected` = the chosen config's tag."""
    cfg, sweep = select_config(data, model_name, configs, runs, **kw)
    rows = [finetune_run(data, model_name, cfg, s, runs, **kw) for s in range(n_seeds)]
    out = pd.DataFrame(rows)
    out["selected"] = cfg.tag()
    out["n_configs"] = len(configs)
    return out


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
        "finetune", help="fine-tune and evaluate one model on one dataset (one cell of Table 2)",
        description="Sweep lr x wd x batch on validation with seed 0, then train --seeds seeds of the best "
                    "config and report test metrics with bootstrap 95%% intervals. Runs are resumable: "
                    "RUNS/<dataset>/<model>/... with metrics.json and test_predictions.csv.")
    p.add_argument("--dataset", required=True, choices=["bus-bra", "mmotu-2d", "gist514", "folder"])
    p.add_argument("--root", required=True, help="dataset root (BUSBRA/, OTU_2d/, usd514_jpeg_roi/ or ROOT/<class>/)")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--checkpoint", help="MAE checkpoint (usf-mae; scratch takes its architecture) or UltraSam/SAM checkpoint")
    p.add_argument("--weights", help="local ImageNet weights file for vit-b / resnet-50 / vgg-19")
    p.add_argument("--mae-config", default=None, help=f"scratch without --checkpoint: one of {', '.join(mae.CONFIGS)}")
    p.add_argument("--out", default="finetune_runs", help="folder for runs/ and results.csv (default finetune_runs)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's, else 224)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--lr", type=float, nargs="+", default=SWEEP["lr"])
    p.add_argument("--weight-decay", type=float, nargs="+", default=SWEEP["weight_decay"])
    p.add_argument("--batch-size", type=int, nargs="+", default=SWEEP["batch_size"])
    p.add_argument("--pool", choices=["token", "avg"], default="token")
    p.add_argument("--head-norm", action="store_true",
                   help="BatchNorm (no affine) before the head, as MAE's linear probe (the quick profile uses it)")
    p.add_argument("--select-on", choices=SELECT_ON, default=TrainConfig.select_on,
                   help="validation score that picks the epoch and the sweep's config (default balanced_accuracy)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="ViT layer-wise lr decay (1 = off, the paper)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the chosen config (default 3)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of training labels (default 1)")
    p.add_argument("--probe", action="store_true", help="also a linear probe of the frozen encoder")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--fold", type=int, default=None, help="BUS-BRA fold (1-5) / GIST514 split (0-4)")
    p.add_argument("--positive", default=None, help="folder dataset: name of the positive class")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation (and folder test) split")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    from .safety import check_output

    check_output(args.out, [args.root], "output folder")
    options = dict(seed=args.split_seed)
    if args.fold is not None:
        options["fold"] = args.fold
    if args.positive:
        options["positive"] = args.positive
    split = load_split(args.dataset, args.root, **options)
    img_size = args.img_size
    if img_size is None:
        img_size = mae_checkpoint_info(args.checkpoint)[2] if args.checkpoint and args.model in ("usf-mae", "scratch") else 224
    print(f"{split.dataset} ({split.split}): {len(split.train)} train / {len(split.val)} val / {len(split.test)} test, "
          f"classes {split.classes}; decoding at {img_size} px")
    data = prepare_data(split, img_size)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, img_size=img_size, pool=args.pool,
                       head_norm=args.head_norm, select_on=args.select_on, layer_decay=args.layer_decay)
    configs = sweep_configs(base, args.lr, args.weight_decay, args.batch_size)
    out = Path(args.out)
    runs = out / "runs"
    kw = dict(checkpoint=args.checkpoint, weights=args.weights, mae_config=args.mae_config, device=args.device,
              n_bootstrap=args.bootstrap)
    if args.fraction < 1:
        cfg, _ = select_config(data, args.model, configs, runs, **kw)
        table = label_efficiency(data, args.model, cfg, runs, fractions=[args.fraction], n_seeds=args.seeds, **kw)
    else:
        table = run_cell(data, args.model, configs, runs, n_seeds=args.seeds, **kw)
    if args.probe:
        table = pd.concat([table, pd.DataFrame([linear_probe(data, args.model, 0, runs, pool=args.pool, **kw)])])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    metrics = [m for m in ("precision", "recall", "f1", "precision_macro", "recall_macro", "f1_macro",
                           "accuracy", "balanced_accuracy", "roc_auc") if m in table.columns]
    print(f"\ninit: {'; '.join(table['init'].unique())}")
    for (mode, fraction), g in table.groupby(["mode", "fraction"], sort=False):
        print(f"\n{args.model} {mode} on {split.dataset} ({len(g)} run(s), {fraction:g} of the labels): "
              "mean over seeds, 95% bootstrap interval of each run averaged")
        for m in metrics:
            print(f"  {m:18s} {g[m].mean():.3f} (sd {g[m].std(ddof=1) if len(g) > 1 else float('nan'):.3f})  "
                  f"[{g[m + '_low'].mean():.3f}, {g[m + '_high'].mean():.3f}]")
    print(f"\nresults: {out / 'results.csv'}")
    return 0
