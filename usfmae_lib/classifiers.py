"""The models fine-tuning compares (Table 2): each built as a timm classifier with the weights it is
meant to start from, and the input statistics those weights were trained with.

    model, init, weights_id = build_classifier("resnet-50", num_classes=2, img_size=224)

Models, all timm:
    usf-mae    timm VisionTransformer with the MAE config's dims, encoder weights from the MAE
               checkpoint (strict: only the new head may be missing); cls token -> head as in the
               paper, or global average pooling (pool="avg": the encoder's final norm becomes fc_norm)
    scratch    the same architecture, random init: the control that says what pretraining adds
    vit-b      vit_base_patch16_224.augreg_in1k   resnet-50  resnet50.tv_in1k   vgg-19  vgg19.tv_in1k
               (ImageNet-1k weights, as the paper describes its baselines; each fed inputs normalised
               with its own tag's mean/std, e.g. 0.5 for the ViT)
    ultrasam   samvit_base_patch16 (SAM ViT-B image encoder + neck) from a user-supplied UltraSam or
               SAM checkpoint; see load_sam_encoder for the key layouts read
ImageNet weights come from a local file (`weights=`, e.g. found in a weights folder by
imagenet_weights_file) or timm's Hugging Face cache (looked up offline); otherwise the model starts
from random weights, a warning is printed, and the `init` column says so (or, with
missing_weights="skip", MissingWeights is raised). The fine-tuning itself is usfmae_lib.finetune.
Also here: pick_device, the one device choice of fine-tuning, reconstruction, the ablations and the bench.
"""
from __future__ import annotations

import collections
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UsfmaeError, checkpoints, mae
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

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
# A baseline whose ImageNet weights are neither given nor in the cache: "random" trains it from random
# init (init column "random: no ImageNet weights found ..."), "skip" leaves it out (build_classifier raises
# MissingWeights; callers check imagenet_weights_available first).
MISSING_WEIGHTS = ("random", "skip")
PAPER_IMG_SIZE = 224  # the paper resizes every image to 224 x 224 (section 2.2)


# ============================================================================ messages, device, weight files
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


def pick_device(device: str = "auto") -> torch.device:
    """'auto' = the GPU when there is one, else the CPU; otherwise any torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_id(path) -> str:
    """Path + size + mtime: a changed checkpoint makes finished runs stale."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


# ============================================================================ usf-mae and scratch: MAE checkpoints
def mae_checkpoint_info(checkpoint) -> tuple[dict, str, int, dict]:
    """(state dict, MAE config name, pretraining img_size, constructor overrides) of an MAE checkpoint."""
    obj = checkpoints.read_checkpoint(checkpoint)
    state = checkpoints.unwrap_state_dict(obj, checkpoint)
    params = obj.get("params") if isinstance(obj.get("params"), dict) else {}
    name = params.get("model") or mae.infer_config(state, checkpoint)
    if name not in mae.CONFIGS:
        raise UsfmaeError(f"checkpoint {checkpoint} names MAE config {name!r}; valid: {', '.join(mae.CONFIGS)}")
    overrides = dict(params.get("model_overrides") or {}) if name == params.get("model") else {}
    patch = overrides.get("patch_size", mae.CONFIGS[name]["patch_size"])
    if not params.get("img_size") and "pos_embed" not in state:
        raise UsfmaeError(f"checkpoint {checkpoint}: not an MAE checkpoint: no pos_embed to read its image size "
                          "from; pass an MAE checkpoint (notebook 03's checkpoint-last.pth or the released weights)")
    size = params.get("img_size") or mae.pos_embed_grid(state["pos_embed"]) * patch
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
    state = mae.encoder_state_dict(checkpoints.load_checkpoint(checkpoint))
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


# ============================================================================ input statistics, ImageNet weights
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


def imagenet_weights_file(weights_dir, model_name: str) -> Path | None:
    """The ImageNet weights file of `model_name` in a weights folder (notebook 05's weights_dir):
    <model>.safetensors, else <model>.pth; None without a folder or such a file (build_classifier then
    looks in timm's cache)."""
    if not weights_dir:
        return None
    found = [p for p in (Path(weights_dir) / f"{model_name}{ext}" for ext in (".safetensors", ".pth")) if p.exists()]
    return found[0] if found else None


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


# ============================================================================ UltraSam / SAM
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
    raw = checkpoints.read_checkpoint(checkpoint, fix="pass the UltraSam weights (UltraSam.pth) or a SAM ViT-B checkpoint")
    state = raw.get("state_dict") if isinstance(raw.get("state_dict"), dict) else checkpoints.unwrap_state_dict(raw, checkpoint)
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
                          "see usfmae_lib.classifiers.load_sam_encoder for the supported key layouts")
    return model


# ============================================================================ every model
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
        return load_mae_encoder(model, checkpoint), f"usf-mae: {checkpoint}", file_id(checkpoint)
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
        return load_sam_encoder(model, checkpoint), f"ultrasam: {checkpoint}", file_id(checkpoint)
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
    return set_input_stats(model, stats), f"{_weights_label(timm_name)} {tag} ({kind})", f"{tag}:{file_id(source)}"


def _expected_imagenet_file(timm_name: str) -> str:
    """What an ImageNet weights file for `timm_name` is, for messages: the exact tag and its Hugging Face repo."""
    repo = _hub_repo(timm_name)
    data = "ImageNet-1k" if in1k_only(timm_name) else "ImageNet"
    return (f"timm's {timm_tag(timm_name)} {data} weights"
            + (f" (model.safetensors of Hugging Face {repo})" if repo else ""))


def _timm_with_imagenet_weights(name: str, timm_name: str, source: Path, from_cache: bool, **kwargs) -> nn.Module:
    """timm's model with the ImageNet weights of `source`, read safely (checkpoints.read_checkpoint) and
    passed to timm as a state dict (so its filters still resize position tables and drop the 1000-class
    head). A file that is unreadable, or whose tensors do not become the model's, is an error naming
    the keys and the file it should be."""
    import logging

    import timm
    expected = _expected_imagenet_file(timm_name)
    fix = (f"delete it from the Hugging Face cache and download {expected} again" if from_cache
           else f"--weights for {name} must be {expected} (read as that tag's weights, fed its input statistics)")
    raw = checkpoints.read_checkpoint(source, fix=fix)
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
        lines.append(f"  model tensors not in the file: {checkpoints.describe_keys(missing)}")
    if unexpected:
        lines.append(f"  file tensors the model lacks: {checkpoints.describe_keys(unexpected)}")
    if wrong:
        lines.append(f"  wrong shapes: {len(wrong)} (e.g. {wrong[0]})")
    if err is not None and not (missing or unexpected or wrong):
        lines.append(f"  timm: {(str(err).strip().splitlines() or [''])[0][:300]}")
    lines.append(f"  fix: {fix}")
    return "\n".join(lines)


# ============================================================================ heads
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
