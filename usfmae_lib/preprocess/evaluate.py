"""How well annotation removal works, measured against ground truth: per-kind masks of the synthetic
annotated tree (`evaluate_annotated`, with the ablation variants) and OCR read before and after
cleaning on real scans (`evaluate_real`). Notebook 02's tables and figures come from here.
"""
from __future__ import annotations

import json
import multiprocessing
import re
import sys
from pathlib import Path

import cv2
import numpy as np

from .. import UsfmaeError
from .batch import cpu_count, pool_worker_init, read_image
from .detectors import (DETECTORS, IMAGE_SUFFIXES, CleanConfig, check_tesseract, clean_image, combine_masks, detect,
                        inpaint, tesseract_words)


# ============================================================================ evaluation
KINDS = ("text", "calipers", "scale", "colour", "grey", "box_arrow")


def synthetic_kind_masks(tree_dir, name: str) -> dict[str, np.ndarray]:
    """Exact mask of each annotation kind of one synthetic annotated image (`annotated/<name>`).

    The generator stores only the union mask, so this replays it (same seed, same scene, same
    random stream) with a Painter that records which drawing call made each pixel:
    text = every text call (labels, device, measurements); calipers = caliper crosses and dots;
    scale = depth-scale ticks and focus marker; colour = colour Doppler flow and colour bar;
    grey = pencil trace and grey-scale bar; box_arrow = ROI / Doppler box outlines and arrows.
    The union of the kinds is checked against the stored mask (a changed generator is an error)."""
    from .. import synth_annotations as sa
    from .. import synthetic as syn

    root = Path(tree_dir)
    info = json.loads((root / "synth.json").read_text())
    seed, (SH, SW) = info["seed"], info["params"]["annotated_size"]
    i = int(re.search(r"(\d+)", name).group(1))
    kinds: dict[str, np.ndarray] = {}

    class Recorder(sa.Painter):
        def _both(self, fn, colour, *a, **k):  # Painter._both, also remembering the pixels drawn
            scratch = np.zeros((self.H, self.W), np.uint8)
            fn(scratch, *a, color=255, **k)
            sel = scratch >= 128
            self.over[sel] = colour
            self.mask[sel] = 255
            self._drawn = sel

        def _record(self, kind):
            kinds.setdefault(kind, np.zeros((self.H, self.W), np.uint8))[self._drawn] = 255

        def text(self, *a, **k):
            super().text(*a, **k)
            self._record("text")

        def line(self, p0, p1, colour, thick=1):
            super().line(p0, p1, colour, thick)
            caller = sys._getframe(1).f_code.co_name
            if caller == "_caliper":
                kind = "calipers"
            elif p0[0] == 3 and p1[0] == 7:
                kind = "colour"  # colour bar
            elif p0[0] == self.W - 6 and p1[0] == self.W - 3:
                kind = "grey"  # grey-scale bar
            else:
                kind = "scale"  # depth-scale ticks
            self._record(kind)

        def rect(self, *a, **k):
            super().rect(*a, **k)
            self._record("box_arrow")

        def arrow(self, *a, **k):
            super().arrow(*a, **k)
            self._record("box_arrow")

        def poly(self, pts, colour, thick=1, closed=False):
            super().poly(pts, colour, thick, closed)
            self._record("scale" if closed else "grey")  # closed: focus marker; open: pencil trace

        def pixels(self, m, colours):
            super().pixels(m, colours)
            kinds.setdefault("colour", np.zeros((self.H, self.W), np.uint8))[m] = 255

    a, r, clean, marks_at = syn.annotated_screen(seed, i, (SH, SW))  # replays synthetic._task_annot
    saved = sa.Painter
    sa.Painter = Recorder
    try:
        _, union, _ = sa.annotate(clean, r, a, *marks_at)
    finally:
        sa.Painter = saved
    stored = cv2.imread(str(root / "annotated" / "masks" / name), cv2.IMREAD_GRAYSCALE)
    if stored is None or not np.array_equal(stored > 0, union > 0):
        raise UsfmaeError(f"{root / 'annotated/masks' / name}: replaying the generator does not give the stored "
                          f"mask; regenerate the tree with this version (usfmae synth)")
    return {k: kinds.get(k, np.zeros((SH, SW), np.uint8)) for k in KINDS}


