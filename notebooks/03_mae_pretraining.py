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
# # 03 · MAE pretraining on ultrasound
#
# USF-MAE is a ViT-B/16 masked autoencoder (decoder 8 layers, 512 wide) trained to reconstruct
# masked patches of ultrasound images. The paper masks 25% of patches (its code: 75%) and trains
# 100 epochs with AdamW (lr 1e-3, wd 0.01, batch 64, 10% warmup then half-cycle cosine, clip 1.0)
# on images rotated 0-90 deg, flipped, and cropped at 0.5x-2.0x scale. This notebook:
#
# 1. packs the cleaned PNGs of notebook 02 once into a memory-mapped uint8 store;
# 2. shows the augmentation, including the zoom-out half of the crop range (scale > 1), which
#    the official code silently replaces by a centre crop;
# 3. takes one batch through the untrained model by hand, stage by stage, with the shape of every
#    tensor and one figure per stage, so that you know what the training below computes;
# 4. pretrains with the same function as `usfmae pretrain` (and `torchrun -m usfmae_lib.pretrain`),
#    resumably: re-running continues from the last checkpoint, or does nothing when finished; with
#    `pretrain_seeds` > 1 it pretrains that many times with different seeds, so that notebooks 05-07
#    can say how much of a result is the luck of one pretraining run;
# 5. plots the loss and learning-rate curves and exports the encoder as a folder timm loads alone,
#    with its model card.
#
# Cells tagged `exercise` ask you to predict, change one value, run and compare; the answer is in
# the markdown cell below each.
#
# Every difference between the paper and the official code is a parameter below; see
# `docs/pretraining.md`. The `paper` profile follows the paper's text, the `official` profile
# the official code (75% mask, from the ImageNet MAE file, ...). Run headless:
# `usfmae run notebooks/03_mae_pretraining.ipynb -f params/smoke/03_mae_pretraining.yaml`.
# Outputs land in `<out_dir>/03_mae_pretraining/`.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
model = "mae_vit_tiny_patch16_dec128d2b"  # named configuration (paper: mae_vit_base_patch16_dec512d8b)
pos_embed = "fixed"  # position tables: fixed sin-cos (reference MAE, official code) or learnable (paper's text; they start as sin-cos)
model_overrides = {"depth": 6}  # constructor overrides of the config (paper's text: {decoder_num_heads: 8}; quick: 6 encoder blocks)
img_size = 112  # input side in pixels (paper: 224)
mask_ratio = 0.25  # fraction of patches hidden (paper: 0.25; official code: 0.75)
norm_pix_loss = False  # normalise each target patch (paper: False, raw pixels; reference MAE: True)
epochs = 30  # paper: 100
batch_size = 64  # per process (paper: 64)
lr = 1e-3  # peak lr, AdamW (paper: 1e-3)
blr_scaling = False  # lr x batch / 256 (official code: True with blr_batch 128)
blr_batch = 0  # batch in that rule; 0 = the global batch
weight_decay = 0.01  # paper: 0.01
decay_all = False  # decay biases and norms too (official code: True; reference MAE: False)
betas = [0.9, 0.95]  # AdamW betas (reference MAE; official code: AdamW default [0.9, 0.999])
warmup_fraction = 0.1  # linear warmup over the first 10% of steps, then half-cycle cosine
min_lr = 0.0  # the cosine's floor (official code: 1e-5)
clip_grad = 1.0  # gradient-norm clipping (paper: 1.0)
rot_degrees = [0.0, 90.0]  # rotation range (paper: 0-90 deg)
flip_p = 0.5  # horizontal and vertical flip probability, each (paper: 0.5)
crop_scale = [0.5, 2.0]  # crop area / image area (paper: 0.5x-2.0x; above 1 zooms out)
init_checkpoint = None  # optional local MAE checkpoint to start from (official code: ImageNet MAE file)
precision = "auto"  # auto = bf16 autocast on GPU; a CPU computes in fp32 whatever is asked
compile = False  # torch.compile the model
checkpoint_every = 0  # steps between checkpoints; 0 = every epoch
log_every = 20  # steps between host syncs (per-step loss rows are written then)
workers = -1  # DataLoader processes; -1 = auto
heldout_per_anatomy = 20  # images per anatomy kept out of pretraining for notebook 04 (paper: 0)
threads = 0  # torch CPU threads; 0 = all cores (on a busy shared machine 1 can be much faster)
max_steps = 0  # stop after this many optimiser steps (0 = all epochs; the dry run: 1-2), with the full schedule
snapshot_epochs = [2, 5, 10, 20]  # also keep the model after these epochs (epoch-NNNN.pth): notebook 07's pretraining-length curve
pretrain_seeds = 1  # pretraining runs, seeds seed, seed+1, ...: notebooks 05-07 evaluate every one (quick: 3; paper: 1, each more costs a full run, docs/scale.md)

