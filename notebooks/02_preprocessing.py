# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Preprocessing: removing burned-in annotations, measured
#
# Scans carry text, calipers, depth scales and colour marks that a model must not learn. The
# paper (section 2.2) removes them with Tesseract OCR (text), HSV + K-Means (colour marks) and
# Canny + contours (grey marks), merges the masks, closes and opens them, inpaints with
# Navier-Stokes, and resizes to 224x224; the ImageNet normalisation is applied at training time.
# It never says how well this works. This notebook:
#
# 1. runs each stage on one image and shows what it detects;
# 2. measures mask precision / recall / IoU per annotation kind, and PSNR / SSIM against the
#    clean twin, on the synthetic annotated set (which has exact masks), with an ablation of
#    each detector and of the official notebook's morphology;
# 3. measures the mask on images that carry no annotation, and counts the words Tesseract still
#    reads on real scans after cleaning;
# 4. regenerates Fig. 2 (original / detected mask / inpainted) on two kinds of real scan, with a
#    row for an image that carries no annotation;
# 5. cleans the pretraining corpus into the PNG tree that notebook 03 reads (`usfmae clean`).
#
# All logic is in `usfmae_lib/preprocess/` (one image: `detectors.py`; a whole tree: `batch.py`; scores
# against ground truth: `evaluate.py`; the figures: `figures.py`); every knob is a field of `CleanConfig`.
# Run headless: `usfmae run notebooks/02_preprocessing.ipynb -f params/smoke/02_preprocessing.yaml`.
# Outputs land in `<out_dir>/02_preprocessing/`: figures and tables at the top, the PNG tree in
# `clean/` (with `clean/index.csv`), per-image scores in `eval/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
image_size = 112  # output side in pixels (paper: 224; 112 here because notebook 03 trains at 112 in quick)
interpolation = "area"  # resize filter: area, linear, cubic, lanczos, nearest (official code: nearest)
keep_aspect = False  # True: scale the long side and pad; False: squash to a square (paper)
ocr = True  # Tesseract text detection (needs the tesseract program)
cleaner = "study"  # annotation cleaner preset: "study" (this study's thresholds) or "official" (the official notebook's)
workers = 0  # processes; 0 = all cores
save_masks = False  # also write the detected masks of the corpus for inspection
n_eval = 0  # synthetic annotated images evaluated; 0 = all
n_real = 0  # real images per dataset folder evaluated; 0 = all
real_dir = None  # a folder of real scans to check the cleaning on (<dataset>/<images>, e.g. BUSI/); None = skip

# %%
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

from usfmae_lib import UsfmaeError, preprocess as pp, study

STEP = "02_preprocessing"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "eval").mkdir(exist_ok=True)
print(f"profile={profile}  cleaner={cleaner}  outputs -> {Path(out_dir).name}/{STEP}")

cfg = pp.make_config(cleaner, image_size=image_size, interpolation=interpolation, keep_aspect=keep_aspect, ocr=ocr,
                     seed=seed)
if ocr:
    print("Tesseract", pp.check_tesseract())  # a clear error here when it is missing
pd.set_option("display.precision", 3)


def save_table(df: pd.DataFrame, name: str):
    """A table at the top of the step folder, as CSV and Markdown."""
    df.to_csv(step_dir / f"{name}.csv", index=False)
    (step_dir / f"{name}.md").write_text(pp.markdown_table(df))


# %% [markdown]
# ## Inputs
#
# The corpus is notebook 01's manifest (`01_curation/manifest.parquet`: every kept 2D frame of
# the still images, videos and volumes); while that is missing, the synthetic tree's
# `pretrain/` still images. The ground truth for the measurements is the synthetic annotated set
# (`annotated/{images,clean,masks}`): each scan with burned-in marks, its clean twin and the
# exact mask of the marks. When notebook 01 ran on real data roots and made no synthetic tree,
# the annotated set alone is generated here.

# %%
from usfmae_lib import synthetic

curation_dir = Path(out_dir) / "01_curation"
synth_dir = synthetic.tree_dir(out_dir)
manifest = curation_dir / "manifest.parquet"
if manifest.exists():
    corpus = manifest
