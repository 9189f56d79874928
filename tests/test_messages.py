"""Messages, not tracebacks (issue 17): a damaged or hostile file, a full disk or a YAML typo ends a
command with exit code 2 and one message naming the file, the cause and the fix.

Each test runs the real entry point (`usfmae_lib.cli.main`, in process, or `usfmae` in a
subprocess) on tiny inputs: a micro MAE pretrained for two steps on 48 fake 40 px scans, which are
also the folder dataset that fine-tuning reads at 32 px.
"""
import collections
import errno
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from usfmae_lib import cli, mae, pretrain

REPO = Path(__file__).resolve().parents[1]
MICRO = "{embed_dim: 48, depth: 2, num_heads: 3, decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models gain nothing from threads; on a shared machine waiting threads slow every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_message(rc, err: str, *parts):
    """Exit code 2, one `usfmae <command>: error:` message holding every part, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err and ": error: " in err, err
    for part in parts:
        assert str(part) in err, f"{part!r} not in:\n{err}"


# ---------------------------------------------------------------------------- damaged files
class _Payload:
    """Unpickling this calls Path.touch(marker): code execution if a loader trusted the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _damage(path: Path, how: str, marker: Path) -> None:
    """Replace a torch checkpoint by a damaged or hostile one, in one of the ways files go bad."""
    good = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "truncated zip":  # a copy or write cut off halfway
        path.write_bytes(good[: len(good) // 2])
    elif how == "empty file":  # e.g. the disk filled up before anything was written
        path.write_bytes(b"")
    elif how == "damaged bytes":  # bits flipped inside data.pkl: the zip's checksum no longer matches
        with zipfile.ZipFile(path) as archive:
            offset = next(i for i in archive.infolist() if i.filename.endswith("data.pkl")).header_offset
        name_len, extra_len = struct.unpack("<HH", good[offset + 26:offset + 30])  # the local header's own
        start = offset + 30 + name_len + extra_len + 8
        damaged = bytearray(good)
        damaged[start:start + 8] = bytes(b ^ 0xFF for b in damaged[start:start + 8])
        path.write_bytes(bytes(damaged))
    elif how == "pickled code":
        torch.save({"model": {"w": torch.ones(2)}, "step": 2, "payload": _Payload(marker)}, path)
    elif how == "lacks keys":  # a valid torch file, but a bare state dict, not a pretraining checkpoint
        torch.save({"w": torch.ones(2)}, path)
    else:
        raise ValueError(how)


CAUSES = {"random bytes": "not a checkpoint", "truncated zip": "truncated", "empty file": "truncated",
          "damaged bytes": "corrupt", "pickled code": "refused", "lacks keys": "not a pretraining checkpoint"}


# ---------------------------------------------------------------------------- a tiny pretraining run
def _pretrain_args(clean_tree, out, epochs=1):
    # 44 images packed (4 held out), batch 16: 2 steps per epoch, a checkpoint at the end of each
    return ["pretrain", "--data", str(clean_tree), "--out", str(out), "--no-progress", "--workers", "0",
            "--batch-size", "16", "-p", "img_size=32", "-p", f"epochs={epochs}", "-p", f"model_overrides={MICRO}"]


@pytest.fixture(scope="module")
def finished_run(clean_tree, tmp_path_factory):
    """A finished two-step pretraining run: (its output folder, the bytes of its checkpoint-last.pth)."""
    out = tmp_path_factory.mktemp("pretrained")
    assert cli.main(_pretrain_args(clean_tree, out)) == 0
    ckpt = out / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT
    return out, ckpt.read_bytes()


@pytest.fixture
def run_with_good_checkpoint(finished_run):
    """The finished run, its checkpoint restored after each test damages it."""
    out, good = finished_run
    ckpt = out / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT
    yield out, ckpt
    ckpt.write_bytes(good)
    for extra in ckpt.parent.iterdir():
        if extra != ckpt:
            extra.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", list(CAUSES))
def test_resume_from_a_damaged_checkpoint_names_the_file_the_cause_and_how_to_go_on(
        clean_tree, run_with_good_checkpoint, tmp_path, capsys, how):
    out, ckpt = run_with_good_checkpoint
    marker = tmp_path / "pwned"
    _damage(ckpt, how, marker)
    rc = cli.main(_pretrain_args(clean_tree, out) + ["--resume"])
    _assert_message(rc, capsys.readouterr().err, "cannot resume", ckpt, CAUSES[how],
                    f"delete {ckpt} and rerun to start over", "keeps only this one checkpoint")
    assert not marker.exists(), "resuming ran code from the pickle"


def test_resume_failure_names_an_intact_copy_beside_the_damaged_checkpoint(
        clean_tree, run_with_good_checkpoint, capsys):
    out, ckpt = run_with_good_checkpoint
    backup = ckpt.with_name("checkpoint-backup.pth")
    shutil.copyfile(ckpt, backup)  # a user's copy of the good checkpoint (step 2)
    _damage(ckpt, "truncated zip", None)
    rc = cli.main(_pretrain_args(clean_tree, out) + ["--resume"])
    _assert_message(rc, capsys.readouterr().err, ckpt, "truncated",
                    f"copy {backup} (intact, step 2) to {ckpt} and rerun with --resume")
    shutil.copyfile(backup, ckpt)  # the advice works: the copy resumes (finished: nothing to do)
    assert cli.main(_pretrain_args(clean_tree, out) + ["--resume"]) == 0


def test_resume_from_hostile_checkpoint_in_a_real_process_exits_2_without_running_it(
        clean_tree, run_with_good_checkpoint, tmp_path):
    out, ckpt = run_with_good_checkpoint
    marker = tmp_path / "pwned"
    _damage(ckpt, "pickled code", marker)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    usfmae = Path(sys.executable).with_name("usfmae")
    proc = subprocess.run([str(usfmae), *_pretrain_args(clean_tree, out), "--resume"], capture_output=True,
                          text=True, env=env, timeout=300)
    _assert_message(proc.returncode, proc.stderr, "usfmae pretrain: error: cannot resume", ckpt,
                    "refused: it holds pickled code")
    assert not marker.exists(), "resuming ran code from the pickle"


# ---------------------------------------------------------------------------- a full disk
Usage = collections.namedtuple("Usage", "total used free")


@pytest.mark.parametrize("error", ["torch writer RuntimeError", "OSError ENOSPC"])
def test_simulated_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_says_so(
        clean_tree, tmp_path, monkeypatch, capsys, error):
    """The second save (step 4) hits a full disk, simulated: torch.save writes part of the file and
    fails as PyTorch's writer does, and shutil.disk_usage reports no free space."""
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        if error == "OSError ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                           "file data/3: file write failed")

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 10 ** 9, 0))
    rc = cli.main(_pretrain_args(clean_tree, tmp_path, epochs=2))
    ckpt = tmp_path / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT
    _assert_message(rc, capsys.readouterr().err, "no space left on the disk holding", "0 B free", f"writing {ckpt}",
                    f"the last good checkpoint is {ckpt} at step 2", "free space and rerun with --resume")
    assert len(saves) == 2
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the failed save replaced nothing
    mae.load_model(ckpt)
    assert [f.name for f in ckpt.parent.iterdir()] == [pretrain.CHECKPOINT]  # no half-written file left


