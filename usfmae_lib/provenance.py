"""Provenance: what made an output, so that a reviewer can check a table against its environment.

* `record(params=None, profile=None, device=None)`: one dict: the git commit and whether the tree
  was dirty, python, torch, timm, numpy, OpenCV, CUDA and the GPU driver (or the CPU's model and
  vector capability), the device, the profile, and the parameters' hash.
* `markdown_block(rec)`: the same as a few lines of markdown (index.md, index.html, Table 2's note).
* `differences(records)`: which of those fields differ between the steps of one output folder.
* `FILE` (provenance.json): where the runner keeps each step's record, in the step's folder;
  `load(path)` reads one; `folder_record` and `folder_markdown` are what index.md and index.html
  say on top (the writing process's record, then which step was made by which code and environment:
  `differences_markdown`).

Versions come from the installed distributions (importlib.metadata), so nothing heavy is imported
to read them; CUDA and the device are read from torch only when torch is already imported or a
device is named.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# distribution name -> the name a reader knows it by
PACKAGES = {"torch": "torch", "timm": "timm", "numpy": "numpy", "opencv-python-headless": "opencv"}
# the fields that say two outputs were made by different code or environments (differences)
COMPARED = ("commit", "dirty", "python", "torch", "timm", "numpy", "opencv", "cuda", "device")
FILE = "provenance.json"  # a step's record, in its folder (DIR/<step>/provenance.json, written by the runner)


def version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_state(repo: Path = REPO_ROOT) -> dict:
    """{'commit': full hash or None, 'dirty': True when tracked files differ from it (None: not a git
    checkout, e.g. an installed wheel)}. Untracked files (outputs, notebooks' executed copies) do not count."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return dict(commit=None, dirty=None)
        status = git("status", "--porcelain", "--untracked-files=no")
        return dict(commit=head.stdout.strip(), dirty=bool(status.stdout.strip()))
    except (OSError, subprocess.SubprocessError):  # no git program
        return dict(commit=None, dirty=None)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(field: str) -> str | None:
    """The first GPU's `field` as nvidia-smi reports it (no CUDA context is made), or None."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_driver() -> str | None:
    return _nvidia_smi("driver_version")


def gpu_name() -> str:
    return _nvidia_smi("name") or "CUDA GPU"


def device_info(device=None) -> dict:
    """The device a step computed on: a CUDA GPU's name, CUDA version and driver, else the CPU's model
    and torch's vector capability (AVX2, AVX512, ...: bf16 speed depends on it)."""
    if "torch" not in sys.modules and device is None:
        return dict(device=f"cpu: {cpu_model()}", cuda=None, driver=None, cpu_capability=None)
    import torch

    dev = torch.device("cuda" if device in (None, "auto") and torch.cuda.is_available() else
                       (device if device not in (None, "auto") else "cpu"))
    if dev.type == "cuda":  # named by nvidia-smi unless torch already holds a context: asking torch would make one
        name = torch.cuda.get_device_name(dev) if torch.cuda.is_initialized() else gpu_name()
        return dict(device=f"cuda: {name}", cuda=torch.version.cuda, driver=gpu_driver(), cpu_capability=None)
    return dict(device=f"cpu: {cpu_model()}", cuda=torch.version.cuda, driver=None,
                cpu_capability=torch.backends.cpu.get_cpu_capability())


def params_hash(params: dict | None) -> str | None:
    """The first 12 hex digits of the sha256 of the parameters as sorted JSON: equal hash, equal parameters."""
    if params is None:
        return None
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def record(params: dict | None = None, profile: str | None = None, device=None) -> dict:
    """Everything that made an output: code (commit, dirty), environment (versions, device), profile,
    parameters' hash, and when."""
    from usfmae_lib import __version__

    rec = dict(**git_state(), usfmae=__version__, python=platform.python_version(),
               **{name: version(dist) for dist, name in PACKAGES.items()}, **device_info(device),
               platform=platform.platform(), profile=profile, params_hash=params_hash(params),
               made=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return rec


def commit_label(rec: dict) -> str:
    """'1a2b3c4d5e6f' or '1a2b3c4d5e6f+dirty' (the short commit a results row carries), 'no git' outside a checkout."""
    if not rec.get("commit"):
        return "no git"
    return rec["commit"][:12] + ("+dirty" if rec.get("dirty") else "")


def markdown_block(rec: dict, title: str = "Provenance", bold: bool = True) -> str:
    """The record as a short markdown list (index.md, index.html's top, Table 2's note: not bold there,
    where bold marks a verdict)."""
    code = commit_label(rec)
    if rec.get("dirty"):
        code += " (uncommitted changes to tracked files: this commit alone does not reproduce it)"
    gpu = rec.get("cuda") and str(rec.get("device", "")).startswith("cuda")
    where = (f"{rec['device']}, CUDA {rec['cuda']}, driver {rec.get('driver') or 'unknown'}" if gpu else
             f"{rec.get('device')}" + (f" ({rec['cpu_capability']})" if rec.get("cpu_capability") else ""))
    lines = [f"**{title}**" if bold else f"{title}:", "",
             f"- code: usfmae {rec.get('usfmae')}, commit {code}",
             f"- python {rec.get('python')}, torch {rec.get('torch')}, timm {rec.get('timm')}, numpy {rec.get('numpy')}, "
             f"OpenCV {rec.get('opencv')}",
             f"- device: {where}",
             f"- platform: {rec.get('platform')}"]
    if rec.get("profile") or rec.get("params_hash"):
        lines.append(f"- profile {rec.get('profile')}, parameters hash {rec.get('params_hash')}")
    lines.append(f"- made {rec.get('made')}")
    return "\n".join(lines)


def differences(records: dict) -> dict:
    """{field: {value: [names]}} for each COMPARED field on which the records ({name: record}) differ."""
    out = {}
    for field in COMPARED:
        values = {}
        for name, rec in records.items():
            if rec:
                values.setdefault(str(rec.get(field)), []).append(name)
        if len(values) > 1:
            out[field] = values
    return out


def load(path) -> dict | None:
    """The record stored in a step's provenance.json; None when there is none or it cannot be read."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _field_label(rec: dict, field: str) -> str:
    if field in ("commit", "dirty"):
        return commit_label(rec)
    return str(rec.get(field))


def differences_markdown(records: dict) -> str:
    """Which of `records` ({name: record}; None, no record, is left out) were made by which code and
    environment, as a markdown table: "" when they agree on every COMPARED field; else one row per
    distinct combination of the fields that differ (commit and dirty shown together), naming the
    records that share it."""
    known = {name: rec for name, rec in records.items() if rec}
    fields = list(differences(known))
    if not fields:
        return ""
    if "commit" in fields and "dirty" in fields:
        fields.remove("dirty")
    columns = ["commit" if f in ("commit", "dirty") else f for f in fields]
    groups: dict[tuple, list[str]] = {}
    for name, rec in known.items():
        groups.setdefault(tuple(_field_label(rec, f) for f in fields), []).append(name)
    lines = ["| step(s) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {', '.join(names)} | " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
              for values, names in groups.items()]
    return "\n".join(lines)


def folder_record(out_dir, profile: str | None, steps) -> dict:
    """The record on top of an output folder's index.md and index.html: this process's (device "auto",
    as the runner records each step), with as parameters' hash the hash of the steps' own ({step: its
    params_hash}): one value that changes when any step's parameters do."""
    hashes = {step: (load(Path(out_dir) / step / FILE) or {}).get("params_hash") for step in steps}
    return record(params=hashes, profile=profile, device="auto")


def folder_markdown(out_dir, steps, current: dict) -> str:
    """What index.md and index.html say on top: markdown_block(current), then, when the steps' own
    records (DIR/<step>/provenance.json) differ from each other or from it on COMPARED, which step was
    made by which code and environment, and which steps have no record."""
    records = {"this index (above)": current, **{step: load(Path(out_dir) / step / FILE) for step in steps}}
    lines = [markdown_block(current)]
    table = differences_markdown(records)
    if table:
        lines += ["", "**Not every step was made by the code and environment above**: a step that `usfmae reproduce` "
                  f"skips because it is unchanged keeps the provenance of the run that made it (`<step>/{FILE}`).",
                  "", table]
    missing = [step for step in steps if records[step] is None]
    if missing:
        lines += ["", f"No `{FILE}` (the step failed, or ran before provenance was recorded): {', '.join(missing)}."]
    return "\n".join(lines)
