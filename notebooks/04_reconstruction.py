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
# # 04 · What the masked autoencoder learned: reconstructions
#
# A walkthrough of masked autoencoding on ultrasound, for newcomers and for teaching:
# patches, a random mask, what the encoder sees, what the decoder predicts, and the loss.
# Then, for the checkpoint of notebook 03 (or any MAE checkpoint):
#
# 1. reconstruction panels per anatomy (original / masked / reconstruction / visible pasted back);
# 2. a mask-ratio sweep (10-90%): masked-patch error per ratio and anatomy, as a table and a plot;
# 3. the encoder's last-layer attention (cls token to patches);
# 4. an interactive view, on by itself in JupyterLab (`interactive = None`), a static figure headless.
#
# Run headless: `usfmae run notebooks/04_reconstruction.ipynb -f params/smoke/04_reconstruction.yaml`.
# Outputs land in `<out_dir>/04_reconstruction/`. Every mask comes from seeded noise, so every
# figure and number here is the same on every run.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
checkpoint = ""  # "" = <out_dir>/03_mae_pretraining/checkpoints/checkpoint-last.pth; or any MAE checkpoint
mask_ratios = [0.1, 0.25, 0.5, 0.75, 0.9]  # ratios of the sweep
panel_mask_ratios = [0.25, 0.75]  # reconstruction panels at these ratios (paper: 25%; official code: 75%)
n_images = 20  # images per anatomy in the sweep (a seeded sample)
clean_dir = ""  # "" = <out_dir>/02_preprocessing/clean; or any folder of PNGs with an index.csv
data_root = None  # with no cleaned tree (released weights): the evaluation sets' folder (BUSBRA/, OTU_2d/, ...)
norm_pix_stats = "visible"  # norm_pix_loss models: patch stats for hidden patches, "visible" | "oracle"
norm_pix_loss = None  # None = as the checkpoint records (a bare state dict records nothing: False)
interactive = None  # widgets (image, mask ratio, seed); None = on in JupyterLab, off under usfmae run (static figures)
batch_size = 32  # images per forward pass
device = "auto"  # auto | cpu | cuda

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import display

from usfmae_lib import reconstruction, study

STEP = "04_reconstruction"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {step_dir}")
torch.manual_seed(seed)


def show(fig, name):
    """Save a figure under step_dir as name.png and show it once."""
    reconstruction.save_figure(fig, step_dir / f"{name}.png")
    plt.close(fig)
    display(fig)


# %% [markdown]
# ## The model
#
# `checkpoint = ""` reads what notebook 03 wrote; any file `load_checkpoint` reads works too,
# including the released USF-MAE weights (a bare state dict: the configuration is inferred
# from its tensor shapes, ViT-B/16 at 224 px).

# %%
model, info = reconstruction.load_inspection_model(checkpoint, out_dir, norm_pix_loss=norm_pix_loss, device=device)
for key, value in info.items():
    print(f"{key:>14}: {value}")
img_size, patch = info["img_size"], info["patch_size"]

# %% [markdown]
# ## The images
#
# Images come from the cleaned tree of notebook 02 (`clean/index.csv`), a seeded sample of
# `n_images` per anatomy. When notebook 03 records the images it held out of pretraining
# (`03_mae_pretraining/heldout.csv`), only those are used; otherwise the sample may include images the
# model trained on, and the printout says so. For strictly unseen images, point `clean_dir` at
# another cleaned tree (e.g. a downstream dataset run through notebook 02). For weights pretrained
# elsewhere (the released USF-MAE) with no cleaned tree here, `data_root` gives the evaluation sets'
# images (BUS-BRA, MMOTU-2D, GIST514-DB as published, not run through annotation removal).

