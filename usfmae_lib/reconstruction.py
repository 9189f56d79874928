"""What the masked autoencoder learned: reconstructions, a mask-ratio sweep, attention (notebook 04).

Plain functions that notebook 04 and tests/test_reconstruction.py call:

    model, info = load_inspection_model("", out_dir)         # "" = notebook 03's checkpoint-last.pth
    index = pick_images(read_index(clean_dir), n_per_anatomy=2, seed=0)
    imgs = normalize_images(load_images(clean_dir, index.path, info["img_size"]))  # [N, 3, S, S]
    result = reconstruct(model, imgs, 0.25, patch_noise(len(imgs), model.num_patches, seed=0))
    fig = plot_reconstructions(result, labels=index.anatomy)           # the MAE demo's four panels
    per_image, table = mask_ratio_sweep(model, imgs, index.anatomy, [0.1, 0.25, 0.5, 0.75, 0.9])
    maps = cls_attention_maps(last_layer_attention(model, imgs))        # [N, G, G], cls -> patches

Shapes: N images, S side in pixels, p patch side, G = S / p patches per side, L = G * G patches of
P = p * p * 3 values, K = int(L * (1 - mask_ratio)) visible patches, T = 1 + L encoder tokens.
Every mask comes from explicit per-patch noise [N, L] drawn from a seeded generator, so a figure
or a number is the same on every run and every machine; the sweep reuses one noise per image for
all ratios, so the patches hidden at 25% are a subset of those hidden at 90% (nested masks).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import UsfmaeError, atomic_write, store
from .classifiers import pick_device
from .mae import MaskedAutoencoderViT, load_model
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from . import stats

STEP = "04_reconstruction"
# where notebook 03 leaves its last checkpoint, relative to out_dir
DEFAULT_CHECKPOINT = Path("03_mae_pretraining") / "checkpoints" / "checkpoint-last.pth"
DEFAULT_CLEAN_DIR = Path("02_preprocessing") / "clean"
# a list of images pretraining did not train on (column path, relative to clean/), read when present
HELDOUT_FILE = Path("03_mae_pretraining") / "store" / "heldout.csv"  # written by store.pack_store
PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
ALL = "all"  # the anatomy label of the rows that pool every image


# ============================================================================ model
# The shipped teaching MAE (made by usfmae_lib/teaching.py, which imports this module): what
# notebooks 03 and 04 show when a run has no model of its own, or when asked to.
TEACHING = "teaching"  # the value of notebook 04's `checkpoint` parameter that selects it
TEACHING_FOLDER = Path(__file__).resolve().parent / "data" / "teaching_mae"
TEACHING_WEIGHTS = TEACHING_FOLDER / "mae.safetensors"


def teaching_checkpoint() -> Path:
    """The shipped teaching MAE's weights; an error naming the regeneration command if absent."""
    if not TEACHING_WEIGHTS.is_file():
        raise UsfmaeError(f"the teaching MAE {TEACHING_WEIGHTS} is missing from this checkout; restore it with git "
                          "(git checkout -- usfmae_lib/data/teaching_mae) or regenerate it with "
                          "usfmae teaching-mae --work outputs/teaching-mae")
    return TEACHING_WEIGHTS


def resolve_checkpoint(checkpoint, out_dir) -> Path:
    """The checkpoint file to inspect: `checkpoint`; "" / None = notebook 03's under out_dir, or,
    when that run has none, the shipped teaching MAE; "teaching" = the shipped teaching MAE."""
    if checkpoint == TEACHING:
        return teaching_checkpoint()
    if checkpoint in (None, ""):
        path = Path(out_dir) / DEFAULT_CHECKPOINT
        return path if path.is_file() else teaching_checkpoint()
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UsfmaeError(f"checkpoint {path} does not exist; check the path (any file checkpoints.load_checkpoint "
                          "reads works: ours, a reference MAE {'model': ...} file, the released USF-MAE "
                          "weights, .safetensors), or pass checkpoint='teaching' for the shipped teaching MAE")
    return path


def load_inspection_model(checkpoint="", out_dir="outputs/quick", config: str | None = None,
                          img_size: int | None = None, norm_pix_loss: bool | None = None,
                          device: str = "auto") -> tuple[MaskedAutoencoderViT, dict]:
    """The MAE of a checkpoint in eval mode, and what it is: (model, info).

    config / img_size default to what the checkpoint records (or, for a bare state dict such as
    the released USF-MAE weights, the named config whose shapes fit, at the size of its position
    table). norm_pix_loss=None keeps the checkpoint's setting; a bare state dict does not record
    it, so pass True for a reference checkpoint trained with normalised-pixel targets.
    """
    path = resolve_checkpoint(checkpoint, out_dir)
    model = load_model(path, config=config, img_size=img_size)
    if norm_pix_loss is not None:
        model.norm_pix_loss = bool(norm_pix_loss)
    model = model.to(pick_device(device)).eval()
    enc = model.blocks[0].attn
    is_teaching = path.resolve() == TEACHING_WEIGHTS.resolve()
    info = dict(checkpoint=TEACHING_LABEL if is_teaching else _short_path(path, out_dir), teaching=is_teaching,
                trained_mask_ratio=model.trained_params.get("mask_ratio"),
                img_size=model.patch_embed.img_size[0], patch_size=model.patch_size,
                num_patches=model.num_patches, embed_dim=model.pos_embed.shape[-1], depth=len(model.blocks),
                heads=enc.num_heads, decoder_depth=len(model.decoder_blocks),
                norm_pix_loss=bool(model.norm_pix_loss),
                parameters=sum(p.numel() for p in model.parameters()))
    return model, info


