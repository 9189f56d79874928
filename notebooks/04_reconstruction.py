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
# # 04 · What the masked autoencoder learned: reconstructions
#
# A walkthrough of masked autoencoding on ultrasound, for newcomers and for teaching:
# patches, a random mask, what the encoder sees, what the decoder predicts, and the loss.
# This notebook will:
#
# 1. show reconstruction panels per anatomy (original / masked / reconstruction / pasted);
# 2. sweep the mask ratio (10-90%) and tabulate the masked-patch error per anatomy;
# 3. show the encoder's last-layer attention (cls token to patches);
# 4. offer an interactive view in JupyterLab that falls back to static figures headless.
#
# *Status: plan only. The cells that do this arrive with issue 7.*
#
# Run headless: `usfmae run notebooks/04_reconstruction.ipynb -f params/smoke/04_reconstruction.yaml`.
# Outputs land in `<out_dir>/04_reconstruction/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
checkpoint = None  # a checkpoint path; None = the one notebook 03 wrote
mask_ratios = [0.1, 0.25, 0.5, 0.75, 0.9]  # ratios of the sweep

# %%
from pathlib import Path

STEP = "04_reconstruction"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
