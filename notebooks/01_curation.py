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
# # 01 · Curation: from dataset folders to one audited pretraining manifest
#
# The paper pretrains on OpenUS-46: about 374k images from 46 public ultrasound datasets, with
# videos sampled at 3 frames/s (how its 3D scans became 2D images is not stated); the
# evaluation images were "reserved for evaluation" (2.1): "none of these datasets were included
# in the pretraining corpus" (2.5). It describes no deduplication and no check for copies of
# evaluation images inside the other datasets: **both are this study's additions**, on by
# default and switched off with `deduplicate` and `remove_leakage` (the paper profile turns
# deduplication off). This notebook:
#
# 1. prints the OpenUS-46 registry (46 datasets, anatomy, the paper's Table 1 counts and US-43d
#    marker, links, licences) and where the paper disagrees with itself;
# 2. generates the synthetic ultrasound tree when no real data root is given (`usfmae synth`);
# 3. reads every image, video and volume under the roots into one manifest of 2D frames
#    (`usfmae curate`), with rejects recorded; the evaluation datasets never enter it;
# 4. finds exact and near duplicates (dropped when `deduplicate`) and pretraining frames that are
#    near copies of an evaluation image (dropped when `remove_leakage`);
# 5. regenerates Table 1 (found vs paper counts), Fig. 1 (one image per dataset) and a bar chart
#    of images per anatomy.
#
# Run headless: `usfmae run notebooks/01_curation.ipynb -f params/smoke/01_curation.yaml`.
# Outputs land in `<out_dir>/01_curation/`; `docs/curation.md` explains every rule.

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
data_roots = []  # real dataset folders; empty = the synthetic tree made by `usfmae synth`
data_root = None  # folder holding BUSBRA/, OTU_2d/, usd514_jpeg_roi/ (as in notebooks 04-07): with data_roots, curated as one more root, so its evaluation sets are audited for leakage (never in the manifest)
synthetic_profile = ""  # size of that tree: smoke, quick or paper; "" = this profile's own (the dry run: smoke)
video_fps = 3.0  # frames sampled per second of video time (paper: 3); 0 = every frame
slice_axis = 0  # volume axis to slice, of the (z, y, x) array
slice_step = 1  # keep every n-th slice of a 3D volume
phash_threshold = 20  # near duplicates: 256-bit perceptual hashes at most this many bits apart
deduplicate = True  # drop exact and near duplicate pretraining frames (this study's addition: the paper describes no deduplication); False keeps them and warns
remove_leakage = True  # drop pretraining frames near an evaluation image (this study's check; the paper keeps the evaluation datasets out, as here either way); False keeps them and warns
workers = 0  # 0 = all cores

# %%
from pathlib import Path

from IPython.display import Markdown, display

from usfmae_lib import curation, study

STEP = "01_curation"
study.setup(globals(), STEP)  # profile file in a live kernel, paths from the repository root (README)
step_dir = Path(out_dir) / STEP  # everything this notebook makes goes here
step_dir.mkdir(parents=True, exist_ok=True)
print(f"profile={profile}  outputs -> {Path(out_dir).name}/{STEP}")

# %% [markdown]
# ## The OpenUS-46 registry
#
# The 46 datasets of the paper's Table 1 with their anatomy and image count, the access link
# from the official README, the licence where a source states it (`unknown` otherwise: check
# the link), the file kinds of the public release where known, the three evaluation sets, and
# `us43d`: the paper's bold ("Datasets in bold are also included in US-43d"), copied as printed.
# The registry is data, `usfmae_lib/data/openus46.csv`; folder aliases (`BUSBRA`, `OTU_2d`,
# `usd514_jpeg_roi`, ...) let `usfmae curate` recognise a downloaded dataset by its folder name.

# %%
registry = curation.load_registry()
display(registry[["name", "anatomy", "paper_count", "file_kinds", "licence", "is_eval", "us43d", "aliases", "link"]])

# %% [markdown]
# **The paper's counts do not add up the way its text says.** Table 1 sums to exactly the
# 374,192 images the text calls the pretraining corpus, but Table 1 includes the three
# evaluation sets, and the text says 10,578 evaluation images were held out *in addition*
# to about 370,000 pretraining images. The official README says "360K unlabeled ultrasound
# images from 43 datasets (10k from 3 datasets were used in evaluation)". **Nor do its US-43d
# counts:** Table 1 bolds 43 rows as "also included in US-43d", while the introduction says only
# 36 of US-43d's datasets were incorporated and 7 excluded, without naming them. The numbers
# below are computed from the registry, not typed in.

