"""The teaching MAE: a small masked autoencoder that ships with the repository.

A 2-epoch smoke model reconstructs colour noise, and even the hour-long quick run fills hidden
patches with flat blocks, so a student opening notebook 03 or 04 would learn nothing from its
pictures. This module makes, once and for as long as it takes on a CPU, a small MAE trained on
the project's own synthetic ultrasound with the project's own code (`store.pack_store`,
`pretrain.train`), and ships its weights (encoder and decoder) as safetensors beside a model
card. Notebooks 03 and 04 show it when a run has no checkpoint of its own, or when asked to.

    path = reconstruction.teaching_checkpoint()          # usfmae_lib/data/teaching_mae/mae.safetensors
    model = mae.load_model(path)                         # safetensors: never unpickles anything
    usfmae teaching-mae --work outputs/teaching-mae      # regenerate (resumable; hours on 1 core)

The corpus is rendered with a seed (1) that the study's synthetic trees (seed 0) do not use, so
every image a notebook shows it was unseen in training.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import UsfmaeError, atomic_write, atomic_write_text, reconstruction

FOLDER = reconstruction.TEACHING_FOLDER  # where the weights (reconstruction.TEACHING_WEIGHTS) and the card go
CARD = "MODEL_CARD.md"
EVAL_PER_ANATOMY = 30  # held-out scans per anatomy in the model card

# the recipe: small patches on a small image, so that a hidden patch is a small hole whose
# surroundings say what it held; everything else is the study's pretraining (pretrain.DEFAULTS)
CORPUS = dict(seed=1, per_anatomy=800, render_size=224, img_size=80)
RECIPE = dict(model="mae_vit_tiny_patch16_dec128d2b",
              model_overrides={"patch_size": 8, "depth": 6, "decoder_depth": 4},
              img_size=80, mask_ratio=0.25, norm_pix_loss=False, epochs=16, batch_size=64, lr=1e-3,
              weight_decay=0.01, warmup_fraction=0.05, clip_grad=1.0, seed=1,
              # upright scans, as the notebooks show them: the small budget goes to anatomy, not to
              # rotated or mirrored copies (the study's recipe rotates 0-90 deg, flips and zooms out)
              rot_degrees=[0.0, 0.0], flip_p=0.0, crop_scale=[0.5, 1.0],
              heldout_per_anatomy=0, snapshot_epochs=[], log_every=20, workers=0)


# ============================================================================ corpus
def render_scan(anatomy: str, seed: int, index: int, render_size: int, img_size: int) -> np.ndarray:
    """One synthetic B-mode still, rendered at render_size as the study's trees are and shrunk
    (area) to img_size: grey uint8 [img_size, img_size]."""
    from .synthetic import K_STILL, render

    grey = render(anatomy, seed, K_STILL, index, render_size, render_size)
    return cv2.resize(grey, (img_size, img_size), interpolation=cv2.INTER_AREA)


def _render_one(job) -> tuple[str, str]:
    root, anatomy, index, seed, render_size, img_size = job
    rel = f"{anatomy}/{anatomy}_{index:06d}.png"
    out = Path(root) / rel
    if not out.exists():  # resumable
        small = render_scan(anatomy, seed, index, render_size, img_size)
        atomic_write(out, lambda tmp: cv2.imwrite(str(tmp), small))
    return rel, anatomy


def make_corpus(root, seed: int, per_anatomy: int, render_size: int, img_size: int, workers: int = 1) -> Path:
    """Synthetic B-mode stills of the ten anatomies (rendered at render_size like the study's
    trees, stored at img_size) with an index.csv that store.pack_store reads."""
    from .synth_scenes import ANATOMIES

    root = Path(root)
    jobs = [(str(root), a, a_i * per_anatomy + i, seed, render_size, img_size)
            for a_i, a in enumerate(ANATOMIES) for i in range(per_anatomy)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_render_one, jobs, chunksize=16))
    else:
        rows = [_render_one(j) for j in jobs]
    index = pd.DataFrame(rows, columns=["path", "anatomy"]).assign(dataset="synthetic-teaching")
    index.to_csv(root / "index.csv", index=False)
    return root


# ============================================================================ held-out evaluation
def heldout_scans(per_anatomy: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Scans the teaching MAE never saw: rendered like its corpus but from `seed` (the study's
    synthetic trees use 0, the corpus CORPUS['seed']). Returns (anatomies, uint8 [N, S, S, 3])."""
    from .synth_scenes import ANATOMIES

    if seed == CORPUS["seed"]:
        raise UsfmaeError(f"seed {seed} rendered the teaching corpus; held-out scans need another seed")
    anatomies, images = [], []
    for a_i, anatomy in enumerate(ANATOMIES):
        for i in range(per_anatomy):
            small = render_scan(anatomy, seed, a_i * per_anatomy + i, CORPUS["render_size"], RECIPE["img_size"])
            anatomies.append(anatomy)
            images.append(np.repeat(small[..., None], 3, axis=2))
    return anatomies, np.stack(images)


