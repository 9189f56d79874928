"""One decode policy everywhere (issue 17): a hostile set of image files gets the same outcome,
for the same reason, in curation, cleaning, fine-tuning and the pretraining store."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, curation, preprocess as pp, store
from usfmae_lib import finetune as ft
from usfmae_lib.curation_readers import MAX_PIXELS, MIN_SIDE, Reject, read_file, read_image_file
from usfmae_lib.datasets import Split

BOMB_SIDE = 30000  # 900 Mpx of zeros in a ~860 KB PNG: 900 MB once decoded


def scan(h=120, w=160, seed=0) -> np.ndarray:
    """A grey uint8 'scan' with some structure (BGR, as cv2 writes it)."""
    rng = np.random.default_rng(seed)
    g = cv2.GaussianBlur(rng.normal(90, 40, (h, w)).astype(np.float32), (0, 0), 2)
    return cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_png(side: int, rows_per_block: int = 1000) -> bytes:
    """A valid 8-bit grey PNG of side x side zeros, built without holding its pixels: after a
    full flush deflate restarts, so every later block of rows compresses to the same bytes."""
    assert side % rows_per_block == 0
    block = b"\0" * ((side + 1) * rows_per_block)  # each row: filter byte 0, then the pixels
    deflate = zlib.compressobj(9)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeat = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(side // rows_per_block):
        checksum = zlib.adler32(block, checksum)
    # an empty final block (fixed Huffman, end-of-block only), then the zlib checksum
    stream = first + repeat * (side // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def test_zeros_png_is_a_valid_png():
    data = zeros_png(64, rows_per_block=16)  # small enough to decode: the builder itself is right
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (64, 64) and not img.any()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(zeros_png(BOMB_SIDE))
    assert path.stat().st_size < 2_000_000
    return path


# file name -> the reason every step gives; None: a good image, accepted everywhere
EXPECTED = {"good.png": None, "empty.png": "zero bytes", "cut_png.png": "truncated", "cut_jpg.jpg": "truncated",
            "text.png": "not an image", "bomb.png": "too large", "tiny.png": "too small", "pixel.png": "too small"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, bomb) -> Path:
    """ROOT/hostile/<the files of EXPECTED>: a curation root and a cleaning input folder."""
    root = tmp_path_factory.mktemp("data")
    d = root / "hostile"
    d.mkdir()
    png = cv2.imencode(".png", scan(seed=1))[1].tobytes()
    jpg = cv2.imencode(".jpg", scan(seed=2), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    cv2.imwrite(str(d / "good.png"), scan())
    (d / "empty.png").write_bytes(b"")
    (d / "cut_png.png").write_bytes(png[: len(png) // 2])
    (d / "cut_jpg.jpg").write_bytes(jpg[: len(jpg) // 2])  # decoders fill the lower half grey
    (d / "text.png").write_text("patient list, not an image\n")
    (d / "bomb.png").write_bytes(bomb.read_bytes())
    cv2.imwrite(str(d / "tiny.png"), scan(4, 4))
    cv2.imwrite(str(d / "pixel.png"), scan(1, 1))
    assert sorted(p.name for p in d.iterdir()) == sorted(EXPECTED)
    return root


def test_the_one_reader_refuses_each_hostile_file_with_its_reason(hostile):
    for name, reason in EXPECTED.items():
        path = hostile / "hostile" / name
        if reason is None:
            rgb = read_image_file(path)
            assert rgb.shape == (120, 160, 3) and rgb.dtype == np.uint8
            assert np.array_equal(rgb, cv2.imread(str(path))[..., ::-1])  # a plain 8-bit PNG: as OpenCV reads it
            continue
        with pytest.raises(Reject) as err:
            read_image_file(path)
        assert err.value.reason == reason, (name, err.value)
    with pytest.raises(Reject, match="30000 x 30000 px") as err:
        read_image_file(hostile / "hostile" / "bomb.png")
    assert str(MAX_PIXELS // 10**6) in err.value.detail  # the limit is named
    with pytest.raises(Reject, match=f"4 x 4 px: a side under {MIN_SIDE} px"):
        read_image_file(hostile / "hostile" / "tiny.png")


def test_curate_rejects_each_hostile_file_with_its_reason(hostile, tmp_path):
    c = curation.curate(hostile, tmp_path / "out", workers=1, progress=False)
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    got = dict(zip(rejects["source"].map(lambda s: Path(s).name), rejects["reason"]))
    assert got == {name: reason for name, reason in EXPECTED.items() if reason}
    assert [Path(s).name for s in c.manifest["source"]] == ["good.png"]


def test_clean_reports_each_hostile_file_with_the_same_reason(hostile, tmp_path):
    out = tmp_path / "clean"
    rep = pp.clean_tree(hostile, out, pp.make_config(ocr=False), workers=1, progress=False)
    rows = rep.assign(name=rep["source"].map(lambda s: Path(s).name)).set_index("name")
    assert sorted(rows.index) == sorted(EXPECTED)
    for name, reason in EXPECTED.items():
        if reason is None:
            assert rows.loc[name, "status"] == "ok"
            continue
        assert rows.loc[name, "status"] == "error", name
        error = rows.loc[name, "error"]
        assert error.split("not a readable image: ", 1)[-1].startswith(reason), (name, error)
    assert sorted(p.name for p in out.rglob("*.png")) == ["good.png"]  # nothing written for a refused file


def test_finetuning_stops_on_a_refused_image_naming_file_and_reason(hostile):
    folder = hostile / "hostile"
    good = ft.read_image(folder / "good.png", 32)
    expected = cv2.resize(read_image_file(folder / "good.png"), (32, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(good, expected)
    for name, reason in EXPECTED.items():
        if reason == "too small":  # an evaluation split keeps its small crops: read, resized
            assert ft.read_image(folder / name, 32).shape == (32, 32, 3)
        elif reason is not None:
            with pytest.raises(UsfmaeError, match=f"not a readable image: {reason}") as err:
                ft.read_image(folder / name, 32)
            assert str(folder / name) in str(err.value) and "remove or replace the file" in str(err.value)
    # a refused evaluation image stops the run before any training, naming the split's part
    part = lambda names: pd.DataFrame({"path": [str(folder / n) for n in names], "label": [0] * len(names)})
    split = Split("folder", "test split", ["a"], None, part(["good.png"]), part(["good.png"]),
                  part(["good.png", "cut_jpg.jpg"]))
    with pytest.raises(UsfmaeError, match="folder test images: .*cut_jpg.jpg: not a readable image: truncated"):
        ft.prepare_data(split, 32)


def test_the_store_skips_what_the_other_steps_refuse(hostile):
    folder = hostile / "hostile"
    for name, reason in EXPECTED.items():
        img = store._read_rgb(folder / name, 32)
        assert (img is None) == (reason is not None), name
    assert np.array_equal(store._read_rgb(folder / "good.png", 32), ft.read_image(folder / "good.png", 32))


def test_a_decompression_bomb_is_refused_from_its_header_fast_and_in_little_memory(bomb):
    start = time.perf_counter()
    for read in (read_image_file, pp.read_image, lambda p: ft.read_image(p, 32)):
        with pytest.raises((Reject, UsfmaeError), match="too large"):
            read(bomb)
    assert time.perf_counter() - start < 5
    # decoding it would take 900 MB; the peak memory of a fresh process that refuses it stays small
    # (VmHWM: the peak of this process's own memory; ru_maxrss would include the forking parent's)
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc to read peak memory from")
    probe = ("import re, sys; from usfmae_lib.curation_readers import read_file; "
             "r = read_file((sys.argv[1], 3.0, 0, 1))[1]; "
             "print(r['reason'], '|', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1])")
    done = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, timeout=120)
    reason, _, peak_kb = done.stdout.strip().partition(" | ")
    assert reason == "too large" and int(peak_kb or 0) < 400_000, done.stdout + done.stderr


def test_unreadable_is_not_corrupt(tmp_path):
    (tmp_path / "folder.png").mkdir()  # the OS refuses to read it, as it refuses a file without permission
    res = read_file((str(tmp_path / "folder.png"), 3.0, 0, 1))[1]
    assert (res["reason"], res["detail"]) == ("unreadable", "IsADirectoryError: Is a directory")
    with pytest.raises(Reject, match="unreadable: FileNotFoundError"):
        read_image_file(tmp_path / "gone.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), scan())
    path.chmod(0)
    assert read_file((str(path), 3.0, 0, 1))[1]["reason"] == "unreadable"


def _avi(path: Path, size=(64, 80), n=10):
    vw = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size[::-1], True)
    assert vw.isOpened()
    for k in range(n):
        vw.write(scan(*size, seed=k))
    vw.release()
    return path.read_bytes()


def test_videos_with_garbage_are_corrupt_and_tiny_videos_too_small(tmp_path):
    data = _avi(tmp_path / "good.avi")
    assert read_file((str(tmp_path / "good.avi"), 3.0, 0, 1))[1]["status"] == "ok"
    garbage = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    (tmp_path / "after_riff.avi").write_bytes(data[:12] + garbage[12:])  # a valid RIFF/AVI header, then garbage
    movi = data.find(b"movi") + 4
    (tmp_path / "after_headers.avi").write_bytes(data[:movi] + garbage[movi:])  # headers fine, frames garbage
    for name in ("after_riff.avi", "after_headers.avi"):
        res = read_file((str(tmp_path / name), 3.0, 0, 1))[1]
        assert res["reason"] == "corrupt", (name, res)
    # a codec FFmpeg does not know looks to OpenCV like a damaged header: the reason says both
    (tmp_path / "unknown_codec.avi").write_bytes(data.replace(b"MJPG", b"ZZZZ"))
    assert read_file((str(tmp_path / "unknown_codec.avi"), 3.0, 0, 1))[1]["reason"] == "corrupt or unsupported codec"
    _avi(tmp_path / "tiny.avi", size=(16, 16), n=3)
    assert read_file((str(tmp_path / "tiny.avi"), 3.0, 0, 1))[1]["reason"] == "too small"


def test_volume_planes_have_the_minimum_side_but_slices_across_the_stack_do_not(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(0).integers(0, 256, (40, 16, 48), dtype=np.uint8)  # (z, y, x): planes 16 x 48
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.T), np.eye(4)), str(tmp_path / "v.nii"))
    assert read_file((str(tmp_path / "v.nii"), 3.0, 0, 10))[1]["reason"] == "too small"
    res = read_file((str(tmp_path / "v.nii"), 3.0, 1, 8))[1]  # slices of 40 x 48: fine
    assert res["status"] == "ok" and [f[3:5] for f in res["frames"]] == [[48, 40], [48, 40]]