TEACHING_LABEL = "the shipped teaching MAE (usfmae_lib/data/teaching_mae)"


def further_runs(checkpoint, out_dir) -> list[Path]:
    """The last checkpoints of notebook 03's further pretraining runs (`pretrain_seeds` > 1) when
    `checkpoint` is its first run's ("" / None, and that run exists): notebook 04's verdicts pool every
    run. Empty for any other checkpoint (a file, the teaching MAE)."""
    from .pretrain import pretraining_runs

    if checkpoint not in (None, "") or not (Path(out_dir) / DEFAULT_CHECKPOINT).is_file():
        return []
    return pretraining_runs(Path(out_dir) / DEFAULT_CHECKPOINT.parts[0])[1:]


def _short_path(path: Path, out_dir) -> str:
    """How a reader names a checkpoint: relative to out_dir when inside it, else its file name."""
    from .study import short_path

    shown = short_path(path, out_dir)
    return Path(path).name if Path(shown).is_absolute() else shown


# ============================================================================ images
def read_index(clean_dir) -> pd.DataFrame:
    """clean/index.csv of notebook 02 (columns path, dataset, anatomy, ...), rows whose PNG exists."""
    clean_dir = Path(clean_dir)
    index_file = clean_dir / "index.csv"
    if not index_file.is_file():
        raise UsfmaeError(f"{index_file} does not exist: run notebook 02 (preprocessing) first with the same "
                          "out_dir, or pass clean_dir=<a folder of PNGs with an index.csv>")
    index = pd.read_csv(index_file, dtype={"path": str, "dataset": str, "anatomy": str})
    missing = {"path", "anatomy"} - set(index.columns)
    if missing:
        raise UsfmaeError(f"{index_file} lacks column(s) {', '.join(sorted(missing))}; it must list path "
                          "(relative to its folder) and anatomy per image, as notebook 02 writes it")
    index["anatomy"] = index["anatomy"].fillna("unknown")
    index = index[[(clean_dir / p).is_file() for p in index["path"]]].reset_index(drop=True)
    if index.empty:
        raise UsfmaeError(f"{index_file} lists no image that exists under {clean_dir}; re-run notebook 02")
    return index


def heldout_rows(index: pd.DataFrame, out_dir) -> tuple[pd.DataFrame, bool]:
    """(rows, held_out): the index rows listed in OUT/03_mae_pretraining/store/heldout.csv (the
    images pack_store kept out of pretraining), else every row and False (pretraining saw them)."""
    listing = Path(out_dir) / HELDOUT_FILE
    if not listing.is_file():
        return index, False
    keep = set(pd.read_csv(listing, dtype={"path": str})["path"])
    rows = index[index["path"].isin(keep)].reset_index(drop=True)
    if rows.empty:
        raise UsfmaeError(f"{listing} lists no image of the clean index; re-run notebook 03 or delete {listing}")
    return rows, True


