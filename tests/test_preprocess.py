"""Tests of annotation removal and the batch cleaner (usfmae_lib.preprocess). ~40 s on 2 cores."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, cli, preprocess as pp, synthetic

NO_OCR = pp.make_config(ocr=False)


def speckle(h=120, w=160, seed=0) -> np.ndarray:
    """Grey RGB uint8 'tissue': smoothed noise, mid-grey, no marks."""
    rng = np.random.default_rng(seed)
    g = cv2.GaussianBlur(rng.normal(90, 40, (h, w)).astype(np.float32), (0, 0), 1.5)
    return cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def annotated() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(annotated, clean, mask): a yellow dotted caliper line, a white cross and a white text
    label on a black margin, drawn on speckle with exact mask."""
    clean = speckle()
    clean[:14] = 0  # black screen margin for the label
    marks = np.zeros(clean.shape[:2], np.uint8)
    colour = np.zeros_like(clean)
    for x in range(30, 130, 4):  # dotted caliper line, yellow
        marks[70, x] = 1
        colour[70, x] = (255, 255, 0)
    for p0, p1 in (((100, 40), (110, 40)), ((105, 35), (105, 45))):  # white 1-px cross
        m = np.zeros_like(marks)
        cv2.line(m, p0, p1, 1, 1)
        colour[m > 0] = (255, 255, 255)
        marks |= m
    m = np.zeros_like(marks)
    cv2.putText(m, "RT BREAST", (3, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 1, 1, cv2.LINE_8)
    colour[m > 0] = (255, 255, 255)
    marks |= m
    ann = clean.copy()
    ann[marks > 0] = colour[marks > 0]
    return ann, clean, marks > 0


# ---------------------------------------------------------------------------- stages
def test_detectors_find_marks_and_inpainting_brings_the_image_closer_to_the_clean_one():
    ann, clean, marks = annotated()
    _, det = pp.clean_image(ann, NO_OCR, resize=False)
    mask = det["mask"] > 0
    assert mask[marks].mean() >= 0.9  # recall of the drawn marks
    assert mask.mean() < 0.15
    assert det["colour"][70, 30:130].any() and det["grey"][35:46, 100:111].any()
    (p_clean, _), (p_ann, _) = pp.psnr_ssim(det["inpainted"], clean), pp.psnr_ssim(ann, clean)
    assert p_clean > p_ann + 3


def test_no_marks_means_a_small_mask():
    for seed in range(3):
        _, det = pp.clean_image(speckle(seed=seed), NO_OCR, resize=False)
        assert (det["mask"] > 0).mean() < 0.02


def test_colour_mask_keeps_dotted_lines_and_ignores_grey():
    ann, _, marks = annotated()
    m = pp.colour_mask(ann) > 0
    assert m[70, 30:130:4].all()  # every dot of the dotted caliper line
    assert not m[marks == 0].any()
    # the official 20 px component filter (no linking) loses the isolated dots
    assert not (pp.colour_mask(ann, min_area=20, link=0) > 0).any()


def test_morphology_keeps_one_pixel_marks_the_official_opening_erased():
    line = np.zeros((40, 40), np.uint8)
    line[20, 5:35] = 255
    assert pp.combine_masks([line])[20, 5:35].all()
    assert not pp.combine_masks([line], dilate=0, close=5, open_=5).any()  # official: close then open 5x5


def test_resize_squash_and_keep_aspect():
    img = np.full((50, 100, 3), 200, np.uint8)
    assert pp.resize_image(img, 32).shape == (32, 32, 3)
    padded = pp.resize_image(img, 32, keep_aspect=True, pad_value=0)
    assert padded.shape == (32, 32, 3)
    assert (padded[:7] == 0).all() and (padded[-7:] == 0).all() and (padded[10:22] == 200).all()
    assert pp.resize_image(img, 16, interpolation="nearest").shape == (16, 16, 3)
    with pytest.raises(UsfmaeError, match="interpolation"):
        pp.make_config(interpolation="bogus")


def test_normalize_uses_imagenet_statistics():
    x = pp.normalize(np.full((4, 4, 3), 255, np.uint8))
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], (1 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD))


def test_unknown_parameter_is_named():
    with pytest.raises(UsfmaeError, match="clahe_clip"):
        pp.make_config(clahe_clp=2.0)


