"""The study's notebooks: twins in sync, no stored outputs, parameter files that fit them, and a
setup cell that makes them write to the same folders from any working folder."""

import ast
import json
import os

import pytest
import yaml

from usfmae_lib import runner, study

NOTEBOOKS = [runner.NOTEBOOKS_DIR / f"{step}.py" for step in runner.STEPS]


def test_every_step_has_both_twins():
    for py in NOTEBOOKS:
        assert py.exists(), py
        assert py.with_suffix(".ipynb").exists(), f"{py}: run jupytext --sync {py}"
    assert sorted(p.stem for p in runner.NOTEBOOKS_DIR.glob("*.ipynb")) == list(runner.STEPS)


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_twins_in_sync_and_ipynb_has_no_outputs(py):
    import jupytext

    ipynb = py.with_suffix(".ipynb")
    assert runner.notebook_difference(jupytext.read(py), jupytext.read(ipynb)) == ""
    stored = json.loads(ipynb.read_text())
    count = study.stored_outputs(stored)  # outputs, execution counts, widget state
    assert count == 0, runner.stored_outputs_message(ipynb, count)


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_the_common_names(py):
    defaults = runner.notebook_parameters(runner.read_notebook(py), str(py))
    assert {"profile", "out_dir", "seed"} <= set(defaults)
    assert defaults["profile"] == runner.DEFAULT_PROFILE


@pytest.mark.parametrize("profile", runner.PROFILES)
def test_every_profile_has_a_valid_parameter_file_per_step(profile):
    for py in NOTEBOOKS:
        params_file = runner.PARAMS_DIR / profile / f"{py.stem}.yaml"
        assert params_file.exists(), params_file
        params = yaml.safe_load(params_file.read_text())
        assert params["profile"] == profile
        assert "out_dir" not in params, f"{params_file}: the output folder is set by --out"
        defaults = runner.notebook_parameters(runner.read_notebook(py), str(py))
        runner.check_params(params, defaults, str(py), {k: str(params_file) for k in params})
    extra = {p.stem for p in (runner.PARAMS_DIR / profile).glob("*.yaml")} - set(runner.STEPS)
    assert not extra, f"parameter files for no notebook: {extra}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_settles_parameters_first_from_any_folder(py, monkeypatch):
    """The first cell after the parameters calls study.setup before using any parameter; run with
    the working folder in notebooks/ (JupyterLab started there), the default out_dir is the
    repository's outputs/quick, never notebooks/outputs/."""
    nb = runner.read_notebook(py)
    index = runner.parameters_cell(nb, str(py))
    params, setup = nb.cells[index].source, nb.cells[index + 1].source
    call = f'STEP = "{py.stem}"\nstudy.setup(globals(), STEP)'
    assert call in setup, f"{py}: its first setup cell must hold\n{call}\n(and import study from usfmae_lib)"
    before = setup[:setup.index(call)]
    names = {node.id for node in ast.walk(ast.parse(before)) if isinstance(node, ast.Name)}
    used = sorted(names & set(runner.notebook_parameters(nb, str(py))))
    assert not used, f"{py}: parameters used before study.setup: {used}"
    monkeypatch.chdir(runner.NOTEBOOKS_DIR)
    namespace = {}
    exec(params, namespace)
    exec(f"from usfmae_lib import study\n{call}", namespace)
    assert namespace["out_dir"] == os.path.join(runner.REPO_ROOT, "outputs", "quick")


def test_exercises_ask_then_answer_in_03_04_and_07():
    """Issue 25: each teaching notebook has a cell tagged `exercise` that the reader changes and runs,
    with the question in the markdown cell above it and the expected outcome in the one below."""
    found = {}
    for py in NOTEBOOKS:
        cells = runner.read_notebook(py).cells
        for i, cell in enumerate(cells):
            if "exercise" in cell.metadata.get("tags", []):
                assert cell.cell_type == "code", f"{py.name}: an exercise is a code cell to change and run"
                assert cells[i - 1].cell_type == "markdown" and "Exercise" in cells[i - 1].source, py.name
                after = cells[i + 1]
                assert after.cell_type == "markdown" and after.source.lstrip().startswith("*Answer.*"), py.name
                assert "ANSWER" not in after.source, f"{py.name}: the answer is still a placeholder"
                found[py.stem] = found.get(py.stem, 0) + 1
    assert {"03_mae_pretraining", "04_reconstruction", "07_ablations"} <= set(found), found
