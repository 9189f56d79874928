"""Notebook 02's figures and the short tables it shows: each stage on one image, removal quality,
Fig. 2 (original / mask / inpainted, with a row for an image that carries no annotation), the
cleaned corpus, and the cleaning settings that differ from the defaults.

Every function returns a figure or a DataFrame; the notebook saves and shows it
(`study.show_figure`). Grey scans are drawn on the fixed 0-255 grey scale (`curation.draw_scan`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..curation import draw_scan
from .batch import read_image
from .detectors import CleanConfig, clahe_lab, clean_image
from .evaluate import KINDS, PSNR_IDENTICAL, synthetic_kind_masks

PSNR_TOP = 60  # dB: cleaned images identical to their clean twin (infinite PSNR) are drawn here


# ============================================================================ tables
def config_changes(cfg: CleanConfig):
    """The cleaning settings of this run that differ from `CleanConfig`'s defaults (one row each:
    parameter, value, default); the defaults themselves are the pipeline table's 'here' column."""
    import pandas as pd

    default = CleanConfig()
    rows = [dict(parameter=f.name, value=getattr(cfg, f.name), default=getattr(default, f.name))
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]
    return pd.DataFrame(rows, columns=["parameter", "value", "default"])


def quality_per_kind(summary_row):
    """Recall, precision and IoU of each annotation kind and of all marks together, from one row of
    `summarize_annotated` (one variant)."""
    import pandas as pd

    r = summary_row
    rows = [dict(kind=k, images=r[f"{k}_images"], recall=r[f"{k}_recall"], precision=r[f"{k}_precision"],
                 iou=r[f"{k}_iou"]) for k in KINDS]
    rows.append(dict(kind="all marks", images=r["images"], recall=r["recall"], precision=r["precision"], iou=r["iou"]))
    return pd.DataFrame(rows)


def mask_fraction_row(images: str, fractions) -> dict:
    """One row of the table of images without annotation: how much of each image the mask covers."""
    f = fractions
    return dict(images=images, n=len(f), mean=f.mean(), p95=f.quantile(0.95), max=f.max(),
                share_under_10pct=(f < 0.10).mean())


def real_summary(real):
    """Per dataset of real scans and over all: images, mask fraction, and the words Tesseract reads
    before cleaning and still reads after, at confidence 50 and 70 (rows of `evaluate_real`)."""
    import pandas as pd

    rows = []
    for ds, g in list(real.groupby("dataset")) + [("all", real)]:
        r = dict(dataset=ds, images=len(g), mask_mean=g["mask_fraction"].mean(), mask_max=g["mask_fraction"].max())
        for level in (50, 70):
            b, k = g[f"words_before_conf{level}"].sum(), g[f"words_still_read_conf{level}"].sum()
            r[f"conf{level}_before"], r[f"conf{level}_still_read"] = b, k
            r[f"conf{level}_still_read_share"] = k / b if b else np.nan
            r[f"conf{level}_read_after"] = g[f"words_after_conf{level}"].sum()
        rows.append(r)
    return pd.DataFrame(rows)


# ============================================================================ figures
def most_marked(tree_dir, names: list[str]) -> str:
    """Of these synthetic annotated images, the one with the most kinds of mark (the first on a tie)."""
    kinds = {n: sum(m.any() for m in synthetic_kind_masks(tree_dir, n).values()) for n in names}
    return max(kinds, key=kinds.get)


def unannotated_stills(synth_dir, annotated_dir, n: int = 10) -> list[Path]:
    """Still images known to carry no annotation: the first pretraining still of each anatomy of
    the synthetic tree, or, without one (notebook 01 ran on real data), the first n clean twins of
    the annotated set."""
    firsts = [sorted(d.glob("*.png"))[:1] for d in sorted(Path(synth_dir).glob("pretrain/*/images"))]
    stills = [p for first in firsts for p in first]
    return stills[:n] or sorted((Path(annotated_dir) / "annotated" / "clean").glob("*.png"))[:n]