# %%
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from usfmae_lib import UsfmaeError, mae, model_card, pretrain, reconstruction, store, study

STEP = "03_mae_pretraining"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
clean_dir = Path(out_dir) / "02_preprocessing" / "clean"
if not clean_dir.is_dir():
    raise UsfmaeError(f"{clean_dir} does not exist: run notebook 02 first "
                      f"(usfmae run notebooks/02_preprocessing.ipynb -f params/{profile}/02_preprocessing.yaml)")
pretrain.check_init_checkpoint(init_checkpoint, step_dir)  # a missing start file stops here, before packing
print(f"profile={profile}  outputs -> {Path(out_dir).name}/{STEP}")


def show(fig, name):  # save under step_dir and show the saved file, once
    study.show_figure(fig, step_dir / f"{name}.png", dpi=110)


# %% [markdown]
# ## 1. The packed store
#
# Decoding PNGs costs more CPU per image than a GPU spends on its training step, so the cleaned
# images are decoded once into uint8 shards (`store/shard_*.npy`: a grey scan in one channel, a
# colour one in three; read memory-mapped by the loader workers) with an index of path, dataset
# and anatomy. Packing is
# skipped when the store is up to date and resumes shard by shard when interrupted.
# `heldout_per_anatomy` seeded images per anatomy (at most a tenth of each) are left out and
# listed in `store/heldout.csv`, so that notebook 04 judges reconstructions on images the model
# never saw. The paper held none out; the paper profile sets 0.

# %%
store_dir = store.pack_store(clean_dir, step_dir / "store", img_size, workers=0, progress=False,
                             heldout_per_anatomy=heldout_per_anatomy, seed=seed)
index = pd.read_parquet(store_dir / "index.parquet")
meta = store.read_store_meta(store_dir)
print(f"{meta['n_images']} images of {img_size} px in {meta['n_shards']} shard(s); "
      f"{meta['n_rejected']} unreadable file(s) skipped (store/rejects.csv); "
      f"{meta['n_heldout']} held out for notebook 04 (store/heldout.csv)")
index.groupby(["dataset", "anatomy"]).size().rename("images").reset_index()

# %% [markdown]
# ## 2. Augmentation, zoom-out included
#
# Each image gets one affine map: a crop whose area is 0.5x-2.0x the image's (aspect 3:4-4:3),
# flips (p = 0.5 each) and a rotation of 0-90 deg, resampled bilinearly in one pass
# (`F.affine_grid` + `F.grid_sample`, on the GPU in batches when there is one). Above 1x the
# crop window is larger than the image, which shrinks inside the output; the border is black
# (pixel 0, the background of a scan), as are rotation corners. A sample's transform and mask
# depend only on (seed, epoch, index): the same on any number of workers or GPUs, and after a
# resume. Below: four images, then the views of five epochs, then a fixed 2x zoom-out.

# %%
params = pretrain.params_of(globals())  # the recipe: the parameters cell above, by pretrain.DEFAULTS' names
augment = pretrain.augment_config(pretrain.resolve_params(**params))
dataset = store.StoreDataset(store_dir, seed, num_patches=1)
shown = np.linspace(0, len(dataset) - 1, 4).astype(int)
show(pretrain.plot_augmentation(dataset, shown, augment, img_size), "fig_augmentation")