def pick_images(index: pd.DataFrame, n_per_anatomy: int, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of up to n_per_anatomy rows per anatomy (store.sample_per_anatomy), the
    same images on every run."""
    return store.sample_per_anatomy(index, n_per_anatomy, seed)


# the evaluation sets' image folders and anatomies: images the released weights never trained on
EVALUATION_IMAGES = {"BUSBRA/Images": "breast", "OTU_2d/images": "ovary", "usd514_jpeg_roi/images": "gastrointestinal"}


def evaluation_index(data_root) -> pd.DataFrame:
    """An index (path relative to data_root, dataset, anatomy) of the evaluation sets' images under
    data_root (BUSBRA/, OTU_2d/, usd514_jpeg_roi/): what notebook 04 shows for weights pretrained
    elsewhere (the released USF-MAE), when there is no cleaned tree of notebook 02. The paper kept
    these sets out of pretraining, so every image is unseen."""
    from .curation_readers import IMAGE_EXTS

    root = Path(data_root)
    rows = [dict(path=f.relative_to(root).as_posix(), dataset=folder.split("/")[0], anatomy=anatomy)
            for folder, anatomy in EVALUATION_IMAGES.items() if (root / folder).is_dir()
            for f in sorted((root / folder).iterdir()) if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".")]
    if not rows:
        raise UsfmaeError(f"{root} holds none of {', '.join(EVALUATION_IMAGES)}: pass the folder that holds the "
                          "evaluation sets as data_root, or a cleaned tree as clean_dir")
    return pd.DataFrame(rows)


def load_images(clean_dir, paths, img_size: int) -> np.ndarray:
    """uint8 RGB [N, S, S, 3], read by the study's one decode policy; images of another size are
    resized (area) to img_size."""
    from .curation_readers import Reject, read_image_file

    out = []
    for rel in paths:
        file = Path(clean_dir) / rel
        try:
            rgb = read_image_file(file)
        except Reject as rej:
            raise UsfmaeError(f"cannot read image {file}: {rej}; re-run notebook 02 or remove it from "
                              "index.csv") from None
        if rgb.shape[:2] != (img_size, img_size):
            rgb = cv2.resize(rgb, (img_size, img_size), interpolation=cv2.INTER_AREA)
        out.append(rgb)
    return np.stack(out)


def _stats(device=None):
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize_images(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 RGB [N, S, S, 3] -> float [N, 3, S, S] with ImageNet mean/std (as the training loader)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean, std = _stats(x.device)
    return (x - mean) / std


def unnormalize(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [N, 3, S, S] -> displayable float RGB [N, S, S, 3] in [0, 1] (clipped)."""
    mean, std = _stats(x.device)
    return (x.detach().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def patch_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise [N, L] from a seeded generator: image i gets the same noise (so the same mask)
    whatever the batch; the patches with the smallest noise stay visible."""
    return torch.rand(n, num_patches, generator=torch.Generator().manual_seed(int(seed)))


# ============================================================================ reconstruction
def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [N, L, 1] of each target patch exactly as norm_pix_loss normalises it:
    mean and (unbiased var + 1e-6)^0.5 over the patch's p*p*3 values."""
    return target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5


def fill_from_visible(stat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-patch statistic [N, L, 1] with masked patches' values replaced by an estimate from
    the visible ones: the mean over the visible patches of its 3x3 neighbourhood, or, where no
    neighbour is visible, the mean over all visible patches of the image. Visible patches keep
    their own value. This is what a user of the model can know: hidden patches' stats are not."""
    n, length, _ = stat.shape
    g = int(round(length ** 0.5))
    visible = (1 - mask).view(n, 1, g, g)                                   # [N, 1, G, G]
    grid = stat.view(n, 1, g, g) * visible
    ones = torch.ones(1, 1, 3, 3, device=stat.device, dtype=stat.dtype)
    local_sum = F.conv2d(grid, ones, padding=1)
    local_count = F.conv2d(visible, ones, padding=1)
    image_mean = grid.sum(dim=(2, 3), keepdim=True) / visible.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    estimate = torch.where(local_count > 0, local_sum / local_count.clamp(min=1), image_mean)
    filled = torch.where(visible > 0, stat.view(n, 1, g, g), estimate)
    return filled.view(n, length, 1)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor,
                norm_pix_stats: str = "visible") -> dict:
    """Run the MAE on ImageNet-normalised images with a given mask and return every piece.

    imgs [N, 3, S, S]; noise [N, L] (see patch_noise). For a norm_pix_loss model the prediction
    is in per-patch normalised units and is mapped back to pixels with per-patch mean/std:
    norm_pix_stats="visible" (default) restores visible patches with their own statistics and
    masked ones with statistics estimated from visible neighbours (fill_from_visible);
    "oracle" uses every patch's true statistics, which leak the hidden patch's brightness and
    contrast, as most published MAE visualisations do.

    Returns tensors on the CPU: mask [N, L] (1 = hidden), target [N, L, P], pred (raw model
    output) and pred_pixels [N, L, P] (ImageNet-normalised pixel space), recon and pasted
    [N, 3, S, S] (the prediction; the prediction with the visible patches of the original pasted
    back), masked_input [N, 3, S, S] (hidden patches set to 0 = the ImageNet mean colour, as the
    reference demo), ids_keep [N, K] (the encoder's input order), and per image [N]: mse (masked
    patches, normalised pixel space), objective (the model's training loss) and baseline_mse
    (filling hidden patches with the mean colour of the visible pixels) and inpaint_mse (OpenCV's
    inpainting of the hidden patches, `inpainted` [N, 3, S, S]; see inpaint_hidden).
    """
    if norm_pix_stats not in ("visible", "oracle"):
        raise UsfmaeError(f"norm_pix_stats must be 'visible' or 'oracle', got {norm_pix_stats!r}")
    device = next(model.parameters()).device
    imgs, noise = imgs.to(device).float(), noise.to(device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)       # [N, L, P], [N, L]
    target = model.patchify(imgs)                                          # [N, L, P]
    hidden = mask.unsqueeze(-1)                                            # [N, L, 1]
    n_hidden = mask.sum(dim=1).clamp(min=1)                                # [N]

    def masked_mean(per_patch):  # [N, L] -> [N], mean over the hidden patches of each image
        return (per_patch * mask).sum(dim=1) / n_hidden

    if model.norm_pix_loss:
        mean, std = patch_stats(target)                                    # [N, L, 1] each
        objective = masked_mean(((pred - (target - mean) / std) ** 2).mean(dim=-1))
        if norm_pix_stats == "visible":
            mean, std = fill_from_visible(mean, mask), fill_from_visible(std, mask)
        pred_pixels = pred * std + mean
    else:
        pred_pixels = pred
        objective = masked_mean(((pred - target) ** 2).mean(dim=-1))
    mse = masked_mean(((pred_pixels - target) ** 2).mean(dim=-1))

    # baseline: every hidden pixel gets the mean colour of the image's visible pixels
    n, length, values = target.shape
    by_channel = target.view(n, length, values // 3, 3)                    # [N, L, p*p, 3]
    visible = (1 - mask).view(n, length, 1, 1)
    colour = (by_channel * visible).sum(dim=(1, 2)) / (visible.sum(dim=(1, 2)) * values // 3).clamp(min=1)
    baseline_mse = masked_mean(((by_channel - colour.view(n, 1, 1, 3)) ** 2).mean(dim=(2, 3)))

    # a hand-made method: OpenCV's Navier-Stokes inpainting of the hidden patches (as notebook 02
    # removes annotations); what the MAE learned must beat it to be worth its training
    inpainted = inpaint_hidden(model.unpatchify(target), mask, model.patch_size)  # [N, 3, S, S]
    inpaint_mse = masked_mean(((model.patchify(inpainted) - target) ** 2).mean(dim=-1))

    ids_keep = torch.argsort(noise, dim=1)[:, :int(length * (1 - mask_ratio))]  # as random_masking
    out = dict(
        mask_ratio=float(mask_ratio), norm_pix_loss=bool(model.norm_pix_loss), norm_pix_stats=norm_pix_stats,
        mask=mask, target=target, pred=pred, pred_pixels=pred_pixels, ids_keep=ids_keep,
        original=imgs,
        masked_input=model.unpatchify(target * (1 - hidden)),
        recon=model.unpatchify(pred_pixels),
        pasted=model.unpatchify(target * (1 - hidden) + pred_pixels * hidden),
        inpainted=inpainted, mse=mse, objective=objective, baseline_mse=baseline_mse, inpaint_mse=inpaint_mse)
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()}


def inpaint_hidden(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, radius: int = 3) -> torch.Tensor:
    """Classical inpainting of the hidden patches: cv2.inpaint (Navier-Stokes, `radius` px) of each
    image, with every pixel of a hidden patch in the inpainting mask.

    imgs [N, 3, S, S] ImageNet-normalised (made from uint8, so the round trip is exact); mask
    [N, L] (1 = hidden). Returns [N, 3, S, S] in the same units, visible pixels unchanged.
    """
    n, _, size, _ = imgs.shape
    g = size // patch_size
    rgb = np.rint(unnormalize(imgs) * 255).astype(np.uint8)                # [N, S, S, 3]
    holes = mask.detach().cpu().numpy().reshape(n, g, g).astype(np.uint8)
    holes = np.kron(holes, np.ones((1, patch_size, patch_size), np.uint8))  # [N, S, S], 1 = hidden pixel
    filled = np.stack([cv2.inpaint(np.ascontiguousarray(rgb[i]), holes[i], radius, cv2.INPAINT_NS)
                       for i in range(n)])
    return normalize_images(filled, imgs.device)


def reconstruct_batched(model, imgs, mask_ratio, noise, batch_size: int = 32, **kwargs) -> dict:
    """reconstruct() in batches of batch_size images (same results: noise is per image)."""
    parts = [reconstruct(model, imgs[i:i + batch_size], mask_ratio, noise[i:i + batch_size], **kwargs)
             for i in range(0, len(imgs), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else parts[0][k]
            for k in parts[0]}


# ============================================================================ mask-ratio sweep
def mask_ratio_sweep(model, imgs: torch.Tensor, anatomies, mask_ratios, seed: int = 0, batch_size: int = 32,
                     paths=None, norm_pix_stats: str = "visible") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Masked-patch error per image at each ratio, and its summary per (ratio, anatomy).

    One noise per image (seeded) serves every ratio, so masks are nested and the ratios differ
    only in how much is hidden. Returns (per_image, table): per_image has one row per image and
    ratio (mask_ratio, image, path, anatomy, mse, objective, baseline_mse, inpaint_mse); table one
    row per ratio and anatomy plus one per ratio with anatomy "all" (n_images, mse mean and std,
    objective, baseline_mse, inpaint_mse), all errors in ImageNet-normalised pixel units on hidden patches.
    """
    anatomies = [str(a) for a in anatomies]
    if len(anatomies) != len(imgs):
        raise UsfmaeError(f"{len(imgs)} images but {len(anatomies)} anatomy labels")
    bad = [r for r in mask_ratios if not 0.0 < float(r) < 1.0]
    if bad:
        raise UsfmaeError(f"mask ratios must lie strictly between 0 and 1; got {bad}")
    noise = patch_noise(len(imgs), model.num_patches, seed)
    rows = []
    for ratio in mask_ratios:
        res = reconstruct_batched(model, imgs, float(ratio), noise, batch_size, norm_pix_stats=norm_pix_stats)
        for i, anatomy in enumerate(anatomies):
            rows.append(dict(mask_ratio=float(ratio), image=i, path=None if paths is None else str(list(paths)[i]),
                             anatomy=anatomy, mse=float(res["mse"][i]), objective=float(res["objective"][i]),
                             baseline_mse=float(res["baseline_mse"][i]), inpaint_mse=float(res["inpaint_mse"][i])))
    per_image = pd.DataFrame(rows)
    return per_image, summarize_sweep(per_image)


def sweep_runs(models: dict, imgs: torch.Tensor, anatomies, mask_ratios, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """mask_ratio_sweep of every model of {pretraining run label: model} on the same images and masks:
    per_image gains a pretrain_run column; the summary is over runs and images (summarize_sweep)."""
    per_image = pd.concat([mask_ratio_sweep(model, imgs, anatomies, mask_ratios, **kw)[0].assign(pretrain_run=run)
                           for run, model in models.items()], ignore_index=True)
    return per_image, summarize_sweep(per_image)


def summarize_sweep(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std of mse) per (mask_ratio, anatomy), then the pooled rows (anatomy "all"); with
    several pretraining runs, over runs and images (n_images counts the images)."""
    def summary(df):
        return df.groupby("mask_ratio").agg(
            n_images=("image", "nunique"), mse=("mse", "mean"), mse_std=("mse", "std"),
            objective=("objective", "mean"), baseline_mse=("baseline_mse", "mean"),
            inpaint_mse=("inpaint_mse", "mean")).reset_index()

    parts = [summary(rows).assign(anatomy=anatomy) for anatomy, rows in per_image.groupby("anatomy", sort=True)]
    parts.append(summary(per_image).assign(anatomy=ALL))
    table = pd.concat(parts, ignore_index=True)
    table["mse_std"] = table["mse_std"].fillna(0.0)  # one image: no spread
    cols = ["mask_ratio", "anatomy", "n_images", "mse", "mse_std", "objective", "baseline_mse", "inpaint_mse"]
    return table[cols].sort_values(["mask_ratio", "anatomy"], key=lambda s: s.map(
        lambda v: (v == ALL, v) if isinstance(v, str) else v)).reset_index(drop=True)


BASELINES = {"flat fill": "baseline_mse", "OpenCV inpainting": "inpaint_mse"}
VERDICT_COLUMNS = ["comparison", "dataset", "n", "model", "other", "difference", "low", "high", "method", "verdict"]
ERROR_WORDS = {stats.BELOW: "lower error", stats.ABOVE: "higher error"}


def _with_runs(per_image: pd.DataFrame) -> pd.DataFrame:
    """per_image with its pretraining run (a sweep of one checkpoint has no column: one run)."""
    return per_image if "pretrain_run" in per_image else per_image.assign(pretrain_run="run 1")


def paired_error(rows: pd.DataFrame, a: str, b: str) -> stats.Interval:
    """The mean of the paired differences rows[a] - rows[b] (one row per pretraining run and image, the
    same masks for both) and the interval of that mean: stats.interval with the images crossed with
    the pretraining runs (every checkpoint sees the same images), Student-t over images when there is
    one run."""
    runs = _with_runs(rows)
    runs = pd.DataFrame(dict(pretrain_run=runs["pretrain_run"], split=0, seed=runs["image"],
                             value=runs[a].to_numpy() - runs[b].to_numpy(), paired=True))
    return stats.interval(runs, "value", pretrained=True, seed_name="images")


def _verdict_row(comparison: str, subset: str, rows: pd.DataFrame, a: str, b: str, smoke: bool) -> dict:
    d = paired_error(rows, a, b)
    verdict = stats.verdict(d.low, d.high, unjudged="smoke" if smoke else None)
    verdict = ERROR_WORDS.get(verdict, verdict)  # the one rule, said of an error
    return dict(comparison=comparison, dataset=subset, n=d.n_seeds, model=float(rows[a].mean()),
                other=float(rows[b].mean()), difference=d.mean, low=d.low, high=d.high, method=d.method,
                verdict=verdict)


def sweep_verdicts(per_image: pd.DataFrame, ratio: float, profile: str | None = None) -> pd.DataFrame:
    """The sweep's verdicts as one table: at `ratio`, the model's masked-patch error against each
    baseline (flat fill, OpenCV inpainting), per anatomy and pooled ("all"), each difference
    (model minus baseline) paired by image, and by pretraining run when per_image holds several
    (paired_error). Verdict: the one rule (stats.verdict), said of an error: "lower error" / "higher
    error" when the interval excludes 0, "no clear difference" when it does not; "too small to judge"
    for every row on the smoke profile. Columns: VERDICT_COLUMNS."""
    rows = per_image[np.isclose(per_image.mask_ratio, ratio)]
    if rows.empty:
        raise UsfmaeError(f"the sweep has no mask ratio {ratio:.0%}; add it to mask_ratios")
    smoke = profile == "smoke"
    out = []
    for name, column in BASELINES.items():
        if column not in rows:
            continue
        comparison = f"MAE vs {name} at {ratio:.0%}"
        for anatomy, g in rows.groupby("anatomy", sort=True):
            out.append(_verdict_row(comparison, anatomy, g, "mse", column, smoke))
        out.append(_verdict_row(comparison, ALL, rows, "mse", column, smoke))
    return pd.DataFrame(out, columns=VERDICT_COLUMNS)


def _at_two_ratios(per_image: pd.DataFrame, low: float, high: float) -> pd.DataFrame:
    """One row per pretraining run and image: mse and baseline_mse at `low` and at `high` (suffixes _low, _high)."""
    runs = _with_runs(per_image)
    keys = ["pretrain_run", "image"]
    at = {r: runs[np.isclose(runs.mask_ratio, r)][keys + ["mse", "baseline_mse"]] for r in (low, high)}
    return at[low].merge(at[high], on=keys, suffixes=("_low", "_high"))


def _beats_flat_fill(both: pd.DataFrame, at: str) -> bool:
    """Is the model's error below the flat fill's at one of the two ratios ("low" or "high")?"""
    d = paired_error(both, f"mse_{at}", f"baseline_mse_{at}")
    return stats.side(d.low, d.high) == stats.BELOW


def ratio_verdicts(per_image: pd.DataFrame, low: float, highs, profile: str | None = None) -> pd.DataFrame:
    """The error at `low` against each ratio in `highs`, pooled over anatomies, paired by image
    (the same image at two ratios; nested masks) and pretraining run. Judged only where the model
    beats the flat fill at both ratios; otherwise its error at either says nothing of what it learned."""
    out = []
    for high in highs:
        both = _at_two_ratios(per_image, low, high)
        if both.empty:
            continue
        row = _verdict_row(f"MAE error at {low:.0%} vs at {high:.0%}", ALL, both, "mse_low", "mse_high",
                           profile == "smoke")
        beats = all(_beats_flat_fill(both, at) for at in ("low", "high"))
        if not beats and row["verdict"] != stats.TOO_SMALL:
            row["verdict"] = "not judged: the model does not beat the flat fill at both ratios"
        out.append(row)
    return pd.DataFrame(out, columns=VERDICT_COLUMNS)


def verdict_table(per_image: pd.DataFrame, ratio: float, mask_ratios, profile: str | None = None) -> pd.DataFrame:
    """Notebook 04's verdicts in one table: sweep_verdicts at `ratio`, then ratio_verdicts of
    `ratio` against every larger ratio of the sweep."""
    return pd.concat([sweep_verdicts(per_image, ratio, profile),
                      ratio_verdicts(per_image, ratio, [r for r in mask_ratios if r > ratio], profile)],
                     ignore_index=True)


# ============================================================================ attention
@torch.no_grad()
def last_layer_attention(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """Attention weights [N, heads, T, T] of the encoder's last block on unmasked images.

    timm's attention calls F.scaled_dot_product_attention, which returns no weights, so a forward
    hook on the last block's attention module recomputes softmax(q k^T * scale) from its input
    with the module's own qkv (and q/k norms). Tokens in patch order (cls first): the encoder runs
    with mask_ratio 0 and noise = arange(L), as a fine-tuned encoder sees an image. Each row sums
    to 1 over the T tokens.
    """
    attn = model.blocks[-1].attn
    captured = {}

    def hook(module, inputs, output):
        x = inputs[0]                                                      # [N, T, D], after norm1
        n, t, _ = x.shape
        qkv = module.qkv(x).reshape(n, t, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])              # [N, H, T, hd]
        captured["attn"] = ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [N, H, T, T]

    device = next(model.parameters()).device
    imgs = imgs.to(device).float()
    order = torch.arange(model.num_patches, device=device, dtype=torch.float32).expand(len(imgs), -1)
    handle = attn.register_forward_hook(hook)
    try:
        model.forward_encoder(imgs, mask_ratio=0.0, noise=order)
    finally:
        handle.remove()
    return captured["attn"].cpu()


def cls_attention_maps(attn: torch.Tensor) -> torch.Tensor:
    """[N, H, T, T] -> [N, G, G]: how much the cls token attends to each patch, averaged over heads
    (the cls token's weight on itself, attn[:, :, 0, 0], is the remainder of the row's 1)."""
    cls_row = attn[:, :, 0, 1:].mean(dim=1)                                # [N, L]
    g = int(round(cls_row.shape[1] ** 0.5))
    return cls_row.reshape(-1, g, g)


# ============================================================================ figures
def _plt():
    import matplotlib.pyplot as plt  # imported on use: the library itself needs no display
    return plt


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Write a figure as PNG atomically (temp file + rename): a killed run leaves no half PNG."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))


def write_table(df: pd.DataFrame, path) -> Path:
    """Write a CSV atomically."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


def _grid_lines(ax, size: int, patch: int, colour="white", width=0.5):
    for v in range(patch, size, patch):
        ax.axhline(v - 0.5, color=colour, lw=width)
        ax.axvline(v - 0.5, color=colour, lw=width)


def _off(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def plot_reconstructions(result: dict, labels=None, title: str | None = None, scale: float = 2.0):
    """The reference MAE demo's four panels per image (rows): original / masked / reconstruction /
    reconstruction with the visible patches pasted back, all un-normalised to [0, 1] RGB; then,
    when the result has it, OpenCV's inpainting of the same hidden patches."""
    plt = _plt()
    keys = [k for k in ("original", "masked_input", "recon", "pasted", "inpainted") if k in result]
    panels = [unnormalize(result[k]) for k in keys]
    n = len(panels[0])
    labels = list(labels) if labels is not None else [f"image {i}" for i in range(n)]
    fig, axes = plt.subplots(n, len(keys), figsize=(len(keys) * scale, n * scale + 0.3), squeeze=False,
                             layout="constrained")
    for i in range(n):
        for j, images in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(images[i], interpolation="nearest")
            _off(ax)
            if i == 0:
                ax.set_title(PANEL_TITLES[j] if j < len(PANEL_TITLES) else "OpenCV inpainting", fontsize=9)
        axes[i, 0].set_ylabel(f"{labels[i]}\nMSE {float(result['mse'][i]):.3f}", fontsize=8)
        if "inpainted" in result:
            axes[i, -1].set_xlabel(f"MSE {float(result['inpaint_mse'][i]):.3f}", fontsize=8)
    if title is None:
        title = f"mask {result['mask_ratio']:.0%}"
        if result["norm_pix_loss"]:
            title += f", norm_pix_loss (patch stats: {result['norm_pix_stats']})"
    fig.suptitle(title, fontsize=10)
    return fig


def _token_strip(ax, cells: list, labels: list, per_row: int, title: str):
    """Draw a sequence of tokens as a strip that wraps every per_row tokens, like text: each cell a
    [p, p, 3] picture (a patch) or a colour name (a special token), its label under it."""
    from matplotlib.colors import to_rgb

    p = next((c.shape[0] for c in cells if isinstance(c, np.ndarray)), 8)  # the patch side
    gap, label_h = max(2, p // 4), max(6, int(p * 0.7))
    rows = int(np.ceil(len(cells) / per_row))
    per_row = int(np.ceil(len(cells) / rows))  # rows of even length: no lone token on the last one
    canvas = np.ones((rows * (p + label_h), per_row * (p + gap) - gap, 3))
    for t, (cell, label) in enumerate(zip(cells, labels)):
        r, c = divmod(t, per_row)
        y, x = r * (p + label_h), c * (p + gap)
        canvas[y:y + p, x:x + p] = cell if isinstance(cell, np.ndarray) else np.array(to_rgb(cell))
        if isinstance(cell, np.ndarray):  # a patch: its position index under it
            ax.text(x + p / 2 - 0.5, y + p + label_h * 0.45, label, ha="center", va="center", fontsize=5.5)
        else:  # a special token: its name on it
            ax.text(x + p / 2 - 0.5, y + p / 2 - 0.5, "cls" if label == "cls" else "M", ha="center",
                    va="center", fontsize=5.5, color="white", weight="bold")
    ax.imshow(canvas, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    _off(ax)
    for side in ax.spines.values():
        side.set_visible(False)


WALKTHROUGH_STAGES = ("patches", "mask", "encoder_input", "decoder_input", "decoder_output", "loss")


def plot_walkthrough(result: dict, stage: str, i: int = 0, patch_size: int = 16, scale: float = 3.0,
                     per_row: int = 16):
    """One figure for one stage of one image's trip through the MAE (WALKTHROUGH_STAGES): patches,
    mask, encoder_input (the token sequence the encoder gets: cls, then the visible patches in
    its shuffled order, each labelled with its position index), decoder_input (cls, then all L
    positions in patch order: the encoded visible tokens, drawn as their patch, and the shared
    mask token at every hidden one), decoder_output, loss (per hidden patch, colour scale from 0).
    One figure per call, so that a notebook makes each figure in the cell that shows it (the inline
    backend shows every figure still open at the end of a cell)."""
    if stage not in WALKTHROUGH_STAGES:
        raise UsfmaeError(f"unknown walkthrough stage {stage!r}; one of {', '.join(WALKTHROUGH_STAGES)}")
    plt = _plt()
    original = unnormalize(result["original"][i:i + 1])[0]                 # [S, S, 3]
    size = original.shape[0]
    g = size // patch_size
    mask = result["mask"][i].numpy().reshape(g, g)                         # 1 = hidden
    hidden_px = np.kron(mask, np.ones((patch_size, patch_size)))[..., None] > 0

    def patch_at(idx):  # the pixels of patch idx (row-major), [p, p, 3]
        r, c = divmod(int(idx), g)
        return original[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]

    if stage == "patches":
        fig, ax = plt.subplots(figsize=(scale, scale))
        ax.imshow(original)
        _grid_lines(ax, size, patch_size)
        for idx in range(g * g) if g <= 8 else ():  # small grids: the position index of each patch
            r, c = divmod(idx, g)
            ax.text((c + 0.5) * patch_size, (r + 0.5) * patch_size, str(idx), ha="center", va="center",
                    fontsize=6, color="yellow")
        ax.set_title(f"{g} x {g} = {g * g} patches of {patch_size}x{patch_size} px\n(numbered row by row)", fontsize=9)
        _off(ax)
        fig.tight_layout()
        return fig

    if stage == "mask":
        fig, ax = plt.subplots(figsize=(scale, scale))
        ax.imshow(np.where(hidden_px, 0.5 * original + 0.25, original))      # hidden patches washed out
        for r, c in zip(*np.nonzero(mask)):
            ax.add_patch(plt.Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                       fill=False, ec="tab:red", lw=0.6))
        ax.set_title(f"random mask: {int(mask.sum())} of {g * g} patches hidden ({result['mask_ratio']:.0%})",
                     fontsize=9)
        _off(ax)
        fig.tight_layout()
        return fig

    if stage == "encoder_input":
        keep = result["ids_keep"][i].numpy()
        rows = int(np.ceil((len(keep) + 1) / per_row))
        fig, ax = plt.subplots(figsize=(per_row * 0.42, rows * 0.62 + 0.6))
        _token_strip(ax, ["tab:orange"] + [patch_at(k) for k in keep], ["cls"] + [str(int(k)) for k in keep], per_row,
                     f"encoder input: a sequence of 1 + {len(keep)} tokens, the cls token and the visible patches "
                     f"in shuffled order\n(number = the patch's position, carried by its position embedding; "
                     f"no hidden patch, no mask token)")
        fig.tight_layout()
        return fig

    if stage == "decoder_input":
        hidden = set(np.nonzero(mask.reshape(-1))[0].tolist())
        cells = ["tab:orange"] + ["0.55" if k in hidden else patch_at(k) for k in range(g * g)]
        labels = ["cls"] + [str(k) for k in range(g * g)]
        rows = int(np.ceil(len(cells) / per_row))
        fig, ax = plt.subplots(figsize=(per_row * 0.42, rows * 0.62 + 0.6))
        _token_strip(ax, cells, labels, per_row,
                     f"decoder input: 1 + {g * g} tokens in patch order, the encoded visible tokens (drawn as their "
                     f"patch)\nand the one shared mask token M at each of the {len(hidden)} hidden positions")
        fig.tight_layout()
        return fig

    if stage == "decoder_output":
        fig, ax = plt.subplots(figsize=(scale, scale))
        ax.imshow(unnormalize(result["recon"][i:i + 1])[0])
        _grid_lines(ax, size, patch_size, colour="black", width=0.3)
        ax.set_title("decoder output: every patch predicted\n(only hidden ones count in the loss)", fontsize=9)
        _off(ax)
        fig.tight_layout()
        return fig

    if stage == "loss":
        per_patch = ((result["pred_pixels"][i] - result["target"][i]) ** 2).mean(dim=-1).numpy().reshape(g, g)
        shown = np.ma.masked_where(mask == 0, per_patch)
        fig, ax = plt.subplots(figsize=(scale * 1.2, scale))
        im = ax.imshow(shown, cmap="magma", interpolation="nearest", vmin=0)  # from 0: a dark patch is a small error
        fig.colorbar(im, ax=ax, fraction=0.046, label="MSE per hidden patch")
        ax.set_title(f"loss = mean over hidden patches = {float(result['mse'][i]):.3f}\n(visible patches: white)",
                     fontsize=9)
        _off(ax)
        fig.tight_layout()
        return fig


def plot_sweep(table: pd.DataFrame, title: str = "masked-patch error vs mask ratio", trained_ratio: float | None = None):
    """Masked-patch MSE against the mask ratio: one line per anatomy, the pooled mean in black,
    the flat-fill and OpenCV-inpainting baselines dashed, the ratio the model was trained at marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("tab10")
    for k, (anatomy, rows) in enumerate((a, r) for a, r in table.groupby("anatomy", sort=True) if a != ALL):
        ax.plot(100 * rows.mask_ratio, rows.mse, "o-", lw=1, ms=3, color=cmap(k % 10), alpha=0.8, label=anatomy)
    pooled = table[table.anatomy == ALL]
    ax.errorbar(100 * pooled.mask_ratio, pooled.mse, yerr=pooled.mse_std, fmt="s-", color="black", lw=2.2,
                capsize=3, label="all (mean ± sd over images)")
    ax.plot(100 * pooled.mask_ratio, pooled.baseline_mse, "--", color="grey", label="flat fill: mean visible colour")
    if "inpaint_mse" in pooled:
        ax.plot(100 * pooled.mask_ratio, pooled.inpaint_mse, "-.", color="tab:blue", lw=1.6,
                label="OpenCV inpainting (Navier-Stokes)")
    if trained_ratio is not None:  # evaluating at a ratio is not pretraining at it
        ax.axvline(100 * trained_ratio, color="tab:red", ls=":", lw=1.5, label=f"trained at {trained_ratio:.0%}")
    ax.set_xlabel("mask ratio (% of patches hidden)")
    ax.set_ylabel("MSE on hidden patches\n(ImageNet-normalised pixels)")
    ax.set_xticks(100 * pooled.mask_ratio)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_attention(images: np.ndarray, maps: torch.Tensor, labels=None, scale: float = 1.8, per_row: int = 5):
    """Images and, below each, the cls token's last-layer attention over it (upsampled, overlaid;
    colour scale per image), up to per_row images side by side."""
    plt = _plt()
    n = len(images)
    labels = list(labels) if labels is not None else [f"image {i}" for i in range(n)]
    cols = min(n, per_row)
    pairs = int(np.ceil(n / cols))
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(cols * scale, pairs * (2 * scale + 0.3)), squeeze=False,
                             layout="constrained")
    size = images.shape[1]
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        heat = cv2.resize(maps[i].numpy().astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST)
        top.imshow(images[i])
        top.set_title(labels[i], fontsize=8)
        bottom.imshow(images[i])
        bottom.imshow(heat, cmap="inferno", alpha=0.6)
        bottom.set_title(f"cls -> patches (max {float(maps[i].max()):.2f})", fontsize=7)
    fig.suptitle("encoder last layer: cls-token attention, mean over heads", fontsize=10)
    return fig


# ============================================================================ interactive
def frontend_available() -> bool:
    """True inside a Jupyter kernel (JupyterLab / Notebook), False in a plain Python process.
    A papermill run is also a kernel but has no one looking: the notebook's `interactive`
    parameter (None = off under usfmae run, study.setup) covers that case."""
    from .study import jupyter_kernel

    return jupyter_kernel()


def _ellipsize(text: str, width: int = 60) -> str:
    """text cut in the middle to `width` characters ("abc...xyz"), so a long file name fits a title."""
    if len(text) <= width:
        return text
    keep = width - 3
    return f"{text[:keep - keep // 2]}...{text[-(keep // 2):]}"


def interactive_view(model, clean_dir, index: pd.DataFrame, mask_ratio: float = 0.25, seed: int = 0,
                     interactive: bool = False, norm_pix_stats: str = "visible"):
    """Image picker, mask-ratio slider and seed box redrawing the four panels (ipywidgets).

    Headless (interactive=False, no Jupyter frontend, or no ipywidgets) it returns the static
    figure for the first image at mask_ratio/seed instead, so a papermill run shows the same view.
    """
    img_size = model.patch_embed.img_size[0]

    def draw(row: int, ratio: float, mask_seed: int):
        imgs = normalize_images(load_images(clean_dir, [index.path.iloc[row]], img_size))
        res = reconstruct(model, imgs, ratio, patch_noise(1, model.num_patches, mask_seed), norm_pix_stats)
        # the image's name goes above the row: a vertical label beside one row outgrows the image
        title = (f"{index.anatomy.iloc[row]}: {_ellipsize(Path(index.path.iloc[row]).name)}\n"
                 f"mask {ratio:.0%}, seed {mask_seed}")
        if res["norm_pix_loss"]:
            title += f", norm_pix_loss (patch stats: {res['norm_pix_stats']})"
        fig = plot_reconstructions(res, labels=[""], title=title, scale=2.6)
        fig.axes[0].set_ylabel(f"MSE {float(res['mse'][0]):.3f}", fontsize=8)
        return fig

    if not (interactive and frontend_available()):
        return draw(0, mask_ratio, seed)
    try:
        import ipywidgets as widgets
    except ImportError:
        return draw(0, mask_ratio, seed)
    from IPython.display import display

    picker = widgets.Dropdown(options=[(f"{a}: {Path(p).name}", i) for i, (a, p) in
                                       enumerate(zip(index.anatomy, index.path))], description="image")
    ratio = widgets.FloatSlider(value=mask_ratio, min=0.05, max=0.95, step=0.05, description="mask ratio",
                                continuous_update=False, readout_format=".0%")
    seed_box = widgets.IntText(value=seed, description="seed")
    out = widgets.Output()

    def update(_=None):
        plt = _plt()
        with out:
            out.clear_output(wait=True)
            fig = draw(picker.value, ratio.value, seed_box.value)
            display(fig)
            plt.close(fig)

    for w in (picker, ratio, seed_box):
        w.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([picker, ratio, seed_box]), out])
