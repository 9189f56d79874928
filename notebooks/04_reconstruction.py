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
# # 04 · What the masked autoencoder learned: reconstructions
#
# Notebook 03 took one batch through the MAE by hand (patches, mask, encoder and decoder inputs,
# loss). This notebook inspects a *trained* one: notebook 03's checkpoint, or, when the run has
# none or `checkpoint = "teaching"`, the small MAE that ships with the repository, trained on the
# project's synthetic ultrasound long enough to learn anatomy (`usfmae_lib/data/teaching_mae/`,
# with its model card). The smoke profile shows that one: its own 2-epoch model draws noise.
#
# 1. reconstruction panels per anatomy, beside OpenCV's classical inpainting of the same holes;
# 2. a mask-ratio sweep (10-90%): the masked-patch error per ratio and anatomy against two baselines
#    that learned nothing, a flat fill and OpenCV's inpainting, with the verdicts in one table;
# 3. the encoder's last-layer attention (cls token to patches);
# 4. an interactive view, on by itself in JupyterLab (`interactive = None`), a static figure headless;
# 5. an exercise.
#
# Run headless: `usfmae run notebooks/04_reconstruction.ipynb -f params/smoke/04_reconstruction.yaml`.
# Outputs land in `<out_dir>/04_reconstruction/`. Every mask comes from seeded noise, so every
# figure and number here is the same on every run.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
checkpoint = ""  # "" = notebook 03's checkpoint-last.pth (the shipped teaching MAE when there is none); "teaching"; or any MAE checkpoint
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
torch.manual_seed(seed)


def show(fig, name):  # save under step_dir and show the saved file, once
    study.show_figure(fig, step_dir / f"{name}.png")


# %% [markdown]
# ## The model
#
# Any file `checkpoints.load_checkpoint` reads works, including the released USF-MAE weights (a
# bare state dict: the configuration is inferred from its tensor shapes, ViT-B/16 at 224 px).

# %%
model, info = reconstruction.load_inspection_model(checkpoint, out_dir, norm_pix_loss=norm_pix_loss, device=device)
img_size, patch = info["img_size"], info["patch_size"]
trained_ratio = info["trained_mask_ratio"]  # None when the file does not record it (a bare state dict)
print(f"{info['checkpoint']}: {info['depth']}-block encoder of width {info['embed_dim']}, {img_size} px, "
      f"{info['num_patches']} patches of {patch} px, {info['parameters'] / 1e6:.1f} M parameters, trained at mask "
      + (f"{trained_ratio:.0%}" if trained_ratio is not None else "ratio not recorded"))
# notebook 03's further pretraining runs (pretrain_seeds > 1): the sweep's verdicts pool every run
models = {"run 1": model} | {
    f"run {k}": reconstruction.load_inspection_model(str(path), out_dir, norm_pix_loss=norm_pix_loss, device=device)[0]
    for k, path in enumerate(reconstruction.further_runs(checkpoint, out_dir), start=2)}
if len(models) > 1:
    print(f"{len(models)} pretraining runs: the panels, attention and views show run 1; the sweep and verdicts pool all")

# %% [markdown]
# ## The images
#
# Images come from the cleaned tree of notebook 02 (`clean/index.csv`), a seeded sample of
# `n_images` per anatomy. When notebook 03 records the images it held out of pretraining
# (`03_mae_pretraining/store/heldout.csv`), only those are used; otherwise the sample may include
# images notebook 03's model trained on, and the printout says so (the teaching MAE never saw any
# of them: it was trained on images rendered from another seed). For weights pretrained
# elsewhere (the released USF-MAE) with no cleaned tree here, `data_root` gives the evaluation sets'
# images (BUS-BRA, MMOTU-2D, GIST514-DB as published, not run through annotation removal).

# %%
clean = Path(clean_dir) if clean_dir else Path(out_dir) / reconstruction.DEFAULT_CLEAN_DIR
if data_root and not (clean / "index.csv").is_file():  # weights pretrained elsewhere: the evaluation images
    clean = Path(data_root)
    index = candidates = reconstruction.evaluation_index(clean)
    held_out = True  # the evaluation sets were kept out of pretraining
elif info["teaching"]:  # rendered from another seed: every image here is new to it
    index = candidates = reconstruction.read_index(clean)
    held_out = True
else:
    index = reconstruction.read_index(clean)
    candidates, held_out = reconstruction.heldout_rows(index, out_dir)
sample = reconstruction.pick_images(candidates, n_images, seed)
print(f"{len(sample)} of {len(index)} images, {len(sample) // max(1, sample.anatomy.nunique())} per anatomy "
      f"({', '.join(sorted(sample.anatomy.unique()))}); "
      f"{'never seen in pretraining' if held_out else 'NOT held out: pretraining may have seen them'}")
images = reconstruction.load_images(clean, sample.path, img_size)  # uint8 [N, S, S, 3]
imgs = reconstruction.normalize_images(images)  # [N, 3, S, S], ImageNet-normalised as in training
# one image per anatomy for the panels: the first of each anatomy's sample
first = sample.reset_index().groupby("anatomy", sort=True)["index"].first().to_list()
panel_labels = sample.anatomy.iloc[first].to_list()

