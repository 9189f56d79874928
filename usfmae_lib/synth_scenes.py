"""Scenes for the synthetic ultrasound generator: anatomies, lesions, eval-set classes.

A scene builder draws tissue-property maps on a `Canvas` (Cartesian, H x W px):
echogenicity `db` (dB re. soft tissue), round-trip attenuation `alpha` (dB/cm),
specular reflectors `spec` (dB above the scatterer level) and scatterer `density` (0..1),
plus a lesion label map. Positions are given in probe coordinates: depth fraction
(0 = skin, 1 = bottom of the image) and lateral fraction (0 = left, 1 = right), so one
builder works under linear and sector probes.

Every builder draws all its random numbers whatever `t` is, so that the frames of a video
or the slices of a volume (same parameter seed, different `t`) show the same anatomy.
"""
from __future__ import annotations

import cv2
import numpy as np

from .synth_physics import Geometry, make_geometry, random_probe

F32 = np.float32
FLUID_DB = -45.0  # blood, urine, amniotic fluid: practically no scatterers
FLUID_ALPHA = 0.35  # fluid attenuation as a fraction of the soft-tissue one
BONE_ALPHA = 300.0  # dB/cm: bone / calcification -> acoustic shadow


class Canvas:
    """Tissue-property maps of one scene. t: time (videos) or elevation (volumes) in [0, 1];
    mode: 'still', 'cine' or 'volume'."""

    def __init__(self, geom: Geometry, rng: np.random.Generator, t: float = 0.0, mode: str = "still",
                 base_db: float = 0.0, base_alpha: float = 6.0):
        H, W = geom.H, geom.W
        self.geom, self.rng, self.t, self.mode = geom, rng, float(t), mode
        self.H, self.W, self.px = H, W, geom.px_mm
        self.base_alpha = base_alpha
        self.fluid_alpha = FLUID_ALPHA * base_alpha  # fluid attenuates little: posterior enhancement
        self.db = np.full((H, W), base_db, F32)
        self.alpha = np.full((H, W), base_alpha, F32)
        self.spec = np.zeros((H, W), F32)
        self.density = np.ones((H, W), F32)
        self.labels = np.zeros((H, W), np.uint8)
        # probe coordinates of every pixel
        self.dfrac = ((geom.cart_r + 0.5) / geom.nr).astype(F32)
        self.lfrac = ((geom.cart_b + 0.5) / geom.nb).astype(F32)
        self._lidx = np.clip(self.lfrac * 255 + 0.5, 0, 255).astype(np.intp)  # LUT index for profile()
        self.meta: dict = {}

    # ---- geometry helpers -------------------------------------------------------
    def mm(self, v: float) -> float:
        """mm -> Cartesian pixels."""
        return v / self.px

    def pos(self, dfrac: float, lfrac: float) -> tuple[float, float]:
        """Probe coordinates -> (x, y) pixel position."""
        p = self.geom.probe
        if not p.is_sector:
            return lfrac * self.W, dfrac * self.H
        r = p.radius_mm + dfrac * p.depth_mm
        a = np.deg2rad((lfrac - 0.5) * p.angle_deg)
        cx, cy = self.geom.apex
        return cx + r * np.sin(a) / self.px, cy + r * np.cos(a) / self.px

    def zfac(self, thickness: float = 0.3) -> float:
        """Elevational cross-section factor of a round structure in 'volume' mode
        (radius scale of a sphere cut at elevation t); 1 otherwise."""
        z0 = self.rng.uniform(0.35, 0.65)
        if self.mode != "volume":
            return 1.0
        f = 1.0 - ((self.t - z0) / thickness) ** 2
        return float(np.sqrt(max(f, 0.0)))

    def noise(self, scale_mm: float, std: float = 1.0) -> np.ndarray:
        """Smooth Gaussian random field (H, W), correlation length ~scale_mm."""
        s = max(self.mm(scale_mm), 1.0)
        h, w = int(self.H / s) + 3, int(self.W / s) + 3
        small = self.rng.standard_normal((h, w)).astype(F32)
        return cv2.resize(small, (self.W, self.H), interpolation=cv2.INTER_CUBIC) * F32(std)

    def profile(self, n_knots: int = 5, std: float = 1.0) -> np.ndarray:
        """Smooth random function of the lateral fraction, evaluated on every pixel (H, W)."""
        knots = self.rng.standard_normal(n_knots).astype(F32) * F32(std)
        xs = np.linspace(0, 1, n_knots)
        fine = np.interp(np.linspace(0, 1, 256), xs, knots).astype(F32)
        fine = cv2.GaussianBlur(fine[None], (0, 0), 12)[0]
        return fine[self._lidx]

    # ---- masks ---------------------------------------------------------------------
    def layer(self, d0: float, d1: float, wobble: float = 0.02, edge: float = 0.004):
        """Soft mask (H, W) of the band between two wavy iso-depth curves."""
        b0 = d0 + self.profile(std=wobble)
        b1 = d1 + self.profile(std=wobble)
        m = np.clip((self.dfrac - b0) / edge, 0, 1) * np.clip((b1 - self.dfrac) / edge, 0, 1)
        return m.astype(F32)

    def poly(self, pts: np.ndarray) -> np.ndarray:
        """Antialiased filled polygon mask (H, W) float32 in [0, 1]."""
        m = np.zeros((self.H, self.W), np.uint8)
        cv2.fillPoly(m, [np.round(pts * 8).astype(np.int32)], 255, cv2.LINE_AA, shift=3)
        return m.astype(F32) / 255.0

    def outline(self, pts: np.ndarray, thick_px: float, closed: bool = True) -> np.ndarray:
        m = np.zeros((self.H, self.W), np.uint8)
        cv2.polylines(m, [np.round(pts * 8).astype(np.int32)], closed, 255, max(int(round(thick_px)), 1),
                      cv2.LINE_AA, shift=3)
        return m.astype(F32) / 255.0

    def blob(self, cx, cy, rx, ry, angle=0.0, irregular=0.0, spikes=0.0, n=96, lobes=5, n_spikes=14):
        """Polygon (n, 2) of a closed blob: ellipse with random low-order harmonics
        (lobulation, `irregular` = relative amplitude) and sharp spicules (`spikes` = relative
        length). All random numbers are drawn whatever the arguments are."""
        th = np.linspace(0, 2 * np.pi, n, endpoint=False)
        harm = self.rng.standard_normal((lobes, 2))
        sp_pos = self.rng.uniform(0, 2 * np.pi, n_spikes)
        sp_len = self.rng.uniform(0.3, 1.0, n_spikes)
        r = np.ones(n)
        for k in range(lobes):
            r += irregular / (1 + 0.5 * k) * (harm[k, 0] * np.cos((k + 2) * th) + harm[k, 1] * np.sin((k + 2) * th)) / 2
        if spikes > 0:
            d = np.angle(np.exp(1j * (th[:, None] - sp_pos[None])))
            r += spikes * (sp_len[None] * np.exp(-(d / 0.06) ** 2)).sum(1)
        r = np.maximum(r, 0.3)
        x, y = r * rx * np.cos(th), r * ry * np.sin(th)
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)

    def beam_line(self, lfrac: float, d0: float, d1: float = 1.0) -> np.ndarray:
        """Two points of a line along one beam (radial for sectors) between two depths."""
        return np.array([self.pos(d0, lfrac), self.pos(d1, lfrac)])

    # ---- painting --------------------------------------------------------------------
    def paint(self, m: np.ndarray, db: float, alpha: float | None = None, density: float | None = None,
              hetero_db: float = 0.0, hetero_mm: float = 3.0, label: int = 0):
        """Set tissue properties inside a soft mask, optionally with a smooth texture."""
        val = F32(db) + (self.noise(hetero_mm, hetero_db) if hetero_db > 0 else F32(0))
        self.db += m * (val - self.db)
        if alpha is not None:
            self.alpha += m * (F32(alpha) - self.alpha)
        if density is not None:
            self.density += m * (F32(density) - self.density)
        if label:
            self.labels[m > 0.5] = label

    def reflect(self, m: np.ndarray, spec_db: float, alpha: float | None = None):
        """Add a specular (bright, phase-coherent) reflector; alpha: its attenuation."""
        self.spec = np.maximum(self.spec, m * F32(spec_db))
        if alpha is not None:
            self.alpha += m * (F32(alpha) - self.alpha)

    def soft_tissue(self, db=0.0, hetero_db=3.0, hetero_mm=4.0, density=1.0):
        self.paint(np.ones((self.H, self.W), F32), db, density=density, hetero_db=hetero_db, hetero_mm=hetero_mm)