# %% [markdown]
# ## 3. The masked autoencoder, one batch by hand
#
# Before training it, take one batch of the images above through the model that section 4 trains,
# still at its random initial weights, calling the model's own methods one stage at a time
# (`usfmae_lib/mae.py`, `MaskedAutoencoderViT`; the reference MAE's `models_mae.py` splits its
# forward the same way). Shapes: N images, H = W pixels, p the patch side, L = (H/p)^2 patches,
# K = int(L x (1 - mask_ratio)) visible ones, D the encoder width, D' the decoder width.
#
# 1. **patchify**: the image is cut into L square patches of p x p x 3 numbers each;
# 2. **encoder_tokens**: each patch becomes one token of width D (a linear projection plus its
#    position embedding: a fixed sin-cos table, or a learned one with `pos_embed = "learnable"`, as the
#    paper's text says); a random `mask_ratio` of them is dropped, and a learned cls token goes first;
# 3. **forward_encoder**: the ViT blocks read only those 1 + K tokens: hidden patches cost nothing;
# 4. **decoder_tokens**: the encoded tokens are narrowed to D', put back in patch order, and one shared,
#    learned mask token fills every hidden position: the decoder sees all 1 + L positions;
# 5. **forward_decoder**: a small ViT predicts p x p x 3 pixel values for every patch;
# 6. **forward_loss**: the mean squared error over the hidden patches only (the visible ones were given).

# %%
untrained = mae.build_model(model, img_size=img_size, pos_embed=pos_embed, **model_overrides)  # section 4 trains this model
torch.manual_seed(seed)
x = store.augment_batch(dataset.__getitems__([(0, int(i)) for i in shown])["images"],
                        torch.zeros(len(shown), store.N_AUG), None, img_size)  # the stored images, no augmentation
noise = reconstruction.patch_noise(len(x), untrained.num_patches, seed)  # one random number per patch
with torch.no_grad():
    patches = untrained.patchify(x)
    tokens, mask, ids_restore = untrained.encoder_tokens(x, mask_ratio, noise)
    latent, _, _ = untrained.forward_encoder(x, mask_ratio, noise)
    decoder_in = untrained.decoder_tokens(latent, ids_restore)
    pred = untrained.forward_decoder(latent, ids_restore)
    loss = untrained.forward_loss(x, pred, mask)
for name, t, meaning in [("image", x, "[N, 3, H, W]"), ("patches", patches, "[N, L, p*p*3]"),
                         ("encoder input", tokens, "[N, 1+K, D]: cls + visible"),
                         ("encoder output", latent, "[N, 1+K, D]"),
                         ("decoder input", decoder_in, "[N, 1+L, D']: cls + visible + mask tokens"),
                         ("prediction", pred, "[N, L, p*p*3]"), ("loss", loss, "[]: mean over hidden patches")]:
    print(f"{name:>15} {str(list(t.shape)):>18}  {meaning}")
print(f"L = {untrained.num_patches} patches, K = {tokens.shape[1] - 1} visible ({mask_ratio:.0%} hidden); "
      f"untrained loss {float(loss):.3f}")

# %% [markdown]
# The same stages as pictures, for the first image. **Patches**: the grid the ViT reads.

# %%
walk = reconstruction.reconstruct(untrained, x[:1], mask_ratio, noise[:1])  # the first image, the same mask


def stage(name):  # one figure per stage of the walk, made in the cell that shows it
    return reconstruction.plot_walkthrough(walk, name, 0, untrained.patch_size)


show(stage("patches"), "mae_1_patches")

# %% [markdown]
# **The mask**: each patch drew a random number; those with the largest are hidden (outlined).

# %%
show(stage("mask"), "mae_2_mask")

# %% [markdown]
# **The encoder's input is a sequence, not a smaller picture**: the cls token, then the visible
# patches in the shuffled order of their random numbers. Where each came from is the number under
# it, which the token carries as its position embedding; the hidden patches are simply absent.

# %%
show(stage("encoder_input"), "mae_3_encoder_input")