elif (synth_dir / "pretrain").is_dir():
    corpus = synth_dir / "pretrain"
    print(f"{manifest} not found: cleaning the synthetic still images {corpus} instead")
else:
    raise UsfmaeError(f"neither {manifest} nor {synth_dir / 'pretrain'} exists: run notebook 01 first "
                      f"(usfmae run notebooks/01_curation.ipynb --out {out_dir})")
annotated_dir = synth_dir
if not (synth_dir / "annotated" / "images").is_dir():
    annotated_dir = step_dir / "synthetic_annotated"
    n = synthetic.PROFILES[profile if profile in synthetic.PROFILES else "quick"]["n_annotated"]
    synthetic.generate_tree(annotated_dir, seed=seed, profile=profile if profile in synthetic.PROFILES else "quick",
                            workers=workers or None, progress=False, n_pretrain=0, n_videos=0, n_volumes=0,
                            n_annotated=n, n_busbra=0, n_otu=0, n_gist=0)
real_root = Path(real_dir) if real_dir else None
if real_root is not None and not real_root.is_dir():
    raise UsfmaeError(f"real_dir {real_dir} is not a folder: give a folder of real scans (<dataset>/<images>) or None")
print("corpus:", study.short_path(corpus, out_dir), "| annotated set:", study.short_path(annotated_dir / "annotated", out_dir),
      "| real scans:", real_root or "none")

# %% [markdown]
# ## The pipeline, stage by stage
#
# | stage | paper | official notebook | here (default) | why |
# |---|---|---|---|---|
# | text | Tesseract word boxes on grey | `image_to_data` on the whole grey image, every non-empty word | candidate lines of thin bright strokes pasted into one mosaic, upscaled 2x, `--psm 11 --oem 1`; a word is kept when its box is >= 5 px high and holds strokes (top-hat >= 120) | no Tesseract call on scans without text lines, a small mosaic instead of a scan of speckle: OCR about 11x cheaper per image (`scripts/preprocess_speed.py`); fonts of 7-10 px need upscaling; 'words' read in speckle are dropped (`ocr_regions="full"` gives the official behaviour) |
# | contrast | CLAHE on L of CIELAB | clip 2.0, 8x8 tiles | same, for detection only | the output keeps the original pixels (PSNR against the clean twin would otherwise measure CLAHE, not cleaning) |
# | colour | HSV, saturated pixels, K-Means | S > 40, k = 3, clusters S > 40 and V > 20, components < 20 px dropped | S >= 40 and V >= 40 per pixel, K-Means (k = 3, 10 iterations) fitted on at most 4000 of them, clusters with centre S >= 60 and V >= 60; components < 8 px dropped after a 5 px closing | dark pixels have meaningless hue; the closing keeps dotted caliper lines, which the 20 px filter deleted |
# | grey | Canny + contours | Canny(50, 150), dilate 3x3, fill external contours of area 30-2000 | Canny(50, 150) edges next to mark pixels (1-2 px strokes: 3x3 top-hat >= 120, grey >= 140, on a straight run of >= 4 px; on the black screen margin any stroke up to 7 px wide), dilated 3x3, pieces of area 6-3000 px and length >= 5, not filled | on tissue, Canny's contours of area 30-2000 are speckle; a mark touching tissue merges into one huge contour; filling a pencil outline masks the lesion |
# | morphology | closing then opening | close 5x5, open 5x5 | dilate 3, close 5x5, open 3x3 | the 5x5 opening erased every mark thinner than 5 px before inpainting; dilating first keeps them |
# | inpainting | Navier-Stokes (OpenCV) | radius 3 | same | |
# | resize | 224x224 | squash, nearest neighbour | squash, area interpolation (`keep_aspect`, `interpolation`) | nearest neighbour aliases speckle |
# | normalisation | ImageNet mean/std | at training | at training (`pp.normalize`, `pp.IMAGENET_MEAN/STD`); PNGs stay uint8 | |
#
# **Two presets** (`cleaner` in the parameters cell, `usfmae clean --cleaner`): `"study"` is the
# column "here (default)"; `"official"` is the official notebook's cleaner, value by value
# (`pp.OFFICIAL`, each with the line of code it comes from; the paper gives no threshold). Where
# they differ:
#
# | | study | official |
# |---|---|---|
# | text | candidate mosaic, 2x, psm 11, word filters, box + 2 px | whole grey image, 1x, Tesseract defaults, every word |
# | colour pixels | S >= 40, V >= 40 | S > 40 |
# | K-Means | OpenCV on (hue circle, S, V), 10 iterations, <= 4000 pixels | scikit-learn on raw (H, S, V), 300 iterations, all pixels |
# | colour clusters, components | centre S, V >= 60; >= 8 px after a 5 px closing | centre S > 40, V > 20; >= 20 px |
# | grey | CLAHE on L, edges next to mark pixels, pieces of 6-3000 px, not filled | CLAHE on grey, every edge, external contours of area 30-2000, filled |
# | morphology | dilate 3, close 5x5, open 3x3 | close 5x5, open 5x5 |
#
# Every value is a field of `CleanConfig` (`usfmae clean ... --config NAME=VALUE`); the full table
# with sources is in docs/preprocessing.md. The settings of this run that differ from the defaults
# (the parameters cell sets the cleaner preset, image size, resize filter, aspect, OCR and seed;
# the rest stay defaults):