def evaluate(model, anatomies, images: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """The model against the flat fill and OpenCV's inpainting at the mask ratio it was trained at,
    per anatomy and pooled, paired by image (reconstruction.sweep_verdicts)."""
    ratio = RECIPE["mask_ratio"]
    imgs = reconstruction.normalize_images(images)
    per_image, _ = reconstruction.mask_ratio_sweep(model, imgs, anatomies, [ratio], seed=seed)
    return reconstruction.sweep_verdicts(per_image, ratio)


# ============================================================================ the model
def make(work_dir, threads: int = 1, workers: int = 1, max_steps: int = 0, progress: bool = True) -> Path:
    """Render the corpus, pack it, pretrain (resumable), and write weights and card to FOLDER."""
    from . import checkpoints, mae, pretrain, store

    work_dir = Path(work_dir)
    corpus = make_corpus(work_dir / "corpus", CORPUS["seed"], CORPUS["per_anatomy"], CORPUS["render_size"],
                         CORPUS["img_size"], workers)
    store_dir = store.pack_store(corpus, work_dir / "store", RECIPE["img_size"], workers=workers, progress=progress)
    summary = pretrain.train(store_dir, work_dir / "run", resume=True, progress=progress, threads=threads,
                             max_steps=max_steps, **RECIPE)
    if summary["last_step"] < summary["steps"]:
        print(f"stopped at step {summary['last_step']} of {summary['steps']} (max_steps); run again to go on")
        return work_dir
    run_ckpt = work_dir / "run" / "checkpoints" / pretrain.CHECKPOINT
    model = mae.load_model(run_ckpt)
    log = pd.read_csv(work_dir / "run" / "log.csv")
    record = dict(params={k: RECIPE[k] for k in ("model", "model_overrides", "img_size", "norm_pix_loss",
                                                   "mask_ratio")})
    weights = checkpoints.save_model(model, reconstruction.TEACHING_WEIGHTS, record, source="usfmae teaching MAE")
    card = dict(corpus=CORPUS, recipe=RECIPE, images=summary["images"], steps=summary["steps"],
                final_loss=float(log.loss.tail(50).mean()), first_loss=float(log.loss.head(50).mean()),
                train_seconds=_train_seconds(log, summary["global_batch"]),
                threads=threads,
                parameters=sum(p.numel() for p in model.parameters()),
                sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), size_bytes=weights.stat().st_size)
    anatomies, images = heldout_scans(EVAL_PER_ANATOMY, seed=0)
    evaluation = evaluate(model.eval(), anatomies, images)
    atomic_write(FOLDER / "heldout_evaluation.csv", lambda tmp: evaluation.to_csv(tmp, index=False, float_format="%.5g"))
    atomic_write_text(FOLDER / "card.json", json.dumps(card, indent=1) + "\n")
    atomic_write_text(FOLDER / CARD, model_card(card, evaluation))
    return weights


