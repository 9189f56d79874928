"""The `official` profile (the official code's recipe) against the `paper` profile (the text), the
honesty of their parameter files, and the stop on a missing ImageNet MAE start file."""
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from usfmae_lib import UsfmaeError, cli, mae, parameters, pretrain, runner, store

NOTEBOOKS = {step: parameters.NOTEBOOKS_DIR / f"{step}.py" for step in parameters.STEPS}

# The official code's values where they differ from the paper profile's (documented in
# params/official/03_mae_pretraining.yaml, README "Paper vs official code", docs/pretraining.md)
OFFICIAL_03 = dict(
    seed=42,
    model_overrides={},  # the reference config's 16 decoder heads (paper profile: the text's 8)
    pos_embed="fixed",  # the reference model's sin-cos tables (paper profile: the text's learnable ones)
    mask_ratio=0.75,
    blr_scaling=True,
    blr_batch=128,
    betas=[0.9, 0.999],
    decay_all=True,
    min_lr=1e-5,
    crop_scale=[0.5, 1.0],
    init_checkpoint=f"weights/{pretrain.IMAGENET_MAE_FILE}",
    precision="bf16",
)
OFFICIAL_02 = dict(interpolation="nearest",  # the code's Resize((224, 224), NEAREST)
                   cleaner="official")  # its get_combined_annotation_mask and clean_and_inpaint
# parameter files whose comments need not justify each value (05: another engineer's file)
UNCOMMENTED = {"05_finetuning"}


def _load(profile: str, step: str) -> dict:
    return yaml.safe_load((parameters.PARAMS_DIR / profile / f"{step}.yaml").read_text())


def _effective(profile: str, step: str) -> dict:
    """Every parameter of the notebook as the profile sets it (the profile's name left out)."""
    defaults = parameters.notebook_parameters(runner.read_notebook(NOTEBOOKS[step]), step)
    return {k: v for k, v in {**defaults, **_load(profile, step)}.items() if k != "profile"}


def _differences(step: str) -> dict:
    paper, official = _effective("paper", step), _effective("official", step)
    return {k: official[k] for k in official if official[k] != paper[k]}


def test_official_is_a_profile_with_a_file_per_notebook():
    assert "official" in parameters.PROFILES
    for step in parameters.STEPS:
        params = _load("official", step)
        assert params["profile"] == "official", step


def test_official_pretraining_differs_from_the_paper_in_the_code_values_only():
    assert _differences("03_mae_pretraining") == OFFICIAL_03
    official = pretrain.resolve_params(**{k: v for k, v in _effective("official", "03_mae_pretraining").items()
                                         if k in pretrain.DEFAULTS})
    paper = pretrain.resolve_params(**{k: v for k, v in _effective("paper", "03_mae_pretraining").items()
                                      if k in pretrain.DEFAULTS})
    assert pretrain.peak_lr(official, world=1) == pytest.approx(1e-3 * 128 / 256)  # the code's 5e-4
    assert pretrain.peak_lr(paper, world=1) == pytest.approx(1e-3)
    assert paper["model_overrides"] == {"decoder_num_heads": 8}  # the text's 8 decoder heads
    assert mae.CONFIGS[official["model"]]["decoder_num_heads"] == 16  # the reference config, unchanged
    assert paper["init_checkpoint"] is None and paper["mask_ratio"] == 0.25


def test_official_other_notebooks_repeat_the_paper_profile():
    assert _differences("02_preprocessing") == OFFICIAL_02
    for step in ("01_curation", "04_reconstruction", "05_finetuning", "06_results"):
        assert _differences(step) == {}, (
            f"params/official/{step}.yaml must repeat params/paper/{step}.yaml (copy it again)")


SOURCES = ("paper:", "official code:", "not stated", "not part of the recipe", "the paper's", "as the paper")


