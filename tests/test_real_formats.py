"""Every format OpenUS-46 ships (issue 15): animated GIF clips, compressed DICOM, MetaImage
sequences, RF data refused. Real files from ../shared/data/real/openus_sample when present
(skipped otherwise); the GIF and RF rules also on files made here, so a clone tests them too."""
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from usfmae_lib import curation
from usfmae_lib import curation_readers as cr


@pytest.fixture(scope="module")
def openus(real, tmp_path_factory):
    """`usfmae curate openus_sample/* --out X` once: (sample folder, Curation)."""
    sample = real("openus_sample")
    out = tmp_path_factory.mktemp("openus") / "cur"
    roots = sorted(p for p in sample.iterdir() if p.is_dir())
    return sample, curation.curate(roots, out, video_fps=3.0, workers=1, progress=False)


def _recorded(path: Path) -> str:
    """How the manifest, its rejects and its datasets name a file or folder: absolute, links resolved
    (curation resolves its roots), so a sample folder reached through a link is named by its target."""
    return str(path.resolve())


def _frames_of(manifest: pd.DataFrame, path: Path) -> pd.DataFrame:
    return manifest[manifest["source"] == _recorded(path)]


def _duration_s(path: Path) -> float:
    """A clip's duration by its container (OpenCV) or, for a GIF, by its frames' delays (Pillow)."""
    if path.suffix.lower() == ".gif":
        with Image.open(path) as im:
            delays = []
            for i in range(im.n_frames):
                im.seek(i)
                delays.append(im.info.get("duration", 0))
        return sum(d if d >= 20 else 100 for d in delays) / 1000  # browsers: under 20 ms shows 100 ms
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():  # decoded count: containers' declared counts are sometimes off
        n += 1
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return n / fps


def test_every_clip_including_the_gif_is_sampled_at_3_per_second_of_its_own_time(openus):
    sample, c = openus
    clips = sorted((sample / "covid19_ultrasound/data/pocus_videos").rglob("*.*"))
    assert {p.suffix.lower() for p in clips} == {".gif", ".mp4", ".avi", ".mov", ".mpeg"}
    for clip in clips:
        got = _frames_of(c.manifest, clip)
        want = math.ceil(_duration_s(clip) * 3 - 1e-9)
        assert set(got["kind"]) == {"video"}, clip.name
        assert abs(len(got) - want) <= 1, (clip.name, len(got), want)


def test_all_four_dicom_files_are_read_including_jpeg_lossless(openus):
    sample, c = openus
    files = sorted((sample / "dicom").glob("*.dcm"))
    assert len(files) == 4 and any("JPGLossless" in f.name for f in files)
    for f in files:
        assert len(_frames_of(c.manifest, f)) >= 1, f.name
    assert len(_frames_of(c.manifest, sample / "dicom/OBXXXX1A_rle_2frame.dcm")) == 2  # multi-frame RLE
    assert not c.rejects["source"].str.endswith(".dcm").any()


def test_palette_dicom_is_shown_in_its_colours_not_its_indices(real):
    import pydicom
    from pydicom.pixels import apply_color_lut

    path = real("openus_sample") / "dicom/gdcm-US-ALOKA-16.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    want = np.rint(apply_color_lut(ds.pixel_array, ds) / 257).astype(np.uint8)  # 16-bit LUT -> 8 bits
    assert np.array_equal(cr.load_frame(path, "image"), want)


def test_metaimage_sequences_are_frames_and_the_rf_frame_is_a_reject(openus):
    sample, c = openus
    meta = sample / "metaimage"
    assert len(_frames_of(c.manifest, meta / "Prostate10_video.igs.mhd")) == 10
    assert len(_frames_of(c.manifest, meta / "UltrasonixCurvilinearScanConvertedData.igs.mha")) == 5
    rf = c.rejects[c.rejects["source"] == _recorded(meta / "UltrasonixLinearRfData.igs.mha")]
    assert list(rf["reason"]) == ["not B-mode"] and "RF" in rf["detail"].iloc[0]
    assert _frames_of(c.manifest, meta / "UltrasonixLinearRfData.igs.mha").empty


