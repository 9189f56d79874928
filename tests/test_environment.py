"""pyproject.toml (ranges), requirements.lock (exact versions, what setup.sh installs) and
environment.yml (conda users) agree, and the .venv that setup.sh filled from the lock holds exactly
the lock's versions."""

import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from usfmae_lib import parameters

ROOT = parameters.REPO_ROOT
# Same package, different name on conda-forge.
PIP_TO_CONDA = {"torch": "pytorch", "opencv-python-headless": "py-opencv", "python-gdcm": "gdcm"}
# conda-only entries that are not Python packages of the project.
CONDA_ONLY = {"python", "pip", "tesseract"}
# setup.sh writes how it filled .venv (lock or ranges) here, last, on success.
DEPS_MARKER = ROOT / ".venv" / "usfmae-deps.txt"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _pyproject_names() -> set[str]:
    return {PIP_TO_CONDA.get(_name(r.name), _name(r.name)) for r in _pyproject_requirements()}


def _environment_yml() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _conda_entries() -> list[tuple[str, str]]:
    """(name as pip spells it with PIP_TO_CONDA applied, spec) for each entry, pip: section included."""
    entries = []
    for dep in _environment_yml()["dependencies"]:
        if isinstance(dep, dict):  # a pip: section
            entries += [(PIP_TO_CONDA.get(_name(r), _name(r)), r) for r in dep.get("pip", [])]
        else:
            entries.append((_name(dep), dep))
    return entries


def _conda_names() -> set[str]:
    assert _environment_yml()["channels"] == ["conda-forge"]
    return {name for name, _ in _conda_entries()}


def _lock_entries() -> list[str]:
    """requirements.lock's entries, each on one line with its --hash options."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _lock() -> dict[str, Requirement]:
    """requirements.lock's entries by canonical name (hash options dropped, markers kept)."""
    reqs = [Requirement(line.split(" --hash", 1)[0].split(" #", 1)[0].strip()) for line in _lock_entries()]
    return {canonicalize_name(req.name): req for req in reqs}


def _pinned(req: Requirement) -> str:
    (spec,) = req.specifier  # exactly one specifier, ==
    assert spec.operator == "==", f"requirements.lock: {req} is not pinned with =="
    return spec.version


def test_environment_yml_and_pyproject_agree():
    pip, conda = _pyproject_names(), _conda_names() - CONDA_ONLY
    assert pip - conda == set(), f"in pyproject.toml, missing from environment.yml: {sorted(pip - conda)}"
    assert conda - pip == set(), f"in environment.yml, missing from pyproject.toml: {sorted(conda - pip)}"


def test_environment_yml_pins_python_and_tesseract():
    deps = _environment_yml()["dependencies"]
    names = {_name(d) for d in deps if isinstance(d, str)}
    assert {"python", "tesseract"} <= names
    assert "python=3.11" in deps


def test_lock_pins_every_package_with_hashes_and_says_how_it_was_made():
    text = (ROOT / "requirements.lock").read_text()
    header = "".join(line for line in text.splitlines(keepends=True)[:3])
    assert "uv pip compile pyproject.toml --extra dev" in header and "-o requirements.lock" in header
    for req in _lock().values():
        _pinned(req)
    unhashed = [line.split()[0] for line in _lock_entries() if "--hash=sha256:" not in line]
    assert not unhashed, f"requirements.lock: entries without a hash: {unhashed}"
    assert len(_lock()) == len(_lock_entries()), "requirements.lock names a package twice"


def test_lock_holds_every_dependency_within_its_range():
    lock = _lock()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} (pyproject.toml) is not in requirements.lock: regenerate it (docs/developing.md)"
        version = _pinned(lock[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {req}")


def test_environment_yml_pins_the_versions_of_the_lock():
    lock = {PIP_TO_CONDA.get(name, name): _pinned(req) for name, req in _lock().items()}
    for name, spec in _conda_entries():
        if name in CONDA_ONLY:
            continue
        match = re.fullmatch(r"[A-Za-z0-9_.\-]+\s*==?\s*([^\s=<>!,]+)", spec.strip())
        assert match, f"environment.yml: {spec} is not pinned (name==version)"
        assert name in lock, f"environment.yml: {spec} is not in requirements.lock"
        assert Version(match.group(1)) == Version(lock[name]), (
            f"environment.yml pins {spec}, requirements.lock {name}=={lock[name]}")


def _deps_mode() -> str:
    """How setup.sh filled the running environment: 'lock', 'ranges', or why it cannot tell."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        return f"not run from the project's .venv (sys.prefix is {sys.prefix})"
    if not DEPS_MARKER.is_file():
        return f"{DEPS_MARKER.relative_to(ROOT)} is missing: .venv was not filled by setup.sh (run bash setup.sh)"
    return DEPS_MARKER.read_text().strip()


def test_installed_versions_equal_the_lock():
    mode = _deps_mode()
    if mode == "ranges":
        pytest.skip(".venv was installed from pyproject.toml's ranges (USFMAE_DEPS=ranges), not from "
                    "requirements.lock, so its versions need not equal the lock's")
    if mode != "lock":
        # CI runs setup.sh (lock by default) first: there a missing marker is a bug, not a reason to skip
        if os.environ.get("CI") and mode.endswith("(run bash setup.sh)"):
            pytest.fail(f"in CI: {mode}")
        pytest.skip(mode)
    wrong = []
    for name, req in _lock().items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        locked = _pinned(req)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed, locked {locked}")
            continue
        if Version(installed) != Version(locked):
            wrong.append(f"{name}: installed {installed}, locked {locked}")
    assert not wrong, ("the installed versions differ from requirements.lock (run bash setup.sh): "
                       + "; ".join(wrong))
