"""How hard are the synthetic evaluation sets? A small CNN trained from scratch on each.

Generates (or reuses) the three eval sets of a synthetic tree (default: the `quick`
profile's sizes, 600 BUS-BRA / 800 MMOTU / 400 GIST images, default difficulty), trains a
4-block CNN from scratch on CPU for each, and prints test accuracy / F1 beside chance
(a predictor drawing labels at the training-class frequencies, averaged over 200 draws).

Splits: BUSBRA test = kFold 1 of 5-fold-cv.csv (train on the rest, validation columns
ignored); OTU_2d train_cls.txt / val_cls.txt; usd514_jpeg_roi train/val split 0.
F1: binary F1 of the positive class (malignant, GIST); OTU: macro F1 (micro F1 = accuracy).

    python scripts/synth_difficulty.py [--tree DIR] [--difficulty 0.5] [--epochs 20]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn


def load_busbra(root: pathlib.Path):
    cv = pd.read_csv(root / "BUSBRA/5-fold-cv.csv")
    paths = [root / "BUSBRA/Images" / f"{i}.png" for i in cv.ID]
    y = (cv.Pathology == "malignant").astype(int).to_numpy()
    test = (cv.kFold == 1).to_numpy()
    return paths, y, ~test, test, 2


def load_otu(root: pathlib.Path):
    paths, ys, tr = [], [], []
    for split in ("train", "val"):
        for line in (root / f"OTU_2d/{split}_cls.txt").read_text().splitlines():
            n, lab = line.split()
            paths.append(root / "OTU_2d/images" / n)
            ys.append(int(lab))
            tr.append(split == "train")
    tr = np.array(tr)
    return paths, np.array(ys), tr, ~tr, 8


def load_gist(root: pathlib.Path):
    ann = root / "usd514_jpeg_roi/annotations"
    paths, ys, tr = [], [], []
    for split in ("train", "val"):
        j = json.loads((ann / f"{split}_anno_crop_split_0.json").read_text())
        cat = {a["image_id"]: a["category_id"] for a in j["annotations"]}
        for im in j["images"]:
            paths.append(root / "usd514_jpeg_roi/images" / im["file_name"])
            ys.append(int(cat[im["id"]] == 2))
            tr.append(split == "train")
    tr = np.array(tr)
    return paths, np.array(ys), tr, ~tr, 2


def read(paths, size: int) -> torch.Tensor:
    ims = [cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA) for p in paths]
    return torch.from_numpy(np.stack(ims)[:, None].astype(np.float32) / 255.0)


def small_cnn(n_cls: int, width: int = 16) -> nn.Module:
    layers, c = [], 1
    for k in range(4):
        w = width * 2**k
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(c, n_cls))


def f1_scores(y, p, n_cls):
    f1 = []
    for c in range(n_cls):
        tp, fp, fn = ((p == c) & (y == c)).sum(), ((p == c) & (y != c)).sum(), ((p != c) & (y == c)).sum()
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return np.array(f1)


def summarise(y, p, n_cls):
    f1 = f1_scores(y, p, n_cls)
    return float((y == p).mean()), float(f1[1] if n_cls == 2 else f1.mean())


def train_eval(x, y, tr, te, n_cls, epochs: int, seed: int):
    torch.manual_seed(seed)
    model = small_cnn(n_cls)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * int(np.ceil(tr.sum() / 32)))
    xt, yt = x[tr], torch.from_numpy(np.ascontiguousarray(y[tr]))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for b in torch.randperm(len(xt), generator=g).split(32):
            xb = xt[b]
            flip = torch.rand(len(b), generator=g) < 0.5  # horizontal flips only: depth has a direction
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        p = torch.cat([model(xb).argmax(1) for xb in x[te].split(128)]).numpy().copy()
    return summarise(y[te], p, n_cls)


def chance(y, tr, te, n_cls, draws: int = 200):
    r = np.random.default_rng(0)
    freq = np.bincount(y[tr], minlength=n_cls) / tr.sum()
    res = np.array([summarise(y[te], r.choice(n_cls, te.sum(), p=freq), n_cls) for _ in range(draws)])
    majority = float((y[te] == np.argmax(freq)).mean())
    return res.mean(0), majority


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", help="existing synthetic tree (default: generate one in a temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=None, help="default: the generator's default")
    ap.add_argument("--n-busbra", type=int, default=600)
    ap.add_argument("--n-otu", type=int, default=800)
    ap.add_argument("--n-gist", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--size", type=int, default=128, help="network input size (px)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = None
    if a.tree:
        root = pathlib.Path(a.tree)
    else:
        from usfmae_lib.synthetic import generate_tree

        tmp = tempfile.TemporaryDirectory()
        root = pathlib.Path(tmp.name)
        t0 = time.perf_counter()
        generate_tree(root, seed=a.seed, profile="quick", progress=False, n_pretrain=0, n_videos=0, n_volumes=0,
                      n_annotated=0, n_busbra=a.n_busbra, n_otu=a.n_otu, n_gist=a.n_gist, difficulty=a.difficulty)
        print(f"generated eval sets in {time.perf_counter() - t0:.0f} s")
    diff = json.loads((root / "synth.json").read_text())["params"]["difficulty"]
    print(f"difficulty={diff}  small CNN from scratch, {a.epochs} epochs, {a.size}x{a.size} input, seed {a.seed}")
    print(f"{'set':8s} {'n train/test':>13s} {'acc':>6s} {'F1':>6s} | {'chance acc':>10s} {'chance F1':>9s} {'majority':>8s}")
    for name, loader, f1name in (("BUSBRA", load_busbra, "F1 malignant"), ("OTU_2d", load_otu, "macro F1"),
                                 ("GIST514", load_gist, "F1 GIST")):
        paths, y, tr, te, n_cls = loader(root)
        x = read(paths, a.size)
        t0 = time.perf_counter()
        acc, f1 = train_eval(x, y, tr, te, n_cls, a.epochs, a.seed)
        (cacc, cf1), maj = chance(y, tr, te, n_cls)
        print(f"{name:8s} {tr.sum():6d}/{te.sum():<6d} {acc:6.3f} {f1:6.3f} | {cacc:10.3f} {cf1:9.3f} {maj:8.3f}"
              f"   ({f1name}; {time.perf_counter() - t0:.0f} s)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
