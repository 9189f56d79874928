"""The exported encoder as a model people can load: a folder that timm reads alone, with its card.

    card = run_facts(step_dir, params, profile, summary)       # what notebook 03 knows about its run
    folder = export_encoder_folder(model, step_dir / FOLDER, card)
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True)   # anyone, from the folder alone

The folder (`<out_dir>/03_mae_pretraining/encoder/`) holds, in the Hugging Face / timm hub layout:

    model.safetensors   the MAE encoder in timm VisionTransformer key layout (mae.encoder_state_dict)
    config.json         architecture, num_classes 0, num_features, global_pool, model_args (every
                        constructor value, so a non-B/16 encoder builds right), pretrained_cfg (input
                        size, the ImageNet mean / std pretraining normalised with, interpolation)
    README.md           the model card: what it is, the data that made it (synthetic said plainly),
                        the recipe, the final loss, the run (profile, folder, commit, provenance), the
                        licence, the limits and the loading call; notebook 06 adds the fine-tuning
                        results with their intervals (`add_finetuning_results`)

`timm.create_model("local-dir:<folder>", pretrained=True)` (timm's local folder source) builds the ViT
from config.json and loads the weights with strict=True; `num_classes=K` adds a fresh head for
fine-tuning. docs/mae.md, "Export for fine-tuning and for others".
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pandas as pd
import torch

from . import UsfmaeError, atomic_write_text, checkpoints, mae, provenance
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .results import DATASET_TITLES, unjudged

FOLDER = "encoder"  # under notebook 03's step folder
WEIGHTS = "model.safetensors"  # the names timm's local-dir (and the Hugging Face hub) look for
CONFIG = "config.json"
CARD = "README.md"
TIMM_SOURCE = "local-dir:"
# a timm registry name per (width, patch): the architecture config.json names; model_args set every
# constructor value anyway, so an encoder of another depth or size builds right from any of them
TIMM_ARCHITECTURES = {(192, 16): "vit_tiny_patch16_224", (384, 16): "vit_small_patch16_224",
                      (768, 16): "vit_base_patch16_224", (1024, 16): "vit_large_patch16_224",
                      (1280, 14): "vit_huge_patch14_224"}
VIT_NAMES = {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
CODE_LICENSE = "MIT"
RESULTS_START = "<!-- usfmae: fine-tuning results -->"
RESULTS_END = "<!-- usfmae: end of fine-tuning results -->"
SYNTH_PREFIX = "synth_"  # the synthetic tree's pretraining datasets: synth_<anatomy>
# what the card's recipe table shows, in this order: parameter -> label
RECIPE = {"model": "MAE config", "model_overrides": "constructor overrides", "pos_embed": "position tables",
          "img_size": "image side (px)", "mask_ratio": "mask ratio", "norm_pix_loss": "normalised-pixel loss",
          "epochs": "epochs", "batch_size": "batch per process", "lr": "lr (peak, or base with blr_scaling)",
          "blr_scaling": "lr x batch / 256", "weight_decay": "weight decay", "decay_all": "decay biases and norms",
          "betas": "AdamW betas", "warmup_fraction": "warmup fraction", "min_lr": "min lr",
          "clip_grad": "gradient clipping", "rot_degrees": "rotation (deg)", "flip_p": "flip probability",
          "crop_scale": "crop scale", "init_checkpoint": "started from", "precision": "precision requested",
          "seed": "seed", "max_steps": "max_steps (0: all)"}


# ============================================================================ the weights and config.json
def encoder_args(model_or_state, num_heads: int | None = None) -> dict:
    """timm VisionTransformer constructor values of an MAE encoder: img_size, patch_size, in_chans,
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias. Read from the tensors' shapes, except the head
    count, which no shape holds: from the model, else `num_heads`, else the recipe a `{'model': ...,
    'params': ...}` checkpoint dict records."""
    state = mae.encoder_state_dict(model_or_state)
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    img_size = mae.pos_embed_grid(state["pos_embed"]) * patch
    if isinstance(model_or_state, torch.nn.Module):
        num_heads = int(model_or_state.blocks[0].attn.num_heads)
    elif num_heads is None and isinstance(model_or_state.get("params"), dict):
        recipe = model_or_state["params"]
        cfg = {**mae.CONFIGS.get(recipe.get("model"), {}), **(recipe.get("model_overrides") or {})}
        num_heads = cfg.get("num_heads")
    if not num_heads:
        raise UsfmaeError("the encoder's head count cannot be read from its tensors: pass the model, a checkpoint "
                          "dict with its params, or num_heads=")
    if embed_dim % int(num_heads):
        raise UsfmaeError(f"num_heads {num_heads} does not divide the encoder width {embed_dim}")
    return dict(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                num_heads=int(num_heads), mlp_ratio=float(mlp_ratio), qkv_bias="blocks.0.attn.qkv.bias" in state)


def timm_architecture(args: dict) -> str:
    """The timm registry name config.json gives (its model_args override every value it sets)."""
    return TIMM_ARCHITECTURES.get((args["embed_dim"], args["patch_size"]), "vit_base_patch16_224")


def timm_config(args: dict, license: str = "other") -> dict:
    """config.json in the layout timm's hub and local-dir loaders read (as timm's save_for_hf writes):
    a feature extractor (num_classes 0, the cls token after the final norm), the input pretraining
    used (S x S, RGB, ImageNet mean / std, as usfmae_lib.store normalises)."""
    size = args["img_size"]
    return {
        "architecture": timm_architecture(args),
        "num_classes": 0,
        "num_features": args["embed_dim"],
        "global_pool": "token",
        "model_args": dict(args),
        "pretrained_cfg": {
            "input_size": [args["in_chans"], size, size],
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 1.0,  # pretraining saw whole images squashed to S x S (notebook 02), no centre crop
            "crop_mode": "squash",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "custom_load": False,
            "license": license,
        },
    }


def loading_call(folder) -> str:
    """The one call that loads the folder (the card shows it)."""
    return f'timm.create_model("{TIMM_SOURCE}{folder}", pretrained=True)'


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_encoder_folder(model_or_state, folder, card: dict, num_heads: int | None = None) -> Path:
    """Write `folder` with model.safetensors, config.json and README.md (the card from `card`, as
    `run_facts` makes it; keys it lacks are said to be unknown). Returns the folder. Each file is
    written atomically; a card's fine-tuning results section is not kept (the weights may be new):
    notebook 06 adds it again."""
    folder = Path(folder)
    args = encoder_args(model_or_state, num_heads)
    state = mae.encoder_state_dict(model_or_state)
    weights = checkpoints.save_safetensors(state, folder / WEIGHTS, {"source": "usfmae MAE encoder"})
    synthetic = (card.get("data") or {}).get("synthetic")
    atomic_write_text(folder / CONFIG, json.dumps(timm_config(args, "mit" if synthetic == "all" else "other"),
                                                  indent=2) + "\n")
    n_params = sum(v.numel() for v in state.values())
    atomic_write_text(folder / CARD, render_card(card, args, n_params, sha256(weights), folder))
    return folder


# ============================================================================ what the run was
def synthetic_status(roots, datasets) -> str:
    """'all', 'some' or 'none' of the pretraining data synthetic: a root holding synth.json (the
    generator's tree), else dataset names (synth_<anatomy>) when the roots are gone."""
    dataset_flags = [str(d).startswith(SYNTH_PREFIX) for d in datasets]
    root_flags = [(Path(r) / "synth.json").is_file() for r in roots if Path(r).exists()]
    flags = dataset_flags or root_flags
    if not flags:
        return "unknown"
    return "all" if all(flags) else ("some" if any(flags) or any(root_flags) else "none")


def run_facts(step_dir, params: dict, profile: str | None, summary: dict | None = None) -> dict:
    """The card's facts about notebook 03's (first) run in `step_dir`: the recipe (`params`, as
    pretrain.params_of gives them), the run's summary (pretrain.train's; else pretraining_summary.csv),
    the data (01_curation/summary.json beside step_dir, store/store.json and index.parquet), the loss
    (log.csv) and the provenance record (provenance.record)."""
    from .pretrain import CHECKPOINT, pretraining_runs, resolve_params
    from .store import read_store_meta

    step_dir = Path(step_dir)
    if summary is None and (step_dir / "pretraining_summary.csv").is_file():
        summary = pd.read_csv(step_dir / "pretraining_summary.csv").iloc[0].to_dict()
    summary = {k: v for k, v in (summary or {}).items() if k != "checkpoint"}
    recipe = resolve_params(**params)
    data = {}
    curation = step_dir.parent / "01_curation" / "summary.json"
    if curation.is_file():
        cur = json.loads(curation.read_text())
        data.update(roots=cur.get("roots", []), n_datasets_curated=cur.get("datasets"),
                    frames_kept=cur.get("kept"), eval_datasets=cur.get("eval_datasets", []),
                    duplicates_dropped=cur.get("duplicates_dropped"), leakage_found=cur.get("leakage"),
                    leakage_dropped=cur.get("leakage_dropped"), curation_settings=cur.get("settings", {}))
    store_dir = step_dir / "store"
    datasets = []
    if (store_dir / "store.json").is_file():
        meta = read_store_meta(store_dir)
        data.update(n_images=meta.get("n_images"), n_heldout=meta.get("n_heldout"),
                    n_rejected=meta.get("n_rejected"), store_img_size=meta.get("img_size"))
        if (store_dir / "index.parquet").is_file():
            index = pd.read_parquet(store_dir / "index.parquet", columns=["dataset", "anatomy"])
            datasets = sorted(index["dataset"].unique())
            data.update(datasets=datasets, anatomies=index["anatomy"].value_counts().sort_index().to_dict())
    data["synthetic"] = synthetic_status(data.get("roots", []), datasets)
    loss = {}
    if (step_dir / "log.csv").is_file():
        log = pd.read_csv(step_dir / "log.csv")
        if len(log):
            k = min(5, len(log))
            loss = dict(first=float(log.loss.head(k).mean()), last=float(log.loss.tail(k).mean()), window=k,
                        last_logged=float(log.loss.iloc[-1]), logged_steps=int(log.step.iloc[-1]))
    device = summary.get("device")
    # named within its output folder (<out>/03_mae_pretraining): the card travels, the machine's folders do not
    return dict(profile=profile, run_dir=f"{step_dir.parent.name}/{step_dir.name}",
                checkpoint=f"{step_dir.parent.name}/{step_dir.name}/checkpoints/{CHECKPOINT}",
                params=recipe, summary=summary, data=data, loss=loss,
                n_pretraining_runs=max(1, len(pretraining_runs(step_dir))),
                provenance=provenance.record(params, profile, device=device if device else None))


# ============================================================================ the card
def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else ("unknown" if n is None else str(n))


def card_tags(synthetic: str) -> list[str]:
    tags = ["image-feature-extraction", "timm", "vision-transformer", "masked-autoencoder", "ultrasound",
            "self-supervised", "usfmae"]
    return tags + (["synthetic-data"] if synthetic in ("all", "some") else [])


def render_card(card: dict, args: dict, n_params: int, weights_sha256: str, folder) -> str:
    """README.md: YAML front matter (library_name timm, licence, tags) and the card's sections."""
    p = card.get("params") or {}
    s = card.get("summary") or {}
    data = card.get("data") or {}
    loss = card.get("loss") or {}
    rec = card.get("provenance") or {}
    synthetic = data.get("synthetic", "unknown")
    vit = VIT_NAMES.get(args["embed_dim"], f"ViT ({args['embed_dim']} wide)")
    name = f"{vit}/{args['patch_size']}"
    default_depth = {192: 12, 384: 12, 768: 12, 1024: 24, 1280: 32}.get(args["embed_dim"])
    if default_depth and args["depth"] != default_depth:
        name += f", {args['depth']} blocks"
    grid = args["img_size"] // args["patch_size"]
    fixed = p.get("pos_embed", "fixed") == "fixed"
    pos = args["embed_dim"] * (grid * grid + 1)
    commit = provenance.commit_label(rec) if rec else "unknown"
    run_dir, profile = card.get("run_dir", "unknown"), card.get("profile") or "unknown"
    license_ = "mit" if synthetic == "all" else "other"
    front = ["---", "library_name: timm", f"license: {license_}"]
    if license_ == "other":
        front += ["license_name: pretraining-data-licences"]  # the datasets' own: docs/data.md
    front += ["pipeline_tag: image-feature-extraction", "tags:"] + [f"- {t}" for t in card_tags(synthetic)] + ["---"]
    source = {"all": "synthetic ultrasound images", "some": "ultrasound images, partly synthetic",
              "none": "ultrasound images"}.get(synthetic, "ultrasound images (source not recorded)")
    lines = front + ["", f"# {name} encoder of a masked autoencoder, pretrained on {source}", ""]
    if synthetic in ("all", "some"):
        share = ("**Synthetic data only.** These weights learned from synthetic images alone" if synthetic == "all"
                 else "**Partly synthetic data.** Part of what these weights learned from is synthetic images")
        lines += [f"> {share}, made by this project's generator (`usfmae_lib.synthetic`)"
                  + (", not from real scans" if synthetic == "all" else "") + ". They are **not the paper's "
                  "USF-MAE** (Megahed et al., arXiv:2510.22990, pretrained on about 374k real images of OpenUS-46) "
                  "and **not for clinical use** or any decision about a patient: they exist to test and teach the "
                  "pipeline.", ""]
    else:
        lines += ["> **Research use only.** Not a medical device and not validated for clinical use. Not the "
                  "paper's released USF-MAE weights: a model this study's code trained "
                  "(arXiv:2510.22990 describes the original).", ""]
    lines += [f"Made by run `{run_dir}` (profile `{profile}`, seed {p.get('seed', 'unknown')}, "
              f"commit `{commit}`) of notebook 03 of usfmae, a reproducible study of USF-MAE.", ""]
    lines += ["## Load it", "", "```python", "import timm", "",
              f'model = timm.create_model("{TIMM_SOURCE}/path/to/{Path(folder).name}", pretrained=True)',
              "features = model.forward_features(x)  # [N, 1 + L, D]; model(x): the cls token after the final norm",
              "cfg = timm.data.resolve_data_config({}, model=model)  # input size, mean / std of pretraining",
              "transform = timm.data.create_transform(**cfg)",
              "# fine-tuning: a fresh head",
              f'clf = timm.create_model("{TIMM_SOURCE}/path/to/{Path(folder).name}", pretrained=True, num_classes=3)',
              "```", "",
              "timm's `local-dir:` source builds the ViT from `config.json` alone and loads `model.safetensors` with "
              f"strict key matching (written with timm {rec.get('timm') or 'unknown'}). Mean pooling, as MAE "
              "fine-tuning does: add `global_pool=\"avg\", fc_norm=False` (the final norm stays where the weights "
              "have it). Another `img_size=` resamples the position table (bicubic). Older timm without "
              "`local-dir:`: `timm.create_model(config['architecture'], pretrained=True, num_classes=0, "
              "pretrained_cfg_overlay=dict(file='model.safetensors'), **config['model_args'])`.", ""]
    lines += ["## What it is", "",
              f"- The encoder of a masked autoencoder (MAE, He et al. 2021, as the reference "
              f"`models_mae.py`, re-stated in `usfmae_lib.mae`): config `{p.get('model', 'unknown')}`"
              + (f" with {p.get('model_overrides')}" if p.get("model_overrides") else "")
              + ", no decoder, no mask token.",
              f"- {name}: width {args['embed_dim']}, {args['depth']} blocks, {args['num_heads']} heads, "
              f"{args['patch_size']} px patches, MLP ratio {_num(args['mlp_ratio'])}, qkv bias, LayerNorm eps 1e-6, "
              f"class token; input {args['in_chans']} x {args['img_size']} x {args['img_size']} "
              f"({grid * grid} patches).",
              f"- {n_params:,} parameters ({n_params / 1e6:.1f} M)"
              + (f", of which the position table ({pos:,}) is fixed 2D sin-cos (never trained in pretraining)"
                 if fixed else ", the position table included (learnable, started as sin-cos)") + ".",
              f"- timm: `{timm_architecture(args)}` with `model_args` {json.dumps(args)} (config.json).",
              f"- Input: RGB scaled to 0-1, then normalised with ImageNet mean {list(IMAGENET_MEAN)} and std "
              f"{list(IMAGENET_STD)}, as in pretraining; grey scans as three equal channels; images squashed to "
              f"{args['img_size']} x {args['img_size']}.",
              f"- `model.safetensors` sha256 `{weights_sha256}`.", ""]
    lines += ["## Data", ""]
    roots = data.get("roots") or []
    if synthetic == "all":
        lines.append(f"- **Synthetic**: the tree `usfmae_lib.synthetic` generated (root{'s' if len(roots) > 1 else ''} "
                     f"{', '.join(f'`{Path(r).name}`' for r in roots) or 'not recorded'}); no real scan.")
    else:
        lines.append(f"- Roots: {', '.join(f'`{Path(r).name}`' for r in roots) or 'not recorded'}"
                     + (" (some synthetic)" if synthetic == "some" else "") + ".")
    if data.get("n_images") is not None:
        ds = data.get("datasets") or []
        lines.append(f"- {_count(data.get('n_images'))} images packed for pretraining from {len(ds)} dataset(s) "
                     f"({', '.join(ds[:8])}{', ...' if len(ds) > 8 else ''}); {_count(data.get('n_heldout'))} held "
                     f"out for notebook 04; {_count(data.get('n_rejected'))} unreadable file(s) skipped.")
    if data.get("anatomies"):
        lines.append("- Images per anatomy: " + ", ".join(f"{a} {n:,}" for a, n in data["anatomies"].items()) + ".")
    if data.get("frames_kept") is not None:
        st = data.get("curation_settings") or {}
        lines.append(f"- Curation (notebook 01): {_count(data.get('frames_kept'))} frames kept; "
                     f"{_count(data.get('duplicates_dropped'))} duplicates dropped (deduplicate "
                     f"{st.get('deduplicate')}); {_count(data.get('leakage_found'))} frames near an evaluation "
                     f"image found, {_count(data.get('leakage_dropped'))} dropped; evaluation sets kept out: "
                     f"{', '.join(data.get('eval_datasets') or []) or 'none among the roots'}.")
    if not data:
        lines.append("- Not recorded.")
    lines.append("")
    lines += ["## Recipe", "", "| parameter | value |", "|---|---|"]
    shown = {**p, "init_checkpoint": p.get("init_checkpoint") or "MAE initialisation (no checkpoint)"}
    lines += [f"| {label} | {_num(shown[key]) if key in shown else 'unknown'} |" for key, label in RECIPE.items()]
    for key, label in (("last_step", "steps run"), ("steps", "steps in the schedule"), ("global_batch", "global batch"),
                       ("peak_lr", "peak lr used"), ("world_size", "processes"), ("device", "device"),
                       ("precision_run", "precision run")):
        if key in s:
            lines.append(f"| {label} | {_num(s[key])} |")
    lines.append("")
    lines += ["## Pretraining loss", ""]
    if loss:
        lines.append(f"Reconstruction loss ({'normalised-pixel' if p.get('norm_pix_loss') else 'pixel'} MSE on the "
                     f"hidden patches): mean of the first {loss['window']} logged steps {loss['first']:.4f}, of the "
                     f"last {loss['window']} {loss['last']:.4f} (last logged step {loss['logged_steps']}: "
                     f"{loss['last_logged']:.4f}). `log.csv` and `fig_loss_curve.png` of the run folder hold "
                     "every step.")
    else:
        lines.append("Not recorded (no log.csv).")
    lines.append("")
    lines += ["## The run", "",
              f"- profile `{profile}`, run folder `{run_dir}`, seed {p.get('seed', 'unknown')}, commit `{commit}`",
              f"- the full checkpoint (decoder and optimiser included): `{card.get('checkpoint', 'unknown')}`",
              f"- rebuild: `usfmae reproduce --profile {profile}` at that commit (notebook 03, "
              f"params/{profile}/03_mae_pretraining.yaml)", ""]
    if rec:
        lines += [provenance.markdown_block(rec), ""]
    lines += ["## Licence", "",
              f"- Code (usfmae): {CODE_LICENSE}."]
    if synthetic == "all":
        lines.append("- Weights: learned only from images this project's code generated, so no dataset licence "
                     f"applies; released under the code's {CODE_LICENSE} licence.")
    else:
        lines.append("- Weights: derived from the pretraining datasets, so **their licences apply** (usfmae's "
                     "docs/data.md lists what each publishes: several forbid commercial use or derivatives, some "
                     "require a data use agreement). Check every dataset of `01_curation/datasets.csv` before "
                     "sharing these weights.")
    lines.append("")
    lines += ["## Limits", ""]
    if synthetic in ("all", "some"):
        lines.append("- Synthetic images are a model of ultrasound (speckle, sector, shadows), not scans: "
                     "features that help on them may not transfer to real images.")
    if unjudged(profile):  # smoke or dry-run: the weights measure nothing
        lines.append(f"- Profile `{profile}` checks that the code runs (a small model, a few steps): these weights "
                     "measure nothing.")
    if s.get("last_step") is not None and s.get("steps") and int(s["last_step"]) < int(s["steps"]):
        lines.append(f"- Stopped after {s['last_step']} of the schedule's {s['steps']} steps (max_steps: a dry run or "
                     "a cut run): not the weights of the whole recipe.")
    n_runs = card.get("n_pretraining_runs") or 1
    lines += [f"- One pretraining run (seed {p.get('seed', 'unknown')})"
              + (f", the first of {n_runs} that notebook 03 made with this recipe and seeds {p.get('seed', 0)}, "
                 f"{p.get('seed', 0) + 1}, ... (`seed<k>/` beside it)" if n_runs > 1 else "")
              + ": how much of a downstream result is one run's luck shows only across runs.",
              f"- Trained at {args['img_size']} px; other sizes work by resampling the position table, "
              "which the weights never saw.",
              "- MAE features are made for fine-tuning: a frozen encoder (k-NN, linear probe) is usually weak.",
              "- Nothing here was evaluated on a clinical task; the fine-tuning results below are this study's "
              "benchmarks (BUS-BRA, MMOTU-2D, GIST514-DB, or their synthetic twins).", ""]
    lines += ["## Fine-tuning results", "", RESULTS_START,
              "Not added yet: notebook 06 (`model_card.add_finetuning_results`) puts here the fine-tuning metrics of "
              "this recipe's runs with their 95% intervals.", RESULTS_END, ""]
    return "\n".join(lines)


# ============================================================================ fine-tuning results
TITLES = {**DATASET_TITLES, "usf-mae": "this recipe (USF-MAE)", "scratch": "same architecture, from scratch"}
METRIC_TITLES = {"f1": "F1", "precision": "precision", "recall": "recall"}


def _runs(r) -> str:
    """'3 pretraining runs x 5 splits x 1 seed' (a count of 1 left out but the seeds'), as Table 2 says it."""
    def count(c):
        return int(r[c]) if c in r and pd.notna(r[c]) else 1
    parts = [f"{count('n_pretrain')} pretraining runs"] if count("n_pretrain") > 1 else []
    parts += [f"{count('n_folds')} splits"] if count("n_folds") > 1 else []
    return " x ".join(parts + [f"{count('n_seeds')} seed{'s' if count('n_seeds') > 1 else ''}"])


def finetuning_section(table: pd.DataFrame, models=("usf-mae", "scratch"), note: str | None = None,
                       source: str | None = None) -> str:
    """The section's markdown from a Table-2-like frame (results.table2_long, or table2.csv read back):
    columns model, dataset, metric, mean, low, high (%), and optionally sd, method, n_pretrain, n_folds,
    n_seeds, init. One row per (model of `models`, dataset) with a mean: each metric's mean and 95%
    interval of the mean, the sd of F1 over single runs, the runs."""
    need = {"model", "dataset", "metric", "mean", "low", "high"}
    if not need <= set(table.columns):
        raise UsfmaeError(f"fine-tuning table lacks column(s) {sorted(need - set(table.columns))}: pass Table 2's "
                          "long form (06_results/table2.csv or results.table2_long)")
    rows = table[table["model"].isin(models) & table["mean"].notna()]
    metrics = [m for m in ("f1", "precision", "recall") if (rows["metric"] == m).any()]
    metrics += sorted(set(rows["metric"]) - set(metrics))
    lines = [f"From `{source}`.", ""] if source else []
    if rows.empty:
        lines.append("No fine-tuning rows of this recipe in the table.")
    else:
        lines += ["Mean over the runs (%), with the 95% interval of the mean; sd: of F1 over single runs.", "",
                  "| model | dataset | " + " | ".join(METRIC_TITLES.get(m, m) for m in metrics) + " | sd | runs |",
                  "|---|---|" + "---|" * len(metrics) + "---|---|"]
        methods = []
        for model in models:
            for dataset, g in rows[rows["model"] == model].groupby("dataset", sort=False):
                cells = []
                for m in metrics:
                    r = g[g["metric"] == m]
                    if r.empty:
                        cells.append("-")
                        continue
                    r = r.iloc[0]
                    ok = pd.notna(r["low"]) and math.isfinite(float(r["low"]))
                    cells.append(f"{r['mean']:.1f} " + (f"[{r['low']:.1f}, {r['high']:.1f}]" if ok else "[no interval]"))
                head = g[g["metric"] == metrics[0]].iloc[0]
                sd = f"{head['sd']:.1f}" if "sd" in head and pd.notna(head["sd"]) else "-"
                lines.append(f"| {TITLES.get(model, model)} | {TITLES.get(dataset, dataset)} | " + " | ".join(cells)
                             + f" | {sd} | {_runs(head)} |")
                if "method" in head and pd.notna(head["method"]):
                    methods.append(f"- {TITLES.get(dataset, dataset)}, {TITLES.get(model, model)}: {head['method']}")
        if methods:
            lines += ["", "How each interval was made:", ""] + methods
        inits = sorted(rows.loc[rows["model"] == models[0], "init"].dropna().unique()) if "init" in rows else []
        if inits:
            lines += ["", "Fine-tuned from: " + "; ".join(f"`{i}`" for i in inits) + ". The means span every "
                      "pretraining run of this recipe (`pretrain_seeds`), of which this folder holds the first."]
    if note:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines)


def add_finetuning_results(folder, table: pd.DataFrame, note: str | None = None, source: str | None = None,
                           models=("usf-mae", "scratch")) -> Path:
    """Put the fine-tuning results (Table 2's long form: mean and interval columns) into the card of
    `folder`, replacing what an earlier call put there (or the placeholder); the rest of the card is
    kept. `note`: e.g. why a smoke profile's numbers measure nothing; `source`: where the table came from.
    Returns the card's path."""
    card = Path(folder) / CARD
    if not card.is_file():
        raise UsfmaeError(f"{card} does not exist: export the encoder folder first "
                          "(notebook 03, model_card.export_encoder_folder)")
    text = card.read_text()
    body = f"{RESULTS_START}\n{finetuning_section(table, models, note, source)}\n{RESULTS_END}"
    pattern = re.compile(re.escape(RESULTS_START) + r".*?" + re.escape(RESULTS_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n## Fine-tuning results\n\n" + body + "\n"
    return atomic_write_text(card, text)
