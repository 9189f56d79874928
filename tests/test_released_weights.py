"""The released USF-MAE weights, one command: a bare ViT-B/16 MAE state dict in the released layout
(the reference MAE's key names, no 'model' wrapper) runs notebooks 04-07 on a data root, with
curation, cleaning and pretraining skipped (notebook 07 runs what needs no pretraining run)."""
import pandas as pd
import pytest
import torch

from usfmae_lib import cli, mae, parameters, runner


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """A ViT-B/16 MAE (decoder 512 x 8) saved as the official code saves it: a raw state_dict."""
    torch.manual_seed(0)
    model = mae.build_model("mae_vit_base_patch16_dec512d8b")
    path = tmp_path_factory.mktemp("released") / "USF-MAE_100epochs.pth"
    torch.save(model.state_dict(), path)
    return path


def test_a_checkpoint_override_skips_curation_cleaning_and_pretraining():
    assert runner.default_steps(["checkpoint=w.pth", "data_root=d"]) == parameters.STEPS[3:]
    assert runner.default_steps(["seed=1"]) == parameters.STEPS


def test_released_weights_run_04_to_07_in_one_command(released_layout, synth_eval, tmp_path, capsys):
    out = tmp_path / "study"
    rc = cli.main(["reproduce", "--profile", "smoke", "--out", str(out), "-p", f"checkpoint={released_layout}",
                   "-p", f"data_root={synth_eval}",
                   # one dataset, one fold, one model: the path, at the cost CI can pay for a ViT-B
                   "-p", "datasets=[bus-bra]", "-p", "busbra_folds=[1]", "-p", "models=[usf-mae]",
                   "-p", "probe_models=[usf-mae]", "-p", "label_fractions=[1.0]", "-p", "n_images=1",
                   "-p", "mask_ratios=[0.25, 0.75]", "-p", "max_images=4"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "checkpoint given: skipping 01_curation, 02_preprocessing, 03_mae_pretraining" in printed
    assert not (out / "01_curation").exists() and not (out / "03_mae_pretraining").exists()
    assert (out / "04_reconstruction" / "mask_ratio_sweep.csv").is_file()
    results = pd.read_csv(out / "05_finetuning" / "results.csv")
    assert set(results["model"]) == {"usf-mae"} and results["init"].str.contains("USF-MAE_100epochs.pth").all()
    assert (out / "06_results" / "table2.md").is_file()
    # notebook 07: the frozen comparison runs; what needs notebook 03's run says why it is absent
    assert (out / "07_ablations" / "labels_pretrained_vs_random.csv").is_file()
    printed_07 = (out / "07_ablations" / "07_ablations.ipynb").read_text()
    assert "records no recipe (released weights)" in printed_07 and "records no step (released weights)" in printed_07