def plot_stages(path, cfg: CleanConfig):
    """Each stage of the pipeline on one image: the input, CLAHE (detection only), the three
    detectors' masks, the combined mask, the inpainted image and the resized output."""
    import matplotlib.pyplot as plt

    rgb = read_image(path)
    resized, det = clean_image(rgb, cfg)
    blank = np.zeros(rgb.shape[:2], np.uint8)  # a detector switched off
    panels = [(rgb, "annotated"), (clahe_lab(rgb, cfg.clahe_clip, cfg.clahe_tile), "CLAHE on L (detection only)"),
              (det["text"], f"text: {det['words']} OCR words"), (det["colour"], "colour: HSV + K-Means"),
              (det["grey"], "grey: Canny + contours"), (det["mask"], "union, dilate, close, open"),
              (det["inpainted"], "Navier-Stokes inpainting"), (resized, f"resized to {cfg.image_size} px")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (img, title) in zip(axes.ravel(), panels):
        draw_scan(ax, blank if img is None else img, title, fontsize=10)
    fig.suptitle(f"Each stage on {Path(path).name}")
    fig.tight_layout()
    return fig


def plot_removal_quality(scores, summary):
    """Left: PSNR against the clean twin, cleaned vs uncleaned, per image of the first variant (all
    detectors). Right: recall per annotation kind for every variant of the ablation."""
    import matplotlib.pyplot as plt

    first = summary.iloc[0]
    allv = scores[scores["variant"] == first["variant"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    identical = allv["psnr_cleaned"] >= PSNR_IDENTICAL
    ax.scatter(allv["psnr_uncleaned"], allv["psnr_cleaned"].clip(upper=PSNR_TOP), s=10, alpha=0.6)
    lo = allv[["psnr_uncleaned", "psnr_cleaned"]].min().min() - 1
    ax.plot([lo, PSNR_TOP], [lo, PSNR_TOP], "k--", lw=1)
    ax.set(xlabel="PSNR uncleaned vs clean twin (dB)", ylabel="PSNR cleaned vs clean twin (dB)",
           ylim=(lo, PSNR_TOP + 2),
           title=f"{first['psnr_improved_share']:.1%} of {len(allv)} images improved\n"
                 f"({identical.sum()} made identical, drawn at {PSNR_TOP} dB); above the line: better")
    rec = summary.set_index("variant")[[f"{k}_recall" for k in KINDS]]
    rec.columns = list(KINDS)
    rec.T.plot.bar(ax=bx, width=0.8, rot=0)
    bx.set(ylabel="recall", ylim=(0, 1.05), title="recall per kind, each detector switched off")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_annotation_removal(picks, cfg: CleanConfig, unannotated=()):
    """Fig. 2: original, detected mask and inpainted result, one row per annotated image in
    `picks`, then one row for the image of `unannotated` (images known to carry no mark) on which
    the mask is largest: the worst damage cleaning does where there is nothing to remove."""
    import matplotlib.pyplot as plt

    rows = [(Path(p), "original", *_cleaned(p, cfg)) for p in picks]
    if len(unannotated):
        stills = [(Path(p), *_cleaned(p, cfg)) for p in unannotated]
        path, img, det = max(stills, key=lambda s: (s[2]["mask"] > 0).mean())
        rows.append((path, f"no annotation, largest mask of {len(stills)}", img, det))
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 4.2 * len(rows)), squeeze=False)
    for row, (path, what, img, det) in zip(axes, rows):
        draw_scan(row[0], img, f"{what}: {path.parent.name}/{path.name}", fontsize=10)
        draw_scan(row[1], det["mask"], f"detected mask ({(det['mask'] > 0).mean():.1%} of pixels)", fontsize=10)
        draw_scan(row[2], det["inpainted"], "inpainted (Navier-Stokes)", fontsize=10)
    fig.tight_layout()
    return fig


def _cleaned(path, cfg: CleanConfig) -> tuple[np.ndarray, dict]:
    """An image and its detections (mask, inpainted image) at its own resolution."""
    img = read_image(path)
    return img, clean_image(img, cfg, resize=False)[1]


def plot_clean_samples(images: list[np.ndarray], size: int, titles=()):
    """A row of cleaned corpus images as notebook 03 reads them (uint8 PNGs of `size` px), each
    titled with its dataset when `titles` are given."""
    import matplotlib.pyplot as plt

    titles = list(titles) or [""] * len(images)
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        draw_scan(ax, img, title, fontsize=8)
    fig.suptitle(f"cleaned corpus, {size} px")
    return fig
