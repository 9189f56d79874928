"""Run the study's notebooks headlessly with papermill (`usfmae run`, `usfmae reproduce`).

Notebooks live in `notebooks/` as jupytext `py:percent` files (the source of truth) paired with
`.ipynb` copies that carry no outputs. Each has one cell tagged `parameters` holding literal
defaults; `params/<profile>/<notebook>.yaml` overrides them per profile (usfmae_lib/parameters.py
reads and checks them, and holds the repository's folders, profiles and steps).

What papermill leaves loose, this module makes strict:
- an unknown parameter name is an error listing the valid names (papermill only warns);
- a value whose type differs from the default's is an error (an int where a float is expected
  is widened, nothing else is converted);
- the kernel is always the Python running this code (no "kernel not found", no other env);
- a failing cell is named: its index and first line in the source notebook, and the error;
- paths: `--out` and a relative path given with `-p` are relative to the current folder (made
  absolute here); relative paths in parameter files and cells are relative to the repository root
  (`study.setup` in each notebook); no output folder goes inside notebooks/;
- the injected parameters carry a marker (`parameters.MARKER`) so the notebook applies no profile
  file of its own (it does in a live kernel, see usfmae_lib/study.py);
- a stored `.ipynb` twin with outputs is reported (JupyterLab strips them on save when started
  with the repository's jupyter_server_config.py).

Layout of an output folder DIR (default `outputs/<profile>/`):
    DIR/<notebook>/<notebook>.ipynb   executed copy
    DIR/<notebook>/provenance.json    what made it: commit, versions, device, parameters' hash (provenance.py)
    DIR/<notebook>/*.png|pdf|svg      its figures (a PNG and its PDF count once), and *.csv|md|tex its
                                      tables (listed in index.md)
    DIR/<notebook>/<subfolder>/       data it makes (not listed)
    DIR/index.md                      written by `reproduce`: provenance, every figure and table, with times
    DIR/index.html                    written by `reproduce` after it: the report a person opens (report.py)
    DIR/.usfmae/                      bookkeeping (fingerprints of finished steps)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# nbformat, jupytext and papermill are imported where they are used: they take seconds, and the step
# commands (`usfmae curate | clean | finetune`) import this module for their options and --help
from usfmae_lib import UsfmaeError, atomic_write_text, parameters, provenance, report, study
# what a step's folder holds for a reader (its figures, a PNG and its PDF once; its tables), shared with the
# report (report.py imports no runner: nbconvert is imported there only when a report is written)
from usfmae_lib.report import FIGURE_SUFFIXES, TABLE_SUFFIXES, dry_run_note, figure_formats, step_outputs  # noqa: F401
from usfmae_lib.safety import folder_lock

KERNEL_NAME = "usfmae-python"
PROVENANCE_FILE = provenance.FILE  # in each step's folder, written by run_notebook


class _DropPapermillParameterWarnings(logging.Filter):
    """Papermill's own parameter parsing warns about comments it cannot read and names it does
    not know; check_params has already validated every name and type, so those lines are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Unable to parse line", "Passed unknown parameter"))


for _name in ("papermill", "papermill.translators"):
    logging.getLogger(_name).addFilter(_DropPapermillParameterWarnings())


# ----------------------------------------------------------------------------- notebooks


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """Read a study notebook from its `.py` twin (source of truth) or its `.ipynb`.

    When both twins exist they must hold the same cells; otherwise the error says how to sync.
    """
    import jupytext

    path = Path(path)
    if not path.exists():
        raise UsfmaeError(f"{path}: no such notebook")
    if path.suffix not in (".py", ".ipynb"):
        raise UsfmaeError(f"{path}: expected a .ipynb notebook or its jupytext .py twin")
    py_twin, ipynb_twin = path.with_suffix(".py"), path.with_suffix(".ipynb")
    nb = jupytext.read(py_twin if py_twin.exists() else path)
    if py_twin.exists() and ipynb_twin.exists():
        stored = jupytext.read(ipynb_twin)
        difference = notebook_difference(nb, stored)
        if difference:
            raise UsfmaeError(
                f"{ipynb_twin} is out of sync with its source {py_twin} ({difference}). "
                f"Fix: jupytext --sync {py_twin}"
            )
        count = study.stored_outputs(stored)
        if count and (ipynb_twin, ipynb_twin.stat().st_mtime) not in _WARNED:  # once per process and save
            _WARNED.add((ipynb_twin, ipynb_twin.stat().st_mtime))
            print(f"usfmae: warning: {stored_outputs_message(ipynb_twin, count)}", file=sys.stderr, flush=True)
    return nb


