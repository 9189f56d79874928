# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# *Status: step 2 (the synthetic tree and its gallery) is in; curation proper (steps 1, 3-5)
# arrives with issue 4.*
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

# %% [markdown]
# ## The synthetic ultrasound tree
#
# No dataset of the study can be downloaded on a fresh machine, so when `data_roots` is empty
# this notebook writes a deterministic miniature of the study's data (the same function as
# `usfmae synth`): a pretraining corpus of ten anatomies as still images, videos and 3D volumes;
# annotated scans with their clean twins and exact annotation masks; and the three evaluation
# sets (BUS-BRA, MMOTU-2D, GIST514-DB) in their real on-disk layouts. Images are formed like
# B-mode ultrasound: random scatterers convolved with a depth-dependent point-spread function,
# envelope-detected (fully developed speckle), attenuated and compensated, log-compressed, with
# shadowing and posterior enhancement. `docs/synthetic.md` explains the model and its limits.
# The same seed always gives the same bytes; a finished file is never written twice, so an
# interrupted run resumes.

# %%
from usfmae_lib import synthetic

synth_dir = step_dir / "synthetic"
if not data_roots:
    synthetic.generate_tree(synth_dir, seed=seed, profile=profile, workers=workers or None)

# %% [markdown]
# One image per anatomy, the two probe geometries (linear: a rectangle; curvilinear and phased:
# a sector on black), and one annotated scan beside its clean twin and the mask of every
# burned-in mark: the ground truth that notebook 02 measures annotation removal against.

# %%
if not data_roots:
    fig = synthetic.plot_gallery(synth_dir)
    fig.savefig(step_dir / "fig_synthetic_gallery.png", dpi=120, bbox_inches="tight")
