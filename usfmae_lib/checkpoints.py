"""Checkpoint files: read them safely, write them atomically, and say why one cannot be read.

* `read_checkpoint(path)`: the dict a torch.save file (zip or legacy) or a safetensors file holds;
  `load_checkpoint(path)`: its state dict (bare, `{'model': ...}`, DDP or torch.compile prefixes);
  `checkpoint_params(path)`: the recipe our pretraining records in it.
* A file that cannot be read is a UsfmaeError naming the file, the cause (missing, empty or
  truncated, corrupt, not a checkpoint, refused because it holds pickled code) and the fix,
  diagnosed from its bytes and pickle opcodes.
* `save_model(model, path, record)`, `save_safetensors(tensors, path)`: safetensors files, written
  atomically (temp file + rename).

It never unpickles untrusted code: torch.save files are read with `torch.load(weights_only=True)`
(tensors and plain python containers only), safetensors files hold no pickle at all, and the
diagnosis reads opcodes without executing them. What a checkpoint means for the MAE (its config,
its position tables, building the model) is `mae.py`'s.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch

from . import UsfmaeError, atomic_write

# the first bytes of each file format a checkpoint may come in
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6: a zip holding data.pkl and the tensors
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # older torch.save: a pickled magic number first
DEFAULT_FIX = "re-download or re-export it"
PICKLE_FIX = ("if you trust the file, re-save only its state dict (torch.save(model.state_dict(), ...)) or "
              "convert it to safetensors; otherwise do not use it")
RECORD_KEY = "usfmae_record"  # safetensors metadata: the constructor record save_model writes


# ============================================================================ reading
def read_checkpoint(path, fix: str | None = None) -> dict:
    """The raw object in a checkpoint file, read without running any pickled code.

    A file that cannot be read raises UsfmaeError naming the file, the cause (missing, empty or
    truncated, corrupt, not a checkpoint at all, refused because it holds pickled code) and what
    to do: `fix`, else a default for the cause; fix="" leaves it to the caller to add."""
    path = Path(path)
    if not path.exists():
        raise UsfmaeError(_with_fix(f"checkpoint {path} does not exist", fix,
                                    "check the path (or download the weights)"))
    if not path.is_file():
        raise UsfmaeError(_with_fix(f"checkpoint {path} is a folder, not a file", fix,
                                    "pass the checkpoint file inside it"))
    kind = file_kind(path)
    if kind in ("empty", "unknown"):
        raise UsfmaeError(_with_fix(f"checkpoint {path}: {_unknown_format_cause(path, kind)}", fix, DEFAULT_FIX))
    try:
        if kind == "safetensors":
            obj = _read_safetensors(path)
        else:
            # weights_only: tensors and plain python containers only; anything that would call
            # code while unpickling (e.g. a __reduce__ payload) is refused instead of executed.
            # mmap (zip files): tensors are read when used, so a caller that needs the encoder of a
            # ViT-B training checkpoint (1.3 GB with its optimiser state) does not read all of it
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as err:  # every way a damaged or hostile file fails; diagnosed from its bytes
        cause = _unreadable_cause(path, kind, err)
        default_fix = PICKLE_FIX if cause.startswith("refused") else DEFAULT_FIX
        raise UsfmaeError(_with_fix(f"checkpoint {path}: {cause}", fix, default_fix)) from err
    if not isinstance(obj, dict):
        raise UsfmaeError(_with_fix(f"checkpoint {path}: not a checkpoint: it holds a {type(obj).__name__}, "
                                    "not a state dict or {'model': state_dict}", fix,
                                    "save model.state_dict() instead"))
    return obj


def unwrap_state_dict(obj: dict, path) -> dict:
    """The state dict in what read_checkpoint returned: `obj['model']` or `obj` itself, without the
    prefixes DDP ('module.') and torch.compile ('_orig_mod.') put before every key. UsfmaeError
    naming `path` when it holds no dict of tensors."""
    state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsfmaeError(f"checkpoint {path} holds no state dict of tensors (keys: "
                          f"{', '.join(list(map(str, obj))[:8])}); expected a bare state dict or {{'model': ...}}")
    return state


def load_checkpoint(path, fix: str | None = None) -> dict:
    """State dict from a bare dict (released USF-MAE weights), a {'model': ...} checkpoint
    (reference MAE and our pretraining) or a safetensors file; never runs pickled code.
    `fix`: what an error message tells the user to do about an unreadable file."""
    return unwrap_state_dict(read_checkpoint(path, fix), path)


def checkpoint_params(path) -> dict:
    """The recipe a checkpoint records ('params' of our pretraining: model, img_size, mask_ratio,
    pos_embed, ...); {} for a bare state dict such as the released weights."""
    obj = read_checkpoint(path)
    return dict(obj["params"]) if isinstance(obj.get("params"), dict) else {}


def _read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors; with the constructor record save_model writes into its
    metadata (model, overrides, img_size, ...), {'model': tensors, **record},
    so mae.load_model rebuilds models that no named config describes."""
    import safetensors
    import safetensors.torch

    state = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        record = (f.metadata() or {}).get(RECORD_KEY)
    return {"model": state, **json.loads(record)} if record else state


