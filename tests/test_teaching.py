"""The shipped teaching MAE (usfmae_lib/data/teaching_mae): safe to load, described by its card,
and worth showing: on synthetic scans it never saw, its masked-patch error at the mask ratio it
was trained at is below both a flat fill and OpenCV's inpainting, anatomy by anatomy."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from usfmae_lib import checkpoints, mae, reconstruction, teaching
from usfmae_lib.synth_scenes import ANATOMIES

PER_ANATOMY = 12  # held-out scans per anatomy: seconds to render, enough for paired intervals


def test_weights_load_without_pickle_and_match_the_card():
    path = reconstruction.teaching_checkpoint()
    assert checkpoints.file_kind(path) == "safetensors"  # no pickle anywhere in the file
    card = json.loads((teaching.FOLDER / "card.json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    assert path.stat().st_size <= 25e6
    model = mae.load_model(path)  # the record in its metadata rebuilds the architecture
    assert model.patch_size == teaching.RECIPE["model_overrides"]["patch_size"]
    assert model.patch_embed.img_size[0] == teaching.RECIPE["img_size"]
    assert model.trained_params["mask_ratio"] == teaching.RECIPE["mask_ratio"]
    text = (teaching.FOLDER / teaching.CARD).read_text()
    assert card["sha256"] in text and "usfmae teaching-mae" in text


@pytest.fixture(scope="module")
def heldout():
    """Scans rendered with the study's seed (0); the teaching corpus used another (1)."""
    assert teaching.CORPUS["seed"] != 0
    return teaching.heldout_scans(PER_ANATOMY, seed=0)


def test_it_beats_flat_fill_and_inpainting_on_unseen_scans(heldout):
    anatomies, images = heldout
    model = mae.load_model(reconstruction.teaching_checkpoint()).eval()
    table = teaching.evaluate(model, anatomies, images)
    lower = table[table.verdict == "lower error"]
    for baseline in reconstruction.BASELINES:
        rows = table[(table.comparison.str.contains(baseline)) & (table.dataset != reconstruction.ALL)]
        assert len(rows) == len(ANATOMIES)
        wins = lower[lower.comparison.str.contains(baseline) & (lower.dataset != reconstruction.ALL)]
        assert len(wins) >= 8, rows[["dataset", "model", "other", "low", "high", "verdict"]]


def test_an_untrained_model_of_the_same_shape_does_not(heldout):
    """The test above can fail: the same evaluation of random weights loses to inpainting."""
    anatomies, images = heldout
    torch.manual_seed(0)
    untrained = mae.build_model(teaching.RECIPE["model"], img_size=teaching.RECIPE["img_size"],
                                **teaching.RECIPE["model_overrides"]).eval()
    table = teaching.evaluate(untrained, anatomies, images)
    rows = table[table.comparison.str.contains("inpainting") & (table.dataset != reconstruction.ALL)]
    assert (rows.verdict == "lower error").sum() == 0


def test_heldout_scans_are_seeded_and_cover_every_anatomy():
    a1, x1 = teaching.heldout_scans(1, seed=0)
    a2, x2 = teaching.heldout_scans(1, seed=0)
    assert sorted(a1) == sorted(ANATOMIES) and np.array_equal(x1, x2)
    assert x1.dtype == np.uint8 and x1.shape[1:] == (teaching.RECIPE["img_size"],) * 2 + (3,)
