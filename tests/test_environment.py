"""environment.yml (conda users) and pyproject.toml (pip users) list the same packages."""

import re
import tomllib

import yaml

from usfmae_lib import parameters

# Same package, different name on conda-forge.
PIP_TO_CONDA = {"torch": "pytorch", "opencv-python-headless": "py-opencv", "python-gdcm": "gdcm"}
# conda-only entries that are not Python packages of the project.
CONDA_ONLY = {"python", "pip", "tesseract"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_names() -> set[str]:
    project = tomllib.loads((parameters.REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {PIP_TO_CONDA.get(_name(r), _name(r)) for r in requirements}


def _conda_names() -> set[str]:
    env = yaml.safe_load((parameters.REPO_ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # a pip: section
            names |= {PIP_TO_CONDA.get(_name(r), _name(r)) for r in dep.get("pip", [])}
        else:
            names.add(_name(dep))
    return names


def test_environment_yml_and_pyproject_agree():
    pip, conda = _pyproject_names(), _conda_names() - CONDA_ONLY
    assert pip - conda == set(), f"in pyproject.toml, missing from environment.yml: {sorted(pip - conda)}"
    assert conda - pip == set(), f"in environment.yml, missing from pyproject.toml: {sorted(conda - pip)}"


def test_environment_yml_pins_python_and_tesseract():
    deps = yaml.safe_load((parameters.REPO_ROOT / "environment.yml").read_text())["dependencies"]
    names = {_name(d) for d in deps if isinstance(d, str)}
    assert {"python", "tesseract"} <= names
    assert "python=3.11" in deps
