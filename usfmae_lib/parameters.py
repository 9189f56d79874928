"""The study's parameters: where they live, and reading and checking them.

The repository's folders, profiles and steps; a notebook's defaults (its one cell tagged
`parameters`, each line `name = <literal>`); `params/<profile>/<notebook>.yaml` and `-p key=value`
over them, where unknown names and wrong types are refused; which parameters hold paths; the marker
`usfmae run` injects beside them. `runner` (usfmae run / reproduce) and `study` (what a notebook does
first) both read them here. Notebooks import this module through study, so it imports fast: no
nbformat, jupytext or torch.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from usfmae_lib import UsfmaeError

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
# paper: the paper's text on a GPU; official: the same except the MAE recipe (and notebook 02's
# resize filter), which follow the official code (75% mask, from the ImageNet MAE, ...); see README
PROFILES = ("smoke", "quick", "paper", "official")
DEFAULT_PROFILE = "quick"  # what `usfmae reproduce` runs: a laptop CPU, under an hour
STEPS = (  # notebooks in the order data flows through them
    "01_curation",
    "02_preprocessing",
    "03_mae_pretraining",
    "04_reconstruction",
    "05_finetuning",
    "06_results",
    "07_ablations",
)
# `usfmae reproduce --dry-run`: params/dry_run/<notebook>.yaml, applied after the profile's file,
# shrinks a profile to a step or two of each of its code paths on a small synthetic tree
DRY_RUN = "dry_run"

# injected by usfmae run / reproduce (runner.py) beside the parameters: the files and -p they came from
MARKER = "_usfmae_run"


# ----------------------------------------------------------------------------- paths


_PATH_NAME = re.compile(r"(^|_)(dir|dirs|root|roots|checkpoint|path|file|files)$")


def is_path_parameter(name: str) -> bool:
    """A parameter holding a path (or a list of them): its name ends in dir, root(s), checkpoint, path or file."""
    return bool(_PATH_NAME.search(name))


# values of path parameters that name something instead of a file (notebook 04's checkpoint)
NAMED_VALUES = ("teaching",)


def resolve_path_value(value, base: Path):
    """A relative path (a string, or a list of them) made absolute against base; "", None, names in
    NAMED_VALUES and absolute paths stay as given ("~" is expanded)."""
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_path_value(v, base) for v in value)
    if isinstance(value, str) and value.strip() and value not in NAMED_VALUES:
        path = Path(value).expanduser()
        return path.as_posix() if path.is_absolute() else os.path.normpath(Path(base) / path)
    return value


def inside(path: Path, folder: Path) -> bool:
    """path is folder or lies below it (links resolved)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


# ----------------------------------------------------------------------------- a notebook's defaults


def cell_tags(cell) -> list[str]:
    """The tags of a notebook cell (a NotebookNode or a dict)."""
    return list(cell.get("metadata", {}).get("tags", []))


def parameters_cell(nb, name: str = "notebook") -> int:
    """Index of the single cell tagged `parameters` of a notebook (nbformat.NotebookNode)."""
    found = [i for i, c in enumerate(nb.cells) if "parameters" in cell_tags(c)]
    if len(found) != 1:
        raise UsfmaeError(f"{name}: expected exactly one cell tagged 'parameters', found {len(found)}")
    return found[0]


def notebook_parameters(nb, name: str = "notebook") -> dict:
    """The parameters cell's defaults, as {name: value}. Each must be `name = <literal>`."""
    return cell_parameters(nb.cells[parameters_cell(nb, name)].source, name)