def mask_scores(pred: np.ndarray, kind_masks: dict[str, np.ndarray], tolerance: int = 3) -> dict[str, float]:
    """Pixel precision / recall / IoU of a predicted mask, overall and per annotation kind.

    A predicted pixel is attributed to the kind of the nearest ground-truth pixel (so a box
    drawn around a word counts for "text"); recall_k = |pred & gt_k| / |gt_k|,
    precision_k = |pred_k & gt_k| / |pred_k|, iou_k = |pred_k & gt_k| / |pred_k | gt_k|.
    The mask is dilated on purpose (inpainting needs a margin), so pixel precision is low by
    design; "precision_near" counts predicted pixels within `tolerance` px of an annotation as
    right. Kinds absent from the image give NaN. Keys: "precision", "precision_near", "recall",
    "iou", "<kind>_recall", "<kind>_precision", "<kind>_iou"."""
    from scipy import ndimage

    p = pred > 0
    label = np.zeros(p.shape, np.int16)  # kind index + 1 of each ground-truth pixel
    for j, k in enumerate(KINDS):
        label[(kind_masks[k] > 0) & (label == 0)] = j + 1
    gt = label > 0
    out = {}
    tp = (p & gt).sum()
    out["precision"] = tp / p.sum() if p.any() else np.nan
    out["recall"] = tp / gt.sum() if gt.any() else np.nan
    out["iou"] = tp / (p | gt).sum() if (p | gt).any() else np.nan
    if gt.any():
        dist, (iy, ix) = ndimage.distance_transform_edt(~gt, return_indices=True)
        nearest = label[iy, ix]  # [H, W] kind of the closest annotation pixel
        out["precision_near"] = (p & (dist <= tolerance)).sum() / p.sum() if p.any() else np.nan
    else:
        nearest = label
        out["precision_near"] = 0.0 if p.any() else np.nan
    for j, k in enumerate(KINDS):
        g = kind_masks[k] > 0
        if not g.any():
            out.update({f"{k}_precision": np.nan, f"{k}_recall": np.nan, f"{k}_iou": np.nan})
            continue
        pk = p & (nearest == j + 1)
        hit = (pk & g).sum()
        out[f"{k}_recall"] = (p & g).sum() / g.sum()
        out[f"{k}_precision"] = hit / pk.sum() if pk.any() else np.nan
        out[f"{k}_iou"] = hit / (pk | g).sum()
    return {k: float(v) for k, v in out.items()}


PSNR_IDENTICAL = 100.0  # dB given to an image identical to its reference (PSNR is infinite)


