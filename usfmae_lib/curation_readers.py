"""Readers for curation: every file a scanner or a lab exports, as 2D uint8 RGB frames.

    kind     extensions                                   library
    image    .png .jpg .jpeg .bmp .tif .tiff               OpenCV (8/16-bit, grey, RGB, RGBA, palette)
    video    .avi .mp4 .mov .mkv .m4v .mpg .mpeg .wmv .webm OpenCV (FFmpeg)
             .gif (animated; one frame: an image)          Pillow (its own per-frame timing)
    volume   .nii .nii.gz                                  nibabel
             .mhd (+ .raw) .mha .nrrd                      SimpleITK
             .dcm .dicom, or no extension with 'DICM'      pydicom (single and multi-frame; with
                                                           python-gdcm for JPEG lossless, JPEG-LS,
                                                           JPEG 2000; palette colour applied)

Frames of a file (`iter_frames`):
  * image: one frame, `frame` 0, `axis` -1.
  * video: sampled uniformly at `video_fps` frames per second of video time: sample k is taken
    at t_k = k / video_fps seconds (t_0 = 0) and is the frame on screen then, floor(t_k * fps)
    where fps is the file's frame rate; samples run while t_k < duration = n_frames / fps. So a
    video gives ceil(duration * video_fps) frames: 4 s at any frame rate -> 12 frames at 3 fps;
    2.5 s -> ceil(7.5) = 8. At most one sample per frame (a 2 fps video sampled at 3 fps gives
    every frame once). `video_fps` 0 keeps every frame. `frame` is the frame number in the file.
    An animated GIF is a video whose frames carry their own display times: sample k is the frame
    on screen at t_k by those times (a delay under 20 ms counts as 100 ms, as browsers show it).
  * volume: the array is put in (slice, row, column) = (z, y, x) order (SimpleITK and pydicom
    order; nibabel's (x, y, z) is transposed), then sliced along `slice_axis` (0 = z) keeping
    every `slice_step`-th slice from slice 0: ceil(n / step) frames, `frame` = slice index.
    A file holding a single 2D image (2D MetaImage, single-frame DICOM) is kind "image".
    DICOM series are not assembled: each file is read on its own.

8-bit RGB conversion (`to_rgb8`, used for hashing, by `load_frame` and so by preprocessing):
  * uint8 is kept; grey is replicated to 3 channels; grey+alpha and RGBA drop the alpha
    channel; palette images are expanded by the decoder.
  * other unsigned or non-negative integer data (16-bit PNG/TIFF, 12-bit DICOM, ...) are scaled
    linearly by the range of the smallest bit depth that holds their maximum:
    x * 255 / (2^b - 1), b = max(8, bit_length(max)); a 16-bit PNG using the full range is x/257.
  * float data and integers with negative values are min-max scaled to 0..255 (NaN -> 0).
  * statistics (max, min) are taken over the whole file: one image, or the whole volume, so
    every slice of a volume shares one scale. Video frames are 8-bit already.

`read_file` (what curation's worker processes run) reads one file's frames and hashes each:
content_hash = BLAKE2b-128 of the RGB frame's shape and bytes; phash and phash256 =
imagehash.phash with 64 and 256 bits.

One decode policy (`read_image_file` for image files, `iter_frames` for every kind): curation,
cleaning, fine-tuning and the pretraining store read images the same way, so a file refused by
one step is refused by all, with the same reason. Before any pixel is decoded an image's size is
read from its header (Pillow, lazily) and checked:
  * too large: more than MAX_PIXELS = 8192 x 8192 (67 Mpx; an ultrasound frame is ~1 Mpx). A
    small file can declare a huge image (a 856 KB PNG of 30000 x 30000 zeros decodes to 900 MB).
  * too small: a side under MIN_SIDE = 32 px (icons and thumbnails are not scans).
The same limits apply to video frames (from the container before decoding) and to volume
slices; the minimum side is not applied to slices across a stack (slice_axis 1 or 2), whose
thin side is the number of slices.

A file that cannot be read raises `Reject(reason, detail)`; reasons:
  zero bytes | unreadable (the OS refused to open or read it: permissions, a folder, ...) |
  truncated | not an image | not a video | not a volume | too large | too small |
  unsupported codec | corrupt or unsupported codec (OpenCV/FFmpeg cannot open a video whose
  container header is there; it does not say which) | unsupported layout | not B-mode |
  corrupt.

Not B-mode (`check_bmode`): pretraining wants display images. RF or IQ data (radio-frequency
echo samples, before envelope detection) is refused: a MetaImage whose PLUS header says
`UltrasoundImageType = RF_...`, and any integer or float data with more than 1% of its samples
below zero (echo amplitudes of a B-mode image are never negative; RF oscillates around zero, so
a third to a half of its samples are negative).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import threading
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".gif")
VOLUME_EXTS = (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd", ".dcm", ".dicom")

# magic bytes at the start of a file -> format (the decoders sniff content, not extensions)
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"BM": "bmp",
               b"II*\x00": "tiff", b"MM\x00*": "tiff", b"II+\x00": "tiff", b"MM\x00+": "tiff"}
VIDEO_MAGIC_AT = ((0, b"RIFF"), (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"),
                  (0, b"\x1aE\xdf\xa3"), (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"),
                  (0, b"0&\xb2u\x8ef\xcf\x11"), (0, b"FLV"))

# What any step accepts as a scan (module docstring): checked from the header, before decoding.
MAX_PIXELS = 8192 * 8192  # 67 Mpx: bounds memory (as 8-bit RGB: 200 MB) and cleaning time
MIN_SIDE = 32  # px
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}  # our format -> Pillow's
GIF_MIN_DELAY_MS, GIF_DEFAULT_DELAY_MS = 20, 100  # browsers show a GIF delay under 20 ms as 100 ms
NEGATIVE_LIMIT = 0.01  # more than 1% of samples below zero: RF/IQ or signed data, not a B-mode image


class Reject(Exception):
    """A file curation cannot read; `reason` is one of the reasons in the module docstring."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _unreadable(err: OSError) -> Reject:
    return Reject("unreadable", f"{type(err).__name__}: {err.strerror or err}")