# ---------------------------------------------------------------------------- Tesseract
def test_missing_tesseract_is_a_clear_error_at_start(tmp_path, monkeypatch, capsys):
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-tesseract"))
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), speckle())
    with pytest.raises(UsfmaeError, match="apt-get install tesseract-ocr.*conda install -c conda-forge tesseract"):
        pp.clean_tree(src, tmp_path / "out", pp.CleanConfig(), workers=1, progress=False)
    assert not (tmp_path / "out" / "a.png").exists()  # nothing half-done: it stopped at the start
    assert cli.main(["clean", str(src), str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 2
    assert "--no-ocr" in capsys.readouterr().err
    # explicit --no-ocr works without Tesseract
    assert cli.main(["clean", str(src), str(tmp_path / "out"), "--no-ocr", "--no-progress", "--workers", "1"]) == 0
    assert (tmp_path / "out" / "a.png").exists()


def test_text_on_a_real_scan_is_found_and_no_longer_read(real):
    rgb = pp.read_image(real("busi_sample") / "benign" / "benign (235).png")  # "lt axilla" burned in
    before = [t for t, c, *_ in pp.read_words(rgb) if c >= 70]
    assert "axilla" in before
    _, det = pp.clean_image(rgb, pp.CleanConfig(), resize=False)
    assert det["words"] >= 1 and det["text"].any()
    after = [t for t, c, *_ in pp.read_words(det["inpainted"]) if c >= 50]
    assert "axilla" not in after
    assert (det["mask"] > 0).mean() < 0.1


def test_notebook_02s_real_scan_check_reads_every_dataset_folder_of_real_dir(real, tmp_path):
    (tmp_path / "real" / "BUSI").mkdir(parents=True)  # what a user passes as real_dir: <dataset>/<images>
    for name in ("benign (235).png", "benign (8).png"):
        shutil.copy(real("busi_sample") / "benign" / name, tmp_path / "real" / "BUSI" / name)
    table = pp.evaluate_real(tmp_path / "real", pp.CleanConfig(), limit=1, workers=1, progress=False)
    assert set(table["dataset"]) == {"BUSI"} and len(table) == 1
    assert {"mask_fraction", "words_before_conf70", "words_still_read_conf70"} <= set(table.columns)


# ---------------------------------------------------------------------------- batch mode
def _folder(root: Path) -> Path:
    ann, _, _ = annotated()
    (root / "setA" / "sub").mkdir(parents=True)
    (root / "setB").mkdir()
    cv2.imwrite(str(root / "setA" / "one.png"), cv2.cvtColor(ann, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "setA" / "sub" / "two.jpg"), speckle(seed=1))
    cv2.imwrite(str(root / "setB" / "grey16.png"), (speckle(seed=2)[..., 0].astype(np.uint16) * 256))
    (root / "setB" / "broken.png").write_bytes(b"not a png")
    return root


def test_clean_tree_mirrors_the_tree_reports_and_resumes(tmp_path):
    src, out = _folder(tmp_path / "in"), tmp_path / "clean"
    cfg = pp.make_config(ocr=False, image_size=32)
    rep = pp.clean_tree(src, out, cfg, workers=2, masks_dir=tmp_path / "masks", progress=False)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == ["setA/one.png", "setA/sub/two.png", "setB/grey16.png"]
    img = cv2.imread(str(out / "setA" / "one.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (tmp_path / "masks" / "setA" / "one.png").exists()
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == list(pp.INDEX_COLUMNS) and sorted(index["path"]) == pngs
    assert set(index["dataset"]) == {"setA", "setB"} and set(index["anatomy"]) == {"unknown"}
    # the bad file is listed with its error; the others are fine
    assert len(rep) == 4 and rep.set_index("path").loc["setB/broken.png", "status"] == "error"
    assert "not a readable image" in rep.set_index("path").loc["setB/broken.png", "error"]
    good = rep[rep["status"] == "ok"].set_index("path")
    assert good.loc["setA/one.png", "mask_fraction"] > 0 and "colour" in good.loc["setA/one.png", "fired"]
    assert (good[[f"t_{s}" for s in pp.STAGES]] >= 0).all().all() and (good["t_total"] > 0).all()
    assert pd.read_csv(out / "report.csv").shape[0] == 4
    # resume: finished PNGs are not redone, the failed image is tried again
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    rep2 = pp.clean_tree(src, out, cfg, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    assert len(rep2) == 4 and (rep2["status"] == "error").sum() == 1
    assert not list(out.rglob(".*.part*"))
    # other parameters: nothing made with the old ones counts as finished
    rep3 = pp.clean_tree(src, out, pp.make_config(ocr=False, image_size=40), workers=1, progress=False)
    assert len(rep3) == 4 and cv2.imread(str(out / "setA" / "one.png")).shape == (40, 40, 3)


def test_manifest_input_uses_the_contract_layout(tmp_path):
    src = _folder(tmp_path / "in")
    rows = [dict(frame_id="setA/one.png#0", dataset="Set A", anatomy="breast", source=str(src / "setA" / "one.png"),
                 kind="image", frame=0, axis=-1),
            dict(frame_id="setA/sub/two.jpg#0", dataset="Set A", anatomy="breast",
                 source=str(src / "setA" / "sub" / "two.jpg"), kind="image", frame=0, axis=-1),
            # an id that ends in its file's extension (curation's image ids do): one .png, never x.png.png
            dict(frame_id="setA/three.png", dataset="Set A", anatomy="breast", source=str(src / "setA" / "one.png"),
                 kind="image", frame=0, axis=-1),
            dict(frame_id="setA/three.jpg", dataset="Set A", anatomy="breast", source=str(src / "setA" / "one.png"),
                 kind="image", frame=0, axis=-1)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "clean"
    rep = pp.clean_tree(manifest, out, pp.make_config(ocr=False, image_size=48), workers=1, progress=False)
    assert (rep["status"] == "ok").all(), rep["error"].tolist()
    index = pd.read_csv(out / "index.csv")
    assert sorted(index["path"])[:3] == ["Set_A/setA_one.png_0.png", "Set_A/setA_sub_two.jpg_0.png", "Set_A/setA_three.png"]
    assert sorted(index["path"])[3].startswith("Set_A/setA_three_") and len(index) == 4  # the clash keeps both
    assert not any(p.endswith(".png.png") for p in index["path"])
    assert set(index["anatomy"]) == {"breast"} and set(index["dataset"]) == {"Set A"}
    assert all((out / p).exists() for p in index["path"])
    pd.DataFrame(rows).drop(columns="kind").to_csv(manifest, index=False)
    with pytest.raises(UsfmaeError, match="kind"):
        pp.clean_tree(manifest, out, NO_OCR, workers=1, progress=False)


def test_cli_param_and_errors(tmp_path, capsys):
    src = _folder(tmp_path / "in")
    assert cli.main(["clean", str(tmp_path / "nothing"), str(tmp_path / "o"), "--no-ocr"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["clean", str(src), str(tmp_path / "o"), "--no-ocr", "--config", "bogus=1"]) == 2
    assert "known" in capsys.readouterr().err
    assert cli.main(["clean", str(src), str(tmp_path / "o"), "--no-ocr", "--no-progress", "--workers", "1",
                     "--image-size", "40", "--keep-aspect", "--config", "clahe_clip=3", "--save-masks"]) == 0
    assert "1 image(s) failed" in capsys.readouterr().err
    assert cv2.imread(str(tmp_path / "o" / "setA" / "one.png")).shape == (40, 40, 3)
    assert (tmp_path / "o_masks" / "setA" / "one.png").exists()


# ---------------------------------------------------------------------------- evaluation
def test_kind_masks_replay_the_generator_and_perfect_masks_score_one(tmp_path):
    root = synthetic.generate_tree(tmp_path / "s", seed=0, profile="smoke", workers=1, progress=False, n_pretrain=0,
                                   n_videos=0, n_volumes=0, n_annotated=3, n_busbra=0, n_otu=0, n_gist=0)
    for i in range(3):
        name = f"ann_{i:05d}.png"
        kinds = pp.synthetic_kind_masks(root, name)
        union = np.zeros_like(kinds["text"])
        for m in kinds.values():
            union |= m
        stored = cv2.imread(str(root / "annotated" / "masks" / name), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(union > 0, stored > 0) and kinds["text"].any()
        s = pp.mask_scores(stored, kinds)
        assert s["recall"] == s["precision"] == s["iou"] == 1.0 and s["text_recall"] == 1.0
        assert pp.mask_scores(np.zeros_like(stored), kinds)["recall"] == 0.0
    scores = pp.evaluate_annotated(root, NO_OCR, workers=1, progress=False)
    assert set(scores["variant"]) == set(pp.ABLATIONS) and len(scores) == 3 * len(pp.ABLATIONS)
    summary = pp.summarize_annotated(scores)
    assert 0 <= summary["recall"].min() <= summary["recall"].max() <= 1
    # a mismatching stored mask is refused, not silently scored
    cv2.imwrite(str(root / "annotated" / "masks" / "ann_00000.png"), np.zeros((256, 320), np.uint8))
    with pytest.raises(UsfmaeError, match="regenerate"):
        pp.synthetic_kind_masks(root, "ann_00000.png")


def test_still_read_needs_the_same_word_in_an_overlapping_box():
    before = [("RT", 80.0, 10, 10, 20, 10), ("UOQ", 75.0, 40, 10, 30, 10), ("SS", 90.0, 100, 100, 10, 10)]
    after = [("rt", 20.0, 15, 12, 20, 10), ("UOQ", 90.0, 200, 200, 30, 10), ("SS", 90.0, 100, 100, 10, 10)]
    assert pp.still_read(before, after) == [True, False, True]