# %% [markdown]
# ## Reconstruction panels per anatomy
#
# The reference MAE demo's four panels, one row per anatomy, at each of `panel_mask_ratios`:
# the image, the masked input (hidden patches at the ImageNet mean colour), the decoder's
# prediction, and the prediction with the visible patches pasted back (what "inpainting" looks
# like); then OpenCV's inpainting of the same hidden patches (`cv2.inpaint`, Navier-Stokes, the
# method notebook 02 uses to remove annotations), which fills each hole from its border inward
# and knows nothing about anatomy. What learning buys is the difference between the last two.
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
# at each ratio, against two baselines that learned nothing: a flat fill (every hidden pixel gets
# the mean colour of the visible ones) and OpenCV's inpainting. One seeded noise per image serves
# all ratios, so the patches hidden at 25% are among those hidden at 90%. The dotted line marks
# the ratio the model was *trained* at: evaluating a model at another ratio is not pretraining at
# it, so this sweep says how one model copes with more or fewer holes, not whether 25% pretraining
# beats 75% (notebook 07 pretrains at both to test that).

# %%
per_image, sweep = reconstruction.sweep_runs(models, imgs, sample.anatomy, mask_ratios, seed=seed,
                                             batch_size=batch_size, paths=sample.path, norm_pix_stats=norm_pix_stats)
reconstruction.write_table(sweep, step_dir / "mask_ratio_sweep.csv")
reconstruction.write_table(per_image, step_dir / "sweep" / "per_image.csv")
display(sweep.pivot(index="anatomy", columns="mask_ratio", values="mse").round(4))
show(reconstruction.plot_sweep(sweep, trained_ratio=trained_ratio), "mask_ratio_sweep")

# %% [markdown]
# **Verdicts.** Each row compares the model's error with another's on the same images and masks:
# the difference (model minus the other) of each image, its mean, and the 95% interval of that mean
# (`method` names it): a Student-t over images for one checkpoint; with notebook 03's further
# pretraining runs, every run on the same images, the variance between runs added (usfmae_lib.stats,
# docs/statistics.md). The rule of notebooks 06 and 07, said of an error: "lower error" / "higher
# error" when the interval excludes 0, "no clear difference" when it includes 0. The ratio rows
# compare the model with itself at two ratios and are judged only where it beats the flat fill at
# both. The smoke profile samples two images per anatomy and judges nothing.

# %%
judged_ratio = trained_ratio if trained_ratio in mask_ratios else panel_mask_ratios[0]
verdicts = reconstruction.verdict_table(per_image, judged_ratio, mask_ratios, profile)
reconstruction.write_table(verdicts, step_dir / "verdicts.csv")
if profile == "smoke":
    print(f"smoke profile: {n_images} images per anatomy check that the code runs and measure nothing; "
          "every verdict reads 'too small to judge'")
display(verdicts.round(4))

# %% [markdown]
# ## Attention of the encoder's last layer
#
# Where the cls token looks in the last encoder block, averaged over heads, with the whole image
# visible (as a fine-tuned encoder sees it). The weights come from a forward hook that recomputes
# softmax(q k^T / sqrt(d)) from the block's input, because the fused attention kernel returns
# none. An untrained or briefly trained model attends almost uniformly; the MAE's objective never
# asks the cls token to summarise the image, so even a good reconstructor may attend diffusely.

# %%
attn = reconstruction.last_layer_attention(model, imgs[first])  # [n, heads, T, T]
maps = reconstruction.cls_attention_maps(attn)  # [n, G, G]
show(reconstruction.plot_attention(images[first], maps, panel_labels), "attention_last_layer")

# %% [markdown]
# ## Interactive view
#
# In JupyterLab (`interactive` None or True) this cell shows widgets: pick an image, move the
# mask-ratio slider, change the seed. Headless (papermill, `usfmae run`) it draws the first image
# at the first panel ratio instead.

# %%
view = reconstruction.interactive_view(model, clean, sample, panel_mask_ratios[0], seed, interactive, norm_pix_stats)
if isinstance(view, plt.Figure):
    show(view, "interactive_view_static")
else:
    display(view)

# %% [markdown]
# **Exercise.** The model was trained at one mask ratio (printed at the top). Predict before you
# run: at 75% hidden, will its error on the hidden patches still be lower than OpenCV's inpainting,
# and will the gap grow or shrink compared with 25%? Set `exercise_ratio` (try 0.5, 0.75, 0.9),
# run, and compare the two lines.

# %% tags=["exercise"]
exercise_ratio = 0.75
for ratio in sorted({judged_ratio, exercise_ratio}):
    r = reconstruction.reconstruct_batched(model, imgs, ratio, reconstruction.patch_noise(len(imgs), model.num_patches, seed),
                                           batch_size, norm_pix_stats=norm_pix_stats)
    print(f"mask {ratio:.0%}: MAE {float(r['mse'].mean()):.3f}, OpenCV inpainting {float(r['inpaint_mse'].mean()):.3f}, "
          f"flat fill {float(r['baseline_mse'].mean()):.3f} (mean over {len(imgs)} images)")

# %% [markdown]
# *Answer.* Both errors grow with the ratio: the holes merge into large regions, far from any
# visible pixel. With the teaching MAE on the smoke sample the MAE stays well below OpenCV's
# inpainting at 75% (0.22 vs 0.35; at 25% 0.08 vs 0.16), and the gap in error even widens, because
# inpainting only carries each hole's border inward while the MAE reads the whole image and what it
# learned of how anatomy continues; as a ratio of the two errors, its advantage shrinks. At 90%
# little is left to condition on and all three methods draw close to the flat fill. The model never
# trained on large holes (it was trained at 25%); whether pretraining *at* 75% gives a better
# encoder is another question, which notebook 07 asks.
