"""The annotation cleaner's two presets (issue 27): `study` (this study's tuned settings, the
defaults) and `official` (the official notebook US_images_preprocessing.ipynb, value by value).
Each preset's values are pinned here, the official preset is checked against the official
functions themselves, and notebook 02's `cleaner` parameter and `usfmae clean --cleaner` reach the
cleaner. A few seconds on 2 cores."""
from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import yaml

from usfmae_lib import UsfmaeError, cli, parameters, preprocess as pp, runner, synthetic
from usfmae_lib.preprocess import detectors

# The official notebook's values (cell "Preprocessing"), one per setting; STUDY.md section 6.
OFFICIAL = dict(
    ocr_regions="full",  # pytesseract.image_to_data(gray): the whole grey image
    ocr_scale=1.0,  # no resize before OCR
    ocr_psm=3,  # no config: Tesseract's defaults
    ocr_oem=3,
    ocr_min_chars=0,  # if text.strip() != "": every non-empty word
    ocr_word_contrast=0,  # no test on the box
    ocr_min_height=0,
    ocr_pad=0,  # cv2.rectangle(mask, (x, y), (x + w, y + h), 255, -1)
    clahe_clip=2.0,  # cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    clahe_tile=8,
    sat_min=41,  # mask_color = s > sat_thresh (40)
    val_min=0,  # no V test per pixel
    kmeans_k=3,  # k=3
    kmeans_features="hsv",  # pixels = hsv[mask_color]
    kmeans_impl="sklearn",  # KMeans(n_clusters=k, random_state=42).fit_predict(pixels)
    kmeans_iters=300,  # KMeans's default max_iter
    kmeans_sample=0,  # every saturated pixel
    cluster_sat_min=40,  # if s_c > sat_thresh and v_c > 20
    cluster_val_min=20,
    colour_min_area=20,  # min_area=20, connectivity=8
    colour_link=0,
    grey_clahe="grey",  # clahe.apply(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    canny_low=50,  # cv2.Canny(enhanced, 50, 150)
    canny_high=150,
    grey_dilate=3,  # cv2.dilate(edges, np.ones((3, 3), np.uint8), iterations=1)
    mark_test=False,
    contour_fill=True,  # findContours(RETR_EXTERNAL); drawContours(mask, [cnt], -1, 255, -1)
    contour_min_area=30,  # if min_area < area < max_area (30, 2000)
    contour_max_area=2000,
    contour_min_length=0,
    mask_dilate=0,  # clean_and_inpaint: no dilation ...
    close_kernel=5,  # ... MORPH_CLOSE, then MORPH_OPEN, kernel np.ones((5, 5))
    open_kernel=5,
    inpaint_radius=3,  # cv2.inpaint(image, mask_clean, inpaintRadius=3, flags=cv2.INPAINT_NS)
    inpaint_method="ns",
)
# This study's values (docs/preprocessing.md, notebook 02's pipeline table).
STUDY = dict(
    ocr_regions="candidates", ocr_scale=2.0, ocr_psm=11, ocr_oem=1, ocr_min_chars=1, ocr_word_contrast=120,
    ocr_min_height=5, ocr_pad=2, clahe_clip=2.0, clahe_tile=8, sat_min=40, val_min=40, kmeans_k=3,
    kmeans_features="hue_circle", kmeans_impl="opencv", kmeans_iters=10, kmeans_sample=4000, cluster_sat_min=60,
    cluster_val_min=60, colour_min_area=8, colour_link=5, grey_clahe="lab", canny_low=50, canny_high=150,
    grey_dilate=3, mark_test=True, contour_fill=False, contour_min_area=6, contour_max_area=3000,
    contour_min_length=5, mask_dilate=3, close_kernel=5, open_kernel=3, inpaint_radius=3, inpaint_method="ns",
)


