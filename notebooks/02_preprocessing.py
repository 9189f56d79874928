# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Preprocessing: removing burned-in annotations, measured
#
# Scans carry text, calipers, depth scales and colour marks that a model must not learn. The
# paper removes them with Tesseract OCR (text), HSV + K-Means (colour marks) and Canny +
# contours (grey marks), merges the masks, closes and opens them, and inpaints with
# Navier-Stokes, then resizes to 224x224. This notebook will:
#
# 1. run each stage on example images and show what it detects;
# 2. measure mask precision / recall / IoU per annotation kind, and PSNR / SSIM against the
#    clean twin, on the synthetic annotated set (which has ground truth);
# 3. ablate each detector, and count the words Tesseract still reads on real images;
# 4. clean the whole manifest into the 224 px PNG tree and the packed uint8 store (`usfmae clean`);
# 5. regenerate Fig. 2 (original / mask / inpainted).
#
# *Status: plan only. The cells that do this arrive with issue 5.*
#
# Run headless: `usfmae run notebooks/02_preprocessing.ipynb -f params/smoke/02_preprocessing.yaml`.
# Outputs land in `<out_dir>/02_preprocessing/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
image_size = 224  # output side in pixels (paper: 224)
ocr = True  # Tesseract text detection (needs the tesseract program)
workers = 0  # 0 = all cores
save_masks = False  # also write the detected masks for inspection

# %%
from pathlib import Path

STEP = "02_preprocessing"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