# %%
clean = Path(clean_dir) if clean_dir else Path(out_dir) / reconstruction.DEFAULT_CLEAN_DIR
if data_root and not (clean / "index.csv").is_file():  # weights pretrained elsewhere: the evaluation images
    clean = Path(data_root)
    index = candidates = reconstruction.evaluation_index(clean)
    held_out = True  # the evaluation sets were kept out of pretraining
else:
    index = reconstruction.read_index(clean)
    candidates, held_out = reconstruction.heldout_rows(index, out_dir)
sample = reconstruction.pick_images(candidates, n_images, seed)
print(f"{len(index)} images in {clean}; sample of {len(sample)} "
      f"({'held out of pretraining' if held_out else 'NOT held out: pretraining may have seen them'})")
print(sample.groupby("anatomy").size().to_string())
images = reconstruction.load_images(clean, sample.path, img_size)  # uint8 [N, S, S, 3]
imgs = reconstruction.normalize_images(images)  # [N, 3, S, S], ImageNet-normalised as in training
# one image per anatomy for the panels: the first of each anatomy's sample
first = sample.reset_index().groupby("anatomy", sort=True)["index"].first().to_list()
panel_labels = sample.anatomy.iloc[first].to_list()

# %% [markdown]
# ## Walkthrough: one image through the masked autoencoder
#
# **1. Patches.** A ViT reads an image as a sequence of square patches (16 x 16 pixels here),
# each flattened to 16 x 16 x 3 numbers and projected to one token.

# %%
walk_ratio = panel_mask_ratios[0] if panel_mask_ratios else 0.25
walk = reconstruction.reconstruct(model, imgs[first[:1]], walk_ratio, reconstruction.patch_noise(1, model.num_patches, seed),
                         norm_pix_stats)
walk_figs = reconstruction.plot_walkthrough(walk, 0, patch)
show(walk_figs["patches"], "walkthrough_1_patches")

# %% [markdown]
# **2. A random mask.** Each patch draws a random number; the patches with the largest ones are
# hidden (here the mask ratio of the panels). The paper hides 25%, the reference MAE 75%.

# %%
show(walk_figs["mask"], "walkthrough_2_mask")

# %% [markdown]
# **3. What the encoder sees.** Only the visible patches (plus a learned cls token) enter the
# encoder, in shuffled order; each carries its position embedding, so order does not matter.
# Dropping hidden patches is what makes MAE pretraining cheap.

# %%
show(walk_figs["encoder_input"], "walkthrough_3_encoder_input")

# %% [markdown]
# **4. What the decoder predicts.** The decoder receives the encoded visible tokens plus one
# shared mask token at every hidden position and predicts the pixels of *every* patch.

# %%
show(walk_figs["decoder_output"], "walkthrough_4_decoder_output")

# %% [markdown]
# **5. The loss.** Mean squared error between prediction and image, averaged over the hidden
# patches only (the visible ones are given, so predicting them teaches nothing).
# For a `norm_pix_loss` model the training loss compares normalised patches; the map below is
# always in ImageNet-normalised pixels.

# %%
show(walk_figs["loss"], "walkthrough_5_loss")
print(f"masked-patch MSE {float(walk['mse'][0]):.4f}; training objective {float(walk['objective'][0]):.4f}")

# %% [markdown]
# ## Reconstruction panels per anatomy
#
# The reference MAE demo's four panels, one row per anatomy, at each of `panel_mask_ratios`:
# the image, the masked input (hidden patches at the ImageNet mean colour), the decoder's
# prediction, and the prediction with the visible patches of the image pasted back (what
# "inpainting" looks like). Images are un-normalised with the ImageNet mean and std.
#
# A `norm_pix_loss` model predicts each patch with its own mean and variance removed, so its
# prediction carries no brightness or contrast: to draw it, each patch needs a mean and std.
# Visible patches have their own; hidden ones do not (that is what was hidden), so
# `norm_pix_stats = "visible"` estimates them from the visible neighbours. Each hidden patch then
# gets a slightly wrong offset and gain of its own, and since the patches are drawn
# independently their borders do not meet: the reconstruction looks **patchy** (a grid of
# tiles). `"oracle"` uses each hidden patch's true statistics, as many published MAE figures do;
# it looks smoother but borrows information the model never had.