def psnr_ssim(img: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR (dB; PSNR_IDENTICAL when identical) and SSIM (scikit-image) of an RGB uint8 image
    against a reference of its size."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = PSNR_IDENTICAL if np.array_equal(img, reference) else peak_signal_noise_ratio(reference, img, data_range=255)
    return float(psnr), float(structural_similarity(reference, img, channel_axis=2, data_range=255))


def image_scores(cleaned: np.ndarray, annotated: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of the cleaned and of the uncleaned (annotated) image against the clean twin,
    all RGB uint8 at the annotated image's resolution (before any resizing)."""
    (pc, sc), (pu, su) = psnr_ssim(cleaned, clean), psnr_ssim(annotated, clean)
    return {"psnr_cleaned": pc, "ssim_cleaned": sc, "psnr_uncleaned": pu, "ssim_uncleaned": su}


ABLATIONS = {  # variant -> (detectors used, morphology (dilate, close, open) or None = the config's)
    "all detectors": (DETECTORS, None),
    "no text (OCR off)": (("colour", "grey"), None),
    "no colour": (("text", "grey"), None),
    "no grey": (("text", "colour"), None),
    "official morphology (no dilation, open 5x5)": (DETECTORS, (0, 5, 5)),
}


def _evaluate_one(args) -> list[dict]:
    tree, name, cfg, variants, clean_twin = args
    root = Path(tree) / "annotated"
    ann, clean = read_image(root / "images" / name), read_image(root / "clean" / name)
    kinds = synthetic_kind_masks(tree, name)
    t: dict[str, float] = {}
    det = detect(ann, cfg, t)
    present = "+".join(k for k in KINDS if kinds[k].any())
    psnr_u, ssim_u = psnr_ssim(ann, clean)  # the uncleaned image, once
    rows = []
    for variant, (use, morph) in variants.items():
        dilate, close, open_ = morph or (cfg.mask_dilate, cfg.close_kernel, cfg.open_kernel)
        parts = [det[d] for d in use if det[d] is not None] + [np.zeros(ann.shape[:2], np.uint8)]
        mask = combine_masks(parts, dilate, close, open_)
        cleaned = inpaint(ann, mask, cfg.inpaint_radius, cfg.inpaint_method)
        rows.append(dict(name=name, variant=variant, kinds=present, mask_fraction=float((mask > 0).mean()),
                         **mask_scores(mask, kinds), psnr_uncleaned=psnr_u, ssim_uncleaned=ssim_u))
        rows[-1]["psnr_cleaned"], rows[-1]["ssim_cleaned"] = psnr_ssim(cleaned, clean)
    rows[0].update({f"t_{k}": v for k, v in t.items()})
    if clean_twin:  # the clean twin carries no annotation: whatever is masked there is a false alarm
        rows[0]["clean_twin_mask_fraction"] = float((detect(clean, cfg)["mask"] > 0).mean())
    return rows


def _pool_map(fn, args: list, workers: int, progress: bool, desc: str) -> list:
    """fn over args on `workers` processes (1: in this process), in order, with a progress bar."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(args), desc=desc, unit="img")
    out = []
    workers = max(1, min(int(workers or cpu_count()), len(args) or 1))
    if workers == 1:
        for a in args:
            out.append(fn(a))
            bar and bar.update(1)
    else:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=pool_worker_init) as ex:
            for r in ex.map(fn, args, chunksize=2):
                out.append(r)
                bar and bar.update(1)
    if bar is not None:
        bar.close()
    return out


def evaluate_annotated(tree_dir, cfg: CleanConfig = CleanConfig(), limit: int = 0, variants=None,
                       clean_twins: bool = True, workers: int = 0, progress: bool = True):
    """Score annotation removal on the synthetic annotated set (`usfmae synth` tree).

    For each image (the first `limit`; 0 = all) and each variant (default `ABLATIONS`: all
    detectors, each one switched off, the official notebook's morphology): mask precision /
    recall / IoU overall and per kind (`mask_scores`), PSNR and SSIM of the cleaned and of the
    uncleaned image against the clean twin at the annotated image's resolution
    (`image_scores`), and the mask fraction; with clean_twins, also the mask fraction the
    pipeline produces on the clean twin (no annotation at all). One row per image and variant."""
    import pandas as pd

    tree = Path(tree_dir)
    names = sorted(p.name for p in (tree / "annotated" / "images").glob("*.png"))
    if not names:
        raise UsfmaeError(f"{tree / 'annotated/images'}: no annotated images; make the tree with `usfmae synth` "
                          f"(or run notebook 01 first)")
    if cfg.ocr:
        check_tesseract()
    names = names[:limit] if limit else names
    args = [(str(tree), n, cfg, variants or ABLATIONS, clean_twins) for n in names]
    rows = _pool_map(_evaluate_one, args, workers, progress, "evaluate")
    return pd.DataFrame([r for rs in rows for r in rs])


def summarize_annotated(scores):
    """Per variant: mean of each score over the images that hold the kind, the number of such
    images, and the share of images whose PSNR against the clean twin improved by cleaning."""
    import pandas as pd

    out = []
    for variant, g in scores.groupby("variant", sort=False):
        r = {"variant": variant, "images": len(g)}
        for k in ("precision", "precision_near", "recall", "iou"):
            r[k] = g[k].mean()
        for k in KINDS:
            have = g[f"{k}_recall"].notna()
            r[f"{k}_images"] = int(have.sum())
            for m in ("recall", "precision", "iou"):
                r[f"{k}_{m}"] = g.loc[have, f"{k}_{m}"].mean()
        for m in ("psnr", "ssim"):
            r[f"{m}_uncleaned"] = g[f"{m}_uncleaned"].mean()
            r[f"{m}_cleaned"] = g[f"{m}_cleaned"].mean()
        r["psnr_cleaned_median"] = g["psnr_cleaned"].median()
        r["psnr_gain_median"] = (g["psnr_cleaned"] - g["psnr_uncleaned"]).median()
        r["psnr_improved_share"] = float((g["psnr_cleaned"] > g["psnr_uncleaned"]).mean())
        r["ssim_improved_share"] = float((g["ssim_cleaned"] > g["ssim_uncleaned"]).mean())
        r["mask_fraction"] = g["mask_fraction"].mean()
        out.append(r)
    return pd.DataFrame(out)


def read_words(rgb: np.ndarray, psm: int = 11, scale: float = 2.0, min_chars: int = 2) -> list[tuple]:
    """What Tesseract reads on the whole grey image: (word, confidence, x, y, w, h in input px),
    upscaled by `scale` so small scanner fonts are legible, psm 11 (sparse text, as labels on a
    scan are), words of >= min_chars letters or digits. Measures the text that survives
    cleaning. At low confidence Tesseract also 'reads' speckle ('SS', 'ae'), which is not text."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    big = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale != 1 else grey
    return [(t, c, l / scale, tp / scale, w / scale, h / scale) for t, c, l, tp, w, h in tesseract_words(big, psm, 3)
            if sum(ch.isalnum() for ch in t) >= min_chars]


def still_read(before: list[tuple], after: list[tuple]) -> list[bool]:
    """For each word read before cleaning: is the same word (letters and digits, any case) read
    after cleaning, at any confidence, in a box that overlaps its box?"""
    def key(t):
        return "".join(ch for ch in t.lower() if ch.isalnum())

    out = []
    for t, _, x, y, w, h in before:
        out.append(any(key(t2) == key(t) and x2 < x + w and x < x2 + w2 and y2 < y + h and y < y2 + h2
                       for t2, _, x2, y2, w2, h2 in after))
    return out


def _real_one(args) -> dict:
    path, root, cfg, conf_levels = args
    rgb = read_image(path)
    _, det = clean_image(rgb, cfg, resize=False)
    rel = Path(path).relative_to(root)
    row = dict(image=rel.as_posix(), dataset=rel.parts[0], height=rgb.shape[0], width=rgb.shape[1],
               mask_fraction=float((det["mask"] > 0).mean()),
               fired="+".join(d for d in DETECTORS if det[d] is not None and det[d].any()) or "none")
    before, after = read_words(rgb), read_words(det["inpainted"])
    kept = still_read(before, after)
    for level in conf_levels:
        row[f"words_before_conf{level}"] = sum(c >= level for _, c, *_ in before)
        row[f"words_still_read_conf{level}"] = sum(k for k, (_, c, *_) in zip(kept, before) if c >= level)
        row[f"words_after_conf{level}"] = sum(c >= level for _, c, *_ in after)
    low = min(conf_levels)
    row["words_before"] = " ".join(f"{t}({c:.0f}{', still read' if k else ''})"
                                   for k, (t, c, *_) in zip(kept, before) if c >= low)
    row["words_after"] = " ".join(f"{t}({c:.0f})" for t, c, *_ in after if c >= low)
    return row


def evaluate_real(root, cfg: CleanConfig = CleanConfig(), limit: int = 0, conf_levels=(50, 60, 70, 80),
                  workers: int = 0, progress: bool = True):
    """Clean real images (every image under root; the first `limit` per dataset folder, 0 = all)
    and count, at each confidence level, the words Tesseract reads before cleaning, how many of
    them it still reads after (`still_read`: same word, overlapping box, any confidence), and all
    it reads after (`read_words` settings: psm 11, 2x upscale, >= 2 letters or digits); also the
    mask fraction. One row per image."""
    import pandas as pd

    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsfmaeError(f"{root}: no images found")
    if limit:
        by_ds: dict[str, list] = {}
        for f in files:
            by_ds.setdefault(f.relative_to(root).parts[0], []).append(f)
        files = [f for fs in by_ds.values() for f in fs[:limit]]
    check_tesseract()
    rows = _pool_map(_real_one, [(str(f), root, cfg, tuple(conf_levels)) for f in files], workers, progress, "real")
    return pd.DataFrame(rows)


def markdown_table(df, floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table of a DataFrame (pandas' to_markdown needs tabulate, not a dependency)."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