# %% [markdown]
# **The decoder's input**: back in patch order, every position filled. Visible positions hold their
# encoded token (drawn here as the patch it came from), hidden ones the same learned mask token M,
# told apart only by their position embeddings: the decoder must work out what belongs there.

# %%
show(stage("decoder_input"), "mae_4_decoder_input")

# %% [markdown]
# **The prediction**: the decoder predicts the pixels of every patch, visible ones included. At
# random weights that is noise.

# %%
show(stage("decoder_output"), "mae_5_decoder_output")

# %% [markdown]
# **The loss** is the squared error on the hidden patches only (colour scale from 0; visible patches
# blank): large everywhere at random weights. Training lowers exactly this number.

# %%
show(stage("loss"), "mae_6_loss")

# %% [markdown]
# **Where training leads.** The repository ships a small MAE trained for this purpose on the
# project's synthetic ultrasound (`usfmae_lib/data/teaching_mae/`, its card says how it was made;
# it never saw these images). On three scans of this run, with 25% of their patches hidden, it
# continues what it sees into the holes (a skull ring, a kidney's outline, a bright fascia line);
# OpenCV's inpainting of the same holes, last, only smears each hole's border inward.

# %%
teacher, teacher_info = reconstruction.load_inspection_model(reconstruction.TEACHING, device="cpu")
# scans with structure to continue (a skull ring, a kidney, a fascia line), as far as this run has them
rows = index[index.anatomy.isin(["fetal_head", "kidney", "muscle"])].groupby("anatomy").head(1)
rows = rows if len(rows) else index.iloc[[int(shown[0])]]
teach = reconstruction.reconstruct(
    teacher, reconstruction.normalize_images(reconstruction.load_images(clean_dir, rows.path, teacher_info["img_size"])),
    0.25, reconstruction.patch_noise(len(rows), teacher.num_patches, seed))
show(reconstruction.plot_reconstructions(teach, rows.anatomy, title="the shipped teaching MAE, mask 25%"),
     "mae_7_teaching_model")

# %% [markdown]
# **Exercise.** Predict before you run: if 75% of the patches were hidden instead, how many tokens
# would the encoder get, and how many the decoder? Which half of the model gets cheaper? Change
# `exercise_mask_ratio` (try 0.1, 0.5, 0.9), run the cell, and compare with the shapes printed above.

# %% tags=["exercise"]
exercise_mask_ratio = 0.75
with torch.no_grad():
    enc_in, _, restore = untrained.encoder_tokens(x, exercise_mask_ratio, noise)
    dec_in = untrained.decoder_tokens(untrained.forward_encoder(x, exercise_mask_ratio, noise)[0], restore)
print(f"mask {exercise_mask_ratio:.0%}: encoder tokens {enc_in.shape[1]}, decoder tokens {dec_in.shape[1]}")

# %% [markdown]
# *Answer.* The encoder gets 1 + int(L x (1 - ratio)) tokens: fewer as the ratio grows (at 75%, a
# quarter of the patches plus the cls token). The decoder always gets 1 + L: the mask tokens take
# the hidden patches' places. The encoder, the big half, gets cheaper, its attention more than
# linearly (its cost grows with the square of the token count): that is why the reference MAE hides
# 75% and trains 3x faster. The paper hides 25% and argues that ultrasound's fine texture needs the
# context; notebook 07 tests which ratio transfers better.

# %% [markdown]
# ## 4. Pretraining
#
# `pretrain.train` is what `usfmae pretrain` and `torchrun -m usfmae_lib.pretrain` run. Per step:
# augment, forward with the sample's mask noise, backward, clip, AdamW, schedule; losses stay on
# the device and are written to `log.csv` every `log_every` steps (one host sync), where a NaN or
# inf stops the run before it could overwrite the last good checkpoint. `checkpoints/checkpoint-last.pth`
# holds model, optimiser, schedule, scaler, step, RNG states and parameters; re-running this
# cell continues from it exactly (or does nothing when the run is complete).

# %%
summary = pretrain.train(store_dir, step_dir, resume=True, progress=False, **params)
print(f"ran {summary['last_step']} of the schedule's {summary['steps']} steps on {summary['device']} in "
      f"{summary['precision_run']} (precision requested: {precision})")