def read_bytes(path: Path) -> bytes:
    """The whole file; Reject "unreadable" when the OS refuses (a decoder error is another matter)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise _unreadable(err) from None


def readable_size(path: Path) -> int:
    """Size in bytes of a file this process can open and read; Reject "unreadable" otherwise."""
    try:
        with open(path, "rb") as f:
            f.read(1)
        return Path(path).stat().st_size
    except OSError as err:
        raise _unreadable(err) from None


def check_frame_size(width: int, height: int, min_side: int = MIN_SIDE):
    """Reject "too large" / "too small" by the limits of the module docstring."""
    if width * height > MAX_PIXELS:
        raise Reject("too large", f"{width} x {height} px = {width * height / 1e6:.0f} Mpx, over the limit of "
                                  f"{MAX_PIXELS / 1e6:.0f} Mpx (MAX_PIXELS = 8192 x 8192)")
    if min(width, height) < min_side:
        raise Reject("too small", f"{width} x {height} px: a side under {min_side} px (MIN_SIDE)")


def check_bmode(a: np.ndarray, what: str = "data"):
    """Reject "not B-mode" when a signed or float array has more than NEGATIVE_LIMIT of its samples
    below zero (module docstring). Unsigned data passes without a scan."""
    if a.dtype.kind not in "if" or a.size == 0:
        return
    negative = float(np.count_nonzero(a < 0)) / a.size
    if negative > NEGATIVE_LIMIT:
        lo, hi = intensity_stats(a)
        raise Reject("not B-mode", f"{what}: {a.dtype} samples, {negative:.0%} below zero (min {lo:g}, max {hi:g}): "
                                   "RF/IQ or signed data, not a display image")


# ============================================================================ file kinds
def is_dicom(path: Path) -> bool:
    """'DICM' at byte 128: how DICOM files without an extension are recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def file_kind(path: Path) -> str | None:
    """'image' | 'video' | 'volume' by extension (DICOM also by content); None: not a frame file."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return "volume"
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in VOLUME_EXTS:
        return "volume"
    if ext == "" and name != "dicomdir" and is_dicom(path):
        return "volume"
    return None


# ============================================================================ 8-bit RGB
def intensity_stats(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of the data, ignoring NaN: what `to_rgb8` scales by."""
    if a.dtype == np.uint8 or a.size == 0:
        return 0.0, 255.0
    if a.dtype.kind == "f":
        finite = a[np.isfinite(a)]
        return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return float(a.min()), float(a.max())