# ============================================================================ anatomies
# name -> (probe kinds, depth range mm)
ANATOMY_PROBES = {
    "breast": (("linear",), (30, 50)),
    "thyroid": (("linear",), (35, 50)),
    "muscle": (("linear",), (35, 60)),
    "lung": (("linear", "curvilinear"), (50, 120)),
    "gi_wall": (("linear", "endocavity"), (30, 60)),
    "liver": (("curvilinear",), (120, 180)),
    "kidney": (("curvilinear",), (100, 160)),
    "fetal_head": (("curvilinear",), (100, 160)),
    "heart": (("phased",), (120, 170)),
    "ovary": (("endocavity",), (50, 80)),
}
ANATOMIES = tuple(ANATOMY_PROBES)


def _skin_and_fat(cv: Canvas, skin_d=0.03, fat_d=0.15, fat_db=-10.0):
    """Bright skin line then hypoechoic subcutaneous fat with sparse scatterers."""
    r = cv.rng
    skin = cv.layer(0.0, skin_d * r.uniform(0.7, 1.3), 0.003)
    cv.paint(skin, 8.0)
    fat = cv.layer(skin_d, fat_d * r.uniform(0.7, 1.3), 0.02)
    cv.paint(fat, fat_db, density=0.5, hetero_db=3, hetero_mm=4)
    return fat_d


def _bezier(ctrl, n: int = 24) -> np.ndarray:
    """Quadratic Bezier curve through 3 control points -> (n, 2) polyline."""
    p0, p1, p2 = (np.asarray(c, float) for c in ctrl)
    u = np.linspace(0, 1, n)[:, None]
    return (1 - u) ** 2 * p0 + 2 * u * (1 - u) * p1 + u**2 * p2


def _smooth_curve(cv: Canvas, depth: float, wobble: float, n_knots: int = 5) -> np.ndarray:
    """Smooth random curve across the image near a depth fraction -> (64, 2) polyline."""
    knots = depth + cv.rng.normal(0, wobble, n_knots)
    u = np.linspace(-0.1, 1.1, 64)
    d = np.interp(u, np.linspace(-0.1, 1.1, n_knots), knots)
    d = np.convolve(np.pad(d, 6, mode="edge"), np.ones(13) / 13, mode="valid")
    return np.array([cv.pos(dd, uu) for dd, uu in zip(d, u)])


def _fibrillar(cv: Canvas, m: np.ndarray, angle: float, spacing_mm: float, db: float = 6.0):
    """Parallel bright striations (muscle perimysium, tendon) inside a mask."""
    yy, xx = np.mgrid[0:cv.H, 0:cv.W].astype(F32)
    ph = (xx * np.sin(angle) + yy * np.cos(angle)) / cv.mm(spacing_mm) + cv.noise(8, 0.6)
    stripes = (np.cos(2 * np.pi * ph) > 0.85).astype(F32) * np.clip(cv.noise(6, 0.8) + 0.6, 0, 1)
    cv.reflect(m * stripes, db * cv.rng.uniform(0.6, 1.2))


def _bone(cv: Canvas, pts: np.ndarray, thick_mm=1.0, spec_db=22.0):
    cv.reflect(cv.outline(pts, cv.mm(thick_mm), closed=False), spec_db, alpha=BONE_ALPHA)