# ============================================================================ writing
def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """`tensors` (copied to the CPU, contiguous) to a safetensors file with string `metadata`
    ('format': 'pt' first, as timm and transformers expect). Written atomically (temp file + rename)."""
    import safetensors.torch

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def save_model(model: torch.nn.Module, path, record: dict, source: str = "usfmae MAE") -> Path:
    """A whole model's state dict as safetensors, with `record` ({'params': {'model',
    'model_overrides', 'img_size', ...}}) in its metadata so that mae.load_model rebuilds it without
    a named config and without any pickle. Written atomically."""
    return save_safetensors(model.state_dict(), path, {"source": source, RECORD_KEY: json.dumps(record)})


# ============================================================================ diagnosing
def describe_keys(keys, n: int = 4) -> str:
    """'count (first n sorted keys, ...)': the keys a checkpoint and a model disagree on, for a message."""
    keys = sorted(keys)
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def file_kind(path) -> str:
    """The format a file's first bytes announce: zip, legacy (both torch.save), pickle (a plain
    python pickle), safetensors (8-byte header length, then a JSON header), empty or unknown."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_MAGIC[:9]):
        return "legacy"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode of pickle protocols 2-5
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2 ** 30:
        return "safetensors"
    return "unknown"


def _with_fix(message: str, fix: str | None, default: str) -> str:
    return message if fix == "" else f"{message}; {fix or default}"


def _unknown_format_cause(path: Path, kind: str) -> str:
    if kind == "empty":
        return ("truncated: the file is empty (0 bytes), so its write or copy was cut off "
                "(a full disk or a killed job?)")
    with open(path, "rb") as f:
        head = f.read(16)
    is_text = all(32 <= byte < 127 or byte in b"\t\n\r" for byte in head)
    looks = " (text, e.g. an HTML page: a failed download?)" if is_text else ""
    return ("not a checkpoint: neither a torch.save file (zip or legacy pickle) nor safetensors; "
            f"it starts with {head!r}{looks}")


def _unreadable_cause(path: Path, kind: str, err: Exception) -> str:
    """Why a file that announces a checkpoint format failed to load: truncated, corrupt, or
    refused because its pickle imports code. Reads bytes and pickle opcodes only, never unpickles."""
    size = path.stat().st_size
    if kind == "safetensors":
        return _safetensors_cause(path, size, err)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if not pickles:
                    return "not a checkpoint: a zip archive without the data.pkl that torch.save writes"
                damaged = archive.testzip()  # CRC of every member
                if damaged:  # members sit in a folder named after the file torch.save first wrote
                    return f"corrupt: {damaged.split('/', 1)[-1]} inside fails its checksum (damaged bytes)"
                try:  # torch's own static reading of data.pkl: the globals weights_only refuses
                    unsafe, complete = torch.serialization.get_unsafe_globals_in_checkpoint(path), True
                except Exception:  # data.pkl ends early, or holds opcodes torch's reader does not walk
                    imports, complete = _pickle_imports(archive.read(pickles[0]))
                    unsafe = _unsafe_globals(imports)
        except (zipfile.BadZipFile, EOFError, OSError):
            return (f"truncated: a torch.save zip file of {size} bytes whose end (the zip directory) is "
                    "missing or damaged; the write or copy was cut off")
    else:  # legacy torch.save (several pickles in a row) or a plain pickle (one)
        with open(path, "rb") as f:
            imports, complete = _pickle_imports(f, n_pickles=5 if kind == "legacy" else 1)
        unsafe = _unsafe_globals(imports)
    if unsafe:
        return (f"refused: it holds pickled code or python objects ({', '.join(sorted(set(unsafe))[:4])}) that "
                "loading would run, so it was not unpickled")
    if not complete:
        return (f"truncated or corrupt: its pickle stream ({size} bytes) ends early or holds bytes that are "
                "no pickle opcode; the write or copy was cut off or damaged")
    if kind == "pickle":
        return "not a checkpoint: a plain python pickle, not a torch.save or safetensors file"
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"corrupt or truncated: torch cannot read it ({type(err).__name__}: {first_line})"


def _safetensors_cause(path: Path, size: int, err: Exception) -> str:
    """Truncated (shorter than its header says) or corrupt safetensors file."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
            end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                       default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            end = None
    if 8 + header_len > size or (end is not None and end > size):
        return (f"truncated: a safetensors file of {size} bytes whose header describes "
                f"{end or 8 + header_len} bytes; the write or copy was cut off")
    return f"corrupt safetensors file ({str(err).splitlines()[0][:200]})"


