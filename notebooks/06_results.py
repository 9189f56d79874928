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
# # 06 · Results: Table 2 and what it supports
#
# This notebook will gather the fine-tuning metrics into the paper's Table 2 (precision,
# recall, F1 per benchmark) with the paper's numbers beside ours, mean +/- sd over seeds and
# bootstrap intervals, the init of every baseline, confusion matrices, the label-efficiency
# plot, and a discussion of what the run supports and what it does not.
#
# *Status: plan only. The cells that do this arrive with issue 8.*
#
# Run headless: `usfmae run notebooks/06_results.ipynb -f params/smoke/06_results.yaml`.
# Outputs land in `<out_dir>/06_results/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0

# %%
from pathlib import Path

STEP = "06_results"
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