def scene_breast(cv: Canvas, lesion: bool | None = None):
    r = cv.rng
    cv.soft_tissue(-2, 2)
    f = _skin_and_fat(cv, fat_d=r.uniform(0.12, 0.3))
    gl_end = f + r.uniform(0.25, 0.45)
    gland = cv.layer(f, gl_end, 0.04)
    cv.paint(gland, r.uniform(1, 5), hetero_db=4, hetero_mm=2.5)
    for _ in range(4):  # Cooper's ligaments: bright arcs through the fat
        x0, x1, x2 = r.uniform(0, 1), r.uniform(-0.15, 0.15), r.uniform(-0.2, 0.2)
        pts = _bezier([cv.pos(0.04, x0), cv.pos(f * 0.6, x0 + x1), cv.pos(f, x0 + x2)])
        cv.reflect(cv.outline(pts, 1.2, closed=False), 8)
    musc = cv.layer(gl_end + 0.05, 1.2, 0.04)
    cv.paint(musc, -6, hetero_db=2)
    _fibrillar(cv, musc, r.uniform(1.3, 1.8), 1.2, 5)
    has_rib = r.random() < 0.4
    rx = r.uniform(0.2, 0.8)
    if has_rib and gl_end < 0.7:
        cx, cy = cv.pos(gl_end + 0.2, rx)
        pts = cv.blob(cx, cy, cv.mm(8), cv.mm(4), 0, 0.05)
        top = pts[pts[:, 1] < cy]
        _bone(cv, top[np.argsort(top[:, 0])], 1.0, 18)
    if lesion is None:
        lesion = r.random() < 0.5
    s = r.uniform(0, 1)
    if lesion:
        breast_lesion(cv, s, center=(r.uniform(f + 0.1, 0.65), r.uniform(0.3, 0.7)))
    else:
        breast_lesion(cv, s, center=(0.5, 0.5), draw=False)


def breast_lesion(cv: Canvas, s: float, center=(0.45, 0.5), size_mm: float | None = None,
                  view: float = 0.0, draw: bool = True, label: int = 1):
    """Breast mass with malignancy score s in [0, 1] (BI-RADS descriptors, ACR lexicon):
    low s -> oval, circumscribed, parallel (wider-than-tall), iso/hypo, posterior enhancement
    (cysts: anechoic); high s -> irregular, spiculated / angular, taller-than-wide, markedly
    hypoechoic, echogenic halo, posterior shadowing, microcalcifications.
    view: rotation of the scan plane (radial / anti-radial views of the same lesion)."""
    r = cv.rng
    j = r.normal(0, 0.12, 8)  # per-feature independent jitter around the score
    f = lambda k: float(np.clip(s + j[k], 0, 1))  # noqa: E731
    size = size_mm or r.uniform(8, 22)
    aspect = 1.6 - 1.0 * f(0) + 0.15 * np.cos(2 * view)  # width / height; <1 = taller-than-wide
    rx = size / 2 * np.sqrt(aspect)
    ry = size / 2 / np.sqrt(aspect)
    cyst = f(1) < 0.12 and r.random() < 0.6
    tilt = r.normal(0, 0.15)
    micro = r.uniform(0, 1, (6, 2))
    if not draw:
        return None
    x, y = cv.pos(*center)
    pts = cv.blob(x, y, cv.mm(rx), cv.mm(ry), tilt, irregular=0.05 + 0.55 * f(2), spikes=0.22 * max(f(3) - 0.45, 0))
    m = cv.poly(pts)
    if f(4) > 0.55:  # echogenic halo of infiltrating tumour
        halo = cv.poly(cv.blob(x, y, cv.mm(rx) * 1.25, cv.mm(ry) * 1.25, tilt, 0.3 * f(2), 0.2 * f(3)))
        cv.paint(halo * (1 - m), 4 + 4 * f(4), hetero_db=2)
    echo = FLUID_DB if cyst else -8 - 14 * f(5)
    alpha = cv.fluid_alpha if cyst else cv.base_alpha * (0.5 + 3.5 * f(6) ** 1.5)
    cv.paint(m, echo, alpha=alpha, hetero_db=0 if cyst else 2 + 3 * f(5), label=label)
    if f(7) > 0.6:  # microcalcifications: tiny bright dots
        for u, v in micro:
            px, py = x + (u - 0.5) * cv.mm(rx), y + (v - 0.5) * cv.mm(ry)
            dot = np.zeros((cv.H, cv.W), np.uint8)
            cv2.circle(dot, (int(px), int(py)), 1, 255, -1)
            cv.reflect(dot.astype(F32) / 255 * m, 14)
    cv.meta["lesion_bbox"] = _bbox(m)
    return m


def _bbox(m: np.ndarray):
    ys, xs = np.nonzero(m > 0.5)
    if xs.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def scene_thyroid(cv: Canvas):
    r = cv.rng
    cv.soft_tissue(-3, 2)
    _skin_and_fat(cv, fat_d=0.08)
    strap = cv.layer(0.1, r.uniform(0.2, 0.26), 0.02)
    cv.paint(strap, -9, hetero_db=1.5)
    _fibrillar(cv, strap, 1.55, 1.0, 4)
    tx = r.uniform(0.4, 0.6)  # trachea position; lobes on each side
    for side in (-1, 1):
        zf = cv.zfac(0.5)
        x, y = cv.pos(0.45, tx + side * 0.28)
        lobe = cv.poly(cv.blob(x, y, cv.mm(9) * zf + 1, cv.mm(7) * zf + 1, 0, 0.15))
        cv.paint(lobe, 6, hetero_db=2, hetero_mm=1.5)
        cv.reflect(cv.outline(cv.blob(x, y, cv.mm(9) * zf + 1, cv.mm(7) * zf + 1, 0, 0.15), 1), 5)
        cx, cy = cv.pos(0.55, tx + side * 0.52)  # carotid artery: anechoic circle, bright wall
        zc = cv.zfac(2.0)
        art = cv.blob(cx, cy, cv.mm(3.5) * zc, cv.mm(3.5) * zc, 0, 0.02)
        cv.paint(cv.poly(art), FLUID_DB, alpha=cv.fluid_alpha)
        cv.reflect(cv.outline(art, 1.5), 10)
    x, y = cv.pos(0.3, tx)  # trachea: bright ring top, reverberation and shadow below
    tr = cv.blob(x, y + cv.mm(5), cv.mm(6.5), cv.mm(5.5), 0, 0.02)
    top = tr[tr[:, 1] < y + cv.mm(5)]
    cv.reflect(cv.outline(top[np.argsort(top[:, 0])], cv.mm(1.5), closed=False), 16, alpha=60.0)
    cv.meta["reverb"] = 0.45
    if r.random() < 0.5:  # nodule
        x, y = cv.pos(0.45, tx + r.choice([-1, 1]) * 0.28)
        zn = cv.zfac(0.25)
        nod = cv.poly(cv.blob(x, y, cv.mm(4) * zn + 0.5, cv.mm(3.5) * zn + 0.5, 0, r.uniform(0, 0.4)))
        cv.paint(nod, r.choice([-15, -5, 6]), hetero_db=3, label=1)