# ---------------------------------------------------------------------------- the presets
def test_official_preset_holds_the_official_notebooks_values():
    assert pp.OFFICIAL.name == "official" and pp.CLEANERS["official"] is pp.OFFICIAL
    assert pp.OFFICIAL.settings() == OFFICIAL
    cfg = pp.make_config("official")
    assert all(getattr(cfg, k) == v for k, v in OFFICIAL.items())
    assert pp.cleaner_name(cfg) == "official"


def test_study_preset_holds_the_defaults():
    assert pp.STUDY.settings() == STUDY
    assert pp.make_config("study") == pp.make_config() == pp.CleanConfig()
    assert pp.cleaner_name(pp.CleanConfig()) == "study"
    assert pp.cleaner_name(pp.make_config("official", open_kernel=3)) == "custom"  # an override: neither
    assert pp.cleaner_name(pp.make_config("official", image_size=64, ocr=False)) == "official"  # not cleaner knobs


def test_unknown_cleaner_or_option_is_named():
    with pytest.raises(UsfmaeError, match="'study', 'official'"):
        pp.make_config("paper")
    for name in ("kmeans_features", "kmeans_impl", "grey_clahe"):
        with pytest.raises(UsfmaeError, match=name):
            pp.make_config(**{name: "bogus"})


def test_docs_table_gives_both_presets_values():
    """docs/preprocessing.md's preset table: one row per setting, `| name | study | official | ...`."""
    text = (parameters.REPO_ROOT / "docs" / "preprocessing.md").read_text()
    for name in STUDY:
        row = re.search(rf"^\| `{name}` \| ([^|]*) \| ([^|]*) \|", text, re.M)
        assert row, f"docs/preprocessing.md: no row for `{name}` in the preset table"
        assert row.groups() == (str(STUDY[name]), str(OFFICIAL[name])), name


# ---------------------------------------------------------------------------- the official functions
# get_annotation_mask_kmeans_clahe, get_grayscale_annotation_mask and clean_and_inpaint of the official
# notebook, verbatim but for comments (BGR images, as cv2.imread gives them there)
def _official_colour(image, k=3, sat_thresh=40, min_area=20):
    from sklearn.cluster import KMeans

    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)
    l, a, b = cv2.split(lab)
    cl = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(l)
    image_clahe = cv2.cvtColor(cv2.merge((cl, a, b)), cv2.COLOR_LAB2BGR)
    hsv = cv2.cvtColor(image_clahe, cv2.COLOR_BGR2HSV)
    h, s, v = cv2.split(hsv)
    mask_color = s > sat_thresh
    pixels = hsv[mask_color]
    if len(pixels) < k:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    kmeans = KMeans(n_clusters=k, random_state=42)
    labels = kmeans.fit_predict(pixels)
    centers = kmeans.cluster_centers_
    mask_result = np.zeros(hsv.shape[:2], dtype=np.uint8)
    for i, center in enumerate(centers):
        h_c, s_c, v_c = center
        if s_c > sat_thresh and v_c > 20:
            match_mask = (labels == i)
            color_pixels_idx = np.where(mask_color)
            mask_result[color_pixels_idx[0][match_mask], color_pixels_idx[1][match_mask]] = 255
    num_labels, labels_img, stats, _ = cv2.connectedComponentsWithStats(mask_result, connectivity=8)
    cleaned_mask = np.zeros_like(mask_result)
    for i in range(1, num_labels):
        if stats[i, cv2.CC_STAT_AREA] >= min_area:
            cleaned_mask[labels_img == i] = 255
    return cleaned_mask


