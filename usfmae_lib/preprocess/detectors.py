"""The method, one image at a time (paper section 2.2): every stage of annotation removal and
standardisation, the config that holds their knobs, and `clean_image`, which runs them all.

One image goes through seven stages, each a plain function whose every knob is a keyword:

    text_mask      Tesseract OCR word boxes on the grey image          -> mask
    clahe_lab      CLAHE on the L channel of CIELAB (for detection only)
    colour_mask    HSV, saturated pixels clustered with K-Means         -> mask
    grey_mask      Canny edges + contours of thin bright strokes       -> mask
    combine_masks  union, dilation, morphological closing then opening -> annotation mask
    inpaint        Navier-Stokes inpainting (cv2.INPAINT_NS)
    resize_image   to image_size (interpolation; squash or keep aspect with padding)

`CleanConfig` gathers every knob with its default; `clean_image(rgb, cfg)` runs them all. The
settings that the study and the official notebook choose differently form a `Cleaner` preset, one
of `CLEANERS`: `STUDY` (the defaults) and `OFFICIAL` (the official notebook's values, each with the
line of code it comes from); `make_config(cleaner="official")` applies one. PNGs are
uint8; ImageNet normalisation (`IMAGENET_MEAN`, `IMAGENET_STD`, `normalize`) is applied at training
time by the loader. Images are RGB uint8 [H, W, 3] throughout (what `curation.load_frame` returns).
Where the paper is vague or the official notebook is weak the choice made here is documented at
the knob and in notebook 02.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields

import cv2
import numpy as np

from .. import UsfmaeError

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
class Cleaner:
    """A named preset of the annotation cleaner: every setting on which this study's cleaner and the
    official notebook's (`US_images_preprocessing.ipynb` of Yusufii9/USF-MAE, STUDY.md section 6)
    are set by their authors, each a field of `CleanConfig` of the same name. Two instances:
    `STUDY` (the defaults of `CleanConfig`) and `OFFICIAL`; `make_config(cleaner="official")`
    applies one, notebook 02's `cleaner` parameter and `usfmae clean --cleaner` name one.
    What each setting does is said at its `CleanConfig` field; the values and their sources are
    said at the two instances below (the one place where they are set)."""
    name: str
    # 1. text
    ocr_regions: str
    ocr_scale: float
    ocr_psm: int
    ocr_oem: int
    ocr_min_chars: int
    ocr_word_contrast: int
    ocr_min_height: int
    ocr_pad: int
    # 2. contrast
    clahe_clip: float
    clahe_tile: int
    # 3. colour
    sat_min: int
    val_min: int
    kmeans_k: int
    kmeans_features: str
    kmeans_impl: str
    kmeans_iters: int
    kmeans_sample: int
    cluster_sat_min: int
    cluster_val_min: int
    colour_min_area: int
    colour_link: int
    # 4. grey
    grey_clahe: str
    canny_low: int
    canny_high: int
    grey_dilate: int
    mark_test: bool
    contour_fill: bool
    contour_min_area: int
    contour_max_area: int
    contour_min_length: int
    # 5. morphology
    mask_dilate: int
    close_kernel: int
    open_kernel: int
    # 6. inpainting
    inpaint_radius: int
    inpaint_method: str

    def settings(self) -> dict:
        """{CleanConfig field: value} of this preset (its name left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


# The study's cleaner: the paper names the operations (section 2.2) but gives no threshold; these
# were tuned on the synthetic annotated set and checked on real scans (notebook 02, docs/preprocessing.md).
STUDY = Cleaner(
    name="study",
    ocr_regions="candidates",  # study: OCR only candidate lines of thin bright strokes, in one mosaic (~11x cheaper)
    ocr_scale=2.0,  # study: scanner fonts are 7-10 px high, Tesseract wants >= 20
    ocr_psm=11,  # study: sparse text
    ocr_oem=1,  # study: LSTM engine only
    ocr_min_chars=1,  # study: a word holds >= 1 letter or digit
    ocr_word_contrast=120,  # study: 'words' read in speckle have top-hat <= 111, scanner text >= 124
    ocr_min_height=5,  # study: 'words' 1-4 px high are speckle
    ocr_pad=2,  # study: 2 px margin around each word box
    clahe_clip=2.0,  # paper: CLAHE; study: the official value
    clahe_tile=8,  # paper: CLAHE; study: the official value
    sat_min=40,  # study: a pixel is saturated when S >= 40
    val_min=40,  # study: ... and V >= 40 (dark pixels have meaningless hue)
    kmeans_k=3,  # paper: K-Means; study: the official k
    kmeans_features="hue_circle",  # study: hue as a point on the circle scaled by S, with S and V (hue wraps)
    kmeans_impl="opencv",  # study: cv2.kmeans, k-means++ initialisation, one attempt
    kmeans_iters=10,  # study: few iterations, the clusters are well separated
    kmeans_sample=4000,  # study: fit on at most 4000 pixels, then assign all
    cluster_sat_min=60,  # study: centre S >= 60 ...
    cluster_val_min=60,  # study: ... and V >= 60 (tinted tissue and dark chroma noise are not marks)
    colour_min_area=8,  # study: components of >= 8 px ...
    colour_link=5,  # study: ... after a 5 px closing that joins the dots of dotted caliper lines
    grey_clahe="lab",  # study: grey of the CIELAB-CLAHE image the colour detector uses
    canny_low=50,  # paper: Canny; study: the official thresholds
    canny_high=150,
    grey_dilate=3,  # study: the official 3x3 dilation of the edges
    mark_test=True,  # study: only Canny edges next to mark pixels (thin bright strokes), not speckle
    contour_fill=False,  # study: connected pieces of edges, not filled (a pencil outline must not mask the lesion)
    contour_min_area=6,  # study: pieces of 6-3000 px (pixel count) ...
    contour_max_area=3000,
    contour_min_length=5,  # study: ... whose longer side is >= 5 px
    mask_dilate=3,  # study: dilate the union 3 px (ellipse) so the opening keeps 1-px marks
    close_kernel=5,  # paper: closing; study: the official 5x5
    open_kernel=3,  # study: 3x3 (the official 5x5 erases marks thinner than 5 px)
    inpaint_radius=3,  # paper: Navier-Stokes inpainting; study: the official radius
    inpaint_method="ns",  # paper: "Navier-Stokes"
)

# The official notebook's cleaner, function by function (US_images_preprocessing.ipynb, cell
# "Preprocessing": get_text_mask, get_annotation_mask_kmeans_clahe, get_grayscale_annotation_mask,
# clean_and_inpaint as deannotate_image calls them). Residual differences, documented in
# docs/preprocessing.md: a word box is w x h here, (w + 1) x (h + 1) there (cv2.rectangle's end
# point is inclusive); cluster centres are kept at >= the thresholds, there at >; K-Means is
# seeded by CleanConfig.seed (notebook 02's `seed`), there by random_state=42.
OFFICIAL = Cleaner(
    name="official",
    ocr_regions="full",  # official code: pytesseract.image_to_data(gray) on the whole grey image
    ocr_scale=1.0,  # official code: no upscaling
    ocr_psm=3,  # official code: no config, i.e. Tesseract's default --psm 3
    ocr_oem=3,  # official code: no config, i.e. Tesseract's default --oem 3
    ocr_min_chars=0,  # official code: every word with text.strip() != ""
    ocr_word_contrast=0,  # official code: no stroke test on word boxes
    ocr_min_height=0,  # official code: no height test on word boxes
    ocr_pad=0,  # official code: cv2.rectangle(mask, (x, y), (x + w, y + h), 255, -1), no margin
    clahe_clip=2.0,  # official code: createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    clahe_tile=8,
    sat_min=41,  # official code: mask_color = s > sat_thresh, sat_thresh=40 (S >= 41 on uint8)
    val_min=0,  # official code: no V test per pixel
    kmeans_k=3,  # official code: k=3
    kmeans_features="hsv",  # official code: KMeans on hsv[mask_color], the raw (H, S, V) of each pixel
    kmeans_impl="sklearn",  # official code: sklearn.cluster.KMeans(n_clusters=k, random_state=42)
    kmeans_iters=300,  # official code: KMeans's default max_iter=300
    kmeans_sample=0,  # official code: fit_predict on every saturated pixel
    cluster_sat_min=40,  # official code: s_c > sat_thresh (40) ...
    cluster_val_min=20,  # official code: ... and v_c > 20
    colour_min_area=20,  # official code: min_area=20, stats[i, cv2.CC_STAT_AREA] >= min_area kept (8-connected)
    colour_link=0,  # official code: no closing before the area filter
    grey_clahe="grey",  # official code: CLAHE (2.0, 8x8) applied to cvtColor(image, COLOR_BGR2GRAY)
    canny_low=50,  # official code: cv2.Canny(enhanced, 50, 150)
    canny_high=150,
    grey_dilate=3,  # official code: cv2.dilate(edges, np.ones((3, 3)), iterations=1)
    mark_test=False,  # official code: every Canny edge
    contour_fill=True,  # official code: findContours(RETR_EXTERNAL), drawContours(..., -1) filled
    contour_min_area=30,  # official code: min_area=30 < cv2.contourArea(cnt) ...
    contour_max_area=2000,  # official code: ... < max_area=2000
    contour_min_length=0,  # official code: no length test
    mask_dilate=0,  # official code: no dilation of the union
    close_kernel=5,  # official code: MORPH_CLOSE with np.ones((5, 5))
    open_kernel=5,  # official code: then MORPH_OPEN with np.ones((5, 5))
    inpaint_radius=3,  # official code: cv2.inpaint(image, mask_clean, inpaintRadius=3, ...)
    inpaint_method="ns",  # official code: flags=cv2.INPAINT_NS in clean_and_inpaint (a later demo cell: TELEA)
)
CLEANERS = {c.name: c for c in (STUDY, OFFICIAL)}


@dataclass(frozen=True)
class CleanConfig:
    """Every knob of the pipeline. Defaults: the study's choice. The knobs of a cleaner preset take
    their default from `STUDY` (values and sources there and at `OFFICIAL`); of the others, the
    official code's value is in brackets where it has one."""
    # 1. text: Tesseract word boxes
    ocr: bool = True  # False = no text detector (explicit; never a silent empty mask)
    ocr_regions: str = STUDY.ocr_regions  # "candidates": OCR only bright stroke regions, pasted in one
    #   mosaic (fast); "full": the whole grey image, as the official notebook
    ocr_scale: float = STUDY.ocr_scale  # upscale before OCR
    ocr_psm: int = STUDY.ocr_psm  # Tesseract page segmentation mode (11 = sparse text, 3 = Tesseract's default)
    ocr_oem: int = STUDY.ocr_oem  # Tesseract engine (1 = LSTM only, 3 = Tesseract's default)
    ocr_min_conf: float = 0.0  # keep words with confidence >= this (Tesseract: 0-100 for every word, so 0 keeps
    #   all); tiny scanner fonts are often read with confidence 0, so confidence is a poor filter
    ocr_min_chars: int = STUDY.ocr_min_chars  # keep words with at least this many letters or digits
    ocr_word_contrast: int = STUDY.ocr_word_contrast  # keep words whose box holds strokes (95th percentile of
    #   the stroke top-hat >= this; 0 = no test)
    ocr_min_height: int = STUDY.ocr_min_height  # ... and whose box is at least this high (px)
    ocr_pad: int = STUDY.ocr_pad  # px added around each word box
    stroke_kernel: int = 5  # top-hat kernel (px): keeps strokes thinner than this (fonts, lines), not speckle
    cand_contrast: int = 80  # stroke brighter than its surroundings by this (0-255) to be a text candidate
    cand_min_height: int = 5  # candidate text line height range (px, at the input resolution)
    cand_max_height: int = 40
    cand_min_aspect: float = 1.5  # a text line is at least this many times as wide as high ...
    cand_min_strokes: int = 2  # ... and holds at least this many letters (speckle: 1-2 round blobs)
    cand_max_fraction: float = 0.35  # candidates cover more than this -> OCR the full image instead
    # 2. contrast (detection only: the output keeps the original pixels)
    clahe_clip: float = STUDY.clahe_clip
    clahe_tile: int = STUDY.clahe_tile  # tile grid (tile x tile)
    # 3. colour marks: HSV + K-Means on saturated pixels
    colour: bool = True
    sat_min: int = STUDY.sat_min  # a pixel is saturated when S >= this (0-255)
    val_min: int = STUDY.val_min  # ... and V >= this (0 = no test)
    kmeans_k: int = STUDY.kmeans_k  # clusters of saturated pixels
    kmeans_features: str = STUDY.kmeans_features  # "hue_circle": (cos H * S, sin H * S, S, V); "hsv": raw (H, S, V)
    kmeans_impl: str = STUDY.kmeans_impl  # "opencv": cv2.kmeans (one k-means++ attempt); "sklearn": sklearn KMeans
    kmeans_iters: int = STUDY.kmeans_iters  # K-Means iterations at most
    kmeans_sample: int = STUDY.kmeans_sample  # fit K-Means on at most this many pixels, then assign all (0 = all)
    cluster_sat_min: int = STUDY.cluster_sat_min  # keep clusters whose centre S >= this ...
    cluster_val_min: int = STUDY.cluster_val_min  # ... and V >= this
    colour_min_area: int = STUDY.colour_min_area  # drop colour components smaller than this (px) after linking
    colour_link: int = STUDY.colour_link  # closing (px) that links dotted caliper lines first (0 = none)
    # 4. grey marks: Canny + contours
    grey: bool = True
    grey_clahe: str = STUDY.grey_clahe  # "lab": grey of the CIELAB-CLAHE image; "grey": CLAHE on the grey image
    canny_low: int = STUDY.canny_low
    canny_high: int = STUDY.canny_high
    grey_dilate: int = STUDY.grey_dilate  # dilate edges (px) before contours
    mark_test: bool = STUDY.mark_test  # True: only edges next to mark pixels (mark_* below); False: every edge
    contour_fill: bool = STUDY.contour_fill  # False: connected pieces of edges with pixel area in [min, max],
    #   not filled; True: external contours with min < cv2.contourArea < max, filled
    contour_min_area: int = STUDY.contour_min_area
    contour_max_area: int = STUDY.contour_max_area
    contour_min_length: int = STUDY.contour_min_length  # ... and longer side >= this (px; 0 = no test)
    mark_kernel: int = 3  # top-hat kernel (px): marks are strokes thinner than this
    mark_contrast: int = 120  # top-hat >= this (0-255) makes a pixel a mark pixel ...
    mark_value: int = 140  # ... when its grey value is >= this too ...
    mark_line: int = 4  # ... and it lies on a straight run of >= this many mark pixels (not speckle) ...
    mark_dark: int = 40  # ... or its 15x15 neighbourhood is darker than this (the black screen margin)
    # 5. union -> dilate -> close -> open
    mask_dilate: int = STUDY.mask_dilate  # dilate the union (px, 0 = none): covers halos, keeps thin marks
    close_kernel: int = STUDY.close_kernel
    open_kernel: int = STUDY.open_kernel
    # 6. inpainting
    inpaint_radius: int = STUDY.inpaint_radius
    inpaint_method: str = STUDY.inpaint_method  # "ns" Navier-Stokes (paper) or "telea"
    # 7. standardisation
    image_size: int = 224  # output side (px) [224]
    interpolation: str = "area"  # area for shrinking (no aliasing of speckle) [nearest]
    keep_aspect: bool = False  # True: scale the long side, pad the short one [squash]
    pad_value: int = 0  # padding grey level when keep_aspect
    seed: int = 0  # K-Means initialisation

    def __post_init__(self):
        for name, allowed in (("ocr_regions", ("candidates", "full")), ("kmeans_features", ("hue_circle", "hsv")),
                              ("kmeans_impl", ("opencv", "sklearn")), ("grey_clahe", ("lab", "grey")),
                              ("inpaint_method", ("ns", "telea"))):
            if getattr(self, name) not in allowed:
                raise UsfmaeError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsfmaeError(f"interpolation {self.interpolation!r} unknown: use one of {sorted(INTERPOLATIONS)}")
        from ..curation_readers import MIN_SIDE

        if self.image_size < MIN_SIDE:  # smaller PNGs would be refused by every later step
            raise UsfmaeError(f"image_size must be >= {MIN_SIDE} (the smallest image any step reads), "
                              f"got {self.image_size}")


def cleaner_preset(name: str) -> Cleaner:
    """The cleaner preset called `name` ("study" or "official"); an unknown name is an error."""
    if name not in CLEANERS:
        raise UsfmaeError(f"cleaner {name!r} unknown: use one of {', '.join(map(repr, CLEANERS))}")
    return CLEANERS[name]


def make_config(cleaner: str = "study", **overrides) -> CleanConfig:
    """CleanConfig of the cleaner preset `cleaner` ("study": the defaults; "official": the official
    notebook's, see `OFFICIAL`) with overrides; an unknown name is an error that lists the known ones."""
    known = {f.name for f in fields(CleanConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UsfmaeError(f"unknown cleaning parameter(s) {bad}; known: {sorted(known)}")
    return CleanConfig(**{**cleaner_preset(cleaner).settings(), **overrides})


def cleaner_name(cfg: CleanConfig) -> str:
    """The name of the preset whose every setting `cfg` has ("study", "official"), else "custom"."""
    for c in CLEANERS.values():
        if all(getattr(cfg, k) == v for k, v in c.settings().items()):
            return c.name
    return "custom"


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


def tesseract_words(grey: np.ndarray, psm: int, oem: int) -> list[tuple[str, float, int, int, int, int]]:
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
        return [(t, c, l / scale, tp / scale, w / scale, h / scale)
                for t, c, l, tp, w, h in tesseract_words(big, psm, oem)]
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
    for t, c, l, tp, w, h in tesseract_words(mosaic, psm, oem):
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
                link: int = 5, seed: int = 0, features: str = "hue_circle", impl: str = "opencv") -> np.ndarray:
    """Mask of colour marks: saturated pixels (HSV: S >= sat_min, V >= val_min), clustered with
    K-Means into k clusters; clusters whose centre is both saturated and bright (S >= cluster_sat_min,
    V >= cluster_val_min) are marks (the others are tinted tissue or dark chroma noise). Components
    smaller than `min_area` after a `link` closing (which joins dotted lines) are dropped.

    features: "hue_circle" clusters (hue as a point on the circle scaled by S, S, V), so that red at
    hue 179 and at hue 0 are neighbours; "hsv" the raw (H, S, V) values (official notebook).
    impl: "opencv" (cv2.kmeans, k-means++, one attempt, `iters` iterations, fitted on at most `sample`
    pixels then all assigned) or "sklearn" (sklearn.cluster.KMeans(k, random_state=seed,
    max_iter=iters).fit_predict, as the official notebook). Returns uint8 0/255 [H, W]."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = (hsv[..., i].astype(np.float32) for i in range(3))
    cand = (s >= sat_min) & (v >= val_min)  # [H, W]
    out = np.zeros(cand.shape, np.uint8)
    n = int(cand.sum())
    if n < k:
        return out
    if features == "hsv":
        feats, unit = hsv[cand].astype(np.float64), 1.0  # [n, 3] raw H (0-179), S, V (0-255)
    else:
        ang = h[cand] * (np.pi / 90.0)  # OpenCV hue is 0..179
        feats = np.stack([np.cos(ang) * s[cand], np.sin(ang) * s[cand], s[cand], v[cand]], 1) / 255.0  # [n, 4]
        unit = 255.0
    rng = np.random.default_rng(seed)
    fit = feats if (sample <= 0 or n <= sample) else feats[rng.choice(n, sample, replace=False)]
    if impl == "sklearn":
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():  # fewer distinct colours than k: fewer clusters, as the official run
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=min(k, len(fit)), random_state=seed, max_iter=iters).fit(fit)
        centres = km.cluster_centers_
        labels = km.labels_ if fit is feats else km.predict(feats)
    else:
        cv2.setRNGSeed(seed)
        crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iters, 1e-3)
        _, _, centres = cv2.kmeans(fit.astype(np.float32), min(k, len(fit)), None, crit, 1, cv2.KMEANS_PP_CENTERS)
        labels = np.argmin(((feats[:, None, :] - centres[None]) ** 2).sum(-1), 1)  # [n]
    keep = (centres[:, -2] * unit >= cluster_sat_min) & (centres[:, -1] * unit >= cluster_val_min)  # S, V last
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
              mark_dark: int = 40, mark_test: bool = True, fill: bool = False) -> np.ndarray:
    """Mask of grey marks (ticks, pencil lines, calipers, box outlines, bars).

    Canny edges (with mark_test: only those next to mark pixels, see `mark_pixels`), dilated
    (`dilate` px square). Then, fill=False: each connected piece of edges is kept when its pixel
    area is in [min_area, max_area] and its longer side >= min_length; pieces are not filled, as a
    pencil outline around a lesion must not mask the lesion. fill=True (official notebook): each
    external contour with min_area < cv2.contourArea < max_area (and longer side >= min_length) is
    drawn filled.
    The mark test is what keeps Canny's edges on speckle out: the official notebook fills every
    external contour of area 30-2000, and on tissue that is speckle, while a mark touching
    tissue merges into one huge contour and is lost.
    grey: uint8 [H, W] (CLAHE-enhanced). Returns uint8 0/255 [H, W]."""
    edges = cv2.Canny(grey, canny_low, canny_high)
    if mark_test:
        marks = mark_pixels(grey, mark_kernel, mark_contrast, mark_value, mark_line, mark_dark)  # [H, W] 0/1
        edges &= cv2.dilate(marks, _kernel(3)) * 255
    if dilate > 1:
        edges = cv2.dilate(edges, _kernel(dilate))
    if fill:
        out = np.zeros_like(grey)
        contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for cnt in contours:
            _, _, w, h = cv2.boundingRect(cnt)
            if min_area < cv2.contourArea(cnt) < max_area and max(w, h) >= min_length:
                cv2.drawContours(out, [cnt], -1, 255, -1)
        return out
    n, lab, stats, _ = cv2.connectedComponentsWithStats(edges, connectivity=8)
    area, side = stats[:, cv2.CC_STAT_AREA], np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
    keep = (area >= min_area) & (area <= max_area) & (side >= min_length)
    keep[0] = False  # background
    return np.where(keep[lab], 255, 0).astype(np.uint8)


# ============================================================================ 5-7
def combine_masks(masks, dilate: int = 3, close: int = 5, open_: int = 3) -> np.ndarray:
    """Union of detector masks, dilated (halo of antialiased or compressed marks; 0 or 1 = none),
    closed (joins pieces), then opened (drops specks), with square kernels of `close` and `open_` px.
    Dilating first means an opening smaller than the dilation keeps 1-px marks: the official 5x5
    opening of the raw union erased them."""
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
def grey_input(rgb: np.ndarray, enhanced: np.ndarray, cfg: CleanConfig) -> np.ndarray:
    """The grey image the grey-mark detector reads: grey of the CIELAB-CLAHE image `enhanced`
    (grey_clahe="lab") or CLAHE on the grey of `rgb` (grey_clahe="grey", official notebook). uint8 [H, W]."""
    if cfg.grey_clahe == "grey":
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_tile, cfg.clahe_tile))
        return clahe.apply(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    return cv2.cvtColor(enhanced, cv2.COLOR_RGB2GRAY)


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
                                    cfg.colour_min_area, cfg.colour_link, cfg.seed, cfg.kmeans_features,
                                    cfg.kmeans_impl)
    lap("colour")
    if cfg.grey:
        out["grey"] = grey_mask(grey_input(rgb, enhanced, cfg), cfg.canny_low, cfg.canny_high,
                                cfg.grey_dilate, cfg.contour_min_area, cfg.contour_max_area,
                                cfg.contour_min_length, cfg.mark_kernel, cfg.mark_contrast, cfg.mark_value,
                                cfg.mark_line, cfg.mark_dark, cfg.mark_test, cfg.contour_fill)
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