def scene_muscle(cv: Canvas):
    r = cv.rng
    cv.soft_tissue(-4, 1.5)
    f = _skin_and_fat(cv, fat_d=r.uniform(0.08, 0.2))
    ang = r.uniform(1.2, 1.9)  # pennation angle of the fibres
    b = f
    for _ in range(r.integers(1, 3)):
        e = b + r.uniform(0.3, 0.45)
        musc = cv.layer(b, e, 0.03)
        cv.paint(musc, -10, hetero_db=2)
        _fibrillar(cv, musc, ang + r.normal(0, 0.15), r.uniform(0.8, 1.6), 7)
        cv.reflect(cv.outline(np.array([cv.pos(e, -0.1), cv.pos(e + r.normal(0, 0.03), 0.5), cv.pos(e, 1.1)]), 2,
                              closed=False), 12)  # fascia
        b = e
    bone_d = min(b + 0.08, 0.9)
    _bone(cv, _smooth_curve(cv, bone_d, 0.03), 1.5, 24)


def scene_lung(cv: Canvas):
    """Chest wall, ribs with shadows, pleural line, A-lines (by reverberation) or B-lines."""
    r = cv.rng
    cv.soft_tissue(-4, 2)
    _skin_and_fat(cv, fat_d=0.06)
    wall = cv.layer(0.08, 0.2, 0.01)
    cv.paint(wall, -8, hetero_db=2)
    _fibrillar(cv, wall, 1.57, 1.5, 5)
    pl = r.uniform(0.2, 0.28)
    gap = r.uniform(0.45, 0.6)
    for lx in (0.5 - gap / 2 - 0.1, 0.5 + gap / 2 + 0.1):  # ribs either side
        cx, cy = cv.pos(pl - 0.02, lx)
        pts = cv.blob(cx, cy, cv.mm(6), cv.mm(4), 0, 0.05)
        top = pts[pts[:, 1] < cy]
        _bone(cv, top[np.argsort(top[:, 0])], 1.2, 20)
    pleura = cv.layer(pl, pl + 0.008, 0.003)
    cv.reflect(pleura, 20)
    lungm = cv.layer(pl + 0.008, 1.5, 0.0)
    # aerated lung: no anatomy beyond the pleura, only artefacts (A-lines come from reverberation)
    cv.paint(lungm, -14, density=0.4, hetero_db=3, hetero_mm=6)
    n_b = int(r.choice([0, 0, 1, 2, 3, 5]))
    pos_b = r.uniform(0.3, 0.7, 6)
    for k in range(n_b):  # B-lines: bright vertical comet tails from the pleura
        ln = cv.outline(cv.beam_line(pos_b[k], pl, 1.0), cv.mm(r.uniform(1.0, 2.0)), closed=False)
        cv.paint(ln * lungm, 6, density=1.0)
    cv.meta["reverb"] = 0.55 if n_b == 0 else 0.3
    cv.meta["n_b_lines"] = n_b


def scene_gi_wall(cv: Canvas, tumour: str | None = None, s: float = 0.5):
    """Layered gut wall (5 layers: interface, mucosa, submucosa, muscularis propria,
    serosa) with fluid in the lumen; optional submucosal tumour."""
    r = cv.rng
    cv.soft_tissue(-4, 3)
    top = r.uniform(0.15, 0.3)
    lumen = cv.layer(-0.5, top, 0.02)
    cv.paint(lumen, FLUID_DB, alpha=cv.fluid_alpha)
    d = top
    for db, th in ((12, 0.012), (-14, 0.03), (8, 0.035), (-12, 0.05), (10, 0.012)):
        th *= r.uniform(0.8, 1.3)
        lay = cv.layer(d, d + th, 0.0)
        cv.paint(lay, db, hetero_db=1.5)
        d += th
    if tumour is not None:
        gi_tumour(cv, tumour, s, center=(d + 0.1, r.uniform(0.35, 0.65)))


def gi_tumour(cv: Canvas, kind: str, s: float, center=(0.5, 0.5), label: int = 1):
    """Submucosal tumour. kind 'leiomyoma': small, oval, homogeneous, hypoechoic, sharp;
    'gist': larger, lobulated, heterogeneous with cystic spaces and echogenic foci, halo.
    s in [0, 1] moves a tumour along the leiomyoma -> GIST feature axis (class overlap)."""
    r = cv.rng
    j = r.normal(0, 0.12, 6)
    f = lambda k: float(np.clip(s + j[k], 0, 1))  # noqa: E731
    size = r.uniform(12, 22) + 16 * f(0)
    x, y = cv.pos(*center)
    zf = cv.zfac(0.35)
    rx, ry = cv.mm(size / 2) * max(zf, 0.05), cv.mm(size / 2) * r.uniform(0.65, 0.95) * max(zf, 0.05)
    pts = cv.blob(x, y, rx, ry, r.normal(0, 0.2), irregular=0.04 + 0.4 * f(1))
    m = cv.poly(pts)
    cv.paint(m, -12 + 4 * f(2), alpha=cv.base_alpha * 1.2, hetero_db=1 + 5 * f(2), hetero_mm=2 + 2 * f(2), label=label)
    cysts = r.uniform(-0.5, 0.5, (4, 3))
    n_cyst = int(round(4 * max(f(3) - 0.4, 0) / 0.6))
    for k in range(n_cyst):
        c = cv.poly(cv.blob(x + cysts[k, 0] * rx, y + cysts[k, 1] * ry, rx * (0.12 + 0.1 * cysts[k, 2]),
                            ry * (0.12 + 0.1 * cysts[k, 2]), 0, 0.2))
        cv.paint(c * m, FLUID_DB, alpha=cv.fluid_alpha)
    foci = r.uniform(-0.5, 0.5, (8, 2))
    for k in range(int(8 * max(f(4) - 0.5, 0))):
        dot = np.zeros((cv.H, cv.W), np.uint8)
        cv2.circle(dot, (int(x + foci[k, 0] * rx), int(y + foci[k, 1] * ry)), 1, 255, -1)
        cv.reflect(dot.astype(F32) / 255 * m, 10)
    if f(5) > 0.6:  # marginal hypoechoic / echogenic halo
        cv.reflect(cv.outline(pts, 1), 2)
    cv.meta["lesion_bbox"] = _bbox(m)
    return m


