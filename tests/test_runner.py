"""The papermill runner: parameters are checked, failures are named, the right kernel runs."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from usfmae_lib import UsfmaeError, cli, parameters, runner, study

# A notebook in the study's format: one parameters cell, one cell that makes a figure and a
# table, one that fails on demand, one that records which Python ran it.
PROBE_NOTEBOOK = '''# %% [markdown]
# # probe

# %% tags=["parameters"]
profile = "smoke"
out_dir = "outputs/smoke"
n = 1  # an int
ratio = 0.5  # a float
name = "x"
flag = False
items = [1, 2]
path = None  # anything

# %%
import sys
from pathlib import Path
step_dir = Path(out_dir) / "probe"
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "figure.png").write_bytes(b"not really a png")
(step_dir / "table.csv").write_text(f"n,ratio,name\\n{n},{ratio},{name}\\n")

# %%
if n < 0:
    raise ValueError("n must be >= 0")

# %%
(step_dir / "kernel.json").write_text(__import__("json").dumps(
    {"executable": sys.executable, "types": [type(v).__name__ for v in (n, ratio, name, flag, items)]}))
'''


@pytest.fixture
def probe(tmp_path):
    nb = tmp_path / "notebooks" / "probe.py"
    nb.parent.mkdir()
    nb.write_text(PROBE_NOTEBOOK)
    return nb


def test_runs_with_parameters_in_this_interpreter(probe, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("n: 3\nname: from-yaml\n")
    result = runner.run_notebook(probe, [params], ["ratio=2", "flag=true"], tmp_path / "out", progress=False)
    assert result.executed == tmp_path / "out" / "probe" / "probe.ipynb"
    assert result.executed.exists()
    assert (tmp_path / "out" / "probe" / "table.csv").read_text().splitlines()[1] == "3,2.0,from-yaml"
    seen = json.loads((tmp_path / "out" / "probe" / "kernel.json").read_text())
    assert Path(seen["executable"]).resolve() == Path(sys.executable).resolve()
    assert seen["types"] == ["int", "float", "str", "bool", "list"]  # ratio=2 widened to float


def test_unknown_parameter_is_refused_listing_valid_names(probe, tmp_path):
    with pytest.raises(UsfmaeError) as err:
        runner.run_notebook(probe, overrides=["nn=3"], out_dir=tmp_path / "out", progress=False)
    message = str(err.value)
    assert "nn" in message
    for valid in ("flag", "items", "n", "name", "path", "ratio"):
        assert valid in message
    assert not (tmp_path / "out" / "probe" / "probe.ipynb").exists()  # refused before running


def test_unknown_parameter_in_yaml_names_the_file(probe, tmp_path):
    params = tmp_path / "typo.yaml"
    params.write_text("ration: 0.1\n")
    with pytest.raises(UsfmaeError, match="typo.yaml"):
        runner.run_notebook(probe, [params], out_dir=tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "override",
    ["n=abc", "n=1.5", "n=true", "flag=1", "ratio=fast", "name=[1]", "items=3"],
)
def test_wrong_type_is_refused(probe, tmp_path, override):
    with pytest.raises(UsfmaeError, match="must be"):
        runner.run_notebook(probe, overrides=[override], out_dir=tmp_path / "out", progress=False)


def test_none_default_accepts_any_value_and_any_value_accepts_none():
    defaults = {"path": None, "n": 1}
    assert parameters.check_params({"path": "a/b", "n": None}, defaults, "nb") == {"path": "a/b", "n": None}


def test_parse_value_reads_yaml_scalars_and_scientific_floats():
    assert parameters.parse_value("3") == 3
    assert parameters.parse_value("1e-3") == pytest.approx(1e-3)
    assert parameters.parse_value("true") is True
    assert parameters.parse_value("[0.25, 0.75]") == [0.25, 0.75]
    assert parameters.parse_value("hello") == "hello"
    assert parameters.parse_value("null") is None


def test_out_dir_is_set_by_the_runner_not_by_parameters(probe, tmp_path):
    with pytest.raises(UsfmaeError, match="--out"):
        runner.run_notebook(probe, overrides=["out_dir=/elsewhere"], out_dir=tmp_path / "out", progress=False)


def test_failing_cell_is_named(probe, tmp_path):
    with pytest.raises(UsfmaeError) as err:
        runner.run_notebook(probe, overrides=["n=-1"], out_dir=tmp_path / "out", progress=False)
    message = str(err.value)
    assert "cell 3" in message  # index in the source notebook: markdown, parameters, work, failing
    assert "ValueError: n must be >= 0" in message
    assert "if n < 0:" in message
    # The executed copy is kept, with the traceback, for the user to read.
    executed = nbformat.read(tmp_path / "out" / "probe" / "probe.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells for o in c.get("outputs", []))


def test_command_line_exit_codes(probe, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["run", str(probe), "--out", out, "-p", "n=-1"]) != 0
    assert "cell 3" in capsys.readouterr().err
    assert cli.main(["run", str(probe), "--out", out, "-p", "n=2"]) == 0


def test_installed_command_refuses_unknown_parameter_on_a_study_notebook():
    """Acceptance 2 of the foundation issue, through the real entry point."""
    notebook = parameters.NOTEBOOKS_DIR / "01_curation.ipynb"
    for bad, expect in (("no_such_param=1", "Valid parameters"), ("seed=abc", "must be int")):
        proc = subprocess.run(
            [sys.executable, "-m", "usfmae_lib.cli", "run", str(notebook), "-p", bad],
            capture_output=True, text=True,
        )
        assert proc.returncode != 0
        assert expect in proc.stderr
        if bad.startswith("no_such"):
            for valid in parameters.notebook_parameters(runner.read_notebook(notebook)):
                assert valid in proc.stderr


def test_out_of_sync_twins_are_refused(tmp_path):
    import jupytext

    py = tmp_path / "nb.py"
    py.write_text(PROBE_NOTEBOOK)
    jupytext.write(jupytext.read(py), tmp_path / "nb.ipynb")
    runner.read_notebook(tmp_path / "nb.ipynb")  # in sync: fine
    py.write_text(PROBE_NOTEBOOK.replace("n = 1", "n = 2"))
    with pytest.raises(UsfmaeError, match="jupytext --sync"):
        runner.read_notebook(tmp_path / "nb.ipynb")


def test_parameters_cell_must_be_unique_and_literal(tmp_path):
    two = tmp_path / "two.py"
    two.write_text('# %% tags=["parameters"]\na = 1\n\n# %% tags=["parameters"]\nb = 2\n')
    with pytest.raises(UsfmaeError, match="exactly one"):
        parameters.notebook_parameters(runner.read_notebook(two), "two")
    computed = tmp_path / "computed.py"
    computed.write_text('# %% tags=["parameters"]\na = len("abc")\n')
    with pytest.raises(UsfmaeError, match="literal"):
        parameters.notebook_parameters(runner.read_notebook(computed), "computed")


# A notebook that reports what its setup cell settled (study.setup under papermill).
SETTLED_NOTEBOOK = '''# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
n_images = 20
data_root = None
clean_dir = ""
interactive = None

# %%
import json
from pathlib import Path
from usfmae_lib import study

STEP = "04_reconstruction"  # a real step: were params/smoke/04_reconstruction.yaml applied, n_images would be 2
study.setup(globals(), STEP)
step_dir = Path(out_dir) / "settled"
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "settled.json").write_text(json.dumps(dict(
    out_dir=out_dir, n_images=n_images, data_root=data_root, clean_dir=clean_dir, interactive=interactive)))
'''


def test_under_usfmae_run_injected_values_win_and_paths_resolve(tmp_path, monkeypatch):
    """Run from notebooks/ (as from a terminal opened there): the default output folder is the
    repository's outputs/, `-p` paths are relative to the current folder, YAML paths to the
    repository root; the notebook applies no profile file of its own; interactive is off."""
    notebooks = tmp_path / "repo" / "notebooks"
    notebooks.mkdir(parents=True)
    (notebooks / "settled.py").write_text(SETTLED_NOTEBOOK)
    (tmp_path / "clean.yaml").write_text("clean_dir: some/clean\n")
    monkeypatch.setattr(parameters, "NOTEBOOKS_DIR", notebooks)
    monkeypatch.chdir(notebooks)
    result = runner.run_notebook(notebooks / "settled.py", [tmp_path / "clean.yaml"],
                                 ["profile=smoke", "n_images=20", "data_root=rel/data"], progress=False)
    assert result.step_dir == tmp_path / "repo" / "outputs" / "smoke" / "settled"
    settled = json.loads((result.step_dir / "settled.json").read_text())
    assert settled == {"out_dir": str(tmp_path / "repo" / "outputs" / "smoke"), "n_images": 20,
                       "data_root": str(notebooks / "rel" / "data"),
                       "clean_dir": str(parameters.REPO_ROOT / "some" / "clean"), "interactive": False}
    assert parameters.MARKER not in result.params
    assert not (notebooks / "outputs").exists()


def test_output_folder_is_never_inside_notebooks(tmp_path, monkeypatch):
    notebooks = tmp_path / "repo" / "notebooks"
    (notebooks / "sub").mkdir(parents=True)
    monkeypatch.setattr(parameters, "NOTEBOOKS_DIR", notebooks)
    monkeypatch.chdir(notebooks / "sub")
    assert runner.output_folder(None, "quick") == tmp_path / "repo" / "outputs" / "quick"
    with pytest.raises(UsfmaeError, match="outputs never go beside the notebooks"):
        runner.output_folder("out", "quick")  # --out relative to the current folder, here inside notebooks/
    monkeypatch.chdir(tmp_path)
    assert runner.output_folder(None, "quick") == tmp_path / "outputs" / "quick"
    assert runner.output_folder("out", "quick") == tmp_path / "out"
    with pytest.raises(UsfmaeError, match="outputs never go beside the notebooks"):
        runner.output_folder(notebooks / "outputs", "quick")


def test_stored_outputs_in_an_ipynb_twin_are_reported_with_the_fix(tmp_path, capsys):
    import jupytext

    py, ipynb = tmp_path / "nb.py", tmp_path / "nb.ipynb"
    py.write_text(PROBE_NOTEBOOK)
    jupytext.write(jupytext.read(py), ipynb)
    runner.read_notebook(py)
    assert "stores outputs" not in capsys.readouterr().err
    stored = json.loads(ipynb.read_text())
    stored["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "saved from the lab\n"}]
    stored["cells"][2]["execution_count"] = 1
    ipynb.write_text(json.dumps(stored))
    runner.read_notebook(py)
    err = capsys.readouterr().err
    assert f"{ipynb} stores outputs (1 cell(s))" in err and f"python -m usfmae_lib.study {ipynb}" in err
    study.main([str(ipynb)])
    runner.read_notebook(py)  # cleared, and still in sync with its twin
    assert "stores outputs" not in capsys.readouterr().err