_WARNED: set = set()


def stored_outputs_message(ipynb: Path, count: int) -> str:
    """What to say about an .ipynb twin that stores outputs, and the fix."""
    return (f"{ipynb} stores outputs ({count} cell(s)); the study's .ipynb twins carry none (saved from a "
            "JupyterLab started without --config=jupyter_server_config.py? see README). "
            f"Clear them: .venv/bin/python -m usfmae_lib.study {ipynb}")


def notebook_difference(a: nbformat.NotebookNode, b: nbformat.NotebookNode) -> str:
    """Describe the first difference in cell types, sources or tags ('' when in sync)."""
    if len(a.cells) != len(b.cells):
        return f"{len(a.cells)} cells vs {len(b.cells)}"
    for i, (ca, cb) in enumerate(zip(a.cells, b.cells)):
        if ca.cell_type != cb.cell_type or ca.source.strip() != cb.source.strip():
            return f"cell {i} differs"
        if ("parameters" in parameters.cell_tags(ca)) != ("parameters" in parameters.cell_tags(cb)):
            return f"cell {i}: 'parameters' tag differs"
    return ""


# ----------------------------------------------------------------------------- execution


@dataclass
class RunResult:
    notebook: Path
    executed: Path  # the executed copy
    step_dir: Path  # DIR/<notebook>/: everything the notebook made
    seconds: float
    params: dict = field(default_factory=dict)


def _kernelspec(root: Path) -> Path:
    """A kernelspec for this very interpreter, so papermill never picks another environment."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        # log level ERROR: hide ipykernel's start-up chatter (e.g. its TCP transport notice)
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.log_level=ERROR"],
        "display_name": f"usfmae ({sys.executable})",
        "language": "python",
        "env": {"PYTHONUNBUFFERED": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return root


def run_notebook(
    notebook: str | Path,
    param_files=(),
    overrides=(),
    out_dir: str | Path | None = None,
    progress: bool = True,
    log_output: bool = False,
) -> RunResult:
    """Execute one notebook with parameters; the executed copy lands in DIR/<notebook>/.

    `out_dir` (DIR) defaults to `outputs/<profile>/` under the current folder (the repository
    root's when that is notebooks/, see output_folder); it is passed to the notebook as its
    `out_dir` parameter, so everything the notebook makes lands there too.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(notebook)
    nb = read_notebook(notebook)
    stem = notebook.stem
    defaults = parameters.notebook_parameters(nb, str(notebook))
    params, origin = parameters.load_params(param_files, overrides)
    if "out_dir" in params:
        raise UsfmaeError(f"{notebook}: set the output folder with --out DIR, not as the parameter out_dir")
    params = parameters.check_params(params, defaults, str(notebook), origin)
    for key, value in params.items():  # typed on a command line: relative to the current folder
        if origin.get(key) == "-p" and parameters.is_path_parameter(key):
            params[key] = parameters.resolve_path_value(value, Path.cwd())
    profile = params.get("profile", defaults.get("profile", parameters.DEFAULT_PROFILE))
    out_dir = output_folder(out_dir, str(profile))
    if "out_dir" in defaults:
        params["out_dir"] = str(out_dir)
    step_dir = out_dir / stem
    step_dir.mkdir(parents=True, exist_ok=True)
    shard = parameters.parse_shard(params.get("shard"))  # (I, N) of a grid's share, or None
    executed = step_dir / (f"{stem}.shard{shard[0]}of{shard[1]}.ipynb" if shard else f"{stem}.ipynb")

    # one run writes a study folder at a time; the shards of one grid together (each claims its runs)
    with folder_lock(out_dir, f"usfmae run {stem}" + (f" shard {shard[0]}/{shard[1]}" if shard else ""), shared=bool(shard)):
        start = time.perf_counter()
        provenance_file = step_dir / (f"provenance.shard{shard[0]}of{shard[1]}.json" if shard else PROVENANCE_FILE)
        provenance_file.unlink(missing_ok=True)  # a failed run leaves none: the outputs are no longer the last run's
        with tempfile.TemporaryDirectory(prefix="usfmae-run-") as tmp:
            source = Path(tmp) / f"{stem}.ipynb"
            nbformat.write(nb, source)
            old_path = os.environ.get("JUPYTER_PATH")
            os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(_kernelspec(Path(tmp))), old_path]))
            try:
                marker = {"sources": [str(f) for f in param_files] + [f"-p {o}" for o in overrides],
                          "parameters": sorted(defaults)}
                papermill.execute_notebook(
                    str(source),
                    str(executed),
                    parameters={**params, parameters.MARKER: marker},
                    kernel_name=KERNEL_NAME,
                    language="python",
                    progress_bar=progress,
                    log_output=log_output,
                )
            except PapermillExecutionError as err:
                raise UsfmaeError(_describe_failure(nb, notebook, err, executed)) from None
            finally:
                if old_path is None:
                    os.environ.pop("JUPYTER_PATH", None)
                else:
                    os.environ["JUPYTER_PATH"] = old_path
        seconds = time.perf_counter() - start
        write_provenance(provenance_file, params, str(profile))
    return RunResult(notebook, executed, step_dir, seconds, params)