def scene_liver(cv: Canvas):
    r = cv.rng
    cv.soft_tissue(-3, 1.5)
    _skin_and_fat(cv, fat_d=0.05)
    wall = cv.layer(0.06, 0.12, 0.01)
    cv.paint(wall, -9, hetero_db=2)
    cv.reflect(cv.layer(0.12, 0.125, 0.005), 8)  # liver capsule
    liver = cv.layer(0.125, r.uniform(0.75, 0.9), 0.06)
    cv.paint(liver, r.uniform(-1, 3), hetero_db=1.2, hetero_mm=6)
    dia = r.uniform(0.75, 0.9)
    cv.reflect(cv.layer(dia, dia + 0.012, 0.05), 16)  # diaphragm
    for _ in range(r.integers(3, 7)):  # portal veins (bright walls) / hepatic veins (no walls)
        d, lf = r.uniform(0.25, 0.7), r.uniform(0.15, 0.85)
        x, y = cv.pos(d, lf)
        z = cv.zfac(0.4)
        rad = cv.mm(r.uniform(2, 6)) * max(z, 0.05)
        pts = cv.blob(x, y, rad * r.uniform(1, 2.5), rad, r.uniform(0, np.pi), 0.05)
        cv.paint(cv.poly(pts) * liver, FLUID_DB, alpha=cv.fluid_alpha)
        if r.random() < 0.5:
            cv.reflect(cv.outline(pts, 1.5) * liver, 10)
    if r.random() < 0.5:  # gallbladder: anechoic pear with posterior enhancement
        x, y = cv.pos(r.uniform(0.35, 0.55), r.uniform(0.25, 0.75))
        z = cv.zfac(0.4)
        gb = cv.blob(x, y, cv.mm(r.uniform(15, 25)) * max(z, .05), cv.mm(r.uniform(8, 12)) * max(z, .05), r.uniform(-0.5, 0.5), 0.1)
        cv.paint(cv.poly(gb), FLUID_DB, alpha=cv.fluid_alpha)
        cv.reflect(cv.outline(gb, 1.5), 8)
    if r.random() < 0.3:  # hemangioma: bright round lesion
        x, y = cv.pos(r.uniform(0.3, 0.6), r.uniform(0.3, 0.7))
        cv.paint(cv.poly(cv.blob(x, y, cv.mm(8), cv.mm(7), 0, 0.15)), 8, hetero_db=2, label=1)


def scene_kidney(cv: Canvas):
    r = cv.rng
    cv.soft_tissue(-3, 1.5)
    _skin_and_fat(cv, fat_d=0.05)
    liver = cv.layer(0.1, 0.45, 0.05)
    cv.paint(liver, 1, hetero_db=1.2, hetero_mm=6)
    x, y = cv.pos(r.uniform(0.5, 0.62), r.uniform(0.4, 0.6))
    z = max(cv.zfac(0.5), 0.05)
    ang = r.normal(0, 0.3)
    rx, ry = cv.mm(r.uniform(45, 55)) * z, cv.mm(r.uniform(22, 28)) * z
    kid = cv.blob(x, y, rx, ry, ang, 0.05)
    cv.paint(cv.poly(cv.blob(x, y, rx * 1.15, ry * 1.3, ang, 0.1)), 6, hetero_db=3)  # perirenal fat
    cv.paint(cv.poly(kid), -5, hetero_db=1.5, label=1)  # cortex
    cv.reflect(cv.outline(kid, 1.5), 10)
    pyr = r.uniform(0, 1, (8, 2))
    for k in range(8):  # medullary pyramids: darker triangles around the sinus
        a = 2 * np.pi * (k + pyr[k, 0] * 0.4) / 8
        px_, py_ = np.cos(a), np.sin(a)
        c, s_ = np.cos(ang), np.sin(ang)
        bx, by = px_ * rx * 0.6, py_ * ry * 0.6
        tri = np.array([[x + c * bx - s_ * by, y + s_ * bx + c * by]])
        w = np.array([[-py_ * 0.25, px_ * 0.25]]) * [rx, ry]
        base = np.array([[px_ * rx * 0.35, py_ * ry * 0.35]])
        pts = np.vstack([tri, x + base + w, x + base - w])
        pts[1:, 1] += y - x
        cv.paint(cv.poly(pts), -13, hetero_db=1)
    sinus = cv.blob(x, y, rx * 0.45, ry * 0.3, ang, 0.25)  # echogenic sinus fat
    cv.paint(cv.poly(sinus), 9, hetero_db=3)
    if r.random() < 0.25:  # hydronephrosis
        cv.paint(cv.poly(cv.blob(x, y, rx * 0.3, ry * 0.2, ang, 0.3)), FLUID_DB, alpha=cv.fluid_alpha)
    if r.random() < 0.3:  # stone: bright focus with shadow
        dot = np.zeros((cv.H, cv.W), np.uint8)
        cv2.circle(dot, (int(x), int(y)), max(int(cv.mm(3)), 2), 255, -1)
        cv.reflect(dot.astype(F32) / 255, 22, alpha=BONE_ALPHA)


