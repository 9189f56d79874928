"""The study's notebooks: twins in sync, no stored outputs, parameter files that fit them, a
setup cell that makes them write to the same folders from any working folder, and every name they
use defined in them, so that they run as plain Python too (`python notebooks/NN_name.py`)."""

import ast
import builtins
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from usfmae_lib import parameters, runner, study, synthetic

NOTEBOOKS = [parameters.NOTEBOOKS_DIR / f"{step}.py" for step in parameters.STEPS]


def test_every_step_has_both_twins():
    for py in NOTEBOOKS:
        assert py.exists(), py
        assert py.with_suffix(".ipynb").exists(), f"{py}: run jupytext --sync {py}"
    assert sorted(p.stem for p in parameters.NOTEBOOKS_DIR.glob("*.ipynb")) == list(parameters.STEPS)


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
    defaults = parameters.notebook_parameters(runner.read_notebook(py), str(py))
    assert {"profile", "out_dir", "seed"} <= set(defaults)
    assert defaults["profile"] == parameters.DEFAULT_PROFILE


@pytest.mark.parametrize("profile", parameters.PROFILES)
def test_every_profile_has_a_valid_parameter_file_per_step(profile):
    for py in NOTEBOOKS:
        params_file = parameters.PARAMS_DIR / profile / f"{py.stem}.yaml"
        assert params_file.exists(), params_file
        params = yaml.safe_load(params_file.read_text())
        assert params["profile"] == profile
        assert "out_dir" not in params, f"{params_file}: the output folder is set by --out"
        defaults = parameters.notebook_parameters(runner.read_notebook(py), str(py))
        parameters.check_params(params, defaults, str(py), {k: str(params_file) for k in params})
    extra = {p.stem for p in (parameters.PARAMS_DIR / profile).glob("*.yaml")} - set(parameters.STEPS)
    assert not extra, f"parameter files for no notebook: {extra}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_settles_parameters_first_from_any_folder(py, monkeypatch):
    """The first cell after the parameters calls study.setup before using any parameter; run with
    the working folder in notebooks/ (JupyterLab started there), the default out_dir is the
    repository's outputs/quick, never notebooks/outputs/."""
    nb = runner.read_notebook(py)
    index = parameters.parameters_cell(nb, str(py))
    params, setup = nb.cells[index].source, nb.cells[index + 1].source
    call = f'STEP = "{py.stem}"\nstudy.setup(globals(), STEP)'
    assert call in setup, f"{py}: its first setup cell must hold\n{call}\n(and import study from usfmae_lib)"
    before = setup[:setup.index(call)]
    names = {node.id for node in ast.walk(ast.parse(before)) if isinstance(node, ast.Name)}
    used = sorted(names & set(parameters.notebook_parameters(nb, str(py))))
    assert not used, f"{py}: parameters used before study.setup: {used}"
    monkeypatch.chdir(parameters.NOTEBOOKS_DIR)
    namespace = {}
    exec(params, namespace)
    exec(f"from usfmae_lib import study\n{call}", namespace)
    assert namespace["out_dir"] == os.path.join(parameters.REPO_ROOT, "outputs", "quick")


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


def _undefined_names(source: str) -> list[str]:
    """'line: name' for each name a module reads that nothing in it binds (an import, an assignment,
    a def, an argument, a loop or with target, ...) and that is no builtin. Any binding anywhere
    counts, so a name bound in one function and read in another passes: this finds the name
    IPython provides and plain Python does not (`display` without its import), not every slip."""
    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return [f"{node.lineno}: {node.id}" for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_name_a_notebook_uses_is_defined_in_it(py):
    assert _undefined_names("display(1)\n") == ["1: display"]  # what a notebook once did
    undefined = _undefined_names(py.read_text())
    assert not undefined, f"{py}: names used but never imported or defined (IPython gives some; plain Python none): " \
                          f"{undefined}"


def test_notebook_02_runs_as_plain_python_at_the_smoke_profile(tmp_path):
    """`python notebooks/02_preprocessing.py` with `profile = "smoke"` and an out_dir of one's own
    typed into its parameters cell, as README's "Notebooks in JupyterLab" says: study.setup applies
    params/smoke/02_preprocessing.yaml to the rest, as in a live kernel. Its input is the synthetic
    tree notebook 01 leaves (02 cleans its still images when there is no manifest)."""
    out = tmp_path / "study"
    synthetic.generate_tree(synthetic.tree_dir(out), seed=0, profile="smoke", workers=2, progress=False,
                            n_videos=0, n_volumes=0, n_busbra=0, n_otu=0, n_gist=0)  # stills and annotated set
    text = (parameters.NOTEBOOKS_DIR / "02_preprocessing.py").read_text()
    for name, value in (("profile", "smoke"), ("out_dir", str(out))):
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, count=1, flags=re.M)
        assert n == 1, name
    script = tmp_path / "02_preprocessing.py"
    script.write_text(text)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(parameters.REPO_ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "profile smoke: applied params/smoke/02_preprocessing.yaml (" in proc.stdout
    assert "image_size=64" in proc.stdout and "kept your cell's" not in proc.stdout, proc.stdout[:2000]
    step = out / "02_preprocessing"
    assert len((step / "clean" / "index.csv").read_text().splitlines()) == 1 + 40  # the smoke tree's 40 stills
    assert (step / "fig2_annotation_removal.png").stat().st_size > 0
    print(f"notebook 02 as plain Python: {time.perf_counter() - start:.0f} s")
