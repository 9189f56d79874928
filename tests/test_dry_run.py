"""`usfmae reproduce --dry-run`: the paper profile's architectures and code paths, a step or two
each, on a small synthetic tree (params/dry_run/, docs/dry_run.md).

The runner's handling of the dry-run files is checked on two fake notebooks (fast); the real
dry run of the paper profile runs once, end to end, through the command (about 6 minutes on
2 CPU cores), and its outputs are checked: a ViT-B/16 MAE with the 512 x 8 decoder at 224 px,
every paper model fine-tuned and probed at 224 px, a label fraction below 1, the tables.
"""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from conftest import statuses
from usfmae_lib import UsfmaeError, checkpoints, mae, parameters, runner

DRY_DIR = parameters.PARAMS_DIR / parameters.DRY_RUN

STEP_NOTEBOOK = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = "outputs/smoke"
value = 1
size = 64

# %%
from pathlib import Path
step_dir = Path(out_dir) / "{step}"
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "numbers.csv").write_text(f"value,size\\n{{value}},{{size}}\\n")
'''
STEPS = ("a_first", "b_second")


@pytest.fixture
def study(tmp_path, monkeypatch):
    """Two fake steps; the profile sets value 1 and size 64, the dry run shrinks a_first's size."""
    monkeypatch.setattr(runner, "_code_fingerprint", lambda: "code-v1")
    notebooks, params, dry = tmp_path / "notebooks", tmp_path / "params" / "paper", tmp_path / "params" / "dry_run"
    for folder in (notebooks, params, dry):
        folder.mkdir(parents=True)
    for step in STEPS:
        (notebooks / f"{step}.py").write_text(STEP_NOTEBOOK.format(step=step))
        (params / f"{step}.yaml").write_text("profile: paper\nvalue: 1\n")
    (dry / "a_first.yaml").write_text("size: 8  # smaller for the dry run\n")  # b_second has no dry-run file
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _reproduce(study, **kwargs):
    return runner.reproduce("paper", kwargs.pop("out_dir", None), steps=STEPS, notebooks_dir=study / "notebooks",
                            params_dir=study / "params", progress=False, **kwargs)


def _numbers(out, step):
    return pd.read_csv(out / step / "numbers.csv").iloc[0].to_dict()


def test_dry_run_applies_its_file_after_the_profile_and_before_overrides(study, capsys):
    index = _reproduce(study, dry_run=True)
    out = study / "outputs" / "paper-dry-run"  # never the real run's folder
    assert index == out / "index.md"
    assert _numbers(out, "a_first") == {"value": 1, "size": 8}
    assert _numbers(out, "b_second") == {"value": 1, "size": 64}  # no dry-run file: the profile's values
    printed = capsys.readouterr().out
    assert "[a_first] dry run: shrinks" in printed and "size: 64 -> 8 (smaller for the dry run)" in printed
    assert "[b_second] dry run: as profile paper" in printed
    text = index.read_text()
    assert "(DRY RUN)" in text.splitlines()[0] and "--dry-run" in text
    _reproduce(study, dry_run=True, overrides=["size=4"], force=True)
    assert _numbers(out, "a_first")["size"] == 4  # -p comes last
    assert not (study / "outputs" / "paper").exists()


def test_the_dry_run_file_is_part_of_the_fingerprint(study):
    _reproduce(study, dry_run=True)
    assert statuses(_reproduce(study, dry_run=True)) == {s: "skipped (unchanged)" for s in STEPS}
    (study / "params" / "dry_run" / "a_first.yaml").write_text("size: 16\n")
    assert statuses(_reproduce(study, dry_run=True)) == {"a_first": "ran", "b_second": "ran"}  # b is downstream
    assert _numbers(study / "outputs" / "paper-dry-run", "a_first")["size"] == 16
    # a real run into the same folder is another computation: every step with a dry-run file reruns
    out = study / "outputs" / "paper-dry-run"
    assert statuses(_reproduce(study, out_dir=out)) == {"a_first": "ran", "b_second": "ran"}
    assert _numbers(out, "a_first")["size"] == 64


def test_a_dry_run_file_that_does_not_fit_its_notebook_stops_before_any_step(study):
    (study / "params" / "dry_run" / "b_second.yaml").write_text("n_images: 1\n")
    with pytest.raises(UsfmaeError, match=r"unknown parameter\(s\) n_images .*dry_run.*b_second.yaml"):
        _reproduce(study, dry_run=True)
    assert not (study / "outputs" / "paper-dry-run" / "a_first").exists()


def test_the_dry_run_files_fit_every_notebook_and_only_shrink():
    """Each file names real parameters with the right types, never sets the profile, and says why."""
    assert sorted(p.stem for p in DRY_DIR.glob("*.yaml")) == sorted(s for s in parameters.STEPS if s != "06_results")
    for path in DRY_DIR.glob("*.yaml"):
        nb = runner.read_notebook(parameters.NOTEBOOKS_DIR / f"{path.stem}.py")
        defaults = parameters.notebook_parameters(nb, path.stem)
        params, origin = parameters.load_params([path])
        parameters.check_params(params, defaults, path.stem, origin)
        assert "profile" not in params and "out_dir" not in params, path
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                assert "  # " in line, f"{path}: {line!r} does not say why"
    paper = yaml.safe_load((parameters.PARAMS_DIR / "paper" / "05_finetuning.yaml").read_text())
    dry = yaml.safe_load((DRY_DIR / "05_finetuning.yaml").read_text())
    assert "models" not in dry and "probe_models" not in dry and "img_size" not in dry  # the paper's own
    assert set(dry["lrs"]) <= set(paper["lrs"]) and set(dry["batch_sizes"]) <= set(paper["batch_sizes"])
    assert "model" not in yaml.safe_load((DRY_DIR / "03_mae_pretraining.yaml").read_text())


def test_reproduce_help_documents_dry_run():
    result = subprocess.run([sys.executable, "-m", "usfmae_lib.cli", "reproduce", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert "--dry-run" in help_text and "params/dry_run/<notebook>.yaml" in help_text
    assert "outputs/<profile>-dry-run/" in help_text


# ---------------------------------------------------------------------------- the real dry run
@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    """`usfmae reproduce --profile paper --dry-run` once, through the command (about 6 minutes on 2 cores).
    The 1.7 GB of ViT-B checkpoints are deleted afterwards; everything else stays for inspection."""
    out = tmp_path_factory.mktemp("paper") / "dry"
    command = [sys.executable, "-m", "usfmae_lib.cli", "reproduce", "--profile", "paper", "--dry-run",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    yield out, result
    shutil.rmtree(out / "03_mae_pretraining" / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "03_mae_pretraining" / "store", ignore_errors=True)


def test_paper_dry_run_runs_every_step_and_says_what_it_shrank(paper_dry_run):
    out, result = paper_dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert statuses(out / "index.md") == {step: "ran" for step in parameters.STEPS}
    assert "(DRY RUN)" in (out / "index.md").read_text().splitlines()[0]
    for step in parameters.STEPS:
        assert f"[{step}] dry run: " in result.stdout
    assert "synthetic_profile: '' -> 'smoke'" in result.stdout
    assert "max_steps: 0 -> 2" in result.stdout and "max_steps: 0 -> 1" in result.stdout
    assert "missing_weights: 'skip' -> 'random'" in result.stdout


def test_paper_dry_run_pretrains_the_papers_vit_b(paper_dry_run):
    out, result = paper_dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    run = out / "03_mae_pretraining"
    ckpt = run / "checkpoints" / "checkpoint-last.pth"
    raw = checkpoints.read_checkpoint(ckpt)
    params = raw["params"]
    assert params["model"] == "mae_vit_base_patch16_dec512d8b" and params["img_size"] == 224
    assert params["model_overrides"] == {"decoder_num_heads": 8} and params["mask_ratio"] == 0.25
    assert params["max_steps"] == 2 and raw["step"] == 2 and params["epochs"] == 100  # the full schedule, cut
    model = mae.load_model(ckpt)
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.img_size == (224, 224)
    assert len(model.blocks) == 12 and model.cls_token.shape[-1] == 768 and model.blocks[0].attn.num_heads == 12
    assert len(model.decoder_blocks) == 8 and model.decoder_embed.out_features == 512
    assert model.decoder_blocks[0].attn.num_heads == 8
    # the text's "learnable positional encodings": trained, so no longer the sin-cos tables they start as
    assert params["pos_embed"] == "learnable" and model.pos_embed.requires_grad
    start = mae.build_model(params["model"], 224, pos_embed="learnable", **params["model_overrides"])
    assert not torch.equal(model.pos_embed, start.pos_embed)
    assert pd.read_csv(run / "log.csv")["step"].tolist() == [1, 2]
    executed = (run / "03_mae_pretraining.ipynb").read_text()
    assert "(precision requested: auto)" in executed  # and what actually ran: fp32 on a CPU, bf16 on a GPU
    assert ("bf16 autocast" if torch.cuda.is_available() else "in fp32") in executed
    assert (out / "04_reconstruction" / "mask_ratio_sweep.csv").exists()
    assert (out / "04_reconstruction" / "attention_last_layer.png").exists()


def test_paper_dry_run_fine_tunes_and_probes_every_paper_model_at_224(paper_dry_run):
    out, result = paper_dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    paper = yaml.safe_load((parameters.PARAMS_DIR / "paper" / "05_finetuning.yaml").read_text())
    step = out / "05_finetuning"
    results = pd.read_csv(step / "results.csv")
    assert set(results["model"]) == set(paper["models"])
    assert set(results["dataset"]) == set(paper["datasets"])
    assert (results["img_size"] == 224).all() and (results["steps_run"] == 1).all()
    baselines = results[results["model"].isin(["vit-b", "resnet-50", "vgg-19"])]
    assert baselines["init"].str.startswith(("random: no ImageNet weights", "imagenet-1k")).all()
    probe = pd.read_csv(step / "probe.csv")
    assert set(probe["model"]) == set(paper["probe_models"]) and set(probe["dataset"]) == set(paper["datasets"])
    curve = pd.read_csv(step / "label_efficiency.csv")
    assert (curve["fraction"] < 1).any() and {"usf-mae", "scratch"} <= set(curve["model"])
    setup = json.loads((step / "setup.json").read_text())
    assert setup["max_steps"] == 1 and setup["img_size"] == 224 and setup["profile"] == "paper"
    table2 = (out / "06_results" / "table2.md").read_text()
    for title in ("USF-MAE", "ViT-Base", "ResNet-50", "VGG-19", "RANDOM INIT"):
        assert title in table2
    assert (out / "06_results" / "discussion.md").read_text().startswith("- DRY RUN")
    assert (out / "06_results" / "fig3_pipeline.png").stat().st_size > 10_000  # Fig. 3, from this run's records