# %%
s = curation.registry_summary(registry)
evals = registry[registry["is_eval"]]
print(f"Table 1: {s['datasets']} datasets, {s['table1_sum']:,} images "
      f"(paper text: 'consisting of {s['paper_total']:,} images exactly')")
print("  the three evaluation sets inside that sum: "
      + " + ".join(f"{r.name} {r.paper_count:,}" for r in evals.itertuples()) + f" = {s['eval_sets_in_table1']:,}")
print(f"  Table 1 without them: {s['table1_sum_without_eval']:,} images from {s['datasets'] - len(evals)} datasets")
print(f"paper text: {s['paper_text_eval_held_out']:,} evaluation images held out, "
      f"{s['text_minus_table1_eval']:,} more than the three sets hold in Table 1")
print(f"  Table 1 datasets whose count equals that difference: {s['datasets_with_that_count'] or 'none'} "
      "(a coincidence or not: the paper does not say)")
print(f"US-43d: Table 1 bolds {s['us43d_bold_in_table1']} of {s['datasets']} rows (all but "
      f"{', '.join(s['us43d_not_bold'])}); the text says {s['us43d_kept_in_text']} of US-43d's datasets were incorporated")
print("this study follows Table 1: the three evaluation sets are registry rows, kept out of the manifest, "
      f"and audited for leakage (remove_leakage={remove_leakage}, deduplicate={deduplicate})")

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
# interrupted run resumes. The tree is raw data, like a real dataset folder, so it lives in
# `<out_dir>/synthetic/`, beside the step folders: curation's output folder may not hold its input.

# %%
from usfmae_lib import synthetic

synth_dir = synthetic.tree_dir(out_dir)  # a raw root beside the step folders
if not data_roots:
    tree_size = synthetic_profile or profile
    if tree_size != profile:
        print(f"synthetic tree at {tree_size} size (synthetic_profile), not {profile}'s")
    synthetic.generate_tree(synth_dir, seed=seed, profile=tree_size, workers=workers or None)

# %% [markdown]
# One image per anatomy, the two probe geometries (linear: a rectangle; curvilinear and phased:
# a sector on black), and one annotated scan beside its clean twin and the mask of every
# burned-in mark: the ground truth that notebook 02 measures annotation removal against.

# %%
if not data_roots:
    study.show_figure(synthetic.plot_gallery(synth_dir), step_dir / "fig_synthetic_gallery.png")

# %% [markdown]
# ## Curation
#
# Each first-level folder of a data root is a dataset, matched to the registry by name or
# alias; unmatched folders are curated under their own name with anatomy "unknown" and
# reported. In the synthetic tree, `pretrain/<anatomy>/` are the pretraining datasets
# (`synth_<anatomy>`), `annotated/` is left to notebook 02, and `BUSBRA/`, `OTU_2d/`,
# `usd514_jpeg_roi/` are the evaluation sets: read and hashed for the leakage audit, never in
# the manifest. Masks and annotation files are skipped.
#
# Videos are sampled at `video_fps` frames per second of video time: sample k is the frame on
# screen at k / video_fps seconds, so a clip of d seconds gives ceil(d x video_fps) frames (4 s ->
# 12, 2.5 s -> 8). Volumes are sliced along `slice_axis` every `slice_step` slices. Every frame
# becomes 8-bit RGB (16-bit and float data scaled as `docs/curation.md` says) and gets an exact
# content hash and two perceptual hashes (pHash, 64 and 256 bits). The run uses all cores, shows
# a progress bar, and resumes: a file read once is cached in `01_curation/cache/` and is not
# read again.

# %%
roots = [Path(r) for r in data_roots] or [synth_dir]
if data_root and data_roots and Path(data_root) not in roots:  # the evaluation sets of notebooks 04-07, audited
    roots.append(Path(data_root))
elif data_root and not data_roots:  # generated pretraining images cannot copy a real evaluation image
    print(f"data_root {data_root}: not audited, the pretraining images are the synthetic tree's (its own twins are)")
cur = curation.curate(roots, step_dir, video_fps=video_fps, slice_axis=slice_axis, slice_step=slice_step,
                      phash_threshold=phash_threshold, workers=workers, progress=True, deduplicate=deduplicate,
                      remove_leakage=remove_leakage)
print(curation.describe(cur))
display(cur.datasets.drop(columns=["folder", "root"]))

