#!/usr/bin/env bash
# One-command setup for a fresh Linux machine with Python >= 3.11:
#   1. the Tesseract OCR program (a system package: the only step that needs root, via apt-get);
#   2. a virtual environment in .venv with this project and every Python dependency.
# Conda users can instead run: conda env create -f environment.yml (which includes tesseract).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if command -v tesseract >/dev/null 2>&1; then
    echo "setup: tesseract found: $(tesseract --version 2>&1 | head -n 1)"
elif command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "setup: installing tesseract-ocr with apt-get (needs root${SUDO:+, asking sudo})"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq tesseract-ocr >/dev/null
else
    echo "setup: WARNING: tesseract is not installed and apt-get is not available." >&2
    echo "setup: install Tesseract OCR with your system's package manager (or use environment.yml);" >&2
    echo "setup: until then the OCR stage of annotation removal stops with an error saying so." >&2
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: Python >= 3.11 is needed, {sys.executable} is {sys.version.split()[0]}; "
             "run with PYTHON=python3.11 bash setup.sh")
PY
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch>=2.14 in pyproject.toml: pip takes PyPI's standard build, which runs on CPU and on CUDA GPUs
# and imports together with torchvision (needed by timm). About 5.5 GB; a few minutes.
.venv/bin/python -m pip install --progress-bar off -e ".[dev]"
# JupyterLab from .venv saves notebooks/*.ipynb without outputs (the .py twins are the source)
.venv/bin/python -m usfmae_lib.study --install-jupyter-config
echo "setup: done. Activate with: source .venv/bin/activate"