def model_card(card: dict, evaluation: pd.DataFrame) -> str:
    """The model card: what the teaching MAE is, how it was made, how well it does, its limits."""
    from .mae import CONFIGS

    r, c = card["recipe"], card["corpus"]
    ov = r["model_overrides"]
    cfg = {**CONFIGS[r["model"]], **ov}
    pooled = evaluation[evaluation.dataset == "all"].set_index("comparison")
    rows = "\n".join(f"| {e.comparison} | {e.dataset} | {e.n} | {e.model:.3f} | {e.other:.3f} | "
                     f"{e.difference:+.3f} [{e.low:+.3f}, {e.high:+.3f}] | {e.verdict} |"
                     for e in evaluation.itertuples())
    wins = {name: int(((evaluation.comparison.str.contains(name)) & (evaluation.dataset != "all")
                       & (evaluation.verdict == "lower error")).sum()) for name in ("flat fill", "inpainting")}
    return f"""# The teaching MAE

A small masked autoencoder that ships with usfmae so that notebooks 03 and 04 can show what a
trained MAE does in seconds, on a laptop, before (or instead of) a run of your own. It is a
teaching aid, not a result of the study: it was trained on the project's **synthetic** ultrasound
only, and says nothing about real scans or about USF-MAE.

| | |
|---|---|
| file | `mae.safetensors` ({card['size_bytes'] / 1e6:.1f} MB, sha256 `{card['sha256']}`) |
| load | `usfmae_lib.mae.load_model(path)` (safetensors: nothing is unpickled; the architecture is in its metadata) |
| architecture | ViT encoder {ov['depth']} blocks x {cfg['embed_dim']} wide, {cfg['num_heads']} heads, patch {ov['patch_size']} px; decoder {ov['decoder_depth']} blocks x {cfg['decoder_embed_dim']}; {card['parameters'] / 1e6:.2f} M parameters |
| input | {r['img_size']} x {r['img_size']} px, ImageNet-normalised RGB (grey scans repeated) |
| objective | MSE on the masked patches, raw pixels, mask ratio {r['mask_ratio']:.0%} (the paper's) |
| data | {card['images']:,} synthetic B-mode stills, {c['per_anatomy']} per anatomy of 10, rendered at {c['render_size']} px from seed {c['seed']} (`usfmae_lib.synthetic.render`), stored at {c['img_size']} px |
| recipe | the study's pretraining code (`pretrain.train`): AdamW lr {r['lr']:g}, wd {r['weight_decay']:g}, batch {r['batch_size']}, {r['warmup_fraction']:.0%} warmup then cosine, clip {r['clip_grad']:g}, {r['epochs']} epochs = {card['steps']:,} steps; crops {r['crop_scale'][0]:g}-{r['crop_scale'][1]:g}x, no rotation or flips (upright scans, as the notebooks show them), seed {r['seed']} |
| training | {card['train_seconds'] / 3600:.2f} h of steps on {card['threads']} CPU thread{'s' * (card['threads'] != 1)} (summed from the log; the corpus takes minutes more); loss {card['first_loss']:.3f} (first 50 steps) -> {card['final_loss']:.3f} (last 50) |
| made by | `usfmae teaching-mae --work outputs/teaching-mae` (resumable; it writes this folder) |
| licence | MIT, as the repository |

## How well it does, on scans it never saw

{EVAL_PER_ANATOMY} scans per anatomy rendered from seed 0 (the seed of the study's own synthetic
trees), a seeded {r['mask_ratio']:.0%} mask each. Error: MSE on the hidden patches in
ImageNet-normalised pixels. The model is compared with two methods that learned nothing: a flat fill
(every hidden pixel gets the mean colour of the visible ones) and OpenCV's Navier-Stokes inpainting
(`cv2.inpaint`) of the same holes. Difference: model minus the other, paired by image, Student-t
95% interval over images; "lower error" when the interval lies below 0. Lower than the flat fill on
{wins['flat fill']} of 10 anatomies, lower than inpainting on {wins['inpainting']} of 10; pooled, {pooled.loc[[k for k in pooled.index if 'flat' in k][0], 'model']:.3f}
vs {pooled.loc[[k for k in pooled.index if 'flat' in k][0], 'other']:.3f} (flat fill) and {pooled.loc[[k for k in pooled.index if 'inpainting' in k][0], 'other']:.3f} (inpainting).
(`heldout_evaluation.csv`; `tests/test_teaching.py` checks it on {12} scans per anatomy.)

| comparison | anatomy | images | model | other | difference [95% CI] | verdict |
|---|---|---|---|---|---|---|
{rows}

## Limits

- Synthetic data only: its anatomy is the generator's (docs/synthetic.md), its speckle is simulated.
- Small and low-resolution ({r['img_size']} px) by design: it must train on a CPU and ship in the repository.
- Trained at {r['mask_ratio']:.0%} masking; at higher ratios its error rises (notebook 04's sweep).
- Its cls token was never asked to summarise an image: it is not a feature extractor to fine-tune.
"""


def _train_seconds(log: pd.DataFrame, global_batch: int) -> float:
    """Training time summed from the log's per-step throughput (resumes included, pauses not)."""
    rate = log["images_per_s"].replace(0, np.nan)
    return float((global_batch / rate).sum(skipna=True))


# ============================================================================ command line
def add_cli(subparsers):
    p = subparsers.add_parser("teaching-mae", help="regenerate the shipped teaching MAE (resumable; hours on a CPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/teaching-mae", help="folder for the corpus, store and run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the corpus (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps; run again to go on (default: all)")
    p.set_defaults(func=lambda a: print(make(a.work, a.threads, a.workers, a.max_steps)) or 0)
