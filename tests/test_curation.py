"""Curation (issue 4): registry, readers, manifest, rejects, duplicates, leakage, resume."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from usfmae_lib import UsfmaeError, cli, curation
from usfmae_lib.curation_readers import load_frame, read_file, video_sample_indices

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
# BUSI samples that are not near duplicates of each other ("benign (222)" and "(267)" are: same scan)
BUSI = [REAL / "busi_sample/benign" / f"benign ({i}).png" for i in (8, 9, 77, 87, 94, 121)]
MMOTU = sorted((REAL / "mmotu_sample").glob("*.png"))
needs_real = pytest.mark.skipif(not all(p.exists() for p in BUSI) or len(MMOTU) < 4,
                                reason=f"real samples not found under {REAL}")


def noise_frames(n, h, w, seed):
    """Distinct random frames with some large-scale structure (so pHash has something to see)."""
    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
            for _ in range(n)]


def write_video(path, n_frames, fps, seed, size=(64, 80)):
    vw = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, size[::-1], True)
    assert vw.isOpened()
    for f in noise_frames(n_frames, *size, seed):
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()


def write_nifti(path, depth, h, w, seed):
    import nibabel as nib

    vol = np.stack(noise_frames(depth, h, w, seed))  # [z, y, x]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.T), np.eye(4)), str(path))  # stored (x, y, z)
    return vol


def write_dicom(path, frames: np.ndarray, multi: bool, transfer_syntax=None, pixel_data=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns = frames.shape[-2:]
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixel_data if pixel_data is not None else frames.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


# ============================================================================ registry
def test_registry_is_table1_of_the_paper():
    reg = curation.load_registry()
    assert len(reg) == 46 and reg["name"].is_unique
    assert reg["paper_count"].sum() == 374_192 == curation.PAPER_TOTAL
    evals = dict(zip(reg.loc[reg["is_eval"], "name"], reg.loc[reg["is_eval"], "paper_count"]))
    assert evals == {"BUS-BRA": 1875, "MMOTU-2D": 1469, "GIST514-DB": 514}
    assert (reg[["link", "licence", "file_kinds", "anatomy"]] != "").all().all()  # "unknown", never blank
    s = curation.registry_summary(reg)
    assert (s["eval_sets_in_table1"], s["table1_sum_without_eval"]) == (3858, 370_334)
    assert s["text_minus_table1_eval"] == 10_578 - 3858
    index = curation.registry_index(reg)  # raises if an alias names two datasets
    for folder, name in (("BUSBRA", "BUS-BRA"), ("OTU_2d", "MMOTU-2D"), ("usd514_jpeg_roi", "GIST514-DB"),
                         ("echonet_dynamic", "EchoNet-Dynamic"), ("CardiacUDC", "CardiacUCD")):
        assert index[curation.normalise_name(folder)]["name"] == name


# ============================================================================ readers
def test_video_sampling_rule():
    def count(n_frames, fps, video_fps):
        idx = video_sample_indices(fps, video_fps)
        return [i for i in (next(idx) for _ in range(n_frames + 1)) if i < n_frames]

    assert count(40, 10, 3) == [0, 3, 6, 10, 13, 16, 20, 23, 26, 30, 33, 36]  # 4 s -> 12 frames
    assert len(count(25, 10, 3)) == 8  # 2.5 s -> ceil(7.5)
    assert count(4, 2, 3) == [0, 1, 2, 3]  # slower than the sampling rate: every frame once
    assert count(5, 30, 0) == [0, 1, 2, 3, 4]  # video_fps 0: every frame


def test_image_formats_and_truncated_files(tmp_path):
    from PIL import Image

    g = noise_frames(1, 64, 80, 5)[0]
    rgb = np.dstack([g, 255 - g, g // 2])
    Image.fromarray(g).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(g).convert("LA").save(tmp_path / "grey_alpha.png")
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "grey16.tif"), g.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "grey.bmp"), g)
    cv2.imwrite(str(tmp_path / "rgb.tiff"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "grey.jpg"), g)
    expect = {"palette.png": (3, 8, g), "rgba.png": (4, 8, rgb), "grey_alpha.png": (4, 8, g), "rgb16.png": (3, 16, rgb),
              "grey16.tif": (1, 16, g), "grey.bmp": (1, 8, g), "rgb.tiff": (3, 8, rgb)}
    for name, (channels, bits, pixels) in expect.items():
        _, res = read_file((str(tmp_path / name), 3.0, 0, 1))
        assert res["status"] == "ok", (name, res)
        assert res["frames"][0][3:7] == [80, 64, channels, bits], name
        got = load_frame(tmp_path / name, "image")
        assert got.shape == (64, 80, 3) and np.array_equal(got, np.dstack([pixels] * 3) if pixels.ndim == 2 else pixels)
    for name in ("grey.bmp", "grey.jpg", "rgb.tiff"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        assert read_file((str(tmp_path / f"cut_{name}"), 3.0, 0, 1))[1]["reason"] == "truncated", name


def test_mhd_raw_and_dicom_readers(tmp_path):
    import SimpleITK as sitk

    vol16 = (np.stack(noise_frames(6, 24, 32, 1)).astype(np.uint16) * 16)  # 12-bit data in uint16
    sitk.WriteImage(sitk.GetImageFromArray(vol16), str(tmp_path / "v.mhd"))
    _, res = read_file((str(tmp_path / "v.mhd"), 3.0, 1, 5))  # slice rows: axis 1 of (z, y, x), every 5th
    assert [f[1] for f in res["frames"]] == [0, 5, 10, 15, 20] and res["frames_in_file"] == 24
    kind, frame, axis, w, h, c, bits = res["frames"][1][:7]
    assert (kind, axis, w, h, c, bits) == ("volume", 1, 32, 6, 1, 16)
    got = load_frame(tmp_path / "v.mhd", "volume", 5, axis=1)
    assert got.shape == (6, 32, 3) and got.dtype == np.uint8
    expected = np.rint(vol16[:, 5, :] * 255.0 / 4095).astype(np.uint8)  # max < 4096: 12-bit range
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 0], got[..., 2])

    frames = np.stack(noise_frames(7, 32, 40, 2))
    write_dicom(tmp_path / "multi.dcm", frames, multi=True)
    _, res = read_file((str(tmp_path / "multi.dcm"), 3.0, 0, 3))
    assert [(f[0], f[1], f[2]) for f in res["frames"]] == [("volume", 0, 0), ("volume", 3, 0), ("volume", 6, 0)]
    assert np.array_equal(load_frame(tmp_path / "multi.dcm", "volume", 3, axis=0)[..., 1], frames[3])
    write_dicom(tmp_path / "single", frames[0], multi=False)  # no extension: recognised by 'DICM'
    _, res = read_file((str(tmp_path / "single"), 3.0, 0, 1))
    assert [f[:3] for f in res["frames"]] == [["image", 0, -1]]
    assert np.array_equal(load_frame(tmp_path / "single", "image")[..., 0], frames[0])

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    write_dicom(tmp_path / "jpegls.dcm", frames[0], False, JPEGLSLossless, encapsulate([b"\xff\xd8\xff\xd9"]))
    assert read_file((str(tmp_path / "jpegls.dcm"), 3.0, 0, 1))[1]["reason"] == "unsupported codec"
    (tmp_path / "cut.mhd").write_text((tmp_path / "v.mhd").read_text().replace("v.raw", "cut.raw"))
    (tmp_path / "cut.raw").write_bytes((tmp_path / "v.raw").read_bytes()[:500])
    assert read_file((str(tmp_path / "cut.mhd"), 3.0, 0, 1))[1]["reason"] == "truncated"


def test_hamming_pairs_is_exact():
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2**63, size=200, dtype=np.uint64)
    h = centres[rng.integers(0, 200, 2000)]
    for _ in range(3):  # flip up to 3 random bits
        h ^= (np.uint64(1) << rng.integers(0, 64, h.size).astype(np.uint64)) * (rng.random(h.size) < 0.7)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    for t in (0, 4, 6):
        i, j, d = curation.hamming_pairs(h, None, t)
        bi, bj = np.nonzero(np.triu(dist <= t, 1))
        assert set(zip(i.tolist(), j.tolist())) == set(zip(bi.tolist(), bj.tolist()))
        assert np.array_equal(d, dist[i, j])
        i, j, _ = curation.hamming_pairs(h[:300], h, t)
        bi, bj = np.nonzero(dist[:300] <= t)
        assert set(zip(i.tolist(), j.tolist())) == set(zip(bi.tolist(), bj.tolist()))


# ============================================================================ roots -> datasets
def test_how_roots_map_to_datasets(tmp_path):
    synth = tmp_path / "synthetic"
    for d in ("pretrain/breast/images", "annotated/images", "annotated/masks", "BUSBRA/Images", "BUSBRA/Masks"):
        (synth / d).mkdir(parents=True)
    (synth / "synth.json").write_text("{}")
    real = tmp_path / "downloads"
    for d in ("EchoNet-Dynamic/Videos", "my_scans"):
        (real / d).mkdir(parents=True)
    (tmp_path / "OTU_2d").mkdir()
    found = {d.name: d for d in curation.discover_datasets([synth, real, tmp_path / "OTU_2d"])}
    assert set(found) == {"synth_breast", "BUS-BRA", "EchoNet-Dynamic", "my_scans", "MMOTU-2D"}
    assert found["synth_breast"].anatomy == "breast" and not found["synth_breast"].is_eval
    assert found["BUS-BRA"].is_eval and found["MMOTU-2D"].is_eval and found["MMOTU-2D"].path == tmp_path / "OTU_2d"
    assert found["EchoNet-Dynamic"].anatomy == "Heart" and found["EchoNet-Dynamic"].in_registry
    assert found["my_scans"].anatomy == "unknown" and not found["my_scans"].in_registry


def test_missing_root_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(UsfmaeError, match="no_such_dataset"):
        curation.curate([missing], tmp_path / "out", progress=False)
    assert cli.main(["curate", str(missing), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err


# ============================================================================ acceptance 1
@needs_real
def test_mixed_tree_frames_copies_and_rejects(tmp_path, capsys):
    root = tmp_path / "data"
    bus, mixed = root / "BUS_UC", root / "mixed"  # BUS_UC is in the registry; "mixed" is not
    for d in (bus / "copies", bus / "masks", mixed / "bad"):
        d.mkdir(parents=True)
    for k, src in enumerate(BUSI):
        shutil.copy(src, bus / f"real_{k}.png")
    shutil.copy(BUSI[0], bus / "copies" / "exact_0.png")  # exact copies
    shutil.copy(BUSI[1], bus / "copies" / "exact_1.png")
    smaller = cv2.resize(cv2.imread(str(BUSI[2])), None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(bus / "copies" / "resized_2.png"), smaller)  # resized copies
    larger = cv2.resize(cv2.imread(str(BUSI[3])), None, fx=1.25, fy=1.25)
    cv2.imwrite(str(bus / "copies" / "resized_3.jpg"), larger, [cv2.IMWRITE_JPEG_QUALITY, 85])  # and re-encoded
    shutil.copy(BUSI[4], bus / "masks" / "not_a_scan.png")  # mask folder: skipped
    shutil.copy(BUSI[4], bus / "real_4_mask.png")  # mask file: skipped

    write_video(mixed / "clip_4s.avi", 40, 10.0, seed=1)  # 4 s at 10 fps -> 12 frames at 3 fps
    write_video(mixed / "clip_2.5s.avi", 25, 10.0, seed=2)  # 2.5 s -> ceil(7.5) = 8 frames
    vol = write_nifti(mixed / "vol.nii.gz", 10, 48, 40, seed=3)  # slice_step 2 -> slices 0, 2, 4, 6, 8
    grey = cv2.resize(cv2.imread(str(MMOTU[0]), cv2.IMREAD_GRAYSCALE), (200, 120), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(mixed / "deep16.png"), grey.astype(np.uint16) * 257)  # 16-bit, full range
    (mixed / "bad" / "empty.png").write_bytes(b"")
    png = BUSI[5].read_bytes()
    (mixed / "bad" / "truncated.png").write_bytes(png[: len(png) // 2])
    (mixed / "bad" / "notes.png").write_text("this is a text file, not an image\n")
    (mixed / "bad" / "fake.avi").write_text("not a video either\n")

    out = tmp_path / "out"
    code = cli.main(["curate", str(root), "--out", str(out), "--slice-step", "2", "--workers", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = pd.read_parquet(out / "manifest.parquet")
    hex_columns = {"content_hash": str, "phash": str, "phash256": str}
    assert manifest.equals(pd.read_csv(out / "manifest.csv", dtype=hex_columns))
    assert set(curation.MANIFEST_COLUMNS) <= set(manifest.columns) and manifest["frame_id"].is_unique

    by_file = manifest.groupby(manifest["source"].map(lambda s: Path(s).name))
    assert by_file.get_group("clip_4s.avi")["frame"].tolist() == [0, 3, 6, 10, 13, 16, 20, 23, 26, 30, 33, 36]
    assert len(by_file.get_group("clip_2.5s.avi")) == 8
    slices = by_file.get_group("vol.nii.gz")
    assert slices["frame"].tolist() == [0, 2, 4, 6, 8] and set(slices["axis"]) == {0}
    assert np.array_equal(load_frame(slices["source"].iloc[2], "volume", 4, 0)[..., 0], vol[4])
    deep = by_file.get_group("deep16.png").iloc[0]
    assert (deep["bit_depth"], deep["channels"], deep["width"], deep["height"]) == (16, 1, 200, 120)
    assert np.array_equal(load_frame(deep["source"], "image")[..., 0], grey)  # 16-bit scaled back to 8
    assert (manifest.loc[manifest["dataset"] == "BUS_UC", "anatomy"] == "Breast").all()
    assert (manifest.loc[manifest["dataset"] == "mixed", "anatomy"] == "unknown").all()
    assert len(manifest) == 6 + 12 + 8 + 5 + 1  # every copy removed, nothing else

    dups = pd.read_csv(out / "duplicates.csv")
    kept = set(manifest["source"])
    pairs = {"exact": [(BUSI[0], "exact_0.png"), (BUSI[1], "exact_1.png")],
             "near": [(BUSI[2], "resized_2.png"), (BUSI[3], "resized_3.jpg")]}
    for kind, items in pairs.items():
        for src, copy_name in items:
            k = BUSI.index(src)
            pair = {str(bus / f"real_{k}.png"), str(bus / "copies" / copy_name)}
            assert len(pair & kept) == 1, f"{copy_name}: keep exactly one of the pair"
            row = dups[dups["source"].isin(pair)]
            assert len(row) == 1 and row["duplicate"].iloc[0] == kind and row["kept_source"].iloc[0] in pair & kept
    assert len(dups) == 4

    rejects = pd.read_csv(out / "rejects.csv")
    reasons = dict(zip(rejects["source"].map(lambda s: Path(s).name), rejects["reason"]))
    assert reasons == {"empty.png": "zero bytes", "truncated.png": "truncated", "notes.png": "not an image",
                       "fake.avi": "not a video"}
    skipped = pd.read_csv(out / "skipped.csv")["path"].map(lambda s: Path(s).name).tolist()
    assert "masks" in skipped and "real_4_mask.png" in skipped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] and "no evaluation set" in summary["warnings"][0]


# ============================================================================ acceptance 2
@needs_real
def test_leakage_audit_catches_a_planted_evaluation_image(tmp_path):
    root = tmp_path / "data"
    images, pre = root / "OTU_2d" / "images", root / "BUSI"
    for d in (images, root / "OTU_2d" / "annotations", pre):
        d.mkdir(parents=True)
    for k, src in enumerate(MMOTU[:3]):  # the evaluation set (MMOTU-2D layout)
        small = cv2.resize(cv2.imread(str(src)), None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(images / f"{k}.JPG"), small, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(root / "OTU_2d" / "annotations" / f"{k}.PNG"), np.zeros((20, 20), np.uint8))
    for k, src in enumerate(BUSI[:3]):
        shutil.copy(src, pre / f"busi_{k}.png")
    planted = cv2.imread(str(images / "1.JPG"))  # resized and re-encoded, hidden among pretraining images
    planted = cv2.resize(planted, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(pre / "zz_planted.jpg"), planted, [cv2.IMWRITE_JPEG_QUALITY, 80])

    c = curation.curate([root], tmp_path / "out", workers=1, progress=False)
    assert c.summary["eval_datasets"] == ["MMOTU-2D"]
    assert len(c.leakage) == 1
    leak = c.leakage.iloc[0]
    assert (Path(leak["source"]).name, leak["eval_dataset"], Path(leak["eval_source"]).name) == \
        ("zz_planted.jpg", "MMOTU-2D", "1.JPG")
    assert c.leakage_pairs.to_dict("records") == [{"dataset": "BUSI", "eval_dataset": "MMOTU-2D", "frames": 1}]
    assert sorted(Path(s).name for s in c.manifest["source"]) == ["busi_0.png", "busi_1.png", "busi_2.png"]
    assert len(pd.read_csv(tmp_path / "out" / "leakage.csv")) == 1
    assert c.summary["frames_evaluation"] == 3  # annotations were skipped, not read as images


# ============================================================================ acceptance 3
def _done_files(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(str(db), timeout=1)
        try:
            return con.execute("SELECT count(*) FROM files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # created but no table yet, or busy
        return 0


def test_killed_run_resumes_to_the_same_manifest(tmp_path):
    root = tmp_path / "data"
    for k in range(3):
        (root / f"set_{k}").mkdir(parents=True)
    frames = noise_frames(540, 160, 192, seed=7)
    for i, f in enumerate(frames):
        cv2.imwrite(str(root / f"set_{i % 3}" / f"img_{i:04d}.png"), f)
    write_video(root / "set_0" / "clip.avi", 30, 10.0, seed=8)
    shutil.copy(root / "set_1" / "img_0001.png", root / "set_2" / "copy_of_0001.png")

    ref = tmp_path / "reference"
    assert cli.main(["curate", str(root), "--out", str(ref), "--workers", "2", "--no-progress"]) == 0

    out = tmp_path / "out"
    db = out / "cache" / "files.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "usfmae_lib.cli", "curate", str(root), "--out", str(out), "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while _done_files(db) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the command and any worker
    proc.wait()
    assert still_running, "the run finished before it could be killed: make the tree bigger"
    done_at_kill = _done_files(db)
    total = 540 + 2
    assert 0 < done_at_kill < total and not (out / "manifest.parquet").exists()

    assert cli.main(["curate", str(root), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == total
    assert summary["files_from_cache"] == done_at_kill  # finished files were not read again
    assert summary["files_read"] == total - done_at_kill
    assert (out / "manifest.csv").read_bytes() == (ref / "manifest.csv").read_bytes()
    assert pd.read_parquet(out / "manifest.parquet").equals(pd.read_parquet(ref / "manifest.parquet"))
    assert (out / "duplicates.csv").read_bytes() == (ref / "duplicates.csv").read_bytes()
    assert len(pd.read_csv(out / "duplicates.csv")) == 1

    assert cli.main(["curate", str(root), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["files_read"] == 0  # a third run reads nothing
    assert (out / "manifest.csv").read_bytes() == (ref / "manifest.csv").read_bytes()