# %%
changes = pp.config_changes(cfg)
if len(changes):
    display(changes)
else:
    print("every setting at its default")

# %% [markdown]
# Each stage on one synthetic annotated scan (the one with the most kinds of mark among the
# first six): the three detectors' masks, their union after the morphology, the inpainted scan and
# the resized output. Masks are white on black; grey scans are drawn on the fixed 0-255 grey scale.

# %%
names = sorted(p.name for p in (annotated_dir / "annotated" / "images").glob("*.png"))
example = pp.most_marked(annotated_dir, names[:6])
fig = pp.plot_stages(annotated_dir / "annotated" / "images" / example, cfg)
study.show_figure(fig, step_dir / "fig_pipeline_stages.png", dpi=110)

# %% [markdown]
# ## Measured on the synthetic annotated set
#
# Each annotated image is scored against its exact ground truth, split into kinds by replaying
# the generator (`pp.synthetic_kind_masks`): **text** (labels, device, measurements),
# **calipers** (crosses and dotted lines), **scale** (depth ticks, focus marker), **colour**
# (Doppler flow, colour bar), **grey** (pencil traces, grey-scale bar), **box_arrow** (ROI boxes,
# arrows). Recall of a kind = share of its pixels under the mask; precision and IoU attribute each
# masked pixel to the nearest annotation's kind. The mask is dilated on purpose (inpainting
# needs a margin), so pixel precision is low by design; `precision_near` counts masked pixels
# within 3 px of an annotation as right. PSNR and SSIM compare the cleaned image and the
# uncleaned one with the clean twin at the annotated image's resolution (before resizing); a
# cleaned image identical to its twin has infinite PSNR and is given 100 dB, so the median is the
# fairer summary.
# Variants: all detectors, each detector switched off, and the official morphology.

# %%
scores = pp.evaluate_annotated(annotated_dir, cfg, limit=n_eval, workers=workers)
scores.to_csv(step_dir / "eval" / "annotated_scores.csv", index=False)
summary = pp.summarize_annotated(scores)
main = summary.iloc[0]  # all detectors, the morphology of the run's cleaner
quality = pp.quality_per_kind(main)
save_table(quality, "removal_quality")
quality

# %%
ablation = summary[["variant", "recall", "precision", "precision_near", "iou", "text_recall", "calipers_recall",
                    "scale_recall", "colour_recall", "grey_recall", "box_arrow_recall", "psnr_uncleaned",
                    "psnr_cleaned", "psnr_cleaned_median", "psnr_gain_median", "psnr_improved_share",
                    "ssim_uncleaned", "ssim_cleaned", "ssim_improved_share", "mask_fraction"]]
save_table(ablation, "ablation")
ablation

