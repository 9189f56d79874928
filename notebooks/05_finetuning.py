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
# # 05 · Fine-tuning on three benchmarks, with baselines
#
# The paper fine-tunes the USF-MAE encoder to classify breast (BUS-BRA), ovarian (MMOTU-2D) and
# gastrointestinal (GIST514-DB) tumours and compares it with ImageNet VGG-19, ResNet-50, ViT-B
# and UltraSam. This notebook will:
#
# 1. load each benchmark with its official split (real layout, or the synthetic twin);
# 2. run the grid of models x datasets x seeds (`usfmae finetune`), selecting hyperparameters on
#    validation as the paper's sweep does;
# 3. add a linear probe of frozen encoders and label-efficiency curves (1-100% of labels).
#
# *Status: plan only. The cells that do this arrive with issue 8.*
#
# Run headless: `usfmae run notebooks/05_finetuning.ipynb -f params/smoke/05_finetuning.yaml`.
# Outputs land in `<out_dir>/05_finetuning/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
datasets = ["bus-bra", "mmotu-2d", "gist514"]  # benchmarks to run
models = ["usf-mae", "vit-b", "resnet-50", "vgg-19"]  # encoders to compare
n_seeds = 3  # independent fine-tuning runs per cell of the table
data_root = None  # folder holding BUSBRA/, OTU_2d/, usd514_jpeg_roi/; None = synthetic twins

# %%
from pathlib import Path

STEP = "05_finetuning"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
