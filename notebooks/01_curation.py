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
# # 01 · Curation: from dataset folders to one audited pretraining manifest
#
# The paper pretrains on OpenUS-46: about 374k images from 46 public ultrasound datasets, with
# videos sampled at 3 frames/s, 3D volumes sliced, duplicates and evaluation images kept out.
# This notebook will:
#
# 1. print the OpenUS-46 registry (46 datasets, anatomy, the paper's Table 1 counts, licences);
# 2. generate the synthetic ultrasound tree when no real data root is given (`usfmae synth`);
# 3. read every image, video and volume under the roots into one manifest of 2D frames
#    (`usfmae curate`), with rejects, exact and near duplicates recorded;
# 4. audit leakage: drop every pretraining frame whose near-duplicate is an evaluation image;
# 5. regenerate Table 1 (found vs paper counts), Fig. 1 (one image per dataset) and a bar chart
#    of images per anatomy.
#
# *Status: plan only. The cells that do this arrive with issue 4.*
#
# Run headless: `usfmae run notebooks/01_curation.ipynb -f params/smoke/01_curation.yaml`.
# Outputs land in `<out_dir>/01_curation/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
data_roots = []  # real dataset folders; empty = the synthetic tree made by `usfmae synth`
video_fps = 3.0  # frames sampled per second of video time (paper: 3)
slice_step = 1  # keep every n-th slice of a 3D volume
phash_threshold = 6  # Hamming distance under which two frames count as near duplicates
workers = 0  # 0 = all cores

# %%
from pathlib import Path

STEP = "01_curation"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