# %% [markdown]
# Left, every annotated image: PSNR against its clean twin after cleaning (y) and before (x); a
# point above the dashed line was brought closer to the twin. Right, the ablation: recall of
# each kind with each detector switched off, and with the official notebook's morphology.

# %%
fig = pp.plot_removal_quality(scores, summary)
study.show_figure(fig, step_dir / "fig_removal_quality.png", dpi=110)

# %% [markdown]
# ## Images with no annotation
#
# A mask on an image without marks only damages it. Two sets are known to carry none: the
# clean twins of the annotated set (the same scans, before the marks were burned in) and the
# synthetic pretraining stills (made without marks); their mask fraction is measured here, the
# stills' when the corpus is cleaned below. Real scans come without labels of their marks, so
# their mask fraction (next section, over all real images, annotated or not) is an upper bound.

# %%
allv = scores[scores["variant"] == main["variant"]]
no_annotation = [pp.mask_fraction_row("clean twins of the annotated set", allv["clean_twin_mask_fraction"])]
pd.DataFrame(no_annotation)

# %% [markdown]
# ## Real scans: words Tesseract still reads, and mask fraction
#
# On each real image (BUSI breast scans, some with labels, calipers and colour Doppler; MMOTU
# ovarian scans with device text, calipers and depth scales), Tesseract reads the whole grey
# image (upscaled 2x, sparse-text mode) before and after cleaning. A word counts when it has >= 2
# letters or digits and confidence >= 70; it is *still read* when the same word is read after
# cleaning, at any confidence, in an overlapping box. At lower confidence Tesseract also 'reads'
# speckle ('SS', 'ae'): such readings stay after cleaning because the tissue stays, and new ones
# appear on inpainted patches; the table gives every confidence level and the raw count of words
# read after cleaning, and `real_words.csv` lists every word.

# %%
if real_root is not None:
    real = pp.evaluate_real(real_root, cfg, limit=n_real, workers=workers)
    real.to_csv(step_dir / "real_words.csv", index=False)
    real_summary = pp.real_summary(real)
    save_table(real_summary, "real_summary")
    b, k = real["words_before_conf70"].sum(), real["words_still_read_conf70"].sum()
    print(f"words read with confidence >= 70: {b} before cleaning, {k} of them still read after ({k / max(b, 1):.0%}); "
          f"mask fraction over all real images: mean {real['mask_fraction'].mean():.3f}, "
          f"max {real['mask_fraction'].max():.3f}")
    display(real_summary)
    display(real[real["words_before_conf50"] > 0][["image", "words_before", "words_after"]])
else:
    real = None
    print("no real scans (real_dir = None): skipped")

# %% [markdown]
# ## Fig. 2, regenerated
#
# The paper's Fig. 2 shows an original scan, the detected mask and the inpainted result for two
# datasets. Here: the most annotated real scan of each of two datasets (largest mask fraction),
# or the two most annotated synthetic images when no real scans are at hand. A last row shows an
# unannotated still image: of the synthetic pretraining stills (the first of each anatomy; the
# clean twins when there is no synthetic tree), the one with the largest mask, i.e. the most
# that cleaning changes where there is nothing to remove.

# %%
if real is not None and real["dataset"].nunique() >= 2:
    picks = [real_root / real[real["dataset"] == ds].sort_values("mask_fraction").iloc[-1]["image"]
             for ds in sorted(real["dataset"].unique())[:2]]
else:
    picks = [annotated_dir / "annotated" / "images" / n for n in allv.sort_values("mask_fraction")["name"].iloc[-2:]]
fig = pp.plot_annotation_removal(picks, cfg, unannotated=pp.unannotated_stills(synth_dir, annotated_dir))
study.show_figure(fig, step_dir / "fig2_annotation_removal.png", dpi=110)

# %% [markdown]
# ## Cleaning the corpus (`usfmae clean`)
#
# The same function as `usfmae clean IN_DIR_OR_MANIFEST OUT_DIR`: all cores, resumable (a
# finished PNG is not redone; files are written atomically), one report row per image (mask
# fraction, which detectors fired, seconds per stage, status; a bad image is listed with its
# error and the run goes on). PNGs are uint8 RGB of `image_size`; `clean/index.csv` lists them
# for notebook 03.