def to_uint8(a: np.ndarray, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Scale any numeric array to uint8 by the rules of the module docstring."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    lo, hi = stats if stats is not None else intensity_stats(a)
    if a.dtype.kind in "iu" and lo >= 0:
        bits = max(8, int(hi).bit_length())
        scaled = a.astype(np.float64) * (255.0 / (2**bits - 1))
    else:
        scaled = (a.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(a.shape)
    return np.clip(np.nan_to_num(np.rint(scaled), nan=0.0), 0, 255).astype(np.uint8)


def to_rgb8(a: np.ndarray, bgr: bool, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Any decoded 2D frame [H, W] / [H, W, C] -> contiguous uint8 RGB [H, W, 3]."""
    a = to_uint8(a, stats)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
    if a.shape[2] == 2:  # grey + alpha
        return cv2.cvtColor(np.ascontiguousarray(a[..., 0]), cv2.COLOR_GRAY2RGB)
    rgb = a[..., :3]
    return np.ascontiguousarray(rgb[..., ::-1] if bgr else rgb)


def _frame_info(native: np.ndarray) -> dict:
    h, w = native.shape[:2]
    return {"width": int(w), "height": int(h), "channels": int(native.shape[2]) if native.ndim == 3 else 1,
            "bit_depth": int(native.dtype.itemsize * 8) if native.dtype != bool else 1}


# ============================================================================ images
def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from an image's header, no pixel decoded; None when Pillow cannot parse it.
    Pillow's format plugin is called directly: Image.open refuses images over ~179 Mpx
    (DecompressionBombError) without telling their size."""
    from PIL import Image

    Image.init()
    opener = Image.OPEN.get(PIL_FORMATS[fmt])
    if opener is None:
        return None
    try:
        with opener[0](BytesIO(data)) as im:
            return tuple(im.size)
    except Exception:  # an unusual header: OpenCV may still decode it, and then its size is checked
        return None


def _check_complete(data: bytes, fmt: str):
    """Reject "truncated" by the end marker or declared size: decoders often return a cut file
    with its missing part filled grey."""
    if fmt == "png" and b"IEND" not in data[-4096:]:
        raise Reject("truncated", "PNG without its IEND chunk")
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise Reject("truncated", "JPEG without an end-of-image marker after its last scan")
    if fmt == "bmp" and len(data) >= 6 and int.from_bytes(data[2:6], "little") > len(data):
        raise Reject("truncated", f"BMP header says {int.from_bytes(data[2:6], 'little')} bytes, file has {len(data)}")
    if fmt == "tiff" and data[2:4] in (b"*\x00", b"\x00*") and len(data) >= 8:  # classic TIFF: first IFD offset
        ifd = int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big")
        if ifd + 2 > len(data):
            raise Reject("truncated", f"TIFF directory at byte {ifd}, file has {len(data)}")


def decode_image(data: bytes, name: str = "", min_side: int = MIN_SIDE) -> np.ndarray:
    """Bytes of a PNG/JPEG/BMP/TIFF -> the decoder's array (BGR order, native bit depth), by the
    policy of the module docstring: complete, within the size limits (sides >= min_side), then decoded."""
    if len(data) == 0:
        raise Reject("zero bytes")
    fmt = next((f for magic, f in IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if fmt is None:
        raise Reject("not an image", f"starts with {data[:8]!r}")
    _check_complete(data, fmt)
    size = header_size(data, fmt)
    if size is not None:
        check_frame_size(*size, min_side)  # before decoding: a small file can declare a huge image
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        reason = "unsupported codec" if fmt == "tiff" else "corrupt"
        raise Reject(reason, f"OpenCV could not decode this {fmt.upper()} {name}".rstrip())
    check_frame_size(img.shape[1], img.shape[0], min_side)  # a header Pillow could not read
    check_bmode(img, f"{fmt.upper()} image")
    return img


def read_image_file(path, min_side: int = MIN_SIDE) -> np.ndarray:
    """The one way every step reads an image file (curation, cleaning, fine-tuning, the store):
    uint8 RGB [H, W, 3], exactly what curation hashed and `load_frame(path, "image")` returns.
    Raises Reject with the reason (unreadable, zero bytes, not an image, truncated, too large,
    too small, corrupt, unsupported codec). min_side = 1 for an evaluation set: MIN_SIDE keeps icons
    and thumbnails out of the pretraining crawl, but a small ROI crop of an official split is a test
    image like any other (GIST514-DB's crops are cut around the tumour)."""
    path = Path(path)
    return to_rgb8(decode_image(read_bytes(path), path.name, min_side), bgr=True)


# ============================================================================ videos
def video_sample_indices(fps: float, video_fps: float):
    """Frame numbers of samples k = 0, 1, ...: floor(k * fps / video_fps), repeats skipped.
    An endless generator; the caller stops at the end of the video."""
    if video_fps <= 0:  # every frame
        yield from itertools.count()
        return
    last, k = -1, 0
    while True:
        i = math.floor(k * fps / video_fps + 1e-9)
        if i > last:
            yield i
            last = i
        k += 1


def _check_video_header(path: Path):
    size = readable_size(path)
    if size == 0:
        raise Reject("zero bytes")
    with open(path, "rb") as f:
        head = f.read(16)
    if not any(head[o:o + len(m)] == m for o, m in VIDEO_MAGIC_AT):
        raise Reject("not a video", f"starts with {head[:8]!r}")
    if head[:4] == b"RIFF":
        if head[8:12] != b"AVI ":
            raise Reject("not a video", f"a RIFF file of type {head[8:12]!r}, not AVI")
        declared = int.from_bytes(head[4:8], "little") + 8
        if declared > size:
            raise Reject("truncated", f"AVI header says {declared} bytes, file has {size}")
        if head[12:16] not in (b"LIST", b"JUNK"):  # the header list (LIST hdrl) comes first
            raise Reject("corrupt", f"AVI header followed by {head[12:16]!r}, not its header list")


CANNOT_OPEN = ("corrupt or unsupported codec",
               "OpenCV/FFmpeg cannot open this video: its header is damaged or its codec has no decoder here")


def _fourcc(cap) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    return code.to_bytes(4, "little").decode("latin-1").strip("\x00 ") or "unknown"


def iter_video(path: Path, video_fps: float):
    """Yield (frame number, BGR uint8 frame) of the sampled frames, decoding sequentially
    (grab every frame, retrieve only the samples: exact, no seeking). Returns the frame count
    and rate as the generator's value (StopIteration.value): (n_frames, fps)."""
    _check_video_header(path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise Reject(*CANNOT_OPEN)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        codec = _fourcc(cap)  # opened: FFmpeg has a decoder for it
        if not fps > 0 or not math.isfinite(fps):
            raise Reject("unsupported codec", "no frame rate in the container")
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width > 0 and height > 0:
            check_frame_size(width, height)  # from the container, before decoding
        wanted = video_sample_indices(fps, video_fps)
        want, i = next(wanted), 0
        while cap.grab():
            if i == want:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                check_frame_size(frame.shape[1], frame.shape[0])
                yield i, frame
                want = next(wanted)
            i += 1
    finally:
        cap.release()
    if i == 0:
        raise Reject("corrupt", f"the container opens ({codec}, {declared} frames declared) but no frame decodes")
    if declared > 0 and i < declared - 1:
        raise Reject("truncated", f"decoded {i} of the {declared} frames the container declares")
    return i, fps


def gif_delays_shown(delays_ms: list[int]) -> list[int]:
    """Each GIF frame's display time in ms as browsers show it (a delay under 20 ms: 100 ms)."""
    return [d if d >= GIF_MIN_DELAY_MS else GIF_DEFAULT_DELAY_MS for d in delays_ms]


def gif_sample_indices(delays_ms: list[int], video_fps: float) -> list[int]:
    """Frame numbers sampled from a GIF whose frame i is shown for delays_ms[i]: sample k is the
    frame on screen at t_k = k / video_fps (module docstring); video_fps 0: every frame."""
    delays = gif_delays_shown(delays_ms)
    if video_fps <= 0:
        return list(range(len(delays)))
    starts = np.cumsum([0] + delays[:-1]) / 1000.0  # s
    total = sum(delays) / 1000.0
    n = math.ceil(total * video_fps - 1e-9)
    picks = np.searchsorted(starts, np.arange(n) / video_fps + 1e-9, side="right") - 1
    return sorted(set(int(i) for i in picks))


def _open_gif(path: Path):
    """An opened animated GIF (Pillow), its size checked from the header before any decoding."""
    from PIL import Image

    size = readable_size(path)
    if size == 0:
        raise Reject("zero bytes")
    with open(path, "rb") as f:
        if f.read(6) not in (b"GIF87a", b"GIF89a"):
            raise Reject("not a video", "a .gif without the GIF87a/GIF89a signature")
    try:
        im = Image.open(path)
    except Exception as err:
        raise Reject("corrupt", f"Pillow: {str(err)[:200]}") from None
    check_frame_size(*im.size)
    return im


def iter_gif(path: Path, video_fps: float):
    """Yield (frame number, RGB uint8 frame) of a GIF's sampled frames (module docstring);
    return (n_frames, mean frame rate) as the generator's value, like `iter_video`."""
    with _open_gif(path) as im:
        try:
            n = im.n_frames
            delays = []
            for i in range(n):  # frame delays live in each frame's header: seek reads them
                im.seek(i)
                delays.append(int(im.info.get("duration", 0) or 0))
            for i in gif_sample_indices(delays, video_fps):
                im.seek(i)  # Pillow composes the frame over the previous ones (disposal rules)
                yield i, np.asarray(im.convert("RGB"))
        except (OSError, EOFError, ValueError) as err:
            raise Reject("truncated" if "truncat" in str(err).lower() or isinstance(err, EOFError) else "corrupt",
                         f"Pillow: {str(err)[:200]}") from None
    return n, 1000.0 * n / sum(gif_delays_shown(delays))


def gif_frame_count(path: Path) -> int:
    with _open_gif(path) as im:
        return im.n_frames


def _gif_frame(path: str, frame: int) -> np.ndarray:
    with _open_gif(Path(path)) as im:
        if frame >= im.n_frames:
            raise Reject("truncated", f"{path} has fewer than {frame + 1} frames")
        im.seek(frame)
        return np.asarray(im.convert("RGB"))


# ============================================================================ volumes
def _reject_from(err: Exception, what: str) -> Reject:
    msg = str(err)
    low = msg.lower()
    if any(s in low for s in ("truncat", "eof", "end of file", "ended before", "too short", "less than expected",
                              "match the expected length", "buffer is smaller", "size mismatch", "damaged")):
        return Reject("truncated", msg[:200])
    if any(s in low for s in ("decompress", "plugin", "handler", "transfer syntax", "codec", "not supported")):
        return Reject("unsupported codec", msg[:200])
    return Reject("corrupt", f"{what}: {msg[:200]}")


META_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_ULONG": 8, "MET_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(path: Path):
    """MetaImage header sanity and, for uncompressed data, the data size (ITK would print and fail)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not any(k in head for k in (b"NDims", b"ObjectType", b"DimSize")):
        raise Reject("not a volume", "no MetaImage header")
    fields = {}
    for line in head.split(b"\n"):
        key, sep, value = line.decode("latin-1").partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    image_type = fields.get("UltrasoundImageType", "")  # PLUS toolkit: BRIGHTNESS, RF_REAL, RF_IQ_LINE, ...
    if image_type.upper().startswith("RF"):
        raise Reject("not B-mode", f"UltrasoundImageType = {image_type} in its header: RF data, not a display image")
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        item = META_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", 1))
        data_file = fields["ElementDataFile"]
    except (KeyError, ValueError):
        return  # unusual header: let SimpleITK decide
    if fields.get("CompressedData", "False").lower() == "true" or data_file.upper() == "LIST" or "%" in data_file:
        return  # compressed or multi-file data: let SimpleITK check it
    expected = int(np.prod(dims)) * item
    if data_file.upper() == "LOCAL":  # .mha: voxels follow the header line ElementDataFile = LOCAL
        key = head.find(b"ElementDataFile")
        have = path.stat().st_size - (key + head[key:].find(b"\n") + 1)
    else:
        raw = path.parent / data_file
        if not raw.exists():
            raise Reject("truncated", f"its data file {data_file} is missing")
        have = raw.stat().st_size
    if have < expected:
        raise Reject("truncated", f"{expected} bytes of voxels expected, {have} found")


def _nifti(path: Path) -> tuple[np.ndarray, bool]:
    import nibabel as nib

    with open(path, "rb") as f:
        head = f.read(4)
    if path.name.lower().endswith(".gz"):
        if head[:2] != b"\x1f\x8b":
            raise Reject("not a volume", "not gzip-compressed")
    elif not {int.from_bytes(head, "little"), int.from_bytes(head, "big")} & {348, 540}:  # sizeof_hdr, NIfTI-1/2
        raise Reject("not a volume", "no NIfTI header")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for bad files
        if "not a nifti" in str(err).lower() or "cannot work out file type" in str(err).lower():
            raise Reject("not a volume", str(err)[:200]) from None
        raise _reject_from(err, "nibabel") from None
    if data.dtype.names:  # RGB24 / RGBA32 NIfTI: structured dtype -> trailing channel axis
        data = np.stack([data[n] for n in data.dtype.names[:3]], axis=-1)
        data = np.transpose(data, (2, 1, 0, 3)) if data.ndim == 4 else np.transpose(data, (1, 0, 2))[None]
        return np.ascontiguousarray(data), False
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise Reject("unsupported layout", f"{data.ndim}-D NIfTI {data.shape}: only 2D and 3D are sliced")
    data = data.T if data.ndim == 3 else data.T[None]  # (x, y, z) -> (z, y, x)
    return np.ascontiguousarray(data), False


def _sitk(path: Path) -> tuple[np.ndarray, bool]:
    import SimpleITK as sitk

    if path.suffix.lower() in (".mhd", ".mha"):
        _check_metaimage(path)
    try:
        img = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(img)  # (z, y, x[, c]) or (y, x[, c])
    except Exception as err:
        raise _reject_from(err, "SimpleITK") from None
    vector = img.GetNumberOfComponentsPerPixel() > 1
    spatial = data.ndim - int(vector)
    if spatial == 2:
        data = data[None]
    elif spatial > 3:
        raise Reject("unsupported layout", f"{spatial}-D image {data.shape}: only 2D and 3D are sliced")
    return np.ascontiguousarray(data), False


def _dicom(path: Path) -> tuple[np.ndarray, bool]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as err:
        raise Reject("not a volume", f"pydicom: {str(err)[:200]}") from None
    if "PixelData" not in ds:
        raise Reject("not an image", "DICOM file without pixel data")
    try:
        data = ds.pixel_array
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":  # indices -> the colours they stand for
            from pydicom.pixels import apply_color_lut

            data = apply_color_lut(data, ds)
    except Exception as err:
        raise _reject_from(err, "pydicom") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        data = data[None]
    return np.ascontiguousarray(data), False


def read_volume(path: Path) -> tuple[np.ndarray, bool]:
    """A volume file -> (array [Z, Y, X] or [Z, Y, X, C], bgr=False); a 2D file has Z = 1."""
    if readable_size(path) == 0:
        raise Reject("zero bytes")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti(path)
    if name.endswith((".mhd", ".mha", ".nrrd")):
        return _sitk(path)
    return _dicom(path)


def volume_slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis)


# ============================================================================ all kinds
def iter_frames(path: Path, video_fps: float = 3.0, slice_axis: int = 0, slice_step: int = 1):
    """Yield (info, rgb) for every frame curation keeps from one file; info has kind, frame,
    axis, width, height, channels, bit_depth (of the decoded data); rgb is uint8 [H, W, 3].
    The generator's return value is the number of frames (or slices) in the file.
    Raises Reject. Every file is read once (a GIF's frame count is read from its headers first)."""
    kind = file_kind(path)
    if kind == "image":
        native = decode_image(read_bytes(path), path.name)
        yield {"kind": "image", "frame": 0, "axis": -1, **_frame_info(native)}, to_rgb8(native, bgr=True)
        return 1
    if kind == "video":
        gif = path.suffix.lower() == ".gif"
        still = gif and gif_frame_count(path) == 1  # a still GIF is an image
        gen = iter_gif(path, video_fps) if gif else iter_video(path, video_fps)
        while True:
            try:
                i, frame = next(gen)
            except StopIteration as stop:
                return stop.value[0]
            yield ({"kind": "image" if still else "video", "frame": int(i), "axis": -1, **_frame_info(frame)},
                   to_rgb8(frame, bgr=not gif))
    if kind == "volume":
        vol, bgr = read_volume(path)
        check_bmode(vol, f"{path.suffix.lstrip('.').upper() or 'DICOM'} data")
        stats = intensity_stats(vol)
        if vol.shape[0] == 1:  # one 2D image in a volume format
            native = vol[0]
            check_frame_size(native.shape[1], native.shape[0])
            yield {"kind": "image", "frame": 0, "axis": -1, **_frame_info(native)}, to_rgb8(native, bgr, stats)
            return 1
        height, width = (d for k, d in enumerate(vol.shape[:3]) if k != slice_axis)
        check_frame_size(width, height, MIN_SIDE if slice_axis == 0 else 1)  # across a stack: as thin as it is deep
        n = vol.shape[slice_axis]
        for i in range(0, n, slice_step):
            native = volume_slice(vol, slice_axis, i)
            yield ({"kind": "volume", "frame": i, "axis": slice_axis, **_frame_info(native)},
                   to_rgb8(native, bgr, stats))
        return n
    raise Reject("not an image", f"unknown file type {path.suffix!r}")


# ============================================================================ load_frame
_cache = threading.local()  # per thread: the last volume read, the last video opened


def _cached_volume(path: str):
    hit = getattr(_cache, "volume", None)
    if hit is None or hit[0] != path:
        vol, bgr = read_volume(Path(path))
        hit = (path, vol, bgr, intensity_stats(vol))
        _cache.volume = hit
    return hit[1:]


def _video_frame(path: str, frame: int) -> np.ndarray:
    st = getattr(_cache, "video", None)
    if st is None or st["path"] != path or st["pos"] > frame:  # (re)open; forward reads reuse it
        if st is not None:
            st["cap"].release()
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise Reject(CANNOT_OPEN[0], f"{CANNOT_OPEN[1]}: {path}")
        st = _cache.video = {"path": path, "cap": cap, "pos": 0}
    cap = st["cap"]
    while st["pos"] < frame:
        if not cap.grab():
            raise Reject("truncated", f"{path} has fewer than {frame + 1} frames")
        st["pos"] += 1
    ok, img = cap.read()
    if not ok:
        raise Reject("truncated", f"{path} has no frame {frame}")
    st["pos"] += 1
    return img


def load_frame(source, kind: str, frame: int = 0, axis: int = -1) -> np.ndarray:
    """One frame of a manifest row as uint8 RGB [H, W, 3], exactly as curation hashed it
    (conversion rules in the module docstring).

    kind "image": the file's image (any format: PNG/JPEG/..., 2D MetaImage, single-frame DICOM);
    "video": frame number `frame` (decoded sequentially; reading a video's frames in increasing
    order reuses one open decoder per thread); "volume": slice `frame` along `axis` of the
    (z, y, x) array (the last volume read is kept in memory per thread).
    """
    path = str(source)
    if kind == "video" and path.lower().endswith(".gif"):
        return _gif_frame(path, int(frame))
    if kind == "video":
        return to_rgb8(_video_frame(path, int(frame)), bgr=True)
    if kind == "volume" or (kind == "image" and file_kind(Path(path)) == "volume"):
        vol, bgr, stats = _cached_volume(path)
        native = vol[0] if kind == "image" else volume_slice(vol, int(axis), int(frame))
        return to_rgb8(native, bgr, stats)
    if kind == "image" and path.lower().endswith(".gif"):
        return _gif_frame(path, 0)
    if kind == "image":
        return read_image_file(path)
    raise ValueError(f"kind must be 'image', 'video' or 'volume', got {kind!r}")


# ============================================================================ one file, hashed (a worker)
def content_hash(rgb: np.ndarray) -> str:
    """BLAKE2b-128 of a uint8 RGB frame's shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.shape}".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def perceptual_hash(rgb: np.ndarray) -> tuple[str, str]:
    """imagehash.phash twice: 64-bit (8x8 DCT of the 32x32 grey thumbnail, 16 hex digits) and
    256-bit (16x16 DCT of the 64x64 thumbnail, 64 hex digits). The short one indexes, the long
    one decides (see curation: the 64-bit hash cannot tell apart scans of one standard view)."""
    import imagehash
    from PIL import Image

    img = Image.fromarray(rgb)
    return str(imagehash.phash(img)), str(imagehash.phash(img, hash_size=16))


def read_file(task: tuple) -> tuple[str, dict]:
    """Worker: (path, video_fps, slice_axis, slice_step) -> (path, result). The result holds
    the frames' [kind, frame, axis, width, height, channels, bit_depth, content_hash, phash, phash256]
    or the reject reason; nothing raised (a long run records rejects and goes on)."""
    path, video_fps, slice_axis, slice_step = task
    p = Path(path)
    try:
        if readable_size(p) == 0:
            raise Reject("zero bytes")
        frames, gen = [], iter_frames(p, video_fps, slice_axis, slice_step)
        while True:
            try:
                info, rgb = next(gen)
            except StopIteration as stop:
                n_in_file = stop.value
                break
            frames.append([info["kind"], info["frame"], info["axis"], info["width"], info["height"],
                           info["channels"], info["bit_depth"], content_hash(rgb), *perceptual_hash(rgb)])
        return path, {"status": "ok", "frames": frames, "frames_in_file": int(n_in_file)}
    except Reject as rej:
        return path, {"status": "reject", "reason": rej.reason, "detail": rej.detail}
    except Exception as err:  # an unexpected decoder error must not stop a 400k-file run
        return path, {"status": "reject", "reason": "corrupt", "detail": f"{type(err).__name__}: {str(err)[:200]}"}


def init_worker():
    cv2.setNumThreads(1)  # one process per core; OpenCV threads would oversubscribe
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # decoder chatter: rejects.csv says it