@pytest.mark.parametrize("profile", ["paper", "official"])
@pytest.mark.parametrize("step", [s for s in parameters.STEPS if s not in UNCOMMENTED])
def test_every_value_says_where_it_comes_from(profile, step):
    """Each value carries a comment: the paper's words, the official code's, or that neither
    states it and why it was chosen (a value too long for one line has its comment above it)."""
    lines = (parameters.PARAMS_DIR / profile / f"{step}.yaml").read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip() or line.startswith("#") or line.startswith("profile:"):
            continue
        comment = line.split("  # ", 1)[1] if "  # " in line else lines[n - 1].lstrip("# ")
        assert "  # " in line or lines[n - 1].startswith("#"), (
            f"params/{profile}/{step}.yaml: {line!r} has no comment saying where its value comes from")
        if "  # " in line:
            assert comment.startswith(SOURCES), f"params/{profile}/{step}.yaml: {line!r}"


def test_official_block_comments_cover_the_values_they_precede():
    text = (parameters.PARAMS_DIR / "official" / "03_mae_pretraining.yaml").read_text()
    lines = text.splitlines()
    for key in ("crop_scale:", "init_checkpoint:"):
        i = next(n for n, line in enumerate(lines) if line.startswith(key))
        assert lines[i - 1].startswith("#") and "official code" in "\n".join(lines[i - 6:i]), key
    assert pretrain.IMAGENET_MAE_URL in text


# ---------------------------------------------------------------------------- missing start file
TINY = dict(model=mae.CPU_CONFIG, img_size=32, batch_size=4, epochs=1, workers=0,
            model_overrides=dict(embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                                 decoder_num_heads=2))


def test_pretraining_without_the_imagenet_mae_file_stops_naming_it(clean_tree, tmp_path):
    store_dir = store.pack_store(clean_tree, tmp_path / "store", 32, progress=False, heldout_per_anatomy=0)
    missing = tmp_path / "weights" / pretrain.IMAGENET_MAE_FILE
    run_dir = tmp_path / "run"
    with pytest.raises(UsfmaeError) as err:
        pretrain.train(store_dir, run_dir, progress=False, init_checkpoint=str(missing), **TINY)
    message = str(err.value)
    assert str(missing.absolute()) in message and "does not exist" in message
    assert "facebookresearch/mae" in message and pretrain.IMAGENET_MAE_URL in message
    assert not (run_dir / "log.csv").exists() and not (run_dir / "checkpoints").exists()  # no work done


def test_the_cli_stops_before_packing_and_exits_2(clean_tree, tmp_path, capsys):
    args = ["pretrain", "-f", str(parameters.PARAMS_DIR / "official" / "03_mae_pretraining.yaml"),
            "--data", str(clean_tree), "--out", str(tmp_path), "--no-progress", "-p", f"model={mae.CPU_CONFIG}",
            "-p", "img_size=32", "-p", "batch_size=4", "-p", "epochs=1", "-p", "precision=fp32",
            "-p", f"init_checkpoint={tmp_path / 'nowhere' / pretrain.IMAGENET_MAE_FILE}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert pretrain.IMAGENET_MAE_FILE in err and "does not exist" in err and pretrain.IMAGENET_MAE_URL in err
    assert not (tmp_path / pretrain.STEP / "store" / "store.json").exists()  # nothing was packed


def test_the_check_passes_a_file_and_a_resumed_run(tmp_path):
    assert pretrain.check_init_checkpoint(None, tmp_path) is None
    with pytest.raises(UsfmaeError, match="is a folder, not a file"):
        pretrain.check_init_checkpoint(tmp_path, tmp_path / "run")
    with pytest.raises(UsfmaeError, match="local MAE checkpoint") as err:  # any other name: no ImageNet story
        pretrain.check_init_checkpoint(tmp_path / "mine.pth", tmp_path / "run")
    assert str((tmp_path / "mine.pth").absolute()) in str(err.value)
    (tmp_path / "mine.pth").write_bytes(b"\0")
    pretrain.check_init_checkpoint(tmp_path / "mine.pth", tmp_path / "run")  # present: no error
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / pretrain.CHECKPOINT).write_bytes(b"\0")
    pretrain.check_init_checkpoint(tmp_path / "gone.pth", resumed)  # a resume never reads the start file


def test_the_relative_default_path_is_resolved_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = _load("official", "03_mae_pretraining")["init_checkpoint"]
    with pytest.raises(UsfmaeError) as err:
        pretrain.check_init_checkpoint(default, tmp_path / "run")
    assert os.fspath(Path.cwd() / default) in str(err.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / default).write_bytes(b"\0")
    pretrain.check_init_checkpoint(default, tmp_path / "run")
