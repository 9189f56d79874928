"""One way to call every step: `usfmae curate | clean | pretrain | finetune` take the notebook's
parameter names (--profile, -f, -p), show every default in --help, and say which form they need.
The whole step through the command (notebook 05 from `usfmae finetune --profile smoke`) runs in
tests/test_reproduce.py, over the smoke study's outputs."""
import pytest

from usfmae_lib import cli, parameters

STEPS = {"curate": "01_curation", "clean": "02_preprocessing", "pretrain": "03_mae_pretraining",
         "finetune": "05_finetuning"}


@pytest.mark.parametrize("command", sorted(STEPS))
def test_help_shows_defaults_and_the_notebook_parameters(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--profile" in text and "-f" in text and "-p" in text
    if command == "pretrain":  # its own flags are notebook 03's names, each with its default
        assert "--mask-ratio N (default 0.25)" in text and "--epochs N (default 100)" in text
        return
    assert "(default: " in text  # the command's own options
    source = parameters.parameters_source((parameters.NOTEBOOKS_DIR / f"{STEPS[command]}.py").read_text(), ".py")
    for line in source.splitlines():  # the notebook's parameters cell, every name with its default
        if line.strip():
            assert " ".join(line.split()) in text, line


@pytest.mark.parametrize("argv, says", [
    (["finetune"], "give --dataset, --root, --model for one cell"),
    (["finetune", "--dataset", "bus-bra", "--root", "x"], "give --model for one cell"),
    (["curate"], "give the dataset folders and --out OUT (or -f / -p / --profile"),
    (["clean"], "give IN_DIR_OR_MANIFEST and OUT_DIR (or -f / -p / --profile"),
    (["clean", "in", "out", "--out", "study"], "--out is the study folder of -f / -p / --profile"),
])
def test_a_command_without_its_inputs_says_which_form_needs_what(argv, says, capsys):
    assert cli.main(argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["finetune", "--profile", "smoke", "--dataset", "bus-bra", "--epochs", "3"], "--dataset, --epochs"),
    (["curate", "some/root", "-p", "seed=1"], "ROOTS"),
    (["clean", "-f", "params/smoke/02_preprocessing.yaml", "--no-ocr"], "--no-ocr"),
])
def test_the_one_piece_options_are_refused_beside_the_notebook_ones(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may run, nothing may be written
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{named}: not with -f / -p / --profile" in err and "-p KEY=VALUE" in err
    assert not any(tmp_path.iterdir())


def test_a_notebook_parameter_is_checked_like_usfmae_run(tmp_path, capsys):
    assert cli.main(["finetune", "--profile", "smoke", "-p", "epoch=3", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) epoch (from -p)" in err and "epochs" in err


def test_every_folder_of_evaluation_sets_is_called_data_root():
    """One name per folder concept: data_roots (notebook 01's pretraining roots), data_root (the
    folder holding BUSBRA/, OTU_2d/, usd514_jpeg_roi/) in every notebook that reads those sets."""
    names = {}
    for step in parameters.STEPS:
        text = (parameters.NOTEBOOKS_DIR / f"{step}.py").read_text()
        params = parameters.cell_parameters(parameters.parameters_source(text, ".py"))
        names[step] = {k for k in params if k.endswith(("root", "roots"))}
    assert names["01_curation"] == {"data_roots", "data_root"}
    for step in ("04_reconstruction", "05_finetuning", "07_ablations"):
        assert names[step] == {"data_root"}, (step, names[step])
    assert not (names["02_preprocessing"] | names["03_mae_pretraining"] | names["06_results"])