def test_pocus_and_hc18_folders_are_the_registrys_datasets(openus):
    sample, c = openus
    found = c.datasets.set_index("folder")
    assert found.loc[_recorded(sample / "covid19_ultrasound"), "dataset"] == "Pocus"
    assert found.loc[_recorded(sample / "hc18"), "dataset"] == "HC"
    assert found.loc[_recorded(sample / "covid19_ultrasound"), "in_registry"]


def test_every_kept_frame_reloads_to_the_hash_curation_recorded(openus):
    _, c = openus
    for row in c.manifest.itertuples():
        rgb = cr.load_frame(row.source, row.kind, row.frame, row.axis)
        assert cr.content_hash(rgb) == row.content_hash, (row.source, row.frame)


# ---------------------------------------------------------------------------- made here
def _gif(path: Path, delays_ms: list[int], size=64) -> list[np.ndarray]:
    frames = [np.full((size, size, 3), 30 * (i + 1), np.uint8) for i in range(len(delays_ms))]
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=delays_ms, loop=0, disposal=1)
    return frames


def test_gif_samples_follow_each_frames_own_delay(tmp_path):
    # frame 0 shows 0-1 s, 1: 1-1.1, 2: 1.1-1.2, 3: 1.2-1.7, 4: 1.7-2.5 s; samples at k/3 s, k = 0..7
    # (ceil(2.5 x 3) = 8): 0, 1/3, 2/3 -> 0; 1 -> 1; 4/3, 5/3 -> 3; 2, 7/3 -> 4; frame 2 is never on screen then
    path = tmp_path / "clip.gif"
    frames = _gif(path, [1000, 100, 100, 500, 800])
    got = list(cr.iter_frames(path, video_fps=3.0))
    assert [info["frame"] for info, _ in got] == [0, 1, 3, 4]  # a frame sampled twice is kept once
    assert all(info["kind"] == "video" for info, _ in got)
    for info, rgb in got:
        assert np.array_equal(rgb, frames[info["frame"]])
        assert np.array_equal(cr.load_frame(path, "video", info["frame"]), rgb)
    assert cr.gif_sample_indices([1000, 100, 100, 500, 800], 0) == [0, 1, 2, 3, 4]  # 0: every frame


def test_gif_without_delays_is_timed_as_browsers_show_it():
    # 30 frames of "0 ms" are shown at 100 ms each: 3 s -> 9 samples, frames 0, 3.33 -> 3, 6.67 -> 6, ...
    assert cr.gif_sample_indices([0] * 30, 3.0) == [math.floor(k * 10 / 3 + 1e-9) for k in range(9)]


def test_a_still_gif_is_an_image(tmp_path):
    path = tmp_path / "still.gif"
    _gif(path, [100])
    (info, rgb), = list(cr.iter_frames(path))
    assert info["kind"] == "image" and rgb.shape == (64, 64, 3)
    assert np.array_equal(cr.load_frame(path, "image"), rgb)


def test_a_cut_gif_is_a_reject_not_a_crash(tmp_path):
    path = tmp_path / "cut.gif"
    _gif(path, [100] * 8, size=128)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _, result = cr.read_file((str(path), 3.0, 0, 1))
    assert result["status"] == "reject", result


def test_signed_rf_like_data_is_refused_and_unsigned_bmode_kept(tmp_path):
    rng = np.random.default_rng(0)
    rf = (rng.normal(0, 3000, (4, 256, 512))).astype(np.int16)  # oscillates around zero, no PLUS header
    sitk.WriteImage(sitk.GetImageFromArray(rf), str(tmp_path / "rf.nrrd"))
    _, result = cr.read_file((str(tmp_path / "rf.nrrd"), 3.0, 0, 1))
    assert result["status"] == "reject" and result["reason"] == "not B-mode", result
    assert "below zero" in result["detail"]
    bmode = np.abs(rf).astype(np.int16)  # envelope-like: signed type, no negative sample
    sitk.WriteImage(sitk.GetImageFromArray(bmode), str(tmp_path / "bmode.nrrd"))
    _, result = cr.read_file((str(tmp_path / "bmode.nrrd"), 3.0, 0, 1))
    assert result["status"] == "ok" and len(result["frames"]) == 4
