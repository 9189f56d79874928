#!/usr/bin/env bash
# One-command setup for a fresh Linux machine with Python >= 3.11:
#   1. the Tesseract OCR program (a system package: the only step that needs root, via apt-get);
#   2. a virtual environment in .venv with this project and every Python dependency, by default at
#      the exact versions of requirements.lock (what the tests run on; Linux x86_64, CPython 3.11).
# Usage: bash setup.sh            exact versions of requirements.lock (default)
#        bash setup.sh --ranges   resolve pyproject.toml's ranges afresh (also: USFMAE_DEPS=ranges)
# Conda users can instead run: conda env create -f environment.yml (which includes tesseract).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DEPS=${USFMAE_DEPS:-lock}
for arg in "$@"; do
    case "$arg" in
        --ranges) DEPS=ranges ;;
        --lock) DEPS=lock ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown option $arg (known: --lock, --ranges)" >&2; exit 2 ;;
    esac
done
case "$DEPS" in
    lock|ranges) ;;
    *) echo "setup: USFMAE_DEPS=$DEPS: use lock (the default) or ranges" >&2; exit 2 ;;
esac

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
# .venv/usfmae-deps.txt says how .venv was filled (lock or ranges); tests/test_environment.py reads
# it to decide whether the installed versions must equal requirements.lock. Written last, on success.
rm -f .venv/usfmae-deps.txt
if [ "$DEPS" = lock ]; then
    if [ "$(uname -sm)" != "Linux x86_64" ]; then
        echo "setup: requirements.lock is resolved for Linux x86_64, this is $(uname -sm);" >&2
        echo "setup: use the ranges instead: USFMAE_DEPS=ranges bash setup.sh" >&2
        exit 2
    fi
    .venv/bin/python - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    print(f"setup: WARNING: requirements.lock is resolved for Python 3.11, .venv has "
          f"{sys.version.split()[0]}; if the install fails: USFMAE_DEPS=ranges bash setup.sh", file=sys.stderr)
PY
    # Exactly the lock: every pinned version with its hashes, nothing else resolved (--no-deps).
    # torch is PyPI's CUDA build (with its nvidia-* wheels, about 5.5 GB); it runs on CPU as well.
    .venv/bin/python -m pip install --progress-bar off --no-deps --require-hashes -r requirements.lock
    .venv/bin/python -m pip install --progress-bar off --no-deps -e .
    .venv/bin/python -m pip check
else
    # pyproject.toml's ranges, resolved now: the newest versions they allow (untested combinations)
    .venv/bin/python -m pip install --progress-bar off -e ".[dev]"
fi
# JupyterLab from .venv saves notebooks/*.ipynb without outputs (the .py twins are the source)
.venv/bin/python -m usfmae_lib.study --install-jupyter-config
echo "$DEPS" > .venv/usfmae-deps.txt
echo "setup: done ($DEPS: $([ "$DEPS" = lock ] && echo "the versions of requirements.lock" || echo "pyproject.toml's ranges")). Activate with: source .venv/bin/activate"