def scene_fetal_head(cv: Canvas):
    r = cv.rng
    cv.soft_tissue(-5, 2)
    wall = cv.layer(0.0, r.uniform(0.12, 0.2), 0.02)  # maternal abdominal wall / uterus
    cv.paint(wall, -3, hetero_db=3)
    fluid = cv.layer(0.18, 1.2, 0.03)
    cv.paint(fluid, FLUID_DB, alpha=cv.fluid_alpha)
    x, y = cv.pos(r.uniform(0.5, 0.6), r.uniform(0.4, 0.6))
    z = max(cv.zfac(0.6), 0.05)
    ang = r.uniform(-0.6, 0.6)
    rx, ry = cv.mm(r.uniform(38, 48)) * z, cv.mm(r.uniform(30, 38)) * z
    skull = cv.blob(x, y, rx, ry, ang, 0.02)
    brain = cv.poly(skull)
    cv.paint(brain, -8, alpha=cv.base_alpha * 0.8, hetero_db=2, label=1)
    cv.reflect(cv.outline(skull, cv.mm(2.5)), 18, alpha=25.0)  # skull: bright, partly shadowing
    c, s_ = np.cos(ang), np.sin(ang)
    mid = np.array([[x - c * rx * 0.9, y - s_ * rx * 0.9], [x + c * rx * 0.9, y + s_ * rx * 0.9]])
    cv.reflect(cv.outline(mid, 1.2, closed=False) * brain, 10)  # falx / midline echo
    for sgn in (-1, 1):  # thalami, hypoechoic
        tx, ty = x + sgn * s_ * ry * 0.18, y - sgn * c * ry * 0.18
        cv.paint(cv.poly(cv.blob(tx, ty, rx * 0.12, ry * 0.12, ang, 0.1)), -15)
    csp = cv.blob(x - c * rx * 0.35, y - s_ * rx * 0.35, rx * 0.08, ry * 0.06, ang, 0.05)
    cv.paint(cv.poly(csp), FLUID_DB)  # cavum septi pellucidi
    cv.meta["head_axes_px"] = [float(rx), float(ry)]


def scene_heart(cv: Canvas):
    """Apical four-chamber view; in 'cine' mode t drives the cardiac cycle."""
    r = cv.rng
    cv.soft_tissue(-12, 3, 5)  # lung / mediastinum around the heart: dim
    hr_cycles = r.uniform(1.5, 2.5)  # beats within the clip
    ph = 0.5 - 0.5 * np.cos(2 * np.pi * hr_cycles * cv.t) if cv.mode == "cine" else r.uniform(0, 1)
    sys_ = float(ph)  # 0 diastole .. 1 end systole
    xm = r.uniform(0.46, 0.54)
    x, y = cv.pos(0.5, xm)
    heart = cv.blob(x, y, cv.mm(52), cv.mm(62) * 1.05, r.normal(0, 0.1), 0.06)
    cv.paint(cv.poly(heart), 0, hetero_db=3, hetero_mm=3)  # myocardium
    cv.reflect(cv.outline(heart, 1.5), 8)  # pericardium
    k_v = 1 - 0.22 * sys_  # ventricles contract in systole
    k_a = 0.85 + 0.2 * sys_  # atria fill
    for side, w in ((-1, 0.17), (1, 0.15)):
        x, y = cv.pos(0.42, xm + side * w)
        cv.paint(cv.poly(cv.blob(x, y, cv.mm(11) * k_v, cv.mm(28) * k_v, side * 0.15, 0.06)), FLUID_DB, alpha=cv.fluid_alpha)
        x, y = cv.pos(0.78, xm + side * w * 1.1)
        cv.paint(cv.poly(cv.blob(x, y, cv.mm(17) * k_a, cv.mm(16) * k_a, 0, 0.08)), FLUID_DB, alpha=cv.fluid_alpha)
        vx = np.array([cv.pos(0.62, xm + side * 0.03), cv.pos(0.62 + 0.06 * (1 - sys_), xm + side * (0.13 + 0.08 * sys_))])
        cv.reflect(cv.outline(vx, 1.5, closed=False), 12)  # mitral / tricuspid leaflets


def scene_ovary(cv: Canvas):
    """Pelvis seen transvaginally: heterogeneous parametrium, ovary with follicles."""
    r = cv.rng
    _pelvis(cv)
    x, y = cv.pos(r.uniform(0.4, 0.6), r.uniform(0.35, 0.65))
    z = max(cv.zfac(0.5), 0.05)
    rx, ry = cv.mm(r.uniform(14, 20)) * z, cv.mm(r.uniform(9, 13)) * z
    ov = cv.blob(x, y, rx, ry, r.normal(0, 0.3), 0.08)
    cv.paint(cv.poly(ov), 2, hetero_db=2, hetero_mm=1.5, label=1)
    cv.reflect(cv.outline(ov, 1.0), 3)
    _follicles(cv, x, y, rx, ry, int(r.integers(4, 11)))
    if r.random() < 0.5:  # bowel loop with gas: bright + shadow
        bx, by = cv.pos(r.uniform(0.3, 0.7), r.choice([0.15, 0.85]))
        pts = cv.blob(bx, by, cv.mm(10), cv.mm(6), 0, 0.2)
        top = pts[pts[:, 1] < by]
        _bone(cv, top[np.argsort(top[:, 0])], 1.5, 14)


def _pelvis(cv: Canvas):
    """Heterogeneous pelvic background: bowel, fat, vessels; bright streaky fat planes."""
    r = cv.rng
    cv.soft_tissue(-7, 5, 5)
    for _ in range(2):
        d = r.uniform(0.1, 0.9)
        cv.reflect(cv.outline(_smooth_curve(cv, d, 0.12), 1.0, closed=False), r.uniform(0, 3))