# %%
report = pp.clean_tree(corpus, step_dir / "clean", cfg, workers=workers, report=step_dir / "report.csv",
                       masks_dir=step_dir / "masks" if save_masks else None)
ok = report[report["status"] == "ok"]
print(f"{len(ok)} of {len(report)} images cleaned; failed: {len(report) - len(ok)}")
if len(ok) < len(report):
    display(report[report["status"] != "ok"][["source", "error"]].head())
print("detectors that fired (images):", ", ".join(f"{k} {v}" for k, v in ok["fired"].value_counts().items()))
timing = pd.DataFrame({"stage": pp.STAGES, "ms_per_image": [1000 * ok[f"t_{s}"].mean() for s in pp.STAGES]})
timing["share"] = timing["ms_per_image"] / timing["ms_per_image"].sum()
save_table(timing, "timing")
timing

# %% [markdown]
# The pretraining stills of the synthetic corpus carry no annotation either: their mask
# fraction joins the table of images without annotation.

# %%
if corpus.is_dir() and corpus.name == "pretrain":  # synthetic stills, made without marks
    no_annotation.append(pp.mask_fraction_row("synthetic pretraining stills", ok["mask_fraction"]))
if real is not None:
    no_annotation.append(pp.mask_fraction_row("all real scans (upper bound: some are annotated)",
                                              real["mask_fraction"]))
no_annotation = pd.DataFrame(no_annotation)
save_table(no_annotation, "no_annotation")
no_annotation

# %% [markdown]
# Eight images of the cleaned corpus, spread over `clean/index.csv`, as notebook 03 reads them.
# The PNGs are uint8; the training loader normalises them with the paper's ImageNet statistics:

# %%
index = pd.read_csv(step_dir / "clean" / "index.csv")
picked = index.iloc[:: max(1, len(index) // 8)][:8]
sample = [pp.read_image(step_dir / "clean" / p) for p in picked["path"]]
x = pp.normalize(sample[0])  # [3, H, W] float32
print(f"normalised with mean {pp.IMAGENET_MEAN}, std {pp.IMAGENET_STD}: {tuple(x.shape)} {x.dtype}, "
      f"values {x.min():.2f} to {x.max():.2f}")
fig = pp.plot_clean_samples(sample, cfg.image_size, titles=picked["dataset"])
study.show_figure(fig, step_dir / "fig_clean_samples.png", dpi=110)

# %% [markdown]
# ## Summary: the targets for annotation removal, as measured in this run
#
# Each target (text and caliper recall, PSNR improved, small masks on images without annotation,
# and on real scans few words left legible) with this run's value and whether it is met. Speed
# against a straightforward serial implementation is measured by `scripts/preprocess_speed.py`
# (both on the same images in one run); `timing.csv` above gives this run's seconds per stage.

# %%
checks = [
    ("synthetic: text recall >= 0.9", main["text_recall"], main["text_recall"] >= 0.9),
    ("synthetic: calipers recall >= 0.9", main["calipers_recall"], main["calipers_recall"] >= 0.9),
    ("synthetic: PSNR(cleaned) > PSNR(uncleaned) for >= 95% of images", main["psnr_improved_share"],
     main["psnr_improved_share"] >= 0.95),
]
if real is not None:
    b, k = real["words_before_conf70"].sum(), real["words_still_read_conf70"].sum()
    checks.append(("real: words still read after cleaning <= 20% of those read before (conf >= 70)",
                   k / b if b else np.nan, bool(b) and k / b <= 0.2))
for r in no_annotation.itertuples():
    checks.append((f"no annotation ({r.images}): mean mask < 10% of pixels", r.mean, r.mean < 0.10))
    checks.append((f"no annotation ({r.images}): share of images with mask < 10%", r.share_under_10pct,
                   r.share_under_10pct >= 0.95))
acceptance = pd.DataFrame(checks, columns=["criterion", "value", "met"])
save_table(acceptance, "acceptance")
acceptance

