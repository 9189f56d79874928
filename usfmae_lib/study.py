"""What a study notebook does first: `study.setup(globals(), STEP)` in its first setup cell.

The same notebook runs in three places, and this makes it compute the same thing in each:
- under `usfmae run` / `usfmae reproduce` (papermill): the runner has merged the profile's YAML
  file and `-p` into the injected parameters (and marks them with `_usfmae_run`); nothing is
  applied here, the injected values win;
- in a live kernel (JupyterLab, or `python notebooks/NN_name.py`): `profile` in the parameters
  cell applies `params/<profile>/<notebook>.yaml` to every parameter the cell leaves at the
  notebook's default; a value changed in the cell stays. The notebook's defaults are its
  parameters cell as last committed (git HEAD), or as saved where git cannot tell (no checkout,
  a new notebook), so a save in the lab does not turn your edits into defaults. `out_dir` left
  at its default follows the profile (`outputs/<profile>`, as the runner's default). `interactive`
  is never taken from a file there: it follows the front end (below). Each value applied is printed;
- everywhere: a relative path in a path parameter (a name ending in dir, root(s), checkpoint, path
  or file) is made absolute against the repository root, whatever the kernel's working folder
  (JupyterLab started in notebooks/ runs its kernels there); `out_dir` inside notebooks/ is
  refused; `interactive = None` becomes True in a Jupyter kernel not started by `usfmae run`,
  False elsewhere; run as plain Python, the notebook is not run again by the worker processes the
  library spawns (cleaning, curation, the synthetic tree), as in a kernel.

Also here: `strip_outputs_before_save`, the JupyterLab save hook (jupyter_server_config.py) that
keeps outputs out of the stored notebooks/*.ipynb, and `python -m usfmae_lib.study FILE.ipynb ...`,
which clears the outputs of notebooks saved without it.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

from usfmae_lib import UsfmaeError, parameters
from usfmae_lib.parameters import MARKER, inside, is_path_parameter, resolve_path_value

FRONT_END = ("interactive",)  # None = auto; in a live kernel set by the front end, never by a profile file


def setup(namespace: dict, step: str) -> None:
    """Settle the parameters in `namespace` (the notebook's globals()) in place; see the module's doc."""
    if namespace.get("__name__") == "__main__" and namespace.get("__file__") and namespace.get("__spec__") is None:
        # plain Python runs the notebook as a script: each worker process the library spawns would run the
        # whole notebook again first (multiprocessing imports a script's __main__) and stop. Named as
        # `python -m` names a package's __main__, it is imported by none, as in a kernel.
        namespace["__spec__"] = importlib.machinery.ModuleSpec("__main__", None)
    root = parameters.REPO_ROOT
    injected = namespace.get(MARKER)
    if injected is not None:  # usfmae run / reproduce: its values are final
        names = list(injected.get("parameters", [])) if isinstance(injected, dict) else []
        sources = injected.get("sources", []) if isinstance(injected, dict) else []
        shown = [short_path(source, root) for source in sources]  # params/smoke/..., not the clone's path
        print(f"parameters: the cell's, then usfmae run's {', '.join(shown) or '(none)'}")
    else:
        saved, committed = parameters.notebook_defaults(step)
        names = list(saved)
        _apply_profile(namespace, step, saved, committed)
    for name in names:
        if is_path_parameter(name) and name in namespace:
            namespace[name] = resolve_path_value(namespace[name], root)
    out = namespace.get("out_dir")
    if isinstance(out, str) and out and inside(Path(out), parameters.NOTEBOOKS_DIR):
        raise UsfmaeError(f"out_dir {out} is inside {parameters.NOTEBOOKS_DIR}: outputs never go beside the "
                          f"notebooks; use outputs/<profile> (relative paths start at the repository root {root})")
    for name in FRONT_END:
        if name in names and namespace.get(name) is None:  # None = auto: on in a Jupyter kernel, off under usfmae run
            namespace[name] = injected is None and jupyter_kernel()


def jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Notebook), False in plain Python or IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def short_path(path, out_dir) -> str:
    """How a notebook prints a path: relative to the study's output folder when it lies inside it
    (`01_curation/manifest.parquet`), else as given (a data root the user chose)."""
    path, out = Path(os.path.realpath(path)), Path(os.path.realpath(out_dir))
    return path.relative_to(out).as_posix() if inside(path, out) and path != out else str(path)


def show_figure(fig, path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG at `path` and as PDF beside it (same stem), close it, and
    display the PNG file once.

    The one rule for figures in the notebooks: the picture a reader sees is the saved file itself
    (the same bytes), shown once in the cell that makes it; closing the figure keeps the inline
    backend from showing it a second time. The PDF is the same figure as vectors, for a paper or
    slides (index.md lists it beside its PNG); it carries no creation date, so the same figure
    gives the same bytes. Outside IPython nothing is displayed. Returns nothing, so that a call
    can end a cell without printing anything.
    """
    import matplotlib.pyplot as plt

    from usfmae_lib import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    if path.suffix.lower() == ".png":
        atomic_write(path.with_suffix(".pdf"),
                     lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"CreationDate": None}))
    plt.close(fig)
    show_image(path)