def write_provenance(path: Path, params: dict, profile: str) -> Path:
    """A step's provenance.json once its notebook ran: provenance.record of its parameters (without
    `out_dir`, so that the same run in another folder has the same hash), read in this process (torch is
    imported here to name the device, the one the notebook's kernel saw). A step that `reproduce` skips
    keeps the file of the run that made it."""
    rec = provenance.record(params={k: v for k, v in params.items() if k != "out_dir"}, profile=profile,
                            device="auto")
    _write_json_atomic(path, rec)
    return path


def output_folder(out_dir, name: str, notebooks_dir: Path | None = None) -> Path:
    """The study folder, absolute: `out_dir` (relative: to the current folder), else outputs/<name>
    under the current folder, or under the repository root when that is inside notebooks/. A folder
    inside notebooks/ is refused: outputs never land beside the notebooks."""
    notebooks_dir = Path(notebooks_dir or parameters.NOTEBOOKS_DIR).resolve()
    if out_dir is None:
        here = Path.cwd().resolve()
        base = notebooks_dir.parent if parameters.inside(here, notebooks_dir) else here
        return base / "outputs" / name
    path = Path(out_dir).expanduser().resolve()
    if parameters.inside(path, notebooks_dir):
        raise UsfmaeError(f"--out {path} is inside {notebooks_dir}: outputs never go beside the notebooks; "
                          f"the default is outputs/{name} under the repository root")
    return path


def _describe_failure(nb, notebook: Path, err, executed: Path) -> str:
    """Name the failing cell by its index in the source notebook, its first line and the error."""
    failing = (err.source or "").strip()
    index = next((i for i, c in enumerate(nb.cells) if c.source.strip() == failing), None)
    first_line = failing.splitlines()[0] if failing else ""
    where = f"cell {index}" if index is not None else f"execution count {err.exec_count}"
    return (
        f"{notebook}: {where} failed ({first_line!r}): {err.ename}: {err.evalue}\n"
        f"Executed copy with the full traceback: {executed}"
    )


# ----------------------------------------------------------------------------- reproduce


