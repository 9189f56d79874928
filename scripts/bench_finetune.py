"""Time the fine-tuning step: training images/s per model and size, on this machine.

    python scripts/bench_finetune.py --sizes 32 64 112 --models usf-mae scratch resnet-50 vit-b vgg-19
    python scripts/bench_finetune.py --sizes 64 80 112 --models scratch --depths 12 6 --threads 1

usf-mae / scratch use the tiny CPU config (mae_vit_tiny_patch16_dec128d2b) with random weights:
speed does not depend on the weights. Baselines start from random weights (none downloaded).
Reports seconds to build the model and training images/s (augmentation + forward + backward +
AdamW step) over a few steps after one warm-up step. Note the machine's load beside the numbers.
"""
import argparse
import os
import time

import torch

from usfmae_lib import classifiers, mae
from usfmae_lib import finetune as ft
from usfmae_lib.store import N_AUG, augment_batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 112])
    p.add_argument("--models", nargs="+", default=["scratch", "resnet-50", "vit-b", "vgg-19"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--depths", type=int, nargs="+", default=[12],
                   help="encoder blocks of usf-mae / scratch (the quick profile: 6; ViT-Ti: 12)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    runs = [(size, name, depth) for size in args.sizes for name in args.models
            for depth in (args.depths if name in ("usf-mae", "scratch") else [None])]
    for size, name, depth in runs:
        t0 = time.time()
        if depth is None:
            model, _, _ = classifiers.build_classifier(name, 2, size)
        else:
            model = classifiers.mae_vit(mae.CPU_CONFIG, 2, size, overrides={"depth": depth})
        build = time.time() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
        labels = torch.randint(0, 2, (args.batch,))
        cfg = ft.make_augment(ft.TrainConfig(img_size=size))
        for step in range(args.steps + 1):
            if step == 1:
                t0 = time.time()
            x = augment_batch(images.permute(0, 2, 3, 1), torch.rand(args.batch, N_AUG), cfg, size)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rate = args.batch * args.steps / (time.time() - t0)
        label = name if depth is None else f"{name} ({depth} blocks)"
        print(f"{size:4d} px  {label:20s} build {build:5.1f} s   train {rate:7.1f} images/s")


if __name__ == "__main__":
    main()
