"""study.setup, the first thing every notebook runs: the same folders from any working folder,
a profile chosen in the parameters cell of a live kernel, `interactive` from the front end, and
the JupyterLab save hook that keeps outputs out of the stored notebooks.

A live kernel is simulated in this process: the parameters cell, then the setup cell, executed
in a fresh namespace with the working folder set to notebooks/ (where JupyterLab started in
notebooks/ runs its kernels). Papermill runs are in tests/test_runner.py.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from usfmae_lib import UsfmaeError, parameters, study

NOTEBOOK = '''# %% [markdown]
# # a step

# %% tags=["parameters"]
profile = "quick"
out_dir = "outputs/quick"
seed = 0
n = 20
size = 64
checkpoint = ""  # "" = the default one
data_roots = []
real_dir = None
interactive = None

# %%
import json
from pathlib import Path

from usfmae_lib import study

STEP = "a_step"
study.setup(globals(), STEP)
step_dir = Path(out_dir) / STEP
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "seen.json").write_text(json.dumps({"n": n, "size": size}))
'''
PROFILES = {"quick": "profile: quick\nn: 20\n", "smoke": "profile: smoke\nn: 2\nsize: 8\ninteractive: false\n"}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with one notebook and two profiles; the working folder is its notebooks/."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "a_step.py").write_text(NOTEBOOK)
    for profile, text in PROFILES.items():
        (root / "params" / profile).mkdir(parents=True)
        (root / "params" / profile / "a_step.yaml").write_text(text)
    monkeypatch.setattr(parameters, "REPO_ROOT", root)
    monkeypatch.setattr(parameters, "NOTEBOOKS_DIR", root / "notebooks")
    monkeypatch.setattr(parameters, "PARAMS_DIR", root / "params")
    monkeypatch.chdir(root / "notebooks")
    return root


def live(root: Path, **cell) -> dict:
    """Run the notebook's parameters cell, edited as a user would (name=value), then its setup
    cell, as a live kernel does: no papermill injection. Returns the namespace."""
    text = (root / "notebooks" / "a_step.py").read_text()
    for name, value in cell.items():
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, count=1, flags=re.M)
        assert n == 1, name
    cells = re.split(r"^# %%.*$", text, flags=re.M)
    namespace = {}
    exec(cells[2], namespace)  # parameters
    exec(cells[3], namespace)  # setup
    return namespace


def test_relative_paths_start_at_the_repository_root_from_notebooks(repo):
    ns = live(repo, checkpoint="weights/mae.pth", data_roots=["data/a", "/abs/b"])
    assert ns["out_dir"] == str(repo / "outputs" / "quick")
    assert (repo / "outputs" / "quick" / "a_step" / "seen.json").exists()
    assert not (repo / "notebooks" / "outputs").exists()
    assert ns["checkpoint"] == str(repo / "weights" / "mae.pth")
    assert ns["data_roots"] == [str(repo / "data" / "a"), "/abs/b"]  # absolute paths stay
    assert ns["real_dir"] is None
    assert live(repo)["checkpoint"] == ""  # "" keeps its meaning (the default one)


def test_out_dir_inside_notebooks_is_refused(repo):
    with pytest.raises(UsfmaeError, match="outputs never go beside the notebooks"):
        live(repo, out_dir="notebooks/outputs/quick")
    assert not (repo / "notebooks" / "outputs").exists()


def test_profile_in_a_live_kernel_applies_its_file_except_what_the_cell_changed(repo, capsys):
    ns = live(repo, profile="smoke", size=32)
    assert ns["n"] == 2  # left at the default: the profile's value
    assert ns["size"] == 32  # changed in the cell: kept
    assert ns["out_dir"] == str(repo / "outputs" / "smoke")  # the default folder follows the profile
    assert ns["interactive"] is False  # not a Jupyter kernel; the file's `interactive` is never applied live
    printed = capsys.readouterr().out
    assert "profile smoke: applied params/smoke/a_step.yaml (n=2)" in printed
    assert "kept your cell's size=32" in printed
    assert json.loads((repo / "outputs" / "smoke" / "a_step" / "seen.json").read_text()) == {"n": 2, "size": 32}


def test_no_profile_or_an_unknown_one(repo):
    ns = live(repo, profile=None)
    assert (ns["n"], ns["size"], ns["out_dir"]) == (20, 64, str(repo / "outputs" / "quick"))
    with pytest.raises(UsfmaeError, match="profiles with a file for a_step: quick, smoke"):
        live(repo, profile="smoek")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_saving_the_cell_does_not_make_its_edits_defaults(repo):
    """JupyterLab autosaves the parameters cell into the .py twin: the defaults are the committed
    ones, so an edit stays the user's after a save."""
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    saved = NOTEBOOK.replace('profile = "quick"', 'profile = "smoke"').replace("size = 64", "size = 32")
    (repo / "notebooks" / "a_step.py").write_text(saved)
    ns = live(repo)  # the cell as saved, unedited since
    assert (ns["n"], ns["size"]) == (2, 32)