def _follicles(cv: Canvas, x, y, rx, ry, n, size=(0.12, 0.22)):
    r = cv.rng
    fp = r.uniform(0, 1, (12, 3))
    for k in range(n):
        a = 2 * np.pi * fp[k, 0]
        rad = 0.55 * np.sqrt(fp[k, 1])
        fx, fy = x + np.cos(a) * rx * rad, y + np.sin(a) * ry * rad
        fr = min(rx, ry) * (size[0] + (size[1] - size[0]) * fp[k, 2])
        cv.paint(cv.poly(cv.blob(fx, fy, fr, fr * 0.9, a, 0.05)), FLUID_DB, alpha=cv.fluid_alpha)


SCENES = {
    "breast": scene_breast, "thyroid": scene_thyroid, "muscle": scene_muscle, "lung": scene_lung,
    "gi_wall": scene_gi_wall, "liver": scene_liver, "kidney": scene_kidney,
    "fetal_head": scene_fetal_head, "heart": scene_heart, "ovary": scene_ovary,
}


def build_scene(anatomy: str, rng: np.random.Generator, H: int, W: int, t: float = 0.0, mode: str = "still",
                probe_kind: str | None = None, sweep: float = 0.0) -> Canvas:
    """Draw one randomised scene of an anatomy. sweep > 0: the scene is drawn wider and a
    window slides over it with t (probe sweep)."""
    kinds, (d0, d1) = ANATOMY_PROBES[anatomy]
    kind = str(rng.choice(kinds)) if probe_kind is None else probe_kind
    r_lo = d0 if kind != "curvilinear" or anatomy != "lung" else 80
    probe = random_probe(rng, kind, float(rng.uniform(r_lo, d1)))
    Wd = int(W * (1 + sweep))
    geom = make_geometry(probe, H, Wd) if sweep else make_geometry(probe, H, W)
    cv = Canvas(geom, rng, t, mode, base_alpha=1.0 * _freq_guess(kind))
    SCENES[anatomy](cv)
    if sweep:
        off = int(round(t * (Wd - W)))
        cv = _crop_canvas(cv, off, W, make_geometry(probe, H, W))
    cv.meta.update(anatomy=anatomy, probe=kind, depth_mm=round(probe.depth_mm, 2))
    return cv


def _freq_guess(kind: str) -> float:
    """Mean frequency of random_physics for the kind (nominal attenuation of the scene)."""
    return {"linear": 10.0, "endocavity": 6.5}.get(kind, 3.75)


def _crop_canvas(cv: Canvas, off: int, W: int, geom: Geometry) -> Canvas:
    out = Canvas.__new__(Canvas)
    out.__dict__.update(cv.__dict__)
    for k in ("db", "alpha", "spec", "density", "labels"):
        setattr(out, k, np.ascontiguousarray(getattr(cv, k)[:, off:off + W]))
    out.geom, out.W = geom, W
    return out


# ====================================================================== evaluation sets
OTU_CLASSES = ("chocolate cyst", "serous cystadenoma", "teratoma", "theca cell tumour", "simple cyst",
               "normal ovary", "mucinous cystadenoma", "high-grade serous cystadenocarcinoma")
# class -> the class it is most easily confused with (difficulty blends towards it)
OTU_CONFUSER = {0: 6, 1: 4, 2: 7, 3: 7, 4: 1, 5: 0, 6: 1, 7: 3}
# prototypes: (lo, hi) ranges; size mm, locules, content dB, content texture dB, wall mm,
# papillae, solid fraction, solid dB, plug (teratoma), follicles, irregularity, shadow, ascites
_OTU_PROTO = {
    0: dict(size=(30, 60), loc=(1, 2), content=(-24, -17), tex=(1, 2), wall=(1.5, 3), pap=(0, 0), solid=(0, 0),
            solid_db=(-5, 0), plug=(0, 0), foll=(0, 0), irr=(0.02, 0.1), shadow=(0, 0), ascites=(0, 0.1)),
    1: dict(size=(40, 90), loc=(1, 3), content=(-45, -38), tex=(0, 0), wall=(0.8, 1.5), pap=(0, 2), solid=(0, 0),
            solid_db=(-2, 2), plug=(0, 0), foll=(0, 0), irr=(0.02, 0.08), shadow=(0, 0), ascites=(0, 0.1)),
    2: dict(size=(30, 70), loc=(1, 1), content=(-32, -20), tex=(2, 5), wall=(1.5, 2.5), pap=(0, 0), solid=(0.15, 0.35),
            solid_db=(8, 14), plug=(1, 1), foll=(0, 0), irr=(0.05, 0.15), shadow=(0.6, 1.0), ascites=(0, 0.1)),
    3: dict(size=(30, 70), loc=(1, 1), content=(-10, -6), tex=(1, 2), wall=(0.5, 1), pap=(0, 0), solid=(1, 1),
            solid_db=(-10, -5), plug=(0, 0), foll=(0, 0), irr=(0.03, 0.1), shadow=(0.5, 1.0), ascites=(0, 0.2)),
    4: dict(size=(20, 50), loc=(1, 1), content=(-45, -42), tex=(0, 0), wall=(0.4, 0.8), pap=(0, 0), solid=(0, 0),
            solid_db=(0, 0), plug=(0, 0), foll=(0, 0), irr=(0.0, 0.04), shadow=(0, 0), ascites=(0, 0.05)),
    5: dict(size=(25, 38), loc=(1, 1), content=(-2, 3), tex=(1.5, 2.5), wall=(0.3, 0.6), pap=(0, 0), solid=(0, 0),
            solid_db=(0, 0), plug=(0, 0), foll=(5, 12), irr=(0.03, 0.1), shadow=(0, 0), ascites=(0, 0.1)),
    6: dict(size=(60, 120), loc=(5, 12), content=(-42, -20), tex=(1, 3), wall=(1, 2), pap=(0, 1), solid=(0, 0.05),
            solid_db=(-3, 3), plug=(0, 0), foll=(0, 0), irr=(0.05, 0.15), shadow=(0, 0), ascites=(0, 0.1)),
    7: dict(size=(50, 100), loc=(2, 6), content=(-40, -25), tex=(2, 4), wall=(2, 4), pap=(3, 8), solid=(0.35, 0.8),
            solid_db=(-7, 0), plug=(0, 0), foll=(0, 0), irr=(0.2, 0.45), shadow=(0, 0.3), ascites=(0.4, 0.9)),
}