# %%
for ratio in panel_mask_ratios:
    noise = reconstruction.patch_noise(len(first), model.num_patches, seed)
    result = reconstruction.reconstruct(model, imgs[first], ratio, noise, norm_pix_stats)
    show(reconstruction.plot_reconstructions(result, panel_labels), f"reconstructions_mask{round(100 * ratio)}")
    if info["norm_pix_loss"] and norm_pix_stats != "oracle":
        oracle = reconstruction.reconstruct(model, imgs[first], ratio, noise, "oracle")
        show(reconstruction.plot_reconstructions(oracle, panel_labels), f"reconstructions_mask{round(100 * ratio)}_oracle_stats")

# %% [markdown]
# ## Mask-ratio sweep
#
# The masked-patch MSE (ImageNet-normalised pixels, hidden patches only) of every sampled image
# at each ratio. One seeded noise per image serves all ratios, so the patches hidden at 25% are
# among those hidden at 90%. The dashed line is a baseline that fills every hidden patch with the
# mean colour of the visible pixels: a model that does not beat it has learned little.
# The paper claims that 25% masking preserves fine anatomy better than 75%; the table says what
# this checkpoint does (a model trained at one ratio is evaluated at all of them). The verdicts
# below pair images: at each ratio the per-image difference from the flat fill, then between
# the ratios, each with a Student-t 95% interval over images; "too small to judge" on the smoke
# profile, when an interval includes 0, or when the model does not beat the flat fill.

# %%
per_image, sweep = reconstruction.mask_ratio_sweep(model, imgs, sample.anatomy, mask_ratios, seed=seed,
                                          batch_size=batch_size, paths=sample.path, norm_pix_stats=norm_pix_stats)
reconstruction.write_table(sweep, step_dir / "mask_ratio_sweep.csv")
reconstruction.write_table(per_image, step_dir / "sweep" / "per_image.csv")
display(sweep.pivot(index="anatomy", columns="mask_ratio", values="mse").round(4))
show(reconstruction.plot_sweep(sweep), "mask_ratio_sweep")
verdicts = [reconstruction.sweep_verdict(per_image, low, high, profile) for low, high in ((0.25, 0.75), (0.25, 0.9))]
print("\n".join(dict.fromkeys(line for v in verdicts for line in v.splitlines())))  # each ratio's line once

# %% [markdown]
# ## Attention of the encoder's last layer
#
# Where the cls token looks in the last encoder block, averaged over heads, with the whole image
# visible (as a fine-tuned encoder sees it). The weights come from a forward hook that recomputes
# softmax(q k^T / sqrt(d)) from the block's input, because the fused attention kernel returns
# none. An untrained or briefly trained model attends almost uniformly.

# %%
attn = reconstruction.last_layer_attention(model, imgs[first])  # [n, heads, T, T]
maps = reconstruction.cls_attention_maps(attn)  # [n, G, G]
show(reconstruction.plot_attention(images[first], maps, panel_labels), "attention_last_layer")
print("cls attention on itself (rest of each row goes to patches):",
      attn[:, :, 0, 0].mean(dim=1).numpy().round(3))

# %% [markdown]
# ## Interactive view
#
# In JupyterLab (`interactive` None or True) this cell shows widgets: pick an image, move the
# mask-ratio slider, change the seed. Headless (papermill, `usfmae run`) it draws the first image
# at the first panel ratio instead.

# %%
view = reconstruction.interactive_view(model, clean, sample, walk_ratio, seed, interactive, norm_pix_stats)
if isinstance(view, plt.Figure):
    plt.close(view)
display(view)

# %%
written = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()
                 and p.suffix in (".png", ".csv"))
print("\n".join(written))