def test_interactive_none_is_on_in_a_jupyter_kernel_only(repo, monkeypatch):
    import IPython

    shell = type("ZMQInteractiveShell", (), {})()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert live(repo)["interactive"] is True
    assert live(repo, interactive=False)["interactive"] is False  # set by the user: kept
    ns = {"interactive": None, "out_dir": "outputs/x",
          parameters.MARKER: {"sources": ["-p n=1"], "parameters": ["interactive", "out_dir"]}}
    study.setup(ns, "a_step")  # under usfmae run: off, and out_dir from the repository root
    assert ns["interactive"] is False and ns["out_dir"] == str(repo / "outputs" / "x")


def test_the_lab_save_hook_strips_outputs_of_notebooks_in_notebooks_only(repo):
    """The repository's jupyter_server_config.py, loaded as `jupyter lab --config=...` does,
    configures the contents manager JupyterLab saves through (jupytext's, pairing the twins)."""
    import nbformat
    from jupytext import TextFileContentsManager
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("jupyter_server_config.py", path=str(Path(__file__).parents[1])).load_config()
    manager = TextFileContentsManager(config=config, root_dir=str(repo))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)", execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="1\n")])])
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    nb.metadata["widgets"] = {"state": {}}
    (repo / "elsewhere").mkdir()
    for path in ("notebooks/b_step.ipynb", "elsewhere/b_step.ipynb"):
        manager.save({"type": "notebook", "content": json.loads(json.dumps(nb))}, path)
    stored = json.loads((repo / "notebooks" / "b_step.ipynb").read_text())
    assert study.stored_outputs(stored) == 0 and "widgets" not in stored["metadata"]
    assert (repo / "notebooks" / "b_step.py").exists()  # the twin is still written
    assert study.stored_outputs(json.loads((repo / "elsewhere" / "b_step.ipynb").read_text())) == 2


def test_setup_turns_the_save_hook_on_for_every_jupyter_server_of_the_venv(tmp_path, monkeypatch):
    """setup.sh runs `python -m usfmae_lib.study --install-jupyter-config`; Jupyter Server, reading its
    config paths as at start, then has the hook without --config."""
    from jupyter_server.serverapp import ServerApp

    assert "-m usfmae_lib.study --install-jupyter-config" in (Path(__file__).parents[1] / "setup.sh").read_text()
    config = tmp_path / "etc" / "jupyter" / "jupyter_server_config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"ServerApp": {"port": 9999}}))  # a setting already there is kept
    assert study.install_jupyter_config(tmp_path) == config
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path / "etc" / "jupyter"))
    monkeypatch.chdir(tmp_path)  # no jupyter_server_config.py in the working folder
    app = ServerApp()
    app.load_config_file()
    assert app.config.ContentsManager.pre_save_hook == study.HOOK and app.config.ServerApp.port == 9999


def test_path_parameters_are_named_by_their_ending():
    for name in ("out_dir", "data_root", "data_roots", "checkpoint", "init_checkpoint", "weights_dir", "path"):
        assert parameters.is_path_parameter(name), name
    for name in ("profile", "seed", "directory_count", "checkpoint_every", "mask_ratios", "interactive"):
        assert not parameters.is_path_parameter(name), name
    assert parameters.resolve_path_value(["a", ""], Path("/r")) == ["/r/a", ""]
    assert parameters.resolve_path_value(None, Path("/r")) is None


def test_main_clears_stored_outputs_keeping_ids(tmp_path, capsys):
    nb = {"cells": [{"cell_type": "code", "id": "abc", "metadata": {"execution": {"t": 1}}, "source": "1",
                     "execution_count": 4, "outputs": [{"output_type": "stream", "name": "stdout", "text": "1"}]}],
          "metadata": {"widgets": {}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    assert study.main([str(path)]) == 0
    cleared = json.loads(path.read_text())
    assert study.stored_outputs(cleared) == 0 and cleared["cells"][0]["id"] == "abc"
    assert "cleared 1 cell(s)" in capsys.readouterr().out