def _official_grey(image, min_area=30, max_area=2000):
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    enhanced = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    edges = cv2.Canny(enhanced, 50, 150)
    dilated = cv2.dilate(edges, np.ones((3, 3), np.uint8), iterations=1)
    contours, _ = cv2.findContours(dilated, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros_like(gray)
    for cnt in contours:
        area = cv2.contourArea(cnt)
        if min_area < area < max_area:
            cv2.drawContours(mask, [cnt], -1, 255, -1)
    return mask


def _official_clean_and_inpaint(image, mask, radius=3):
    kernel = np.ones((5, 5), np.uint8)
    mask_clean = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask_clean = cv2.morphologyEx(mask_clean, cv2.MORPH_OPEN, kernel)
    return cv2.inpaint(image, mask_clean, inpaintRadius=radius, flags=cv2.INPAINT_NS), mask_clean


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """(annotated, clean twin, marks) of one synthetic annotated scan (RGB uint8, bool [H, W])."""
    root = synthetic.generate_tree(tmp_path_factory.mktemp("synth"), seed=0, profile="smoke", workers=1,
                                   progress=False, n_pretrain=0, n_videos=0, n_volumes=0, n_annotated=2,
                                   n_busbra=0, n_otu=0, n_gist=0)
    name = "ann_00001.png"  # text, calipers, colour and grey marks
    marks = np.any([m > 0 for m in pp.synthetic_kind_masks(root, name).values()], axis=0)
    return (pp.read_image(root / "annotated" / "images" / name), pp.read_image(root / "annotated" / "clean" / name),
            marks)


def test_official_preset_reproduces_the_official_functions(scan):
    ann, _, _ = scan
    bgr = cv2.cvtColor(ann, cv2.COLOR_RGB2BGR)
    cfg = pp.make_config("official", ocr=False, seed=42)  # the official KMeans's random_state
    _, det = pp.clean_image(ann, cfg, resize=False)
    colour, grey = _official_colour(bgr), _official_grey(bgr)
    assert colour.any() and grey.any()
    assert np.array_equal(det["colour"], colour) and np.array_equal(det["grey"], grey)
    inpainted, mask = _official_clean_and_inpaint(bgr, cv2.bitwise_or(colour, grey))
    assert np.array_equal(det["mask"], mask)
    assert np.array_equal(det["inpainted"], cv2.cvtColor(inpainted, cv2.COLOR_BGR2RGB))
    # the study's cleaner, on the same scan, masks otherwise
    assert not np.array_equal(pp.detect(ann, pp.make_config(ocr=False, seed=42))["mask"], mask)


def test_official_text_detector_reads_the_whole_grey_image_and_keeps_every_word(monkeypatch):
    """No Tesseract needed: the OCR call is recorded. Official: the grey image itself (no mosaic, no
    upscaling), Tesseract's default modes, every non-empty word filled with no margin."""
    img = np.zeros((60, 80, 3), np.uint8)
    img[10:30, 5:70] = 255  # whatever: the words come from the fake OCR
    calls = []

    def fake(grey, psm, oem):
        calls.append((grey.shape, psm, oem))
        return [("--", 20.0, 10, 12, 30, 4)]  # a 4 px high 'word' of no letter: the study drops it

    monkeypatch.setattr(detectors, "tesseract_words", fake)
    off = pp.make_config("official")
    mask, n = pp.text_mask(img, off.ocr_regions, off.ocr_scale, off.ocr_psm, off.ocr_oem, off.ocr_min_conf,
                           off.ocr_min_chars, off.ocr_word_contrast, off.ocr_min_height, off.ocr_pad)
    assert calls == [((60, 80), 3, 3)] and n == 1
    assert mask[12:16, 10:40].all() and (mask > 0).sum() == 4 * 30
    st = pp.make_config("study")
    calls.clear()
    mask, n = pp.text_mask(img, st.ocr_regions, st.ocr_scale, st.ocr_psm, st.ocr_oem, st.ocr_min_conf,
                           st.ocr_min_chars, st.ocr_word_contrast, st.ocr_min_height, st.ocr_pad)
    assert n == 0 and not mask.any() and all(call[1:] == (11, 1) for call in calls)


def test_official_preset_cleans_an_annotated_scan_end_to_end(scan, tmp_path):
    """usfmae clean --cleaner official on a folder: PNG, mask and report, the marks mostly masked and
    the cleaned scan closer to its clean twin than the annotated one."""
    ann, clean, marks = scan
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "scan.png"), cv2.cvtColor(ann, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert cli.main(["clean", str(tmp_path / "in"), str(out), "--cleaner", "official", "--no-ocr", "--save-masks",
                     "--image-size", "128", "--no-progress", "--workers", "1"]) == 0
    assert json.loads((out / "clean_config.json").read_text())["cleaner"] == "official"
    mask = cv2.imread(str(tmp_path / "out_masks" / "scan.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert mask[marks].mean() > 0.5 and mask.mean() < 0.15
    cleaned = pp.read_image(out / "scan.png")

    def small(img):
        return pp.resize_image(img, 128)

    assert pp.psnr_ssim(cleaned, small(clean))[0] > pp.psnr_ssim(small(ann), small(clean))[0] + 1


def test_a_folder_cleaned_by_one_preset_is_redone_by_the_other(scan, tmp_path):
    ann, _, _ = scan
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "scan.png"), cv2.cvtColor(ann, cv2.COLOR_RGB2BGR))
    out, masks = tmp_path / "out", tmp_path / "masks"
    made = {}
    for name in ("study", "official", "official"):
        pp.clean_tree(tmp_path / "in", out, pp.make_config(name, ocr=False, image_size=64), workers=1,
                      masks_dir=masks, progress=False)
        assert json.loads((out / "clean_config.json").read_text())["cleaner"] == name
        made[name] = made.get(name, []) + [((out / "scan.png").stat().st_mtime_ns,
                                            cv2.imread(str(masks / "scan.png"), cv2.IMREAD_GRAYSCALE))]
    (t_study, m_study), (t_off, m_off), (t_again, _) = made["study"] + made["official"]
    assert t_off != t_study and not np.array_equal(m_off, m_study)  # redone with the other preset
    assert t_again == t_off  # the same preset again: resumed, nothing redone


# ---------------------------------------------------------------------------- notebook 02's parameter
def _notebook_cfg(tmp_path, params: dict):
    """Notebook 02's parameters cell, the given values injected (as usfmae run does), then its setup
    cell: the cleaning config it builds."""
    nb = runner.read_notebook(parameters.NOTEBOOKS_DIR / "02_preprocessing.py")
    index = parameters.parameters_cell(nb, "02_preprocessing")
    namespace = {}
    exec(nb.cells[index].source, namespace)
    namespace.update(params, out_dir=str(tmp_path), ocr=False)
    namespace[parameters.MARKER] = {"parameters": sorted(params) + ["out_dir", "ocr"], "sources": []}
    exec(nb.cells[index + 1].source, namespace)
    return namespace["cfg"]


def test_the_notebook_parameter_reaches_the_cleaner(scan, tmp_path):
    defaults = parameters.notebook_parameters(runner.read_notebook(parameters.NOTEBOOKS_DIR / "02_preprocessing.py"))
    assert defaults["cleaner"] == "study"
    files = {p: yaml.safe_load((parameters.PARAMS_DIR / p / "02_preprocessing.yaml").read_text()) for p in
             ("paper", "official")}
    assert files["paper"]["cleaner"] == "study" and files["official"]["cleaner"] == "official"
    cfgs = {p: _notebook_cfg(tmp_path / p, {k: v for k, v in f.items() if k != "profile"}) for p, f in files.items()}
    assert pp.cleaner_name(cfgs["paper"]) == "study" and pp.cleaner_name(cfgs["official"]) == "official"
    assert cfgs["official"] == pp.make_config("official", image_size=224, interpolation="nearest", ocr=False, seed=0)
    ann, _, _ = scan
    masks = {p: pp.detect(ann, cfg)["mask"] for p, cfg in cfgs.items()}
    assert not np.array_equal(masks["paper"], masks["official"])
    with pytest.raises(UsfmaeError, match="cleaner 'bogus' unknown"):
        _notebook_cfg(tmp_path / "bad", {"cleaner": "bogus"})