def otu_features(rng: np.random.Generator, cls: int, difficulty: float) -> dict:
    """Morphology of one ovarian image: own-class draw blended towards the confusable class
    by w ~ U(0, difficulty) (continuous features lerp, counts switch with probability w)."""
    own = {k: rng.uniform(*v) for k, v in _OTU_PROTO[cls].items()}
    conf = {k: rng.uniform(*v) for k, v in _OTU_PROTO[OTU_CONFUSER[cls]].items()}
    w = rng.uniform(0, difficulty)
    sw = rng.random(len(own))
    out = {}
    for i, k in enumerate(own):
        if k in ("loc", "pap", "foll", "plug"):
            out[k] = int(round(conf[k] if sw[i] < w * 0.7 else own[k]))
        else:
            out[k] = (1 - w) * own[k] + w * conf[k]
    out["w"] = w
    return out


def scene_otu(cv: Canvas, cls: int, difficulty: float, label: int = 1):
    """Transvaginal view of an ovarian lesion of MMOTU class `cls` (see OTU_CLASSES)."""
    r = cv.rng
    _pelvis(cv)
    f = otu_features(r, cls, difficulty)
    x, y = cv.pos(r.uniform(0.42, 0.58), r.uniform(0.4, 0.6))
    rx = cv.mm(f["size"] / 2)
    ry = rx * r.uniform(0.65, 0.95)
    rx, ry = min(rx, cv.W * 0.42), min(ry, cv.H * 0.4)
    ang = r.normal(0, 0.3)
    outer = cv.blob(x, y, rx, ry, ang, irregular=f["irr"])
    m = cv.poly(outer)
    cv.paint(m, f["content"], alpha=cv.fluid_alpha * (1 + (f["content"] + 45) / 20), hetero_db=f["tex"], hetero_mm=1.5, label=label)
    seeds = r.uniform(-0.6, 0.6, (12, 2))
    loc_db = r.uniform(-42, -18, 12)
    if f["loc"] > 1:  # locules: Voronoi cells inside the lesion, septa on their borders
        yy, xx = np.mgrid[0:cv.H, 0:cv.W].astype(F32)
        sx, sy = x + seeds[: f["loc"], 0] * rx, y + seeds[: f["loc"], 1] * ry
        d = (xx[..., None] - sx) ** 2 + (yy[..., None] - sy) ** 2
        lab = np.argmin(d, axis=-1).astype(np.uint8)
        if cls == 6 or f["tex"] > 2.5:  # 'stained glass' locules of different echogenicity
            for k in range(f["loc"]):
                cv.paint(m * (lab == k), loc_db[k] * 0.5 + f["content"] * 0.5, hetero_db=f["tex"])
        edge = (cv2.morphologyEx(lab, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0).astype(F32)
        edge = cv2.dilate(edge, np.ones((max(int(cv.mm(f["wall"] * 0.3)), 1),) * 2, np.uint8))
        cv.reflect(edge * m, 4 + f["wall"])
    cv.reflect(cv.outline(outer, cv.mm(f["wall"]) * 0.5), 3 + 1.5 * f["wall"])
    if f["solid"] > 0.05:  # solid component: eccentric irregular mass
        sr = np.sqrt(f["solid"])
        off = (1 - sr) * 0.7
        sa = r.uniform(0, 2 * np.pi)
        sm = cv.poly(cv.blob(x + off * rx * np.cos(sa), y + off * ry * np.sin(sa), rx * sr, ry * sr, ang, 0.1 + f["irr"]))
        alpha = cv.base_alpha * (1 + 6 * f["shadow"])
        cv.paint(sm * m, f["solid_db"], alpha=alpha, hetero_db=2 + 2 * f["irr"] * 5, hetero_mm=2)
    else:
        r.uniform(0, 2 * np.pi)
    pap = r.uniform(0, 1, (8, 2))
    for k in range(f["pap"]):  # papillary projections from the inner wall
        a = 2 * np.pi * pap[k, 0]
        px_, py_ = x + 0.85 * rx * np.cos(a), y + 0.85 * ry * np.sin(a)
        pr = cv.mm(2 + 4 * pap[k, 1])
        cv.paint(cv.poly(cv.blob(px_, py_, pr, pr * 0.8, a, 0.3)) * m, 2, hetero_db=2)
    if f["plug"]:  # dermoid plug (Rokitansky nodule) with shadow, and dot-dash hair lines
        a = r.uniform(0, 2 * np.pi)
        pxy = (x + 0.5 * rx * np.cos(a), y + 0.5 * ry * np.sin(a))
        cv.reflect(cv.poly(cv.blob(*pxy, rx * 0.3, ry * 0.25, a, 0.2)), 14, alpha=cv.base_alpha * (2 + 8 * f["shadow"]))
        lines = r.uniform(-0.5, 0.5, (6, 3))
        for lx, ly, la in lines:
            p0 = np.array([x + lx * rx, y + ly * ry])
            d = np.array([np.cos(la * 6), np.sin(la * 6)]) * cv.mm(3)
            cv.reflect(cv.outline(np.array([p0 - d, p0 + d]), 1, closed=False) * m, 9)
    else:
        r.uniform(0, 2 * np.pi, 1 + 18)
    if f["foll"]:
        _follicles(cv, x, y, rx, ry, min(f["foll"], 12), size=(0.1, 0.2))
    if r.random() < f["ascites"]:  # free fluid in the pouch of Douglas
        fx, fy = cv.pos(r.uniform(0.75, 0.95), r.uniform(0.2, 0.8))
        cv.paint(cv.poly(cv.blob(fx, fy, cv.mm(25), cv.mm(8), r.normal(0, 0.3), 0.4)) * (1 - m), FLUID_DB, alpha=cv.fluid_alpha)
    cv.meta["lesion_bbox"] = _bbox(m)
    cv.meta["otu_features"] = {k: (round(float(v), 3)) for k, v in f.items()}
    return m