# %% [markdown]
# ## Rejects and duplicates
#
# A file that cannot be read is listed in `rejects.csv` with its reason (zero bytes, truncated,
# not an image, unsupported codec, ...) and the run goes on.
#
# Deduplication is this study's addition: the paper samples videos at 3 frames/s "to ensure
# balanced representation without redundancy" but describes no removal of repeated images
# across files. With `deduplicate = False` (the paper profile) duplicates stay in the manifest
# and are only listed (`dropped` False); they weight the corpus toward what is repeated.
#
# Exact duplicates share a content hash; near duplicates (the same frame resized or re-encoded)
# have 64-bit pHashes at most 6 bits apart and 256-bit pHashes at most `phash_threshold` bits
# apart. The 64-bit hash alone is not enough: it sees mostly the outline of the image, so
# distinct scans of one standard view (a fetal head, an apical four-chamber heart in the same
# sector) collide, even at 0 bits. The first frame in manifest order is kept, the others are
# listed in `duplicates.csv` beside it. Frames of one video or volume are not compared with each
# other: the sampling rate and the slice step already control redundancy inside a file.

# %%
print(f"rejects: {len(cur.rejects)}")
if len(cur.rejects):
    display(cur.rejects.groupby(["dataset", "reason"]).size().rename("files").reset_index())
print(f"duplicates: {len(cur.duplicates)}, " + ("dropped" if deduplicate else "KEPT (deduplicate off)"))
if len(cur.duplicates):
    display(cur.duplicates.groupby(["dataset", "duplicate"]).size().rename("frames").reset_index())
    display(cur.duplicates.head(10))
print(f"skipped (masks, annotations, non-image files): {len(cur.skipped)}")
if len(cur.skipped):
    display(cur.skipped.groupby(["dataset", "reason"]).size().rename("files").reset_index())

# %% [markdown]
# ## Leakage audit
#
# The paper keeps the three evaluation *datasets* out of pretraining; so does this study,
# whatever the switches say. Checking the pretraining datasets for copies of evaluation images
# is this study's addition (the paper is silent): every pretraining frame that is a near
# duplicate (same rule) of an image of an evaluation set is listed in `leakage.csv` with its
# nearest evaluation image, and dropped from the manifest when `remove_leakage` is on. Off,
# those frames stay in pretraining, and notebooks 05-07 no longer test on unseen images only.
# The counts per (pretraining dataset, evaluation set) pair are below and in
# `leakage_pairs.csv`. The synthetic tree plants no copies, so 0 is the expected count there;
# `tests/test_curation.py` plants a resized, re-encoded evaluation image and checks it is caught.

# %%
print(f"evaluation sets audited against: {', '.join(cur.summary['eval_datasets']) or 'none'}")
print(f"pretraining frames near an evaluation image: {len(cur.leakage)}, "
      + ("dropped" if remove_leakage else "KEPT (remove_leakage off)"))
if len(cur.leakage_pairs):
    display(cur.leakage_pairs)
else:
    print("frames per (pretraining dataset, evaluation set) pair: none")

# %% [markdown]
# ## Table 1, regenerated
#
# The paper's count for every OpenUS-46 dataset beside the frames this run found and kept
# (`table1.csv`, `table1.md`, `table1.tex`). Datasets found under the roots that are not in
# OpenUS-46 are appended (marked `*`). The `US-43d` column copies the paper's bold ("also
# included in US-43d"); its footnote names the disagreement with the paper's text (43 bold rows,
# 36 datasets kept in the text). **On the synthetic tree the found counts are tiny and
# belong to synthetic datasets (`synth_*`), not to the paper's: only the three evaluation sets
# match registry rows, with a few dozen images each instead of thousands.** With real data
# roots, the two columns can be compared dataset by dataset.

# %%
display(Markdown((step_dir / "table1.md").read_text()))

# %% [markdown]
# ## Fig. 1: one frame per dataset
#
# The first kept frame of each dataset (the first image of each evaluation set, in red), with its
# anatomy and how many frames the dataset gave. Grey scans are drawn on the fixed 0-255 grey scale.

# %%
study.show_figure(curation.plot_montage(cur), step_dir / "fig1_montage.png")

# %% [markdown]
# ## Images per anatomy
#
# Frames kept in this run per anatomy, beside the paper's pretraining images per anatomy
# (Table 1 without the evaluation sets; the paper's anatomy labels, which overlap: "Heart" and
# "Echocardiography", "Fetal Head" and "Fetal Head Circumference"). The two totals differ by
# orders of magnitude, so both panels show each anatomy's share of its own total on the same
# linear scale, with the count beside each bar: the mixes can be compared, and Heart's half of
# the paper's corpus shows as what it is.

# %%
fig = curation.plot_images_per_anatomy(cur, registry)
study.show_figure(fig, step_dir / "fig_images_per_anatomy.png")
