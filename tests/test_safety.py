"""Data safety under careless use: inputs never written, one run per folder, workers that die
with their run, reports that survive kill -9, and every input file accounted for."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, cli
from usfmae_lib import curation, preprocess, safety
from usfmae_lib.safety import check_output, folder_lock

PY = sys.executable


def scans(folder: Path, n: int, size=(240, 320), seed: int = 0) -> list[Path]:
    """n small scan-like PNGs with a burned-in grey mark each (so the grey detector has work)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 120, (*size, 3), dtype=np.uint8), (5, 5), 0)
        cv2.line(img, (20, 20 + i % 50), (120, 60), (230, 230, 230), 1)
        paths.append(folder / f"scan_{i:03d}.png")
        cv2.imwrite(str(paths[-1]), img)
    return paths


def tree_md5(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ============================================================================ outputs vs inputs
def test_check_output_refuses_same_inside_around_and_through_a_link(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (tmp_path / "link").symlink_to(a)
    for out, how in ((a, "is the same as"), (a / "out", "lies inside"), (tmp_path, "holds"),
                     (tmp_path / "link" / "out", "lies inside")):
        with pytest.raises(UsfmaeError, match=how):
            check_output(out, [a])
    check_output(tmp_path / "b", [a])  # a sibling is fine
    check_output(tmp_path / "ab", [a])  # a name that only starts like the input is fine


@pytest.mark.parametrize("out", ["A", "A/out", "."])
def test_clean_into_its_own_input_exits_2_and_leaves_the_input_byte_identical(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    scans(tmp_path / "A", 4)
    before = tree_md5(tmp_path / "A")
    rc = cli.main(["clean", "A", out, "--no-ocr", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "input A" in err and "choose an output folder outside A" in err and "Traceback" not in err
    assert tree_md5(tmp_path / "A") == before


def test_clean_refuses_a_report_or_masks_folder_inside_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scans(tmp_path / "A", 2)
    before = tree_md5(tmp_path / "A")
    assert cli.main(["clean", "A", "out", "--no-ocr", "--report", "A/report.csv"]) == 2
    assert cli.main(["clean", "A", "out", "--no-ocr", "--save-masks", "--masks-dir", "A/masks"]) == 2
    assert tree_md5(tmp_path / "A") == before and not (tmp_path / "out" / "index.csv").exists()


def test_clean_of_a_manifest_refuses_an_output_among_the_curated_roots(tmp_path):
    root = tmp_path / "root"
    scans(root / "ds", 3)
    c = curation.curate(root, tmp_path / "cur", workers=1, progress=False)
    with pytest.raises(UsfmaeError, match="lies inside the input"):
        preprocess.clean_tree(c.out_dir / "manifest.parquet", root / "ds" / "clean", preprocess.make_config(ocr=False),
                              workers=1, progress=False)
    assert sorted(p.name for p in (root / "ds").iterdir()) == [f"scan_{i:03d}.png" for i in range(3)]


@pytest.mark.parametrize("out", ["root", "root/out"])
def test_curate_into_its_root_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    scans(tmp_path / "root" / "ds", 3)
    before = tree_md5(tmp_path / "root")
    assert cli.main(["curate", "root", "--out", out, "--workers", "1", "--no-progress"]) == 2
    assert "input root" in capsys.readouterr().err
    assert tree_md5(tmp_path / "root") == before


def test_curate_of_an_empty_root_is_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["curate", str(tmp_path / "empty"), "--out", str(tmp_path / "cur")]) == 2
    err = capsys.readouterr().err
    assert "no dataset folder and no image, video or volume file under" in err and "Traceback" not in err


# ============================================================================ one run per folder
def _hold_lock_in_child(folder: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom usfmae_lib.safety import folder_lock\n"
            "with folder_lock(sys.argv[1], 'usfmae clean'):\n    print('held', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([PY, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_into_a_locked_folder_stops_and_a_killed_holder_frees_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(safety, "GRACE_S", 0.5)
    scans(tmp_path / "A", 2)
    out = tmp_path / "out"
    child = _hold_lock_in_child(out)
    try:
        assert cli.main(["clean", str(tmp_path / "A"), str(out), "--no-ocr", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another run" in err and f"pid {child.pid}" in err and "usfmae clean" in err
        assert not (out / "index.csv").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # kill -9 leaves no stale lock: the next run simply goes ahead
    assert cli.main(["clean", str(tmp_path / "A"), str(out), "--no-ocr", "--no-progress", "--workers", "1"]) == 0
    assert len(pd.read_csv(out / "index.csv")) == 2


def _try_lock_in_child(folder: Path) -> subprocess.CompletedProcess:
    code = "import sys\nfrom usfmae_lib.safety import folder_lock\nwith folder_lock(sys.argv[1], 'try'):\n    pass\n"
    return subprocess.run([PY, "-c", code, str(folder)], capture_output=True, text=True)


def test_the_lock_is_reentrant_in_one_process_and_refuses_others(tmp_path):
    with folder_lock(tmp_path, "outer"):
        with folder_lock(tmp_path, "inner"):  # a notebook kernel may call a step twice
            pass
        other = _try_lock_in_child(tmp_path)  # still held by the outer block
        assert other.returncode != 0 and f"outer, pid {os.getpid()}" in other.stderr
    assert _try_lock_in_child(tmp_path).returncode == 0


def test_a_forked_worker_does_not_keep_a_killed_runs_lock(tmp_path):
    """A DataLoader worker forked by a run shares the run's lock descriptor; after kill -9 of the
    run the lock must go at once, not when the worker has exited."""
    code = ("import os, sys, time\nfrom usfmae_lib.safety import folder_lock, end_with_parent\n"
            "with folder_lock(sys.argv[1], 'run'):\n"
            "    if os.fork() == 0:\n        end_with_parent(); time.sleep(30); os._exit(0)\n"
            "    print('held', flush=True); time.sleep(60)\n")
    run = subprocess.Popen([PY, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip() == "held"
    time.sleep(0.3)  # the worker is up
    run.send_signal(signal.SIGKILL)
    run.wait()
    start = time.monotonic()
    with folder_lock(tmp_path, "next run"):
        assert time.monotonic() - start < 1.0


def test_end_with_parent_closes_the_inherited_lock_descriptors(tmp_path):
    with folder_lock(tmp_path, "run"):
        (fd,) = safety._held.values()
        pid = os.fork()
        if pid == 0:  # the worker: after end_with_parent its copy of the lock descriptor is gone
            safety.end_with_parent()
            try:
                os.fstat(fd)
                os._exit(1)
            except OSError:
                os._exit(0 if not safety._held else 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(fd)  # the run's own descriptor, and so its lock, are untouched


def test_reproduce_refuses_a_second_run_into_the_same_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(safety, "GRACE_S", 0.5)
    child = _hold_lock_in_child(tmp_path / "study")
    try:
        rc = cli.main(["reproduce", "--profile", "smoke", "--out", str(tmp_path / "study"), "--steps", "06_results"])
    finally:
        child.kill()
        child.wait()
    assert rc == 2 and "is being written by another run" in capsys.readouterr().err


# ============================================================================ kill -9
def _clean_cmd(inp: Path, out: Path, workers: int = 1) -> list[str]:
    return [PY, "-m", "usfmae_lib.cli", "clean", str(inp), str(out), "--no-ocr", "--no-progress",
            "--workers", str(workers)]


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> int:
    """Start cmd, kill -9 it as soon as ready() holds; returns the pid it had."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before the kill point: give it more work"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_clean_killed_twice_then_rerun_reports_one_row_per_image_as_an_uninterrupted_run(tmp_path):
    inp = tmp_path / "in"
    scans(inp, 60)
    preprocess.clean_tree(inp, tmp_path / "ref", preprocess.make_config(ocr=False), workers=1, progress=False)
    out = tmp_path / "out"
    pngs = lambda: sum(1 for _ in out.glob("*.png"))  # noqa: E731
    for kill_at in (10, 35):  # two points of the run, each rerun resuming the last
        _kill_when(_clean_cmd(inp, out), lambda: pngs() >= kill_at)
    assert pngs() < 60, "the second kill came after the end"
    assert subprocess.run(_clean_cmd(inp, out), capture_output=True).returncode == 0
    report = pd.read_csv(out / "report.csv")
    assert len(report) == 60 and report["path"].is_unique
    timing = [c for c in report.columns if c.startswith("t_")]
    ref = pd.read_csv(tmp_path / "ref" / "report.csv").drop(columns=timing).sort_values("path").reset_index(drop=True)
    got = report.drop(columns=timing).sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(got.astype(str), ref.astype(str))
    assert tree_md5(out).keys() >= {p.name for p in (tmp_path / "ref").glob("*.png")}
    assert {k: v for k, v in tree_md5(out).items() if k.endswith(".png")} == \
        {k: v for k, v in tree_md5(tmp_path / "ref").items() if k.endswith(".png")}


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find worker processes")
def test_clean_workers_end_with_a_killed_parent(tmp_path):
    inp = tmp_path / "in"
    scans(inp, 120)
    out = tmp_path / "out"
    proc = subprocess.Popen(_clean_cmd(inp, out, workers=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(1 for _ in out.glob("*.png")) < 5:  # workers are busy
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    workers = [k for k in _children(proc.pid) if _alive(k)]
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a worker still importing its modules (seconds under a loaded CI) arms its death signal, or sees
    # its parent gone, only when the import is done: the promise is that every one ends, not how fast
    deadline = time.monotonic() + 60
    while any(_alive(k) for k in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(k) for k in workers)


# ============================================================================ every file accounted for
def test_curate_accounts_for_every_file_of_a_hostile_tree(tmp_path, monkeypatch):
    ds = tmp_path / "root" / "ds"
    good = scans(ds, 3)
    (ds / "copy.png").write_bytes(good[0].read_bytes())  # an exact duplicate
    (ds / "zero.png").write_bytes(b"")
    (ds / "text.png").write_text("not a picture")
    (ds / "notes.txt").write_text("read me")
    (ds / ".DS_Store").write_bytes(b"\0")
    (ds / "scan_000_mask.png").write_bytes(good[1].read_bytes())
    (ds / "dangling.png").symlink_to(ds / "gone.png")
    (ds / "self.png").symlink_to(ds / "self.png")
    (ds / "sub").mkdir()
    scans(ds / "sub", 1, seed=5)
    (ds / "sub" / "loop").symlink_to(ds)  # a folder link back up the tree
    locked = ds / "locked"
    scans(locked, 1, seed=6)
    if os.geteuid() == 0:  # root reads any folder: make this one fail as an unreadable folder does
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        c = curation.curate(tmp_path / "root", tmp_path / "cur", workers=1, progress=False)
    finally:
        locked.chmod(0o755)
    every = {str(p) for p in ds.rglob("*") if (p.is_file() or p.is_symlink()) and "loop" not in p.parts
             and "locked" not in p.parts} | {str(locked), str(ds / "sub" / "loop")}
    every -= {str(locked / "scan_000.png")}  # inside the unreadable folder: the folder is the entry
    framed = set(c.frames["source"])
    rejected, skipped = set(c.rejects["source"]), set(c.skipped["path"])
    assert framed | rejected | skipped == every
    assert not (framed & rejected or framed & skipped or rejected & skipped)
    why = dict(zip(c.skipped["path"], c.skipped["reason"]))
    assert why[str(locked)].startswith("unreadable folder")
    assert why[str(ds / "sub" / "loop")].startswith("link to a folder already read")
    assert why[str(ds / "dangling.png")].startswith("broken link") and why[str(ds / "self.png")].startswith("broken link")
    assert why[str(ds / ".DS_Store")] == "hidden file" and why[str(ds / "scan_000_mask.png")] == "mask/annotation file"
    status = dict(zip(c.frames["source"], c.frames["status"]))
    assert sorted(status[str(p)] for p in (good[0], ds / "copy.png")) == ["exact duplicate", "kept"]
    assert set(c.rejects["reason"]) >= {"zero bytes", "not an image"}
