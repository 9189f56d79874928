"""Annotation removal and standardisation (paper section 2.2), batch mode, and its evaluation.

One image goes through seven stages, each a plain function whose every knob is a keyword:

    text_mask      Tesseract OCR word boxes on the grey image          -> mask
    clahe_lab      CLAHE on the L channel of CIELAB (for detection only)
    colour_mask    HSV, saturated pixels clustered with K-Means         -> mask
    grey_mask      Canny edges + contours of thin bright strokes       -> mask
    combine_masks  union, dilation, morphological closing then opening -> annotation mask
    inpaint        Navier-Stokes inpainting (cv2.INPAINT_NS)
    resize_image   to image_size (interpolation; squash or keep aspect with padding)

`CleanConfig` gathers every knob with its default, `clean_image(rgb, cfg)` runs them all and
`clean_tree(inp, out_dir, cfg)` cleans a folder tree or a curation manifest on all cores
(`usfmae clean`). PNGs are uint8; ImageNet normalisation (`IMAGENET_MEAN`, `IMAGENET_STD`,
`normalize`) is applied at training time by the loader.

Images are RGB uint8 [H, W, 3] throughout (what `curation.load_frame` returns). Where the paper
is vague or the official notebook is weak (the project's study notes) the choice made
here is documented at the knob and in notebook 02.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np

from . import UsfmaeError, atomic_write, atomic_write_bytes
from .safety import check_output, end_with_parent, folder_lock

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # paper section 2.2, applied by the training loader
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DETECTORS = ("text", "colour", "grey")
STAGES = ("read", "text", "clahe", "colour", "grey", "morph", "inpaint", "resize", "write")
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
TESSERACT_FIX = ("install the Tesseract OCR program (Debian/Ubuntu: sudo apt-get install tesseract-ocr; "
                 "conda: conda install -c conda-forge tesseract), or pass --no-ocr (ocr=False) to clean "
                 "without text detection")


@dataclass(frozen=True)
class CleanConfig:
    """Every knob of the pipeline. Defaults: the study's choice (official notebook in brackets)."""
    # 1. text: Tesseract word boxes
    ocr: bool = True  # False = no text detector (explicit; never a silent empty mask)
    ocr_regions: str = "candidates"  # "candidates": OCR only bright stroke regions, pasted in one
    #   mosaic (fast); "full": the whole grey image, as the official notebook
    ocr_scale: float = 2.0  # upscale before OCR: scanner fonts are 7-10 px high, Tesseract wants >= 20 [1]
    ocr_psm: int = 11  # Tesseract page segmentation: 11 = sparse text [3 = default]
    ocr_oem: int = 1  # 1 = LSTM engine only
    ocr_min_conf: float = 0.0  # keep words with confidence >= this [any non-empty word]; tiny scanner
    #   fonts are often read with confidence 0, so confidence is a poor filter
    ocr_min_chars: int = 1  # keep words with at least this many letters or digits
    ocr_word_contrast: int = 120  # keep words whose box holds strokes (95th percentile of the stroke
    #   top-hat >= this): drops words 'read' in speckle (<= 111 there; >= 124 on real scanner text) [no test]
    ocr_min_height: int = 5  # ... and whose box is at least this high (px): 'words' 1-4 px high are speckle
    ocr_pad: int = 2  # px added around each word box
    stroke_kernel: int = 5  # top-hat kernel (px): keeps strokes thinner than this (fonts, lines), not speckle
    cand_contrast: int = 80  # stroke brighter than its surroundings by this (0-255) to be a text candidate
    cand_min_height: int = 5  # candidate text line height range (px, at the input resolution)
    cand_max_height: int = 40
    cand_min_aspect: float = 1.5  # a text line is at least this many times as wide as high ...
    cand_min_strokes: int = 2  # ... and holds at least this many letters (speckle: 1-2 round blobs)
    cand_max_fraction: float = 0.35  # candidates cover more than this -> OCR the full image instead
    # 2. contrast (detection only: the output keeps the original pixels)
    clahe_clip: float = 2.0  # [2.0]
    clahe_tile: int = 8  # tile grid (tile x tile) [8]
    # 3. colour marks: HSV + K-Means on saturated pixels
    colour: bool = True
    sat_min: int = 40  # a pixel is saturated when S >= this (0-255) [40]
    val_min: int = 40  # ... and V >= this: dark pixels have meaningless hue [none per pixel]
    kmeans_k: int = 3  # clusters of saturated pixels [3]
    kmeans_iters: int = 10  # K-Means iterations (few: the clusters are well separated)
    kmeans_sample: int = 4000  # fit K-Means on at most this many pixels, then assign all (0 = fit on all)
    cluster_sat_min: int = 60  # keep clusters whose centre S >= this [40] ...
    cluster_val_min: int = 60  # ... and V >= this [20]
    colour_min_area: int = 8  # drop colour components smaller than this after linking dots [20]
    colour_link: int = 5  # closing (px) that links dotted caliper lines before the area filter
    # 4. grey marks: Canny + contours, only edges next to mark pixels (thin bright strokes)
    grey: bool = True
    canny_low: int = 50  # [50]
    canny_high: int = 150  # [150]
    grey_dilate: int = 3  # dilate edges (px) before contours [3]
    contour_min_area: int = 6  # keep pieces of area in [min, max] px, not filled [filled, 30-2000]
    contour_max_area: int = 3000
    contour_min_length: int = 5  # ... and longer side >= this (px) [no test]
    mark_kernel: int = 3  # top-hat kernel (px): marks are strokes thinner than this [no test]
    mark_contrast: int = 120  # top-hat >= this (0-255) makes a pixel a mark pixel ...
    mark_value: int = 140  # ... when its grey value is >= this too ...
    mark_line: int = 4  # ... and it lies on a straight run of >= this many mark pixels (not speckle) ...
    mark_dark: int = 40  # ... or its 15x15 neighbourhood is darker than this (the black screen margin)
    # 5. union -> dilate -> close -> open
    mask_dilate: int = 3  # dilate the union (px): covers halos and keeps thin marks through opening
    close_kernel: int = 5  # [5]
    open_kernel: int = 3  # [5, which erases marks thinner than 5 px before inpainting]
    # 6. inpainting
    inpaint_radius: int = 3  # [3]
    inpaint_method: str = "ns"  # "ns" Navier-Stokes (paper) or "telea"
    # 7. standardisation
    image_size: int = 224  # output side (px) [224]
    interpolation: str = "area"  # area for shrinking (no aliasing of speckle) [nearest]
    keep_aspect: bool = False  # True: scale the long side, pad the short one [squash]
    pad_value: int = 0  # padding grey level when keep_aspect
    seed: int = 0  # K-Means initialisation

    def __post_init__(self):
        if self.ocr_regions not in ("candidates", "full"):
            raise UsfmaeError(f"ocr_regions must be 'candidates' or 'full', got {self.ocr_regions!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsfmaeError(f"interpolation {self.interpolation!r} unknown: use one of {sorted(INTERPOLATIONS)}")
        if self.inpaint_method not in ("ns", "telea"):
            raise UsfmaeError(f"inpaint_method must be 'ns' or 'telea', got {self.inpaint_method!r}")
        from .curation_readers import MIN_SIDE

        if self.image_size < MIN_SIDE:  # smaller PNGs would be refused by every later step
            raise UsfmaeError(f"image_size must be >= {MIN_SIDE} (the smallest image any step reads), "
                              f"got {self.image_size}")


def make_config(**overrides) -> CleanConfig:
    """CleanConfig with overrides; an unknown name is an error that lists the known ones."""
    known = {f.name for f in fields(CleanConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UsfmaeError(f"unknown cleaning parameter(s) {bad}; known: {sorted(known)}")
    return CleanConfig(**overrides)


# ============================================================================ 1. text (OCR)
def check_tesseract() -> str:
    """Version of the Tesseract program pytesseract will call; a clear error when it is missing."""
    import pytesseract

    try:
        return str(pytesseract.get_tesseract_version())
    except (pytesseract.TesseractNotFoundError, OSError) as err:
        cmd = pytesseract.pytesseract.tesseract_cmd
        raise UsfmaeError(f"Tesseract OCR program not found (pytesseract calls {cmd!r}): {TESSERACT_FIX}") from err


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_RECT, (max(int(size), 1), max(int(size), 1)))


def stroke_tophat(rgb: np.ndarray, kernel: int = 5) -> np.ndarray:
    """How much brighter each pixel is than its surroundings, for strokes thinner than `kernel`
    (white top-hat of max(R, G, B), so coloured marks count as much as white ones). uint8 [H, W].
    Scanner fonts and graphics are 1-2 px strokes: high; speckle grains are wider: low."""
    return cv2.morphologyEx(rgb.max(axis=2), cv2.MORPH_TOPHAT, _kernel(kernel))


def text_candidates(tophat: np.ndarray, contrast: int = 80, min_height: int = 5, max_height: int = 40,
                    min_aspect: float = 1.5, min_strokes: int = 2) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, w, h) of lines of strokes: where OCR has something to read.

    tophat: `stroke_tophat` [H, W]; strokes are pixels >= contrast; a 9x3 closing joins the
    letters of a line. A line is kept when its height is in [min_height, max_height], it is at
    least min_aspect times as wide as high and holds >= min_strokes separate strokes (letters):
    bright speckle makes short, roundish blobs of one or two strokes."""
    strokes = (tophat >= contrast).astype(np.uint8)
    lines = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 3)))
    _, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    boxes = []
    for x, y, w, h, _ in stats[1:]:
        if not (min_height <= h <= max_height and w >= min_aspect * h):
            continue
        _, _, st, _ = cv2.connectedComponentsWithStats(strokes[y:y + h, x:x + w], connectivity=8)
        if (st[1:, cv2.CC_STAT_AREA] >= 2).sum() >= min_strokes:
            boxes.append((int(x), int(y), int(w), int(h)))
    return boxes


def _ocr_words(grey: np.ndarray, psm: int, oem: int) -> list[tuple[str, float, int, int, int, int]]:
    """(text, conf, left, top, width, height) of every non-empty word Tesseract reads."""
    import pytesseract

    d = pytesseract.image_to_data(grey, config=f"--psm {psm} --oem {oem}", output_type=pytesseract.Output.DICT)
    return [(t, float(c), l, tp, w, h) for t, c, l, tp, w, h in
            zip(d["text"], d["conf"], d["left"], d["top"], d["width"], d["height"]) if str(t).strip()]


def _dark_on_light(crop: np.ndarray) -> np.ndarray:
    """Tesseract reads dark text on a light page best: invert white-on-dark crops."""
    return 255 - crop if np.median(crop) < 128 else crop


def ocr_words(rgb: np.ndarray, regions: str = "candidates", scale: float = 2.0, psm: int = 11, oem: int = 1,
              tophat: np.ndarray | None = None, cand_contrast: int = 80, cand_min_height: int = 5,
              cand_max_height: int = 40, cand_min_aspect: float = 1.5, cand_min_strokes: int = 2,
              cand_max_fraction: float = 0.35):
    """Words Tesseract reads on the grey image: list of (text, conf, x, y, w, h) in input pixels.

    regions="full" runs OCR on the whole grey image (official notebook); "candidates" pastes
    the candidate text lines (`text_candidates` of `tophat`) into one mosaic, so Tesseract reads
    one small image instead of laying out a whole scan of speckle. Images are upscaled by `scale`."""
    H, W = rgb.shape[:2]
    boxes = []
    if regions == "candidates":
        tophat = stroke_tophat(rgb) if tophat is None else tophat
        boxes = text_candidates(tophat, cand_contrast, cand_min_height, cand_max_height, cand_min_aspect,
                                cand_min_strokes)
        if sum(w * h for _, _, w, h in boxes) > cand_max_fraction * H * W:
            regions = "full"  # strokes everywhere: let Tesseract lay out the page itself
    if regions == "full":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        big = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale != 1 else grey
        return [(t, c, l / scale, tp / scale, w / scale, h / scale) for t, c, l, tp, w, h in _ocr_words(big, psm, oem)]
    if not boxes:
        return []
    bright = rgb.max(axis=2)  # [H, W]: coloured text as legible as white text
    m, rows, offsets, y = 6, [], [], 10  # margin around a line (px), crops, (row y, x0, y0, height)
    for x, yb, w, h in boxes:
        x0, y0, x1, y1 = max(x - m, 0), max(yb - m, 0), min(x + w + m, W), min(yb + h + m, H)
        crop = cv2.resize(_dark_on_light(bright[y0:y1, x0:x1]), None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_CUBIC)
        rows.append(crop)
        offsets.append((y, x0, y0, crop.shape[0]))
        y += crop.shape[0] + 12
    mosaic = np.full((y, max(r.shape[1] for r in rows) + 20), 255, np.uint8)  # one line per row, white gaps
    for r, (ry, *_) in zip(rows, offsets):
        mosaic[ry:ry + r.shape[0], 10:10 + r.shape[1]] = r
    words = []
    for t, c, l, tp, w, h in _ocr_words(mosaic, psm, oem):
        cy = tp + h / 2  # the row the word's centre falls in
        for ry, x0, y0, rh in offsets:
            if ry <= cy < ry + rh:
                words.append((t, c, x0 + (l - 10) / scale, y0 + (tp - ry) / scale, w / scale, h / scale))
                break
    return words


def text_mask(rgb: np.ndarray, regions: str = "candidates", scale: float = 2.0, psm: int = 11, oem: int = 1,
              min_conf: float = 0.0, min_chars: int = 1, word_contrast: int = 120, min_height: int = 5, pad: int = 2,
              stroke_kernel: int = 5, cand_contrast: int = 80, cand_min_height: int = 5, cand_max_height: int = 40,
              cand_min_aspect: float = 1.5, cand_min_strokes: int = 2,
              cand_max_fraction: float = 0.35) -> tuple[np.ndarray, int]:
    """Mask (uint8 0/255 [H, W]) of the filled boxes (+ pad px) of the words Tesseract reads
    (see `ocr_words`) with confidence >= min_conf, >= min_chars letters or digits, a box >= min_height
    px high that holds strokes (95th percentile of `stroke_tophat` >= word_contrast); and the number
    of such words."""
    H, W = rgb.shape[:2]
    mask = np.zeros((H, W), np.uint8)
    tophat = stroke_tophat(rgb, stroke_kernel)
    words = ocr_words(rgb, regions, scale, psm, oem, tophat, cand_contrast, cand_min_height, cand_max_height,
                      cand_min_aspect, cand_min_strokes, cand_max_fraction)
    n = 0
    for t, c, l, tp, w, h in words:
        x0, y0 = max(int(np.floor(l)), 0), max(int(np.floor(tp)), 0)
        x1, y1 = min(int(np.ceil(l + w)), W), min(int(np.ceil(tp + h)), H)
        if (c < min_conf or sum(ch.isalnum() for ch in t) < min_chars or x1 <= x0 or h < min_height
                or np.percentile(tophat[y0:y1, x0:x1], 95) < word_contrast):
            continue
        cv2.rectangle(mask, (max(x0 - pad, 0), max(y0 - pad, 0)), (min(x1 + pad, W) - 1, min(y1 + pad, H) - 1),
                      255, thickness=-1)
        n += 1
    return mask, n


# ============================================================================ 2. contrast
def clahe_lab(rgb: np.ndarray, clip: float = 2.0, tile: int = 8) -> np.ndarray:
    """CLAHE on the L channel of CIELAB (a, b kept): weak marks become visible to the detectors."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tile, tile)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# ============================================================================ 3. colour marks
def colour_mask(rgb: np.ndarray, sat_min: int = 40, val_min: int = 40, k: int = 3, iters: int = 10,
                sample: int = 4000, cluster_sat_min: int = 60, cluster_val_min: int = 60, min_area: int = 8,
                link: int = 5, seed: int = 0) -> np.ndarray:
    """Mask of colour marks: saturated pixels (HSV), clustered with K-Means on (hue as a point
    on the circle scaled by S, S, V); clusters that are both saturated and bright are marks
    (the others are tinted tissue or dark chroma noise). Components smaller than `min_area`
    after a `link` closing (which joins dotted lines) are dropped. Returns uint8 0/255 [H, W]."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = (hsv[..., i].astype(np.float32) for i in range(3))
    cand = (s >= sat_min) & (v >= val_min)  # [H, W]
    out = np.zeros(cand.shape, np.uint8)
    n = int(cand.sum())
    if n < k:
        return out
    ang = h[cand] * (np.pi / 90.0)  # OpenCV hue is 0..179
    feats = np.stack([np.cos(ang) * s[cand], np.sin(ang) * s[cand], s[cand], v[cand]], 1) / 255.0  # [n, 4]
    rng = np.random.default_rng(seed)
    fit = feats if (sample <= 0 or n <= sample) else feats[rng.choice(n, sample, replace=False)]
    cv2.setRNGSeed(seed)
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iters, 1e-3)
    _, _, centres = cv2.kmeans(fit.astype(np.float32), min(k, len(fit)), None, crit, 1, cv2.KMEANS_PP_CENTERS)
    labels = np.argmin(((feats[:, None, :] - centres[None]) ** 2).sum(-1), 1)  # [n]
    keep = (centres[:, 2] * 255 >= cluster_sat_min) & (centres[:, 3] * 255 >= cluster_val_min)
    out[cand] = np.where(keep[labels], 255, 0).astype(np.uint8)
    return drop_small(out, min_area, link)


def drop_small(mask: np.ndarray, min_area: int, link: int = 0) -> np.ndarray:
    """Drop components smaller than min_area; `link` (px) closes gaps first so the dots of a
    dotted line count as one component (only the original pixels are returned)."""
    if min_area <= 1:
        return mask
    joined = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _kernel(link)) if link > 1 else mask
    n, lab, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    big = np.zeros(n, bool)
    big[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return np.where(big[lab] & (mask > 0), 255, 0).astype(np.uint8)


# ============================================================================ 4. grey marks
def line_opening(mask: np.ndarray, length: int) -> np.ndarray:
    """Pixels of `mask` on a straight run of >= length pixels (horizontal, vertical or diagonal):
    keeps lines and letters, drops isolated bright speckle. uint8 0/1 [H, W]."""
    if length <= 1:
        return mask
    kernels = [np.ones((1, length), np.uint8), np.ones((length, 1), np.uint8),
               np.eye(length, dtype=np.uint8), np.fliplr(np.eye(length, dtype=np.uint8)).copy()]
    out = np.zeros_like(mask)
    for k in kernels:
        out |= cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    return out


def mark_pixels(grey: np.ndarray, kernel: int = 3, contrast: int = 120, value: int = 140, line: int = 4,
                dark: int = 40) -> np.ndarray:
    """Pixels of strokes thinner than `kernel` (white top-hat >= contrast), bright (>= value), on a
    straight run of >= `line` such pixels (speckle grains are short). Where the mean grey level of
    the 15x15 neighbourhood is below `dark` (the black screen margin, which holds no speckle), any
    stroke up to 2 * kernel + 1 px wide is a mark, however short: depth ticks, grey-scale bars.
    uint8 0/1 [H, W]."""
    tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, _kernel(kernel))
    marks = line_opening(((tophat >= contrast) & (grey >= value)).astype(np.uint8), line)
    if dark > 0:
        wide = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, _kernel(2 * kernel + 1))
        marks |= ((wide >= contrast) & (grey >= value) & (cv2.blur(grey, (15, 15)) < dark)).astype(np.uint8)
    return marks


def grey_mask(grey: np.ndarray, canny_low: int = 50, canny_high: int = 150, dilate: int = 3,
              min_area: int = 6, max_area: int = 3000, min_length: int = 5, mark_kernel: int = 3,
              mark_contrast: int = 120, mark_value: int = 140, mark_line: int = 4,
              mark_dark: int = 40) -> np.ndarray:
    """Mask of grey marks (ticks, pencil lines, calipers, box outlines, bars).

    Canny edges next to mark pixels, dilated; each connected piece (its contour)
    is kept when its area is in [min_area, max_area] px and its longer side >= min_length.
    Pieces are not filled: a pencil outline around a lesion must not mask the lesion.
    The mark test is what keeps Canny's edges on speckle out: the official notebook fills every
    external contour of area 30-2000, and on tissue that is speckle, while a mark touching
    tissue merges into one huge contour and is lost.
    grey: uint8 [H, W] (CLAHE-enhanced). Returns uint8 0/255 [H, W]."""
    marks = mark_pixels(grey, mark_kernel, mark_contrast, mark_value, mark_line, mark_dark)  # [H, W] 0/1
    edges = cv2.Canny(grey, canny_low, canny_high) & (cv2.dilate(marks, _kernel(3)) * 255)
    if dilate > 1:
        edges = cv2.dilate(edges, _kernel(dilate))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(edges, connectivity=8)
    area, side = stats[:, cv2.CC_STAT_AREA], np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
    keep = (area >= min_area) & (area <= max_area) & (side >= min_length)
    keep[0] = False  # background
    return np.where(keep[lab], 255, 0).astype(np.uint8)


# ============================================================================ 5-7
def combine_masks(masks, dilate: int = 3, close: int = 5, open_: int = 3) -> np.ndarray:
    """Union of detector masks, dilated (halo of antialiased or compressed marks), closed (joins
    pieces), then opened (drops specks). Dilating first means an opening smaller than the
    dilation keeps 1-px marks: the official 5x5 opening of the raw union erased them."""
    masks = [m for m in masks if m is not None]
    union = np.zeros(masks[0].shape, np.uint8)
    for m in masks:
        union |= m
    if dilate > 1:
        union = cv2.dilate(union, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (dilate, dilate)))
    if close > 1:
        union = cv2.morphologyEx(union, cv2.MORPH_CLOSE, _kernel(close))
    if open_ > 1:
        union = cv2.morphologyEx(union, cv2.MORPH_OPEN, _kernel(open_))
    return union


def inpaint(rgb: np.ndarray, mask: np.ndarray, radius: int = 3, method: str = "ns") -> np.ndarray:
    """Fill the masked pixels from their surroundings (Navier-Stokes by default, as the paper)."""
    if not mask.any():
        return rgb.copy()
    flag = cv2.INPAINT_NS if method == "ns" else cv2.INPAINT_TELEA
    return cv2.inpaint(rgb, mask, radius, flag)


def resize_image(img: np.ndarray, size: int = 224, interpolation: str = "area", keep_aspect: bool = False,
                 pad_value: int = 0) -> np.ndarray:
    """Resize to size x size: squash (paper) or keep the aspect ratio and pad the short side."""
    interp = INTERPOLATIONS[interpolation]
    H, W = img.shape[:2]
    if not keep_aspect:
        return cv2.resize(img, (size, size), interpolation=interp)
    s = size / max(H, W)
    h, w = max(1, round(H * s)), max(1, round(W * s))
    small = cv2.resize(img, (w, h), interpolation=interp)
    top, left = (size - h) // 2, (size - w) // 2
    return cv2.copyMakeBorder(small, top, size - h - top, left, size - w - left, cv2.BORDER_CONSTANT,
                              value=(pad_value,) * 3)


def normalize(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W] with ImageNet statistics (training time)."""
    x = img.astype(np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


# ============================================================================ one image
def detect(rgb: np.ndarray, cfg: CleanConfig = CleanConfig(), timings: dict | None = None) -> dict:
    """Run the detectors: {"text", "colour", "grey": uint8 masks or None when switched off,
    "mask": the combined annotation mask, "words": words read}."""
    t = timings if timings is not None else {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - clock
        clock = now

    out = {"text": None, "colour": None, "grey": None, "words": 0}
    if cfg.ocr:
        out["text"], out["words"] = text_mask(
            rgb, cfg.ocr_regions, cfg.ocr_scale, cfg.ocr_psm, cfg.ocr_oem, cfg.ocr_min_conf, cfg.ocr_min_chars,
            cfg.ocr_word_contrast, cfg.ocr_min_height, cfg.ocr_pad, cfg.stroke_kernel, cfg.cand_contrast,
            cfg.cand_min_height, cfg.cand_max_height, cfg.cand_min_aspect, cfg.cand_min_strokes, cfg.cand_max_fraction)
    lap("text")
    enhanced = clahe_lab(rgb, cfg.clahe_clip, cfg.clahe_tile) if (cfg.colour or cfg.grey) else rgb
    lap("clahe")
    if cfg.colour:
        out["colour"] = colour_mask(enhanced, cfg.sat_min, cfg.val_min, cfg.kmeans_k, cfg.kmeans_iters,
                                    cfg.kmeans_sample, cfg.cluster_sat_min, cfg.cluster_val_min,
                                    cfg.colour_min_area, cfg.colour_link, cfg.seed)
    lap("colour")
    if cfg.grey:
        out["grey"] = grey_mask(cv2.cvtColor(enhanced, cv2.COLOR_RGB2GRAY), cfg.canny_low, cfg.canny_high,
                                cfg.grey_dilate, cfg.contour_min_area, cfg.contour_max_area,
                                cfg.contour_min_length, cfg.mark_kernel, cfg.mark_contrast, cfg.mark_value,
                                cfg.mark_line, cfg.mark_dark)
    lap("grey")
    parts = [out[k] for k in DETECTORS] + [np.zeros(rgb.shape[:2], np.uint8)]
    out["mask"] = combine_masks(parts, cfg.mask_dilate, cfg.close_kernel, cfg.open_kernel)
    lap("morph")
    return out


def clean_image(rgb: np.ndarray, cfg: CleanConfig = CleanConfig(), timings: dict | None = None,
                resize: bool = True) -> tuple[np.ndarray, dict]:
    """Detect, inpaint and (resize=True) resize one RGB uint8 image.

    Returns (cleaned image, detection dict of `detect` with "inpainted" = the cleaned image at
    the input resolution)."""
    t = timings if timings is not None else {}
    rgb = np.ascontiguousarray(rgb)
    det = detect(rgb, cfg, t)
    clock = time.perf_counter()
    det["inpainted"] = inpaint(rgb, det["mask"], cfg.inpaint_radius, cfg.inpaint_method)
    now = time.perf_counter()
    t["inpaint"] = t.get("inpaint", 0.0) + now - clock
    out = det["inpainted"]
    if resize:
        out = resize_image(out, cfg.image_size, cfg.interpolation, cfg.keep_aspect, cfg.pad_value)
    t["resize"] = t.get("resize", 0.0) + time.perf_counter() - now
    return out, det


# ============================================================================ batch mode
MANIFEST_COLUMNS = ("frame_id", "dataset", "anatomy", "source", "kind", "frame", "axis")
REPORT_COLUMNS = (["path", "source", "frame", "status", "error", "height", "width", "mask_fraction"]
                  + [f"{d}_fraction" for d in DETECTORS] + ["fired", "words"]
                  + [f"t_{s}" for s in STAGES] + ["t_total"])
INDEX_COLUMNS = ("path", "dataset", "anatomy", "source", "frame")


def safe_name(text: str) -> str:
    """A file-system-safe version of text (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "_"


def list_jobs(inp) -> list[dict]:
    """What to clean: one dict per image (src, kind, frame, axis, rel, dataset, anatomy).

    inp: a folder (every image file under it; rel mirrors the tree, suffix .png; dataset = the
    first folder below inp, or inp's name; anatomy "unknown") or a curation manifest
    (.parquet/.csv; rel = <dataset>/<frame_id made file-system-safe>.png)."""
    inp = Path(inp)
    if not inp.exists():
        raise UsfmaeError(f"{inp}: no such folder or manifest; give an image folder or a manifest.parquet/.csv "
                          f"written by `usfmae curate`")
    jobs = []
    if inp.is_dir():
        files = sorted(p for p in inp.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        taken = set()
        for f in files:
            rel = f.relative_to(inp)
            out = rel.with_suffix(".png").as_posix()
            if out in taken:  # a.jpg beside a.png: keep both
                out = rel.as_posix() + ".png"
            taken.add(out)
            dataset = rel.parts[0] if len(rel.parts) > 1 else inp.name
            jobs.append(dict(src=str(f.resolve()), kind="file", frame=0, axis=-1, rel=out, dataset=dataset,
                             anatomy="unknown"))
        return jobs
    import pandas as pd

    if inp.suffix.lower() == ".parquet":
        df = pd.read_parquet(inp)
    elif inp.suffix.lower() == ".csv":
        df = pd.read_csv(inp)
    else:
        raise UsfmaeError(f"{inp}: not a folder, .parquet or .csv manifest")
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise UsfmaeError(f"{inp}: manifest lacks column(s) {missing}; write it with `usfmae curate`")
    taken = set()
    for r in df.itertuples(index=False):
        stem = str(r.frame_id)
        if Path(stem).suffix.lower() in IMAGE_SUFFIXES:  # an image file's id ends in its own extension
            stem = stem[:-len(Path(stem).suffix)]
        rel = f"{safe_name(r.dataset)}/{safe_name(stem)}.png"  # one extension: x.png, never x.png.png
        if rel in taken:  # two ids that differ only in unsafe characters
            import hashlib

            rel = rel[:-4] + "_" + hashlib.sha1(str(r.frame_id).encode()).hexdigest()[:8] + ".png"
        taken.add(rel)
        jobs.append(dict(src=str(r.source), kind=str(r.kind), frame=int(r.frame), axis=int(r.axis), rel=rel,
                         dataset=str(r.dataset), anatomy=str(r.anatomy)))
    return jobs


def read_image(path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] by curation's one decode policy (`read_image_file`):
    the same checks (truncation, size limits) and 8-bit conversion, so what curation refuses
    cleaning refuses too, for the same reason."""
    from .curation_readers import Reject, read_image_file

    try:
        return read_image_file(path)
    except Reject as rej:  # the report row's error: "<path>: not a readable image: <reason>: <detail>"
        raise UsfmaeError(f"{path}: not a readable image: {rej}") from None


def read_job(job: dict) -> np.ndarray:
    """Pixels of one job: files of a folder directly, manifest rows through `curation.load_frame`
    (still images, video frames and volume slices, converted to 8-bit RGB as curation hashed them)."""
    if job["kind"] == "file":
        return read_image(job["src"])
    from .curation import load_frame

    return np.ascontiguousarray(load_frame(job["src"], job["kind"], job["frame"], job["axis"]))


def write_png(path: Path, img: np.ndarray, compression: int = 3):
    """Write an RGB (or single-channel) uint8 PNG atomically (temp file + os.replace)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img,
                           [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise UsfmaeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def clean_job(job: dict, cfg: CleanConfig, out_dir, masks_dir=None, compression: int = 3) -> dict:
    """Clean one job and write its PNG (and mask); never raises: errors become the row's status."""
    t: dict[str, float] = {}
    row = dict(path=job["rel"], source=job["src"], frame=job["frame"], status="ok", error="")
    start = time.perf_counter()
    try:
        rgb = read_job(job)
        t["read"] = time.perf_counter() - start
        out, det = clean_image(rgb, cfg, t)
        clock = time.perf_counter()
        write_png(Path(out_dir) / job["rel"], out, compression)
        if masks_dir is not None:
            write_png(Path(masks_dir) / job["rel"], det["mask"], compression)
        t["write"] = time.perf_counter() - clock
        row.update(height=rgb.shape[0], width=rgb.shape[1], mask_fraction=float((det["mask"] > 0).mean()),
                   words=det["words"])
        fired = []
        for d in DETECTORS:
            m = det[d]
            row[f"{d}_fraction"] = np.nan if m is None else float((m > 0).mean())
            if m is not None and m.any():
                fired.append(d)
        row["fired"] = "+".join(fired) or "none"
    except Exception as err:  # one bad image must not stop a run of thousands: record it
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
    for s_ in STAGES:
        row[f"t_{s_}"] = t.get(s_, 0.0)
    row["t_total"] = time.perf_counter() - start
    return row


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_init():
    cv2.setNumThreads(1)  # one process per core: no thread oversubscription
    os.environ["OMP_THREAD_LIMIT"] = "1"  # Tesseract's OpenMP threads, read by the tesseract program


def _pool_worker_init():
    end_with_parent()  # a killed run leaves no worker behind
    _worker_init()


def _run_job(args):
    return clean_job(*args)


class _ReportWriter:
    """Appends one report row per finished image and flushes it at once, so that a run killed
    with kill -9 keeps the row of every image it finished (the rerun redoes only the rest)."""

    def __init__(self, path: Path):
        _drop_partial_line(path)
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def write(self, row: dict):
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        self.file.close()


def _drop_partial_line(path: Path):
    """Cut a half-written last line (a kill during a write), so the next row starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _reported_paths(path: Path) -> set[str]:
    """Output paths that already have a complete row in the report."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {r["path"] for r in csv.DictReader(f) if r.get("t_total") not in (None, "")}


def _write_csv_atomic(path: Path, df):
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _input_locations(inp, jobs) -> list[Path]:
    """What `clean` reads: the input folder, or a manifest, the data roots it was curated from
    (summary.json beside it) and its source files' folders, so no output can land among them."""
    inp = Path(inp)
    if inp.is_dir():
        return [inp]
    found = [inp] + sorted({Path(j["src"]).parent for j in jobs})
    summary = inp.parent / "summary.json"
    if summary.is_file():
        try:
            found += [Path(r) for r in json.loads(summary.read_text()).get("roots", [])]
        except (ValueError, AttributeError):
            pass
    return found


def _clean_jobs(jobs, out_dir: Path, cfg: CleanConfig, workers: int, report: Path, masks_dir, progress: bool,
                compression: int):
    """clean_tree's work, under the output folder's lock."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.part*"):  # temp files of a killed run
        stale.unlink()
    # a PNG counts as finished only when it was made with these very parameters
    settings = out_dir / "clean_config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True, indent=1)
    same = settings.exists() and settings.read_text() == wanted
    if not same and report.exists():
        report.unlink()  # rows of a run with other parameters
    # done = its PNG exists and its report row too (a kill can fall between the two)
    reported = _reported_paths(report) if same else set()
    todo = [j for j in jobs if not (same and j["rel"] in reported and (out_dir / j["rel"]).exists())]
    settings.write_text(wanted)
    workers = max(1, min(int(workers or cpu_count()), len(todo) or 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="clean", unit="img")
    args = [(j, cfg, out_dir, masks_dir, compression) for j in todo]
    writer = _ReportWriter(report)

    def done(row):
        writer.write(row)
        if bar is not None:
            bar.update(1)

    try:
        if workers == 1:
            old_threads, old_omp = cv2.getNumThreads(), os.environ.get("OMP_THREAD_LIMIT")
            _worker_init()
            try:
                for a in args:
                    done(_run_job(a))
            finally:
                cv2.setNumThreads(old_threads)
                if old_omp is None:
                    os.environ.pop("OMP_THREAD_LIMIT", None)
                else:
                    os.environ["OMP_THREAD_LIMIT"] = old_omp
        elif args:
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked child can inherit locked OpenCV / OpenMP thread pools
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_worker_init) as ex:
                for row in ex.map(_run_job, args, chunksize=max(1, min(16, len(args) // (8 * workers)))):
                    done(row)
    finally:
        writer.close()
        if bar is not None:
            bar.close()


def clean_tree(inp, out_dir, cfg: CleanConfig = CleanConfig(), workers: int = 0, report=None, masks_dir=None,
               progress: bool = True, compression: int = 3):
    """Clean every image of a folder tree or manifest into out_dir (PNG tree + index.csv).

    Uses `workers` processes (0 = all cores). Resumes: a PNG already in out_dir is not redone
    when out_dir/clean_config.json shows it was made with the same `cfg` (otherwise all are redone).
    Writes the report (default out_dir/report.csv; one row per image: status and error, mask
    area fraction, each detector's fraction, which fired, words, seconds per stage) and
    out_dir/index.csv (path relative to out_dir, dataset, anatomy, source, frame; one row per
    PNG). A bad image is listed with its error and the run goes on. Returns the report
    (pandas DataFrame) of this input.

    Refuses an output (folder, report, masks) that is, lies inside, or holds an input, and a
    second run into the same out_dir while one is going (see usfmae_lib.safety)."""
    out_dir = Path(out_dir)
    report = Path(report) if report is not None else out_dir / "report.csv"
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    jobs = list_jobs(inp)
    inputs = _input_locations(inp, jobs)
    for path, what in ((out_dir, "output folder"), (report, "report file"), (masks_dir, "masks folder")):
        if path is not None:
            check_output(path, inputs, what)
    if cfg.ocr:
        check_tesseract()  # fail at the start, not on image 1 of 374k
    with folder_lock(out_dir, "usfmae clean"):
        _clean_jobs(jobs, out_dir, cfg, workers, report, masks_dir, progress, compression)
        return _write_report_and_index(jobs, out_dir, report)


def _write_report_and_index(jobs, out_dir: Path, report: Path):
    """One report row per job (the last one wins) and index.csv of the PNGs there are."""
    import pandas as pd

    rep = pd.read_csv(report, keep_default_na=False, na_values=[""]) if report.exists() else pd.DataFrame(
        columns=REPORT_COLUMNS)
    rep = rep.drop_duplicates("path", keep="last")
    rels = {j["rel"] for j in jobs}
    rep = rep[rep["path"].isin(rels)]
    _write_csv_atomic(report, rep)
    index = pd.DataFrame([{"path": j["rel"], "dataset": j["dataset"], "anatomy": j["anatomy"], "source": j["src"],
                           "frame": j["frame"]} for j in jobs if (out_dir / j["rel"]).exists()],
                         columns=list(INDEX_COLUMNS))
    _write_csv_atomic(out_dir / "index.csv", index)
    return rep.reset_index(drop=True)


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
    from . import synth_annotations as sa
    from . import synthetic as syn

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
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_worker_init) as ex:
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
    return [(t, c, l / scale, tp / scale, w / scale, h / scale) for t, c, l, tp, w, h in _ocr_words(big, psm, 3)
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


# ============================================================================ CLI
def _parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise UsfmaeError(f"--param {text!r}: write KEY=VALUE, e.g. --param clahe_clip=3.0")
    types = {f.name: f.type for f in fields(CleanConfig)}
    if key not in types:
        raise UsfmaeError(f"--param {key}: unknown; known: {sorted(types)}")
    default = getattr(CleanConfig(), key)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return key, value.lower() in ("true", "1")
        return key, type(default)(value)
    except ValueError:
        raise UsfmaeError(f"--param {key}={value}: expected a {type(default).__name__}") from None


def add_cli(subparsers):
    """Register `usfmae clean`."""
    p = subparsers.add_parser(
        "clean", help="remove burned-in annotations and write the 224 px PNG tree",
        description="Remove burned-in annotations (Tesseract text, HSV + K-Means colour marks, Canny grey "
                    "marks; Navier-Stokes inpainting) and resize, for every image of a folder tree or a "
                    "curation manifest, on all cores. Resumes: finished PNGs are not redone. Writes "
                    "OUT_DIR/index.csv and a per-image report; a bad image is listed, never fatal.")
    p.add_argument("input", metavar="IN_DIR_OR_MANIFEST", help="image folder, or manifest.parquet/.csv")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder of the PNG tree")
    p.add_argument("--workers", type=int, default=0, help="processes (default 0: all cores)")
    p.add_argument("--image-size", type=int, default=CleanConfig.image_size, help="output side in px (224)")
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=CleanConfig.interpolation)
    p.add_argument("--keep-aspect", action="store_true", help="scale the long side and pad (default: squash)")
    p.add_argument("--no-ocr", action="store_true", help="no text detection (no Tesseract needed)")
    p.add_argument("--save-masks", action="store_true", help="also write each annotation mask")
    p.add_argument("--masks-dir", help="where masks go (default: OUT_DIR beside, named OUT_DIR_masks)")
    p.add_argument("--report", help="per-image report CSV (default: OUT_DIR/report.csv)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other cleaning parameter (see CleanConfig), e.g. --param clahe_clip=3.0")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    over = dict(_parse_param(t) for t in args.param)
    over.update(image_size=args.image_size, interpolation=args.interpolation)
    if args.keep_aspect:
        over["keep_aspect"] = True
    if args.no_ocr:
        over["ocr"] = False
    cfg = make_config(**over)
    out = Path(args.out_dir)
    masks = None
    if args.save_masks:
        masks = Path(args.masks_dir) if args.masks_dir else out.with_name(out.name + "_masks")
    rep = clean_tree(args.input, out, cfg, workers=args.workers, report=args.report, masks_dir=masks,
                     progress=not args.no_progress)
    bad = rep[rep["status"] != "ok"]
    print(f"{len(rep) - len(bad)} images cleaned into {out} (index.csv, report: {args.report or out / 'report.csv'})")
    if len(bad):
        print(f"{len(bad)} image(s) failed; they are listed with their error in the report:", file=sys.stderr)
        for r in bad.head(10).itertuples():
            print(f"  {r.source}: {r.error}", file=sys.stderr)
    return 0
