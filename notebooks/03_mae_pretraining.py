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
# # 03 · MAE pretraining on ultrasound
#
# USF-MAE is a ViT-B/16 masked autoencoder (decoder 8 layers, 512 wide) trained to reconstruct
# masked patches of ultrasound images. The paper masks 25% of patches (its code: 75%) and trains
# 100 epochs with AdamW (lr 1e-3, wd 0.01, batch 64, 10% warmup then cosine, clip 1.0).
# This notebook will:
#
# 1. build the model from a named configuration (tiny ones for CPU, the paper's for GPU);
# 2. pretrain on the packed store from notebook 02 (`usfmae pretrain`), resumably;
# 3. plot the loss and learning-rate curves and export the encoder to safetensors.
#
# *Status: plan only. The cells that do this arrive with issue 6.*
#
# Run headless: `usfmae run notebooks/03_mae_pretraining.ipynb -f params/smoke/03_mae_pretraining.yaml`.
# Outputs land in `<out_dir>/03_mae_pretraining/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
model = "mae_vit_tiny_patch16_dec128d2b"  # named configuration (paper: mae_vit_base_patch16_dec512d8b)
img_size = 112  # input side in pixels (paper: 224)
mask_ratio = 0.25  # fraction of patches hidden (paper: 0.25; official code: 0.75)
epochs = 20  # paper: 100
batch_size = 64  # paper: 64
lr = 1e-3  # paper: 1e-3 (AdamW)
weight_decay = 0.01  # paper: 0.01
warmup_fraction = 0.1  # linear warmup over the first 10% of steps, then half-cycle cosine
clip_grad = 1.0  # gradient-norm clipping (paper: 1.0)
init_checkpoint = None  # optional local MAE checkpoint to start from (official code: ImageNet MAE)

# %%
from pathlib import Path

STEP = "03_mae_pretraining"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
