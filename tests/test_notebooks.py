"""The study's notebooks: twins in sync, no stored outputs, parameter files that fit them."""

import json

import pytest
import yaml

from usfmae_lib import runner

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
    for cell in stored["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{ipynb}: stored outputs; clear them"
            assert cell["execution_count"] is None, f"{ipynb}: stored execution count"


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