# torch.serialization.get_unsafe_globals_in_checkpoint, the public way to ask which globals
# weights_only refuses, reads torch.save zip files only (a legacy file is a ValueError), and its
# static reader stops at opcodes weights_only never accepts (STACK_GLOBAL, FRAME, ... of the
# protocol 4-5 pickles pickle.dump writes). For those files the globals are listed here with
# pickletools.genops, which reads opcodes and executes nothing, and _unsafe_globals asks torch.
def _pickle_imports(data, n_pickles: int = 1) -> tuple[list[tuple[str, str]], bool]:
    """((module, name) of every global the pickle(s) import, whether each pickle reached STOP), found
    by reading opcodes with pickletools (nothing is executed). `data`: bytes or a binary file."""
    import pickletools

    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    names = []
    try:
        for _ in range(n_pickles):
            memo, top, strings = {}, None, []  # enough stack tracking to name STACK_GLOBAL's module and name
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "STOP":
                    break
                if op.name in ("GLOBAL", "INST"):
                    names.append(tuple(arg.split(" ", 1)) if " " in arg else (arg, ""))
                elif op.name == "STACK_GLOBAL":
                    names.append(tuple(map(str, ([None, None] + strings)[-2:])))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = top
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = top
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    top = memo.get(arg)
                    strings.append(top)
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    top = arg
                    strings.append(arg)
                else:
                    top = None
            if n_pickles > 1:  # legacy torch.save: another pickle follows, unless the file ends here
                if not stream.read(1):
                    break
                stream.seek(-1, io.SEEK_CUR)
    except (ValueError, EOFError, pickle.UnpicklingError):  # ends before STOP: truncated or damaged
        return names, False
    return names, True


def _unsafe_globals(imports: list[tuple[str, str]]) -> list[str]:
    """The 'module.name' of each of `imports` that torch's weights_only unpickler refuses (neither
    allowlisted by torch nor added with torch.serialization.add_safe_globals). Asked through the
    public get_unsafe_globals_in_checkpoint, which reads only torch.save zip files: so the names go,
    as GLOBAL opcodes and nothing else, into the data.pkl of a minimal zip made in memory, which it
    reads statically (nothing is unpickled)."""
    if not imports:
        return []

    def line(text) -> bytes:
        return str(text).replace("\n", " ").encode("utf-8", "replace") + b"\n"

    probe = io.BytesIO()
    with zipfile.ZipFile(probe, "w") as archive:  # the two records torch's zip reader requires
        archive.writestr("probe/data.pkl", b"\x80\x02" + b"".join(b"c" + line(m) + line(n) for m, n in imports) + b".")
        archive.writestr("probe/version", "3\n")
    probe.seek(0)
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(probe)
    except Exception:  # a torch whose zip reader wants more: judge by module, as weights_only roughly does
        return [f"{m}.{n}" for m, n in imports if not f"{m}.{n}".startswith(("torch.", "collections.OrderedDict",
                                                                           "_codecs.encode"))]
