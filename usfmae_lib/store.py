"""Fast pretraining input: a packed uint8 image store, its Dataset, and batched augmentation.

Decoding 374k PNGs every epoch costs more CPU than the GPU step, so the cleaned PNG tree
(OUT/02_preprocessing/clean with index.csv, or any folder of images) is packed once into
    store/shard_00000_grey.npy  [g, S, S] uint8: the shard's grey images (R = G = B), one channel
    store/shard_00000.npy ...   [c, S, S, 3] uint8 RGB: its colour images; both read memory-mapped
    store/shard_00000.json ...  which source files the shard holds (resume and up-to-date check)
    store/index.parquet         one row per image: path, dataset, anatomy, shard, grey, row (in
                                the shard's grey or colour array)
    store/store.json            size, count, fingerprint of the source listing
    store/rejects.csv           files that could not be read (skipped, not fatal)
    store/heldout.csv           images kept out of the store (path, dataset, anatomy), so that
                                notebook 04 can show reconstructions of images pretraining never saw
`pack_store` is idempotent: shards whose sources are unchanged are kept, and an up-to-date
store is not touched. A killed pack resumes at the first shard not yet written.

Grey images are stored in one channel, losslessly (only frames whose three channels are equal
everywhere): a cleaned B-mode scan is grey, so the paper's 374k frames at 224 px take about a
third of the 56 GB that RGB would (docs/scale.md measures it); the loader repeats the channel.

Augmentation is the paper's: rotation 0-90 deg, horizontal and vertical flips (p 0.5 each) and a
random resized crop whose area is 0.5x-2.0x the image's. Scales above 1 really zoom out: the crop
window is larger than the image, so the image shrinks inside the output and the rest is padded
with black (pixel value 0, the background of an ultrasound scan outside its sector; after
ImageNet normalisation, -mean/std). Rotation corners are padded the same way. All of it is one
affine map per image, applied to a batch with F.affine_grid + F.grid_sample (bilinear), on the
GPU when there is one and with the same code in the loader workers on a CPU.

Randomness never comes from worker RNG state: every sample draws its augmentation and its
mask noise from SeedSequence([seed, epoch, index]), so batches, masks and augmentations are the
same whatever the number of workers or processes, and after a resume.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import UsfmaeError, atomic_write, atomic_write_text
from .preprocess import IMAGENET_MEAN, IMAGENET_STD  # paper section 2.2, applied as images are read

STORE_VERSION = 2  # 2: grey images in one channel
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
N_AUG = 7  # uniforms per sample: angle, hflip, vflip, scale, ratio, x offset, y offset


# ============================================================================ packing
def list_sources(src) -> pd.DataFrame:
    """The images to pack: rows of src/index.csv (notebook 02's contract) or, without one, every
    image file under src (dataset = first folder, anatomy 'unknown'). Columns path (relative to
    src), dataset, anatomy; sorted by path so that shards do not depend on listing order."""
    src = Path(src)
    if not src.is_dir():
        raise UsfmaeError(f"{src}: no such folder of preprocessed images; run notebook 02 "
                          "(usfmae clean) first or pass a folder of PNGs")
    index_csv = src / "index.csv"
    if index_csv.exists():
        table = pd.read_csv(index_csv, dtype={"path": str, "dataset": str, "anatomy": str})
        if "path" not in table:
            raise UsfmaeError(f"{index_csv}: no 'path' column; expected path, dataset, anatomy (notebook 02's index)")
        for col in ("dataset", "anatomy"):
            table[col] = table[col].fillna("unknown") if col in table else "unknown"
        table = table[["path", "dataset", "anatomy"]]
    else:
        paths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        table = pd.DataFrame({"path": paths})
        table["dataset"] = [p.split("/")[0] if "/" in p else "unknown" for p in paths]
        table["anatomy"] = "unknown"
    if table.empty:
        raise UsfmaeError(f"{src}: no images found (looked for {index_csv.name} or *.png/*.jpg files)")
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def sample_per_anatomy(table: pd.DataFrame, n_per_anatomy: int, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of up to n_per_anatomy rows per anatomy, sorted by (anatomy, path).

    The sample depends only on the rows and the seed (not on their order or on the other
    anatomies), so the same images come back on every run.
    """
    picked = []
    for _, rows in table.sort_values("path").groupby("anatomy", sort=True):
        n = min(int(n_per_anatomy), len(rows))
        picked.append(rows.sample(n=n, random_state=np.random.RandomState(seed)) if n < len(rows) else rows)
    return pd.concat(picked).sort_values(["anatomy", "path"]).reset_index(drop=True)


def split_heldout(table: pd.DataFrame, n_per_anatomy: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(packed, held_out): n_per_anatomy seeded images per anatomy are kept out of pretraining,
    but never more than a tenth of an anatomy's images, so that small anatomies still train."""
    if n_per_anatomy <= 0:
        return table, table.iloc[:0]
    held = pd.concat([sample_per_anatomy(rows, min(n_per_anatomy, len(rows) // 10), seed)
                      for _, rows in table.groupby("anatomy", sort=True)])
    packed = table[~table["path"].isin(set(held["path"]))].reset_index(drop=True)
    return packed, held.reset_index(drop=True)


def _read_rgb(path: Path, size: int) -> np.ndarray | None:
    """uint8 RGB [size, size, 3] by curation's one decode policy (`read_image_file`), or None
    when that policy refuses the file (missing, truncated, too small, ...)."""
    from .curation_readers import Reject, read_image_file

    try:
        img = read_image_file(path)
    except Reject:
        return None
    if img.shape[:2] != (size, size):  # area filter when shrinking, as the preprocessing does
        shrink = img.shape[0] > size or img.shape[1] > size
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return img


def _refusal(path: Path) -> str:
    """Why the decode policy refuses a file, in the words curate and clean use."""
    from .curation_readers import Reject, read_image_file

    if not path.exists():
        return "missing file"
    try:
        read_image_file(path)
    except Reject as rej:
        return f"{rej.reason}: {rej.detail}" if rej.detail else rej.reason
    return "unreadable image"


def _fingerprint(src: Path, paths, size: int) -> str:
    """Hash of the file list, their sizes and modification times, and the store size."""
    h = hashlib.sha256(f"{STORE_VERSION}:{size}".encode())
    for p in paths:
        st = (src / p).stat() if (src / p).exists() else None
        h.update(f"{p}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def _write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1))


def store_is_current(src, store_dir, img_size: int, heldout_per_anatomy: int = 0, seed: int = 0) -> bool:
    """True when store_dir holds a complete store of src's current images at img_size (with the
    same held-out images)."""
    meta_file = Path(store_dir) / "store.json"
    if not meta_file.exists():
        return False
    meta = json.loads(meta_file.read_text())
    paths = split_heldout(list_sources(src), heldout_per_anatomy, seed)[0]["path"].tolist()
    return meta.get("fingerprint") == _fingerprint(Path(src), paths, img_size) and meta.get("img_size") == img_size


def pack_store(src, store_dir, img_size: int, shard_size: int = 2048, workers: int = 0,
               progress: bool = True, heldout_per_anatomy: int = 0, seed: int = 0) -> Path:
    """Pack the images under `src` into a uint8 store at store_dir (see module docstring).

    img_size: side S of the stored squares (images of another size are resized). workers:
    decoding threads (0 = all cores; OpenCV releases the GIL). heldout_per_anatomy, seed: images
    per anatomy left out and listed in store_dir/heldout.csv (see split_heldout; 0 = none, as
    the paper). Returns store_dir. Idempotent and resumable: unchanged shards are kept, an
    up-to-date store returns at once.
    """
    from tqdm.auto import tqdm

    src, store_dir = Path(src), Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    table, heldout = split_heldout(list_sources(src), heldout_per_anatomy, seed)
    heldout_csv = store_dir / "heldout.csv"
    if heldout.empty:
        heldout_csv.unlink(missing_ok=True)
    elif not heldout_csv.exists() or heldout_csv.read_text() != heldout.to_csv(index=False):
        atomic_write(heldout_csv, lambda tmp: heldout.to_csv(tmp, index=False))
    paths = table["path"].tolist()
    fingerprint = _fingerprint(src, paths, img_size)
    meta_file = store_dir / "store.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("fingerprint") == fingerprint:
        return store_dir  # up to date
    meta_file.unlink(missing_ok=True)  # incomplete until the end

    workers = workers or os.cpu_count() or 1
    n_shards = math.ceil(len(paths) / shard_size)
    kept, rejects = [], []
    bar = tqdm(total=len(paths), desc="packing store", unit="img", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for s in range(n_shards):
            chunk = paths[s * shard_size:(s + 1) * shard_size]
            shard_npy, shard_json = store_dir / f"shard_{s:05d}.npy", store_dir / f"shard_{s:05d}.json"
            shard_fp = _fingerprint(src, chunk, img_size)
            done = json.loads(shard_json.read_text()) if shard_json.exists() else {}
            shard_grey = store_dir / f"shard_{s:05d}_grey.npy"
            if done.get("fingerprint") != shard_fp or not shard_npy.exists() or not shard_grey.exists():
                colour = np.zeros((len(chunk), img_size, img_size, 3), np.uint8)  # [c, S, S, 3]
                grey = np.zeros((len(chunk), img_size, img_size), np.uint8)  # [g, S, S]
                ok, is_grey = [], []
                for i, img in enumerate(pool.map(lambda p: _read_rgb(src / p, img_size), chunk)):
                    if img is None:
                        continue
                    g = bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())
                    if g:
                        grey[sum(is_grey)] = img[..., 0]
                    else:
                        colour[len(ok) - sum(is_grey)] = img
                    ok.append(chunk[i])
                    is_grey.append(g)
                n_grey = sum(is_grey)
                atomic_write(shard_npy, lambda tmp: np.save(tmp, colour[:len(ok) - n_grey]))
                atomic_write(shard_grey, lambda tmp: np.save(tmp, grey[:n_grey]))
                done = {"fingerprint": shard_fp, "paths": ok, "grey": is_grey,
                        "rejects": sorted(set(chunk) - set(ok))}
                _write_json(shard_json, done)
            rows = {True: 0, False: 0}
            for p, g in zip(done["paths"], done["grey"]):
                kept.append((p, s, g, rows[g]))
                rows[g] += 1
            rejects += done["rejects"]
            bar.update(len(chunk))
    bar.close()
    for stale in store_dir.glob("shard_*.*"):  # shards of an earlier, larger source
        if int(stale.stem.split("_")[1]) >= n_shards:
            stale.unlink()

    index = pd.DataFrame(kept, columns=["path", "shard", "grey", "row"])
    index = index.merge(table, on="path", how="left")[["path", "dataset", "anatomy", "shard", "grey", "row"]]
    if index.empty:
        raise UsfmaeError(f"{src}: none of the {len(paths)} images could be read; see {store_dir / 'rejects.csv'}")
    atomic_write(store_dir / "index.parquet", lambda tmp: index.to_parquet(tmp, index=False))
    reasons = [_refusal(src / r) for r in rejects]
    pd.DataFrame({"path": rejects, "reason": reasons}).to_csv(store_dir / "rejects.csv", index=False)
    _write_json(meta_file, {"version": STORE_VERSION, "source": str(src.resolve()), "img_size": img_size,
                            "n_images": len(index), "n_rejected": len(rejects), "n_shards": n_shards,
                            "n_heldout": len(heldout), "n_grey": int(index["grey"].sum()),
                            "bytes": sum(f.stat().st_size for f in store_dir.glob("shard_*.npy")),
                            "fingerprint": fingerprint})
    return store_dir


def read_store_meta(store_dir) -> dict:
    meta_file = Path(store_dir) / "store.json"
    if not meta_file.exists():
        raise UsfmaeError(f"{store_dir}: not a packed image store (no store.json); "
                          "build it with store.pack_store(clean_dir, store_dir, img_size)")
    return json.loads(meta_file.read_text())


# ============================================================================ augmentation
@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation. A scale is the crop's area over the image's (RandomResizedCrop's
    meaning); above 1 the crop is larger than the image, which therefore shrinks (zoom-out)."""
    rot_degrees: tuple = (0.0, 90.0)  # uniform rotation range (paper: 0-90 deg)
    flip_p: float = 0.5  # horizontal and vertical flip probability, each
    crop_scale: tuple = (0.5, 2.0)  # crop area / image area (paper: 0.5x-2.0x)
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio w/h, log-uniform (torchvision's default)


def sample_randomness(seed: int, epoch: int, index: int, num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """(augmentation uniforms [N_AUG], mask noise [num_patches]) for one sample, from
    SeedSequence([seed, epoch, index]): independent of workers, processes and resume."""
    rng = np.random.default_rng([seed, epoch, index])
    return rng.random(N_AUG, dtype=np.float32), rng.random(num_patches, dtype=np.float32)


def affine_theta(u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """[B, N_AUG] uniforms -> [B, 2, 3] maps from output to source coordinates (normalised to
    [-1, 1], F.affine_grid's convention) for crop -> flips -> rotation."""
    angle = torch.deg2rad(cfg.rot_degrees[0] + u[:, 0] * (cfg.rot_degrees[1] - cfg.rot_degrees[0]))
    flip_x = torch.where(u[:, 1] < cfg.flip_p, -1.0, 1.0)
    flip_y = torch.where(u[:, 2] < cfg.flip_p, -1.0, 1.0)
    scale = cfg.crop_scale[0] + u[:, 3] * (cfg.crop_scale[1] - cfg.crop_scale[0])
    log_r = math.log(cfg.crop_ratio[0]) + u[:, 4] * (math.log(cfg.crop_ratio[1]) - math.log(cfg.crop_ratio[0]))
    crop_w, crop_h = torch.sqrt(scale * torch.exp(log_r)), torch.sqrt(scale / torch.exp(log_r))  # / image side
    # crop centre: uniform over positions where the crop lies inside the image (crop < 1) or the
    # image lies inside the crop (crop > 1): offset in [-|1 - w|, |1 - w|] either way
    centre_x = (2 * u[:, 5] - 1) * (1 - crop_w).abs()
    centre_y = (2 * u[:, 6] - 1) * (1 - crop_h).abs()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # source = centre + diag(crop) @ diag(flip) @ R(-angle) @ output
    theta = torch.stack([
        torch.stack([crop_w * flip_x * cos, crop_w * flip_x * sin, centre_x], -1),
        torch.stack([-crop_h * flip_y * sin, crop_h * flip_y * cos, centre_y], -1),
    ], 1)
    return theta  # [B, 2, 3]


def augment_batch(images: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig | None, out_size: int) -> torch.Tensor:
    """uint8 [B, S, S, 3] + uniforms [B, N_AUG] -> ImageNet-normalised float [B, 3, out, out].

    cfg None: no augmentation (plain resize). Runs on the images' device, in batches.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)  # [B, 3, S, S] in [0, 1]
    if cfg is not None:
        theta = affine_theta(u.float(), cfg)
        grid = F.affine_grid(theta, [x.shape[0], 3, out_size, out_size], align_corners=False)
        # border-clamped bilinear inside the image, black outside it: no black bleeds into the
        # edge pixels of a crop that lies inside the image, and zoom-out padding is exactly black
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x * (grid.abs() <= 1).all(-1).unsqueeze(1)  # [B, 1, out, out] source inside the image
    elif x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = _mean_std(x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std [1, 3, 1, 1] on device, made once: a host-to-device copy every
    step would make the host wait for the GPU."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


# ============================================================================ dataset
class StoreDataset(torch.utils.data.Dataset):
    """Reads a packed store. Keys are (epoch, index) pairs (see EpochSampler), so that a sample's
    augmentation and mask noise follow from (seed, epoch, index) alone.

    `__getitems__` serves a whole batch: {'images': uint8 [B, S, S, 3] (or, with augment_here,
    normalised float [B, 3, out, out]), 'aug': [B, N_AUG], 'noise': [B, L], 'index': [B]}.
    augment_here: augment in the loader (CPU training) instead of on the device.
    """

    def __init__(self, store_dir, seed: int, num_patches: int, augment: AugmentConfig | None = None,
                 augment_here: bool = False, out_size: int | None = None):
        self.store_dir = Path(store_dir)
        self.meta = read_store_meta(store_dir)
        if self.meta.get("version") != STORE_VERSION:
            raise UsfmaeError(f"{store_dir}: a store of version {self.meta.get('version')}, this code reads version "
                              f"{STORE_VERSION}; pack it again (store.pack_store, or rerun notebook 03: it repacks)")
        index = pd.read_parquet(self.store_dir / "index.parquet", columns=["shard", "grey", "row"])
        self.shard = index["shard"].to_numpy(np.int64)
        self.grey = index["grey"].to_numpy(bool)
        self.row = index["row"].to_numpy(np.int64)
        self.seed, self.num_patches = int(seed), int(num_patches)
        self.augment, self.augment_here = augment, augment_here
        self.out_size = out_size or self.meta["img_size"]
        self._shards = None  # memory maps, opened lazily in each worker process

    def __len__(self):
        return len(self.shard)

    def _open(self):
        n = int(self.shard.max()) + 1
        self._shards = {(s, grey): np.load(self.store_dir / f"shard_{s:05d}{'_grey' if grey else ''}.npy", mmap_mode="r")
                        for s in range(n) for grey in (False, True)}

    def __getstate__(self):  # workers re-open the maps instead of pickling them
        return {**self.__dict__, "_shards": None}

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys) -> dict:
        if self._shards is None:
            self._open()
        size = self.meta["img_size"]
        images_t = torch.empty((len(keys), size, size, 3), dtype=torch.uint8)  # [B, S, S, 3]
        if torch.utils.data.get_worker_info() is not None:
            images_t.share_memory_()  # filled in place: no copy when sent to the main process
        images = images_t.numpy()
        aug = np.empty((len(keys), N_AUG), np.float32)
        noise = np.empty((len(keys), self.num_patches), np.float32)
        index = np.empty(len(keys), np.int64)
        for b, (epoch, i) in enumerate(keys):
            pixels = self._shards[(self.shard[i], self.grey[i])][self.row[i]]
            images[b] = pixels[..., None] if self.grey[i] else pixels  # grey: [S, S] -> every channel
            aug[b], noise[b] = sample_randomness(self.seed, epoch, i, self.num_patches)
            index[b] = i
        batch = {"images": images_t, "aug": torch.from_numpy(aug),
                 "noise": torch.from_numpy(noise), "index": torch.from_numpy(index)}
        if self.augment_here:
            batch["images"] = augment_batch(batch["images"], batch["aug"], self.augment, self.out_size)
        return batch


def _keep_batch(batch):
    """collate_fn: __getitems__ already returns a collated batch."""
    return batch


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index) keys and can start mid-epoch.

    The epoch's permutation depends on (seed, epoch) only; rank r takes every world-th index
    (a single process takes them all), so one process with batch 2B sees, step by step, the
    union of what two processes with batch B see. `set_position(epoch, start)` skips the first
    `start` samples of this rank (the batches done before a resume).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0):
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        order = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in order])

    def __len__(self):
        return self.num_samples - self.start


def make_loader(dataset: StoreDataset, sampler: EpochSampler, batch_size: int, workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over the store: persistent workers, pinned memory on CUDA, whole batches."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        collate_fn=_keep_batch, pin_memory=pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_loader_worker_init)


def _loader_worker_init(worker_id: int):
    from .safety import end_with_parent

    end_with_parent()  # a killed run leaves no loader worker behind
