"""Fixtures shared by several test files."""
import csv
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import synthetic

# Under pytest-xdist (README's test command) each worker, and every kernel or command it starts,
# computes on one thread: two workers with torch's default of one thread per core would put twice
# as many busy threads as cores on the machine, and OpenMP threads that wait by spinning then slow
# every step. A single test run (no workers) keeps torch's default.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Real ultrasound samples live beside a development checkout (../shared/data/real), never in the
# repository: a user's clone has none, and every test that reads them skips and says why.
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def statuses(index_path):
    """{step: status} from the table at the top of a `usfmae reproduce` index.md."""
    found = re.findall(r"^\| \[(\w+)\]\([^)]*\) \| ([^|]+) \|", index_path.read_text(), flags=re.M)
    return {step: status.strip() for step, status in found}


@pytest.fixture(scope="session")
def real():
    """real("busi_sample") -> that real-data sample's folder, or skip the test naming what is absent."""
    def get(name: str) -> Path:
        path = REAL / name
        if not path.exists():
            pytest.skip(f"{path} is absent (real-data samples live beside a development checkout, not in it)")
        return path
    return get


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """48 fake scans as notebook 02 writes them: clean/<dataset>/*.png + index.csv (a grey disc on
    black, 40 px); also a folder dataset ROOT/<class>/ with classes busi and echo."""
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        dataset = ("busi", "echo")[i % 2]
        (root / dataset).mkdir(exist_ok=True)
        img = np.zeros((40, 40), np.uint8)
        cv2.circle(img, tuple(int(v) for v in rng.integers(8, 32, 2)), int(rng.integers(3, 12)), 200, -1)
        rel = f"{dataset}/img_{i:03d}.png"
        cv2.imwrite(str(root / rel), img)
        rows.append(dict(path=rel, dataset=dataset, anatomy=("breast", "heart")[i % 2], source=rel, frame=0))
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return root


@pytest.fixture(scope="session")
def synth_eval(tmp_path_factory):
    """The three evaluation sets of the synthetic tree in their published layouts, nothing else
    (BUSBRA/, OTU_2d/, usd514_jpeg_roi/). Read-only: tests copy or link what they change."""
    root = tmp_path_factory.mktemp("synth_eval")
    synthetic.generate_tree(root, seed=3, profile="smoke", workers=1, progress=False, n_pretrain=0,
                            n_videos=0, n_volumes=0, n_annotated=0)
    return root


@pytest.fixture(scope="session")
def make_recon_out():
    """make_recon_out(out, scans, config, img_size, overrides) -> out: what notebook 04 reads, made by
    hand: scans ({anatomy: [uint8 images]}) as notebook 02's clean tree with index.csv, and an
    untrained checkpoint of `config` (with `overrides`) where notebook 03 leaves one."""
    import torch

    from usfmae_lib import reconstruction
    from usfmae_lib.mae import build_model

    def make(out: Path, scans: dict, config: str, img_size: int, overrides: dict) -> Path:
        clean = out / "02_preprocessing" / "clean"
        rows = []
        for anatomy, images in scans.items():
            for k, img in enumerate(images):
                rel = f"synthetic/{anatomy}_{k}.png"
                (clean / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(clean / rel), img)
                rows.append(dict(path=rel, dataset="synthetic", anatomy=anatomy, source=rel, frame=0))
        with open(clean / "index.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        torch.manual_seed(0)
        ckpt = out / reconstruction.DEFAULT_CHECKPOINT
        ckpt.parent.mkdir(parents=True)
        torch.save({"model": build_model(config, img_size=img_size, **overrides).state_dict(), "step": 0,
                    "params": {"model": config, "img_size": img_size, "norm_pix_loss": False,
                               "model_overrides": overrides}}, ckpt)
        return out
    return make