@pytest.fixture
def small_disk(tmp_path):
    """A real 2.5 MB file system (tmpfs): room for the store and one micro checkpoint, not two."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_says_so(clean_tree, small_disk, capsys):
    rc = cli.main(_pretrain_args(clean_tree, small_disk, epochs=2))
    ckpt = small_disk / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT
    _assert_message(rc, capsys.readouterr().err, "no space left on the disk holding", f"writing {ckpt}",
                    f"the last good checkpoint is {ckpt} at step 2", "free space and rerun with --resume")
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the failed save replaced nothing
    assert [f.name for f in ckpt.parent.iterdir()] == [pretrain.CHECKPOINT]  # no half-written file left


def test_a_checkpoint_write_error_that_is_not_a_full_disk_keeps_its_traceback(tmp_path, monkeypatch):
    def buggy_save(obj, f, *args, **kwargs):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(torch, "save", buggy_save)  # the disk has room: nothing to blame on it
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        pretrain.save_checkpoint({"w": torch.ones(2)}, tmp_path / "ck.pth")


def test_simulated_full_disk_in_any_command_is_a_message_and_other_os_errors_are_not(monkeypatch, capsys):
    from usfmae_lib import runner

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/figure.png")

    monkeypatch.setattr(runner, "run_notebook", disk_full)
    rc = cli.main(["run", "notebooks/03_mae_pretraining.py"])
    _assert_message(rc, capsys.readouterr().err, "usfmae run: error: no space left", "/data/out/figure.png")

    def permission_denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out/figure.png")

    monkeypatch.setattr(runner, "run_notebook", permission_denied)
    with pytest.raises(PermissionError):  # not a full disk: the traceback is kept
        cli.main(["run", "notebooks/03_mae_pretraining.py"])


# ---------------------------------------------------------------------------- YAML parameter files
BAD_YAML = "epochs: 3\nbetas: [0.9, 0.95\nlr: 1e-3\n"  # the list is never closed


@pytest.mark.parametrize("command", [["run", str(REPO / "notebooks/03_mae_pretraining.py")], ["pretrain"]])
def test_yaml_syntax_error_names_the_file_line_column_and_problem(tmp_path, capsys, command):
    params = tmp_path / "params.yaml"
    params.write_text(BAD_YAML)
    rc = cli.main(command + ["-f", str(params), "--out", str(tmp_path / "out")])
    _assert_message(rc, capsys.readouterr().err, f"{params}, line 3, column 3: YAML syntax error",
                    "expected ',' or ']'", "line 2", "fix the YAML")
    assert not (tmp_path / "out").exists()  # refused before anything ran


# ---------------------------------------------------------------------------- fine-tuning weights
def _finetune(model, data, tmp_path, *extra):
    return cli.main(["finetune", "--dataset", "folder", "--root", str(data), "--positive", "busi",
                     "--model", model, "--img-size", "32", "--epochs", "1", "--lr", "1e-3", "--weight-decay",
                     "0.01", "--batch-size", "16", "--seeds", "1", "--bootstrap", "10",
                     "--out", str(tmp_path / "runs"), *extra])


@pytest.mark.parametrize("how", ["random bytes", "truncated zip", "missing"])
def test_unreadable_imagenet_weights_name_the_file_cause_and_expected_weights(clean_tree, tmp_path, capsys, how):
    weights = tmp_path / "vit_b.pth"
    if how != "missing":
        torch.save({"pos_embed": torch.zeros(1, 197, 768), "cls_token": torch.zeros(1, 1, 768)}, weights)
        _damage(weights, how, None)
    rc = _finetune("vit-b", clean_tree, tmp_path, "--weights", str(weights))
    cause = {"random bytes": "not a checkpoint", "truncated zip": "truncated", "missing": "does not exist"}[how]
    _assert_message(rc, capsys.readouterr().err, weights, cause,
                    *(["vit_base_patch16_224.augreg_in1k ImageNet-1k weights"] if how != "missing" else []))


def test_imagenet_weights_of_another_model_name_the_mismatched_keys(clean_tree, tmp_path, capsys):
    weights = tmp_path / "vit_small.pth"  # ViT-S shapes under ViT-B's names: timm would fail mid-load
    torch.save({"cls_token": torch.zeros(1, 1, 384), "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16),
                "blocks.0.attn.qkv.weight": torch.zeros(1152, 384)}, weights)
    rc = _finetune("vit-b", clean_tree, tmp_path, "--weights", str(weights))
    _assert_message(rc, capsys.readouterr().err, f"ImageNet weights {weights} do not fit vit-b",
                    "wrong shapes: 3", "blocks.0.attn.qkv.weight: file [1152, 384], model [2304, 768]",
                    "model tensors not in the file", "timm/vit_base_patch16_224.")


def test_imagenet_weights_with_foreign_keys_are_refused_not_silently_skipped(clean_tree, tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"  # right names nowhere: timm alone would load nothing and go on
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
                "vgg.features.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    rc = _finetune("resnet-50", clean_tree, tmp_path, "--weights", str(weights))
    _assert_message(rc, capsys.readouterr().err, f"ImageNet weights {weights} do not fit resnet-50",
                    "model tensors not in the file", "file tensors the model lacks: 1 (vgg.features.0.weight)",
                    "timm/resnet50.")


# ---------------------------------------------------------------------------- MAE checkpoints
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["random bytes", "truncated zip", "damaged bytes", "pickled code", "plain pickle",
                                 "missing"])
def test_unreadable_mae_checkpoint_tells_apart_why(finished_run, clean_tree, tmp_path, capsys, how):
    ckpt = tmp_path / "mae.pth"
    marker = tmp_path / "pwned"
    if how == "plain pickle":  # pickle.dump, not torch.save, of a payload: refused, never run
        with open(ckpt, "wb") as f:
            pickle.dump({"model": {}, "payload": _Payload(marker)}, f)
    elif how != "missing":
        ckpt.write_bytes(finished_run[1])
        _damage(ckpt, how, marker)
    rc = _finetune("usf-mae", clean_tree, tmp_path, "--checkpoint", str(ckpt))
    cause = {"plain pickle": "refused", "missing": "does not exist"}.get(how) or CAUSES[how]
    _assert_message(rc, capsys.readouterr().err, f"checkpoint {ckpt}", cause)
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"
