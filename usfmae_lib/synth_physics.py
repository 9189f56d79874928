"""B-mode image formation for the synthetic ultrasound generator.

A scene is a set of tissue-property maps drawn in Cartesian image coordinates
(echogenicity in dB, attenuation in dB/cm, specular reflectors, scatterer density).
`simulate` resamples them onto the beam grid of the probe (depth x beam), fills the grid
with random complex scatterers, convolves with a depth-dependent point-spread function
(PSF), applies attenuation, electronic noise and time-gain compensation (TGC), takes the
envelope |I + jQ| (fully developed speckle is then Rayleigh-distributed), log-compresses
to 8 bits and scan-converts back to the Cartesian image (sector probes: black outside the
fan).

Units: depth in mm, attenuation in dB/cm for the round trip at the imaging frequency,
echogenicity in dB relative to a reference soft tissue (0 dB).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

PROBE_KINDS = ("linear", "curvilinear", "phased", "endocavity")


@dataclass
class Probe:
    """Probe geometry.

    kind: linear (rectangular image) or a sector: curvilinear (convex, apex above the
    skin), phased (apex at the skin), endocavity (small radius, wide opening).
    depth_mm: imaged depth below the probe face; angle_deg: full sector opening;
    radius_mm: radius of curvature of the probe face (0 for phased).
    """

    kind: str = "linear"
    depth_mm: float = 40.0
    angle_deg: float = 60.0
    radius_mm: float = 40.0

    @property
    def is_sector(self) -> bool:
        return self.kind != "linear"


def random_probe(rng: np.random.Generator, kind: str, depth_mm: float) -> Probe:
    """Typical opening/radius for each probe kind, randomised slightly."""
    if kind == "linear":
        return Probe("linear", depth_mm, 0.0, 0.0)
    if kind == "curvilinear":
        return Probe(kind, depth_mm, rng.uniform(55, 75), rng.uniform(40, 60))
    if kind == "phased":
        return Probe(kind, depth_mm, rng.uniform(70, 90), rng.uniform(0.5, 2.0))
    if kind == "endocavity":
        return Probe(kind, depth_mm, rng.uniform(110, 150), rng.uniform(8, 12))
    raise ValueError(f"unknown probe kind {kind!r}")


@dataclass
class Geometry:
    """Mapping between the Cartesian image (H x W px) and the beam grid (nr x nb)."""

    probe: Probe
    H: int
    W: int
    px_mm: float  # Cartesian pixel size (square pixels)
    nr: int
    nb: int
    # beam grid -> Cartesian sample positions (for resampling the scene), float32 (nr, nb)
    beam_x: np.ndarray = field(repr=False)
    beam_y: np.ndarray = field(repr=False)
    # Cartesian -> beam grid positions (for scan conversion), float32 (H, W)
    cart_b: np.ndarray = field(repr=False, default=None)
    cart_r: np.ndarray = field(repr=False, default=None)
    fan: np.ndarray = field(repr=False, default=None)  # bool (H, W), inside the image
    apex: tuple = (0.0, 0.0)  # apex position in px (sector), for beam-aligned drawing

    @property
    def dr_mm(self) -> float:
        return self.probe.depth_mm / self.nr


def make_geometry(probe: Probe, H: int, W: int, margin: float = 0.02) -> Geometry:
    """Build the two resampling maps. Linear: identity; sector: the fan, fitted inside
    the image with `margin` (fraction) on top/bottom/sides, centred horizontally."""
    if not probe.is_sector:
        px = probe.depth_mm / H
        by, bx = np.mgrid[0:H, 0:W].astype(np.float32)
        return Geometry(probe, H, W, px, H, W, bx, by, bx, by, np.ones((H, W), bool), (W / 2, 0.0))
    R0, D = probe.radius_mm, probe.depth_mm
    th = np.deg2rad(probe.angle_deg) / 2
    # bounding box of the fan in mm relative to the apex (y downwards)
    x_half = (R0 + D) * np.sin(th)
    y_top = R0 * np.cos(th)
    y_bot = R0 + D
    px = max((y_bot - y_top) / (H * (1 - 2 * margin)), 2 * x_half / (W * (1 - 2 * margin)))
    cx = W / 2.0
    cy = H * margin - y_top / px  # apex row (negative: above the image)
    nr, nb = H, W
    r = R0 + (np.arange(nr, dtype=np.float32) + 0.5) * (D / nr)
    a = -th + (np.arange(nb, dtype=np.float32) + 0.5) * (2 * th / nb)
    rr, aa = np.meshgrid(r, a, indexing="ij")
    beam_x = (cx + rr * np.sin(aa) / px).astype(np.float32)
    beam_y = (cy + rr * np.cos(aa) / px).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    dx, dy = (xx + 0.5 - cx) * px, (yy + 0.5 - cy) * px
    rc = np.hypot(dx, dy)
    ac = np.arctan2(dx, dy)
    cart_r = ((rc - R0) / (D / nr) - 0.5).astype(np.float32)
    cart_b = ((ac + th) / (2 * th / nb) - 0.5).astype(np.float32)
    fan = (rc >= R0) & (rc <= R0 + D) & (np.abs(ac) <= th)
    return Geometry(probe, H, W, px, nr, nb, beam_x, beam_y, cart_b, cart_r, fan, (cx, cy))


@dataclass
class Physics:
    """Acquisition / display knobs (all randomised per image by `random_physics`)."""

    freq_mhz: float = 7.5
    axial_mm: float = 0.25  # axial PSF sigma (pulse length)
    lateral_mm: float = 0.45  # lateral PSF sigma at the focus
    focus_frac: float = 0.4  # focal depth as a fraction of the image depth
    rayleigh_frac: float = 0.35  # depth of field (fraction of depth) of the lateral beam
    atten_db_cm: float = 6.0  # nominal soft-tissue round-trip attenuation, dB/cm
    tgc_error_db: float = 2.0  # smooth residual error of the TGC curve (std, dB)
    noise_db: float = -30.0  # electronic noise re. 0 dB tissue at the deepest row (after TGC)
    gain_db: float = 0.0  # display gain
    dynamic_range_db: float = 55.0
    ref_db: float = 33.0  # level mapped to white = tissue level + ref_db - gain
    reverb: float = 0.0  # strength of multiple reflections of shallow specular echoes
    smooth_px: float = 0.0  # display smoothing (speckle reduction), Gaussian sigma in px
    n_lateral_levels: int = 4  # bands used to approximate the depth-dependent lateral PSF
    tgc_adapt: float = 0.7  # fraction of the scene's mean attenuation profile compensated by TGC
    tgc_seed: int = 0  # seed of the TGC error curve (fixed over the frames of a video)


def random_physics(rng: np.random.Generator, kind: str, depth_mm: float, **over) -> Physics:
    """Draw plausible settings; higher frequency for shallow linear imaging."""
    if kind == "linear":
        f = rng.uniform(7, 13)
    elif kind == "endocavity":
        f = rng.uniform(5, 8)
    else:
        f = rng.uniform(2.5, 5)
    wl = 1.54 / f  # wavelength, mm
    p = Physics(
        freq_mhz=float(f),
        axial_mm=float(wl * rng.uniform(0.7, 1.0)),
        lateral_mm=float(wl * rng.uniform(1.8, 2.8)),
        focus_frac=float(rng.uniform(0.3, 0.6)),
        rayleigh_frac=float(rng.uniform(0.25, 0.5)),
        atten_db_cm=float(1.0 * f),  # 0.5 dB/cm/MHz one way, doubled for round trip
        tgc_error_db=float(rng.uniform(0.5, 2.5)),
        noise_db=float(rng.uniform(-38, -24)),
        gain_db=float(rng.normal(0, 3)),
        dynamic_range_db=float(rng.uniform(48, 62)),
        smooth_px=float(rng.choice([0.0, 0.0, 0.5, 0.8])),
        tgc_seed=int(rng.integers(0, 2**31)),
    )
    for k, v in over.items():
        setattr(p, k, v)
    return p


def _smooth_profile(rng: np.random.Generator, n: int, n_knots: int = 6) -> np.ndarray:
    """Smooth random 1D curve of length n with unit-ish std (cubic through knots)."""
    knots = rng.standard_normal(n_knots).astype(np.float32)
    return cv2.resize(knots[None, :], (n, 1), interpolation=cv2.INTER_CUBIC)[0]


def _gauss_kernel(sigma: float) -> np.ndarray:
    """Unit-energy Gaussian (sum k^2 = 1) so speckle brightness does not depend on PSF size."""
    sigma = max(float(sigma), 0.3)
    k = cv2.getGaussianKernel(2 * int(np.ceil(3 * sigma)) + 1, sigma).astype(np.float32)
    return k / np.sqrt((k**2).sum())


def _to_beam(geom: Geometry, img: np.ndarray) -> np.ndarray:
    """Resample a Cartesian map (H, W[, C]) onto the beam grid (nr, nb[, C])."""
    if not geom.probe.is_sector:
        return img
    return cv2.remap(img, geom.beam_x, geom.beam_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def psf_field(rng: np.random.Generator, amp: np.ndarray, coherent: np.ndarray,
              phys: Physics, geom: Geometry, scat: np.ndarray | None = None) -> np.ndarray:
    """Complex RF (I/Q) field (nr, nb, 2) float32: scatterers convolved with the PSF.

    amp: (nr, nb) RMS scatterer amplitude; coherent: (nr, nb) amplitude of specular
    (phase-coherent along the interface) reflection; scat: optional unit complex Gaussian
    scatterers (nr, nb, 2) (videos/volumes pass correlated ones). The axial PSF is fixed;
    the lateral PSF widens away from the focus (Gaussian beam), approximated by blending
    a few laterally blurred copies per depth band.
    """
    nr, nb = amp.shape
    z = rng.standard_normal((nr, nb, 2), dtype=np.float32) if scat is None else scat.copy()
    z *= amp[..., None]
    if coherent is not None:
        z[..., 0] += coherent
    dr = geom.dr_mm
    # lateral sample spacing in mm at each depth (sector: beams diverge)
    if geom.probe.is_sector:
        th = np.deg2rad(geom.probe.angle_deg)
        r = geom.probe.radius_mm + (np.arange(nr) + 0.5) * dr
        lat_mm = np.maximum(r * th / nb, 1e-3)
    else:
        lat_mm = np.full(nr, geom.px_mm)
    depth = (np.arange(nr) + 0.5) * dr
    zf = phys.focus_frac * geom.probe.depth_mm
    zr = max(phys.rayleigh_frac * geom.probe.depth_mm, 1e-3)
    sig_px = phys.lateral_mm * np.sqrt(1 + ((depth - zf) / zr) ** 2) / lat_mm  # per row
    ka = _gauss_kernel(phys.axial_mm / dr)
    z = cv2.sepFilter2D(z, -1, np.ones((1, 1), np.float32), ka, borderType=cv2.BORDER_REFLECT)
    levels = np.geomspace(max(sig_px.min(), 0.3), max(sig_px.max(), 0.31), phys.n_lateral_levels)
    # per-row fractional index into the levels (log-spaced)
    li = np.interp(np.log(np.clip(sig_px, levels[0], levels[-1])), np.log(levels), np.arange(len(levels)))
    out = np.zeros_like(z)
    one = np.ones((1, 1), np.float32)
    for k, s in enumerate(levels):
        w = np.clip(1 - np.abs(li - k), 0, 1).astype(np.float32)
        rows = np.nonzero(w)[0]
        if rows.size == 0:
            continue
        lo, hi = rows[0], rows[-1] + 1
        pad = int(3 * phys.axial_mm / dr) + 1  # blur a slightly larger band, no edge artefacts
        a, b = max(lo - pad, 0), min(hi + pad, nr)
        blurred = cv2.sepFilter2D(z[a:b], -1, _gauss_kernel(s), one, borderType=cv2.BORDER_REFLECT)
        out[lo:hi] += blurred[lo - a:hi - a] * w[lo:hi, None, None]
    return out


def simulate(scene, rng: np.random.Generator, phys: Physics | None = None,
             return_envelope: bool = False, scat: np.ndarray | None = None):
    """Render a scene to an 8-bit B-mode image.

    scene: object with `geom` (Geometry) and Cartesian float32 maps `db`, `alpha`,
    `spec`, `density` (H, W) (see synth_scenes.Canvas).
    scat: optional scatterer field (nr, nb, 2), see psf_field.
    Returns uint8 (H, W); with return_envelope also the envelope after TGC, before log
    compression, on the beam grid (nr, nb) float32 (linear probes: same grid as the image).
    """
    geom = scene.geom
    phys = phys or Physics()
    stack = np.dstack([scene.db, scene.alpha, scene.spec, scene.density]).astype(np.float32)
    db, alpha, spec, dens = np.moveaxis(_to_beam(geom, stack), -1, 0)
    nr, nb = db.shape
    amp = np.power(10.0, db / 20.0, dtype=np.float32)
    if float(dens.min()) < 0.999:
        # sparse scatterers: keep the mean intensity, lose the Gaussian statistics
        d = np.clip(dens, 1e-3, 1)
        amp *= (rng.random((nr, nb), dtype=np.float32) < d) / np.sqrt(d)
    else:
        rng.random((nr, nb), dtype=np.float32)  # same stream whatever the density
    coherent = None
    if float(spec.max()) > 0:
        # specular reflector of intensity `spec` dB: mostly rough (speckled) plus a
        # phase-coherent share, so interfaces are bright but still grainy
        s_amp = np.where(spec > 0, np.power(10.0, spec / 20.0, dtype=np.float32), 0).astype(np.float32)
        if phys.reverb > 0:
            s_amp = s_amp + _reverberation(s_amp, phys.reverb)
        amp = np.sqrt(amp * amp + 0.8 * s_amp * s_amp)
        coherent = 0.45 * s_amp
    iq = psf_field(rng, amp, coherent, phys, geom, scat)
    # attenuation along each beam (round trip), compensated by TGC for nominal tissue
    # (the scene's maps use its own nominal attenuation: rescale to this frequency)
    alpha = alpha * np.float32(phys.atten_db_cm / getattr(scene, "base_alpha", phys.atten_db_cm))
    dz_cm = geom.dr_mm / 10.0
    att_db = np.cumsum(alpha, axis=0) * dz_cm
    depth_cm = (np.arange(nr, dtype=np.float32) + 1) * dz_cm
    tgc_err = _smooth_profile(np.random.default_rng(phys.tgc_seed), nr)
    # TGC: nominal attenuation, partly adapted to this scene's mean attenuation per depth
    # (what the sonographer's sliders / auto-TGC do), plus a smooth residual error
    tgc_db = ((1 - phys.tgc_adapt) * phys.atten_db_cm * depth_cm + phys.tgc_adapt * np.median(att_db, axis=1)
              + phys.tgc_error_db * tgc_err).astype(np.float32)
    iq *= np.power(10.0, -att_db / 20.0, dtype=np.float32)[..., None]
    noise_rms = 10 ** ((phys.noise_db - float(tgc_db.max())) / 20) / np.sqrt(2)
    noise = rng.standard_normal(iq.shape, dtype=np.float32) * np.float32(noise_rms)
    iq += noise
    iq *= np.power(10.0, tgc_db / 20.0, dtype=np.float32)[:, None, None]
    env = cv2.magnitude(iq[..., 0], iq[..., 1])
    img = log_compress(env, phys)
    img = _to_cartesian(geom, img)
    if phys.smooth_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), phys.smooth_px)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if geom.probe.is_sector:
        out[~geom.fan] = 0
    return (out, env) if return_envelope else out


def _reverberation(coherent: np.ndarray, strength: float, n_echo: int = 4, top_frac: float = 0.4):
    """Multiple reflections between probe and a shallow specular reflector at depth z
    reappear at 2z, 3z, ... with decaying amplitude (lung A-lines, gas, needles)."""
    nr = coherent.shape[0]
    src = coherent.copy()
    src[int(nr * top_frac):] = 0
    rows = np.arange(nr)
    out = np.zeros_like(coherent)
    for k in range(2, n_echo + 2):
        out += (strength ** (k - 1)) * src[rows // k] * (rows % k == 0)[:, None]
    # each source row maps to one row k*z: thicken so that the echo keeps its width
    return cv2.dilate(out, np.ones((3, 1), np.uint8))


def log_compress(env: np.ndarray, phys: Physics) -> np.ndarray:
    """Envelope -> display grey level (float, 0..255): 20 log10, window of DR dB."""
    db = 20.0 * np.log10(env + 1e-6)
    top = phys.ref_db - phys.gain_db
    return (db - (top - phys.dynamic_range_db)) * (255.0 / phys.dynamic_range_db)


def _to_cartesian(geom: Geometry, img: np.ndarray) -> np.ndarray:
    """Scan conversion (bilinear) of the beam-grid image to the Cartesian image."""
    if not geom.probe.is_sector:
        return img
    return cv2.remap(img, geom.cart_b, geom.cart_r, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