pd.Series({k: v for k, v in summary.items() if k != "checkpoint"}).to_frame("value")

# %% [markdown]
# **More pretraining runs** (`pretrain_seeds` > 1). The same recipe with the seeds after `seed`:
# another initialisation, another order of the images, other masks. Each run lands in
# `seed<k>/` beside the first (no snapshots: notebook 07's length curve follows the first run).
# Fine-tuning every one of them (notebook 05) is what puts the variance between pretraining runs
# into the intervals of Table 2: with one run, a lucky or unlucky pretraining looks like a property
# of the method.

# %%
def last_losses(run_dir):  # mean of the run's last 5 logged losses
    return pd.read_csv(Path(run_dir) / "log.csv").loss.tail(5).mean()


further = pretrain.train_further_runs(store_dir, step_dir, pretrain_seeds, **params)
runs_summary = [dict(seed=seed, steps=summary["last_step"], loss_last_5_logs=last_losses(step_dir))] + [
    dict(seed=run["seed"], steps=run["last_step"],
         loss_last_5_logs=last_losses(pretrain.seed_run_dir(step_dir, run["seed"], seed)))
    for run in further]
pd.DataFrame(runs_summary).set_index("seed") if pretrain_seeds > 1 else None

# %%
log = pd.read_csv(step_dir / "log.csv")
window = pretrain.smoothing_window(len(log))
show(pretrain.plot_loss_curve(log, model, model_overrides, img_size, mask_ratio, norm_pix_loss), "fig_loss_curve")

# %%
show(pretrain.plot_lr_schedule(log, warmup_fraction, summary["steps"]), "fig_lr_schedule")
span = "step" if window == 1 else f"{window} steps"
first, last = log.loss.head(window).mean(), log.loss.tail(window).mean()
print(f"loss: first {span} {first:.4f} -> last {span} {last:.4f} ({last / first:.0%} of the start)")
pd.DataFrame([{**summary, "loss_first_steps": first, "loss_last_steps": last}]).to_csv(
    step_dir / "pretraining_summary.csv", index=False)

# %% [markdown]
# ## 5. The encoder, for fine-tuning and for anyone
#
# The encoder alone (no decoder, no mask token) goes to `encoder/`, a folder that timm loads by itself
# (`model_card.export_encoder_folder`): `model.safetensors` in timm's `VisionTransformer` key layout,
# `config.json` (every constructor value, the input size, and the ImageNet mean and std that
# pretraining normalised with) and `README.md`, the model card: what the model is, the data that made
# it (synthetic data said plainly), the recipe, the final loss, this run (profile, folder, commit,
# versions), the licence and the limits; notebook 06 adds the fine-tuning results with their
# intervals. Below it is loaded back as a receiver would, with the one documented call: timm matches
# the keys strictly, and its features must equal the MAE encoder's. (Notebook 05 fine-tunes from
# `checkpoints/checkpoint-last.pth` itself.)

# %%
trained = mae.load_model(step_dir / "checkpoints" / pretrain.CHECKPOINT).eval()
encoder_dir = model_card.export_encoder_folder(trained, step_dir / model_card.FOLDER,
                                               model_card.run_facts(step_dir, params, profile, summary))
vit = timm.create_model(f"local-dir:{encoder_dir.resolve()}", pretrained=True).eval()  # what a receiver runs
x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
n = trained.patch_embed.num_patches
with torch.no_grad():  # no masking, patches in order: the MAE encoder is the ViT
    torch.testing.assert_close(vit.forward_features(x), trained.forward_encoder(
        x, 0.0, noise=torch.arange(float(n)).expand(2, n))[0], atol=1e-5, rtol=1e-5)
size_mb = (encoder_dir / model_card.WEIGHTS).stat().st_size / 1e6
print(f"encoder -> {encoder_dir.relative_to(step_dir)}/ ({size_mb:.1f} MB of weights, config.json, README.md): "
      f"timm.create_model(\"local-dir:<that folder>\", pretrained=True) gives the MAE encoder's features")