def show_image(path) -> None:
    """Display a PNG file as it is (its bytes) when running under IPython; do nothing elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))


def _apply_profile(ns: dict, step: str, saved: dict, committed: dict) -> None:
    """A live kernel: params/<profile>/<step>.yaml over the values the cell leaves at their defaults."""
    profile = ns.get("profile")
    default = {**saved, **committed}  # committed where git knows the notebook, else as saved
    if not profile:  # None or "": the cell as it stands
        print("profile: none, the parameters cell as it stands")
        return
    folder = parameters.PARAMS_DIR / str(profile)
    if not folder.is_dir():
        known = sorted(p.name for p in parameters.PARAMS_DIR.iterdir() if (p / f"{step}.yaml").is_file())
        raise UsfmaeError(f"profile {profile!r}: no folder {folder}; profiles with a file for {step}: "
                          f"{', '.join(known) or 'none'}")
    file = folder / f"{step}.yaml"
    applied, kept = [], []
    if file.is_file():
        values, origin = parameters.load_params([file])
        values = parameters.check_params(values, saved, f"{step} (profile {profile})", origin)
        for key, value in values.items():
            if key == "profile" or key in FRONT_END:
                continue
            if key in ns and key in default and ns[key] != default[key]:  # changed in the cell: yours
                if ns[key] != value:
                    kept.append(f"{key}={ns[key]!r}")
                continue
            if ns.get(key) != value:
                applied.append(f"{key}={value!r}")
            ns[key] = value
        where = os.path.relpath(file, parameters.REPO_ROOT) if inside(file, parameters.REPO_ROOT) else file
        print(f"profile {profile}: applied {where}" + (f" ({', '.join(applied)})" if applied else " (no change)")
              + (f"; kept your cell's {', '.join(kept)}" if kept else ""))
    else:
        print(f"profile {profile}: no {file}, the parameters cell as it stands")
    if "out_dir" in default and ns.get("out_dir") == default["out_dir"]:
        ns["out_dir"] = f"outputs/{profile}"  # the runner's default folder for this profile


# ----------------------------------------------------------------------------- outputs out of stored notebooks


def stored_outputs(nb: dict) -> int:
    """How many cells of a notebook (a dict or NotebookNode) carry outputs or an execution count;
    saved widget state counts as one more."""
    cells = sum(1 for c in nb.get("cells", []) if c.get("cell_type") == "code"
                and (c.get("outputs") or c.get("execution_count") is not None))
    return cells + (1 if nb.get("metadata", {}).get("widgets") else 0)


def clear_outputs(nb: dict) -> None:
    """Drop outputs, execution counts, cell timings and saved widget state, in place."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)


def strip_outputs_before_save(model: dict, path: str, contents_manager, **kwargs) -> None:
    """Jupyter server pre-save hook (jupyter_server_config.py): a notebook saved into this
    repository's notebooks/ folder is written without outputs; any other notebook as it is."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    folder = (Path(getattr(contents_manager, "root_dir", ".")) / path.strip("/")).parent
    if os.path.realpath(folder) == os.path.realpath(parameters.NOTEBOOKS_DIR):
        clear_outputs(model["content"])


HOOK = "usfmae_lib.study.strip_outputs_before_save"
JUPYTER_CONFIG = Path("etc") / "jupyter" / "jupyter_server_config.json"


def install_jupyter_config(prefix=None) -> Path:
    """Turn the pre-save hook on for every Jupyter server of an environment (setup.sh calls this
    for .venv): ContentsManager.pre_save_hook in <prefix>/etc/jupyter/jupyter_server_config.json,
    which Jupyter Server reads at start (other settings there are kept), so `jupyter lab` saves the
    notebooks/ twins without outputs with no --config."""
    import json

    path = Path(prefix or sys.prefix) / JUPYTER_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("ContentsManager", {})["pre_save_hook"] = HOOK
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    """python -m usfmae_lib.study NOTEBOOK.ipynb ...: clear stored outputs in place (cell ids and
    metadata kept). python -m usfmae_lib.study --install-jupyter-config: see install_jupyter_config."""
    import nbformat

    files = list(sys.argv[1:] if argv is None else argv)
    if files == ["--install-jupyter-config"]:
        print(f"JupyterLab in this environment saves notebooks/*.ipynb without outputs: {install_jupyter_config()}")
        return 0
    if not files:
        print("usage: python -m usfmae_lib.study NOTEBOOK.ipynb ...  (clears their stored outputs)", file=sys.stderr)
        return 2
    for name in files:
        nb = nbformat.read(name, as_version=nbformat.NO_CONVERT)
        n = stored_outputs(nb)
        if n:  # a file left as it is keeps its time (jupytext --sync reads the newer twin)
            clear_outputs(nb)
            nbformat.write(nb, name)
        print(f"{name}: cleared {n} cell(s)" if n else f"{name}: no outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