def _code_fingerprint() -> str:
    """Hash of the library's source and shipped data (the teaching MAE's weights included): a change
    redoes every step."""
    h = hashlib.sha256()
    library = parameters.REPO_ROOT / "usfmae_lib"
    for f in sorted([*library.rglob("*.py"), *(library / "data").rglob("*.*")]):
        h.update(f.relative_to(parameters.REPO_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _step_fingerprint(nb: nbformat.NotebookNode, params_files, overrides, upstream: str, code: str) -> str:
    """Hash of what a step computes from: its cells, parameter files (the profile's, then the dry
    run's), overrides, the step before it and the library's code."""
    h = hashlib.sha256()
    cells = [(c.cell_type, c.source, parameters.cell_tags(c)) for c in nb.cells]  # not cell ids: jupytext makes them up
    files = [params_files] if isinstance(params_files, Path) else list(params_files)
    texts = [f.read_text() for f in files]
    for part in (cells, texts[0] if len(texts) == 1 else texts, list(overrides), upstream, code):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def reproduce(
    profile: str = parameters.DEFAULT_PROFILE,
    out_dir: str | Path | None = None,
    force: bool = False,
    steps=parameters.STEPS,
    overrides=(),
    notebooks_dir: Path = parameters.NOTEBOOKS_DIR,
    params_dir: Path = parameters.PARAMS_DIR,
    progress: bool = True,
    dry_run: bool = False,
) -> Path:
    """Run every notebook of the study in order with `params/<profile>/<notebook>.yaml`.

    A step is skipped when its notebook, parameter file, overrides, the library's code and every
    step before it are unchanged since it last succeeded (`force=True` redoes it). Writes
    `DIR/index.md`, then the report `DIR/index.html` (report.write_report), and returns index.md's
    path. A second reproduce (or run) into the same DIR while one is going stops with a message.

    dry_run: apply `params/dry_run/<notebook>.yaml` after the profile's file (and before
    `overrides`): the profile's models and code paths for a step or two each, on a small synthetic
    tree (docs/dry_run.md). Its default folder is `outputs/<profile>-dry-run/`, never a real run's.
    """
    if profile not in parameters.PROFILES:
        raise UsfmaeError(f"unknown profile {profile!r}; choose one of {', '.join(parameters.PROFILES)}")
    out_dir = output_folder(out_dir, f"{profile}-dry-run" if dry_run else profile, notebooks_dir)
    state_dir = out_dir / ".usfmae" / "reproduce"
    state_dir.mkdir(parents=True, exist_ok=True)
    plan = []  # (step, notebook path, notebook, parameter files, its parameter names); all read up front
    for step in steps:
        notebook = notebooks_dir / f"{step}.py"  # the source of truth; .ipynb when there is no twin
        notebook = notebook if notebook.exists() else notebook.with_suffix(".ipynb")
        nb = read_notebook(notebook)
        params_file = params_dir / profile / f"{step}.yaml"
        if not params_file.exists():
            raise UsfmaeError(f"{params_file}: missing parameter file for profile {profile!r}, step {step}")
        params_files = [params_file]
        dry_file = params_dir / parameters.DRY_RUN / f"{step}.yaml"
        if dry_run and dry_file.exists():  # a step without one runs as the profile says
            params_files.append(dry_file)
        defaults = parameters.notebook_parameters(nb, str(notebook))
        if len(params_files) > 1:  # a dry-run file that does not fit its notebook stops before any step runs
            merged, origin = parameters.load_params(params_files)
            parameters.check_params(merged, defaults, str(notebook), origin)
        plan.append((step, notebook, nb, params_files, set(defaults)))
    valid = set().union(*(names for *_, names in plan))
    unknown = sorted({o.partition("=")[0].strip() for o in overrides} - valid)
    if unknown:  # a name no step has is a typo: refuse it before anything runs
        raise UsfmaeError(f"unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")

    command = f"usfmae reproduce --profile {profile}" + (" --dry-run" if dry_run else "")
    with folder_lock(out_dir, command):
        return _reproduce_steps(plan, overrides, profile, out_dir, state_dir, force, progress, dry_run)


def dry_run_changes(nb: nbformat.NotebookNode, params_files, name: str = "notebook") -> list[str]:
    """What the dry run's file (the last of params_files) changes, one line per parameter:
    'name: <the profile's value> -> <the dry run's> (<the file's comment>)'."""
    *profile_files, dry_file = params_files
    before = {**parameters.notebook_parameters(nb, name), **parameters.load_params(profile_files)[0]}
    after = parameters.load_params([dry_file])[0]
    comments = {}
    for line in dry_file.read_text().splitlines():
        key, sep, rest = line.partition(":")
        if sep and not line.startswith((" ", "#")) and "  # " in rest:
            comments[key.strip()] = rest.split("  # ", 1)[1].strip()
    return [f"{k}: {before.get(k)!r} -> {v!r}" + (f" ({comments[k]})" if k in comments else "")
            for k, v in after.items() if k != "profile" and before.get(k) != v]


def _reproduce_steps(plan, overrides, profile: str, out_dir: Path, state_dir: Path, force: bool,
                     progress: bool, dry_run: bool = False) -> Path:
    """reproduce's loop over the steps, under the study folder's lock."""
    code = _code_fingerprint()
    upstream, records = "", []
    for step, notebook, nb, params_files, names in plan:
        step_overrides = [o for o in overrides if o.partition("=")[0].strip() in names]
        fingerprint = _step_fingerprint(nb, params_files, step_overrides, upstream, code)
        if dry_run:  # say what the dry run shrank, skipped step or not
            changes = dry_run_changes(nb, params_files, str(notebook)) if len(params_files) > 1 else []
            print(f"[{step}] dry run: " + ("shrinks" + "".join(f"\n    {c}" for c in changes) if changes
                                           else f"as profile {profile}"), flush=True)
        state_file = state_dir / f"{step}.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        executed = out_dir / step / f"{step}.ipynb"
        if not force and state.get("fingerprint") == fingerprint and executed.exists():
            print(f"[{step}] unchanged, skipped (last run took {state['seconds']:.1f} s)", flush=True)
            records.append((step, "skipped (unchanged)", state["seconds"]))
        else:
            print(f"[{step}] running with {' + '.join(str(f) for f in params_files)}", flush=True)
            state_file.unlink(missing_ok=True)  # a failed or interrupted step must run again
            try:
                result = run_notebook(notebook, params_files, step_overrides, out_dir, progress=progress)
            except UsfmaeError as err:
                records.append((step, f"FAILED: {str(err).splitlines()[0]}", None))
                _write_indexes(out_dir, profile, records, dry_run, failed=True)
                raise
            state = {"fingerprint": fingerprint, "seconds": result.seconds, "params": result.params}
            _write_json_atomic(state_file, state)
            records.append((step, "ran", result.seconds))
        upstream = fingerprint
    return _write_indexes(out_dir, profile, records, dry_run)


def _write_indexes(out_dir: Path, profile: str, records, dry_run: bool, failed: bool = False) -> Path:
    """index.md, then the report index.html (report.py), from the same provenance record; index.md's path.
    After a failed step the report is still written (it shows the failing cell's traceback), but a
    problem with it does not hide the step's error."""
    current = provenance.folder_record(out_dir, profile, [step for step, *_ in records])
    index = write_index(out_dir, profile, records, dry_run, current=current)
    try:
        report.write_report(out_dir, profile, records, dry_run, current=current)
    except Exception as err:  # noqa: BLE001 - only after a failed step, whose error is the one to raise
        if not failed:
            raise
        print(f"report not written: {type(err).__name__}: {err}", file=sys.stderr)
    return index


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def write_index(out_dir: Path, profile: str, records, dry_run: bool = False, current: dict | None = None) -> Path:
    """DIR/index.md: the provenance of this run (provenance.folder_markdown: `current`, by default
    provenance.folder_record's, and which steps differ from it), then per step its status and time,
    then every figure (with its other formats, the PDF beside the PNG) and table it made."""
    current = current or provenance.folder_record(out_dir, profile, [step for step, *_ in records])
    lines = [
        f"# usfmae outputs: profile `{profile}`" + (" (DRY RUN)" if dry_run else ""),
        "",
        "Written by `usfmae reproduce" + (" --dry-run" if dry_run else "") + "`. Paths are relative to this folder; "
        "`index.html` beside it is the same study as one page to read, every notebook with its figures and tables.",
        "",
        *([dry_run_note(profile), ""] if dry_run else []),
        provenance.folder_markdown(out_dir, [step for step, *_ in records], current),
        "",
        "| step | status | time (s) | figures | tables |",
        "|---|---|---|---|---|",
    ]
    details = []
    for step, status, seconds in records:
        figures, tables = step_outputs(out_dir / step)
        took = f"{seconds:.1f}" if seconds is not None else "-"
        lines.append(f"| [{step}]({step}/{step}.ipynb) | {status} | {took} | {len(figures)} | {len(tables)} |")
        details += ["", f"## {step}", ""]
        for p in figures:
            rel = p.relative_to(out_dir).as_posix()
            others = "".join(f" ([{o.suffix[1:]}]({o.relative_to(out_dir).as_posix()}))" for o in figure_formats(p))
            details.append(f"- figure: [{rel}]({rel}){others}")
        details += [f"- table: [{p.relative_to(out_dir)}]({p.relative_to(out_dir)})" for p in tables]
        if not figures and not tables:
            details.append("- (no figures or tables)")
    total = sum(s for _, _, s in records if s is not None)
    lines += ["", f"Total time of the steps listed: {total:.1f} s", *details, ""]
    index = out_dir / "index.md"
    index.write_text("\n".join(lines))
    return index


# ----------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="execute one notebook headlessly with papermill",
        description="Execute one notebook headlessly. Parameters come from YAML files (-f, in order) "
        "then -p key=value; unknown names and wrong types are refused.",
    )
    run.add_argument("notebook", help="notebooks/NN_name.ipynb or its .py twin")
    run.add_argument("-f", "--file", dest="param_files", action="append", default=[], metavar="PARAMS.yaml")
    run.add_argument("-p", "--param", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--out", default=None, metavar="DIR", help="output folder (default outputs/<profile>/)")
    run.add_argument("--log-output", action="store_true", help="stream the notebook's output to the terminal")
    run.set_defaults(func=_run_cli)

    rep = subparsers.add_parser(
        "reproduce",
        help="run every notebook in order for a profile and write index.md",
        description="Regenerate every figure and table of the study for one profile. Steps whose "
        "notebook, parameters, code and upstream steps did not change are skipped.",
    )
    rep.add_argument("--profile", choices=parameters.PROFILES, default=parameters.DEFAULT_PROFILE)
    rep.add_argument("--out", default=None, metavar="DIR",
                     help="output folder (default outputs/<profile>/; with --dry-run outputs/<profile>-dry-run/)")
    rep.add_argument("--force", action="store_true", help="redo every step even if unchanged")
    rep.add_argument("--steps", nargs="+", choices=parameters.STEPS, default=None,
                     help="run only these steps (default: all; with -p checkpoint=FILE, weights pretrained elsewhere "
                          "such as the released USF-MAE: 04-06, skipping curation, cleaning and pretraining)")
    rep.add_argument("-p", "--param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter in every step that has it")
    rep.add_argument("--dry-run", action="store_true",
                     help="the profile's models and code paths for a step or two each, on a small synthetic tree: "
                          "params/dry_run/<notebook>.yaml over the profile's files (then -p); prints what it shrinks "
                          "per step; default folder outputs/<profile>-dry-run/ (docs/dry_run.md). For paper and "
                          "official on a CPU, a few minutes")
    rep.set_defaults(func=_reproduce_cli)


# ----------------------------------------------------------------------------- step commands as notebooks
# `usfmae curate | clean | finetune` also take a step's notebook parameters: with -f, -p or --profile they
# run the step's notebook headlessly (what `usfmae run notebooks/<step>.ipynb` does), so a command, a
# notebook and `usfmae reproduce` compute the same thing under the same parameter names.


def add_step_options(parser: argparse.ArgumentParser, step: str) -> None:
    """Add -f / -p / --profile to a step command; its --help lists notebook <step>'s parameters. Call it
    after the command's own options: those are refused together with these (run_step_cli)."""
    own = {a.dest: (a.option_strings[0] if a.option_strings else a.metavar or a.dest.upper(), a.default)
           for a in parser._actions if a.dest not in ("help", "out") and a.default != argparse.SUPPRESS}
    parser.set_defaults(_own_options=own)
    group = parser.add_argument_group(
        f"notebook {step}'s whole step (any of these runs notebooks/{step}.ipynb headlessly, as `usfmae run`; "
        "--out is then the study folder, default outputs/<profile>)")
    group.add_argument("-f", "--params-file", dest="step_files", action="append", default=[], metavar="YAML",
                       help=f"parameter file with the notebook's names, e.g. params/smoke/{step}.yaml (repeatable)")
    group.add_argument("-p", "--step-param", dest="step_params", action="append", default=[],
                       metavar="KEY=VALUE", help="override one of the notebook's parameters (YAML value)")
    group.add_argument("--profile", choices=parameters.PROFILES, default=None,
                       help=f"start from params/<profile>/{step}.yaml (then -f files, then -p)")
    parser.epilog = f"notebook {step}'s parameters and their defaults (its parameters cell):\n" + parameters_text(step)


def parameters_text(step: str) -> str:
    """The parameters cell of notebooks/<step>.py as it reads (name = default  # what it is), indented."""
    path = parameters.NOTEBOOKS_DIR / f"{step}.py"
    if not path.is_file():
        return f"  ({path} not found: the notebooks come with a clone of the repository)"
    source = parameters.parameters_source(path.read_text(), ".py") or ""
    return "\n".join(f"  {line}" for line in source.splitlines() if line.strip())


def step_mode(args: argparse.Namespace) -> bool:
    """True when a step command was given -f, -p or --profile (its notebook runs, see add_step_options)."""
    return bool(getattr(args, "step_files", None) or getattr(args, "step_params", None) or getattr(args, "profile", None))


def run_step_cli(args: argparse.Namespace, step: str) -> int:
    """Run notebook <step> for a step command given -f, -p or --profile. The command's own options
    (changed from their defaults) are refused: they belong to its other form, under other names."""
    given = [name for dest, (name, default) in getattr(args, "_own_options", {}).items()
             if getattr(args, dest, default) != default]
    if given:
        raise UsfmaeError(f"{', '.join(given)}: not with -f / -p / --profile, which run notebook {step} with its own "
                          f"parameter names (listed by --help); give those as -p KEY=VALUE")
    files = parameters.with_profile(step, args.profile, args.step_files)
    result = run_notebook(parameters.NOTEBOOKS_DIR / f"{step}.py", files, args.step_params, args.out)
    print(f"executed {result.notebook} in {result.seconds:.1f} s -> {result.executed}")
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    result = run_notebook(args.notebook, args.param_files, args.overrides, args.out, log_output=args.log_output)
    print(f"executed {result.notebook} in {result.seconds:.1f} s -> {result.executed}")
    return 0


def default_steps(overrides=()) -> tuple[str, ...]:
    """Every step; but with `-p checkpoint=FILE` the MAE was pretrained elsewhere (the released
    weights), so curation, cleaning and pretraining are skipped and 04-06 run on that checkpoint."""
    if any(o.partition("=")[0].strip() == "checkpoint" and o.partition("=")[2].strip() for o in overrides):
        skipped = parameters.STEPS[:3]
        print(f"checkpoint given: skipping {', '.join(skipped)} (pass --steps to choose)", flush=True)
        return parameters.STEPS[3:]
    return parameters.STEPS


def _reproduce_cli(args: argparse.Namespace) -> int:
    steps = args.steps or default_steps(args.overrides)
    index = reproduce(args.profile, args.out, args.force, steps, args.overrides, dry_run=args.dry_run)
    print(f"report (open it in a browser): {index.with_name('index.html')}; figures and tables listed in {index}")
    return 0