def cell_parameters(source: str, name: str = "notebook") -> dict:
    """{name: value} of a parameters cell's source; each line must be `name = <literal>`."""
    defaults = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, (ast.Assign, ast.AnnAssign))):
            raise UsfmaeError(f"{name}: the parameters cell may hold only assignments (line {node.lineno})")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            raise UsfmaeError(f"{name}: parameters must be plain `name = value` (line {node.lineno})")
        try:
            defaults[targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise UsfmaeError(
                f"{name}: parameter {targets[0].id!r} must have a literal default (line {node.lineno})"
            ) from None
    return defaults


def parameters_source(text: str, suffix: str) -> str | None:
    """The source of the one cell tagged `parameters` in a py:percent or .ipynb text, or None.
    Read without jupytext or nbformat, which take seconds to import."""
    if suffix == ".ipynb":
        try:
            cells = json.loads(text).get("cells", [])
        except ValueError:
            return None
        found = ["".join(c["source"]) if isinstance(c.get("source"), list) else c.get("source", "")
                 for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    else:
        cells, body = [], None
        for line in text.splitlines(keepends=True):
            if line.startswith("# %%"):
                body = []
                cells.append((line, body))
            elif body is not None:
                body.append(line)
        found = ["".join(body) for header, body in cells if re.search(r'tags=\[[^\]]*"parameters"', header)]
    return found[0] if len(found) == 1 else None


def notebook_defaults(step: str) -> tuple[dict, dict]:
    """(defaults as saved, defaults as last committed, {} when git cannot tell) of notebooks/<step>."""
    for suffix in (".py", ".ipynb"):
        path = NOTEBOOKS_DIR / f"{step}{suffix}"
        if path.exists():
            break
    else:
        raise UsfmaeError(f"study.setup: no notebook {NOTEBOOKS_DIR / step}.py or .ipynb; "
                          "pass the notebook's own name (STEP)")
    source = parameters_source(path.read_text(), suffix)
    if source is None:
        raise UsfmaeError(f"{path}: expected exactly one cell tagged 'parameters'")
    saved = cell_parameters(source, str(path))
    committed, text = {}, _committed_text(path)
    source = parameters_source(text, suffix) if text is not None else None
    if source is not None:
        try:
            committed = cell_parameters(source, f"{path} (HEAD)")
        except UsfmaeError:  # an older commit with a cell the runner would refuse: the saved file decides
            committed = {}
    return saved, committed


def _committed_text(path: Path) -> str | None:
    """The file as git HEAD holds it, or None (no git, not a checkout, not committed yet)."""
    try:
        proc = subprocess.run(["git", "-C", str(path.parent), "show", f"HEAD:./{path.name}"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- values over the defaults


def parse_value(text: str):
    """`-p key=value` value: YAML scalar/list/dict (`3`, `0.5`, `true`, `[1, 2]`), `1e-3` as float."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise UsfmaeError(f"value {text!r} is not valid YAML{_yaml_error_text(err)}; quote it (key='\"text\"') "
                          "or fix the brackets") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' as a string; users mean a number
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def load_params(files=(), overrides=()) -> tuple[dict, dict]:
    """Merge YAML files in order, then `key=value` overrides. Returns (params, where each came from)."""
    params, origin = {}, {}
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise UsfmaeError(f"{f}: parameter file not found" + (" (it is a folder)" if f.is_dir() else ""))
        try:
            data = yaml.safe_load(f.read_text()) or {}
        except UnicodeDecodeError as err:
            raise UsfmaeError(f"{f}: not a text file ({err.reason} at byte {err.start}); pass a YAML file") from err
        except yaml.YAMLError as err:
            raise UsfmaeError(f"{f}{_yaml_error_text(err)}; fix the YAML there (a space after ':', "
                              "closed brackets and quotes, spaces not tabs)") from err
        if not isinstance(data, dict):
            raise UsfmaeError(f"{f}: a parameter file must be a YAML mapping of name: value")
        params.update(data)
        origin.update({k: str(f) for k in data})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsfmaeError(f"-p {item!r}: expected key=value")
        params[key.strip()] = parse_value(text)
        origin[key.strip()] = "-p"
    return params, origin


def with_profile(step: str, profile: str | None, files=()) -> list:
    """Parameter files in the order they apply: params/<profile>/<step>.yaml (when a profile is given),
    then `files`; -p overrides come after all of them."""
    return ([PARAMS_DIR / profile / f"{step}.yaml"] if profile else []) + list(files)


def _yaml_error_text(err: yaml.YAMLError) -> str:
    """', line L, column C: <problem> (<context> at line L2)' from a PyYAML error (lines from 1)."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: YAML syntax error: {problem}"


def check_params(params: dict, defaults: dict, notebook: str, origin: dict | None = None) -> dict:
    """Refuse unknown names and wrong types; return params with ints widened where floats are due."""
    origin = origin or {}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        where = ", ".join(f"{k} (from {origin.get(k, '?')})" for k in unknown)
        raise UsfmaeError(
            f"{notebook}: unknown parameter(s) {where}. Valid parameters: {', '.join(sorted(defaults))}"
        )
    checked = {}
    for key, value in params.items():
        expected = defaults[key]
        ok, value = _fits(value, expected)
        if not ok:
            raise UsfmaeError(
                f"{notebook}: parameter {key!r} (from {origin.get(key, '?')}) must be "
                f"{type(expected).__name__} like its default {expected!r}, got {type(value).__name__} {value!r}"
            )
        checked[key] = value
    return checked


def _fits(value, expected) -> tuple[bool, object]:
    if expected is None:  # a None default accepts anything (e.g. an optional path)
        return True, value
    if value is None:  # optional values can always be switched off
        return True, value
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool), value
    if isinstance(expected, float) and isinstance(value, int):
        return True, float(value)
    return isinstance(value, type(expected)), value


def parse_shard(value) -> tuple[int, int] | None:
    """A grid's share, "I/N" (1 <= I <= N): (I, N); None or "" for the whole grid."""
    if value in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsfmaeError(f"shard {value!r}: give I/N with 1 <= I <= N, e.g. --shard 1/4 for the first of four shares")
    return int(match[1]), int(match[2])
