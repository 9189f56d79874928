"""Burned-in scanner annotations with an exact ground-truth mask.

Every mark is drawn once on a scratch mask, binarised, and painted in its colour on the
overlay and in 255 on the mask (hard edges, like scanner screen fonts), so that
annotated == clean exactly wherever mask == 0. Text uses OpenCV Hershey fonts.
Colours are BGR, as OpenCV writes them.
"""
from __future__ import annotations

import cv2
import numpy as np

WHITE, YELLOW, CYAN, GREEN = (255, 255, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0)
ORANGE, GREY = (0, 170, 255), (170, 170, 170)
TEXT_COLOURS = (WHITE, WHITE, YELLOW, CYAN, GREEN)
MARK_COLOURS = (YELLOW, GREEN, CYAN, YELLOW)
FONT = cv2.FONT_HERSHEY_SIMPLEX
SITES = {
    "breast": ["RT BREAST", "LT BREAST", "RT BR 10:00 3CM FN", "LT BR 2:00 RAD", "R BREAST ARAD"],
    "thyroid": ["THYROID RT LOBE", "LT LOBE TRANS", "THYROID SAG", "ISTHMUS"],
    "muscle": ["R QUAD LONG", "L GASTROC", "MSK", "R BICEPS TRV"],
    "lung": ["LUNG R2", "L ANT", "PLEURA", "LUS ZONE 3"],
    "gi_wall": ["STOMACH", "EUS ANTRUM", "DUODENUM", "GI WALL"],
    "liver": ["LIVER", "RT LOBE", "LIVER/GB", "ABD"],
    "kidney": ["RT KIDNEY LONG", "LT KIDNEY", "KIDNEY TRV", "RENAL"],
    "fetal_head": ["BPD", "HC", "FETAL HEAD", "TV VIEW"],
    "heart": ["A4C", "4CH", "APICAL", "ECHO"],
    "ovary": ["RT OVARY", "LT OVARY", "OV R", "ADNEXA L"],
}
DEVICES = ["SYN-L12 12MHz", "SYN-C5 3.5MHz", "SONO-X L7", "U-SCAN 5C2", "EX-8 TV6", "P4-2 PHASED"]


class Painter:
    """Draws on an overlay and the mask together."""

    def __init__(self, H: int, W: int):
        self.over = np.zeros((H, W, 3), np.uint8)
        self.mask = np.zeros((H, W), np.uint8)
        self.H, self.W = H, W
        self.kinds: list[str] = []

    def _both(self, fn, colour, *a, **k):
        """Draw on a scratch mask and binarise it (some OpenCV builds antialias text even
        with LINE_8), then paint the colour there: overlay and mask agree pixel for pixel."""
        scratch = np.zeros((self.H, self.W), np.uint8)
        fn(scratch, *a, color=255, **k)
        sel = scratch >= 128
        self.over[sel] = colour
        self.mask[sel] = 255

    def text(self, s, org, colour, scale=0.35, thick=1):
        self._both(lambda img, color: cv2.putText(img, s, org, FONT, scale, color, thick, cv2.LINE_8), colour)

    def line(self, p0, p1, colour, thick=1):
        self._both(lambda img, color: cv2.line(img, p0, p1, color, thick, cv2.LINE_8), colour)

    def rect(self, p0, p1, colour, thick=1):
        self._both(lambda img, color: cv2.rectangle(img, p0, p1, color, thick, cv2.LINE_8), colour)

    def arrow(self, p0, p1, colour, thick=1):
        self._both(lambda img, color: cv2.arrowedLine(img, p0, p1, color, thick, cv2.LINE_8, tipLength=0.35), colour)

    def poly(self, pts, colour, thick=1, closed=False):
        p = [np.round(pts).astype(np.int32)]
        self._both(lambda img, color: cv2.polylines(img, p, closed, color, thick, cv2.LINE_8), colour)

    def pixels(self, m: np.ndarray, colours: np.ndarray):
        """Arbitrary per-pixel colours (H, W, 3) where m (bool)."""
        self.over[m] = colours[m]
        self.mask[m] = 255

    def apply(self, clean_bgr: np.ndarray) -> np.ndarray:
        on = self.mask > 0
        out = clean_bgr.copy()
        out[on] = self.over[on]
        return out


def _caliper(p: Painter, a, b, colour, style: str, size: int, dots: int = 4):
    """Two caliper marks (+ or x) joined by a dotted line."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = int(np.hypot(*(b - a)) / dots)
    for k in range(1, n):
        q = a + (b - a) * k / n
        if np.hypot(*(q - a)) > size + 1 and np.hypot(*(q - b)) > size + 1:
            x, y = int(round(q[0])), int(round(q[1]))
            p.line((x, y), (x, y), colour)
    for q in (a, b):
        x, y = int(round(q[0])), int(round(q[1]))
        if style == "+":
            p.line((x - size, y), (x + size, y), colour)
            p.line((x, y - size), (x, y + size), colour)
        else:
            p.line((x - size, y - size), (x + size, y + size), colour)
            p.line((x - size, y + size), (x + size, y - size), colour)


def _doppler(p: Painter, rng, x0, y0, w, h, fan):
    """Colour-flow box: red/blue velocity-coded flow in a vessel-like band, box outline."""
    H, W = p.H, p.W
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ang = rng.uniform(-0.6, 0.6)
    cx, cy = x0 + w / 2 + rng.uniform(-0.2, 0.2) * w, y0 + h / 2 + rng.uniform(-0.2, 0.2) * h
    d = (xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang)  # distance to the vessel axis
    rad = rng.uniform(0.12, 0.3) * h
    v = np.clip(1 - (d / rad) ** 2, 0, 1)  # parabolic flow profile
    inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h) & fan
    flow = inside & (v > 0.05) & (rng.random((H, W)) > 0.08)
    sign = rng.choice([-1, 1])
    col = np.zeros((H, W, 3), np.uint8)
    lvl = (80 + 175 * v).astype(np.uint8)
    col[..., 2 if sign > 0 else 0] = lvl  # red towards the probe, blue away
    col[..., 1] = (np.clip(v - 0.7, 0, 1) * 500).astype(np.uint8)  # aliasing -> yellow/cyan core
    p.pixels(flow, col)
    p.rect((int(x0), int(y0)), (int(x0 + w), int(y0 + h)), GREY if rng.random() < 0.5 else WHITE)
    p.kinds.append("doppler")


def annotate(clean: np.ndarray, rng: np.random.Generator, anatomy: str = "breast", depth_mm: float = 40.0,
             px_mm: float = 0.2, roi: tuple | None = None, fan: np.ndarray | None = None,
             scan_box: tuple | None = None, p_each: float = 0.6):
    """Burn scanner annotations into a clean grey image.

    clean: uint8 (H, W) or (H, W, 3); roi: lesion/structure box (x, y, w, h) in px to
    measure; fan: bool (H, W) imaged area; scan_box: (x0, y0, x1, y1) of the scan on the
    screen; p_each: probability of each optional element.
    Returns (annotated BGR uint8 (H, W, 3), mask uint8 (H, W) 0/255, kinds list).
    """
    bgr = clean if clean.ndim == 3 else cv2.cvtColor(clean, cv2.COLOR_GRAY2BGR)
    H, W = bgr.shape[:2]
    p = Painter(H, W)
    fan = np.ones((H, W), bool) if fan is None else fan
    x0, y0, x1, y1 = scan_box or (0, 0, W, H)
    ys, xs = np.nonzero(fan)
    if roi is None or roi[2] < 4:
        cx, cy = rng.uniform(0.35, 0.65) * W, rng.uniform(0.35, 0.65) * H
        rw, rh = rng.uniform(0.15, 0.3) * W, rng.uniform(0.1, 0.25) * H
        roi = (cx - rw / 2, cy - rh / 2, rw, rh)
    rx, ry, rw, rh = roi
    scale = rng.uniform(0.3, 0.42)
    tcol = TEXT_COLOURS[rng.integers(len(TEXT_COLOURS))]
    draw = rng.random(10) < p_each
    # site label, top-left; device and settings, top-right
    site = SITES.get(anatomy, ["US"])[rng.integers(len(SITES.get(anatomy, ["US"])))]
    p.text(site, (3, 11), tcol, scale)
    p.kinds.append("text")
    if draw[0]:
        dev = DEVICES[rng.integers(len(DEVICES))]
        (tw, _), _ = cv2.getTextSize(dev, FONT, scale * 0.9, 1)
        p.text(dev, (W - tw - 3, 11), WHITE, scale * 0.9)
        p.text(f"D {depth_mm / 10:.1f}cm G{rng.integers(40, 70)}", (W - tw - 3, 23), GREY, scale * 0.85)
    if draw[1]:  # depth scale with 1 cm ticks (5 mm minor) at the right edge of the scan
        xs_ = min(x1 + 2, W - 8)
        step = 10.0 / px_mm
        for k in range(int((y1 - y0) / (step / 2)) + 1):
            yk = int(round(y0 + k * step / 2))
            if yk >= H:
                break
            ln = 5 if k % 2 == 0 else 2
            p.line((xs_, yk), (xs_ + ln, yk), GREY)
        p.kinds.append("depth_scale")
        if rng.random() < 0.7:  # focus marker
            fy = int(y0 + rng.uniform(0.3, 0.6) * (y1 - y0))
            pts = np.array([[xs_ + 7, fy], [xs_ + 11, fy - 3], [xs_ + 11, fy + 3]])
            p.poly(pts, WHITE, closed=True)
    if draw[2]:  # calipers across the structure + measurement text
        ccol = MARK_COLOURS[rng.integers(len(MARK_COLOURS))]
        style = "+" if rng.random() < 0.6 else "x"
        a, b = (rx, ry + rh / 2), (rx + rw, ry + rh / 2 + rng.normal(0, 2))
        _caliper(p, a, b, ccol, style, int(rng.integers(3, 5)))
        d1 = np.hypot(b[0] - a[0], b[1] - a[1]) * px_mm / 10
        lines = [f"D {d1:.2f}cm"]
        if rng.random() < 0.5:
            c, d = (rx + rw / 2, ry), (rx + rw / 2 + rng.normal(0, 2), ry + rh)
            _caliper(p, c, d, ccol, style, int(rng.integers(3, 5)))
            lines = [f"D1 {d1:.2f}cm", f"D2 {np.hypot(d[0] - c[0], d[1] - c[1]) * px_mm / 10:.2f}cm"]
            p.text("2", (int(d[0]) + 5, int(d[1]) + 4), ccol, 0.3)
        p.text("1", (int(b[0]) + 5, int(b[1]) + 4), ccol, 0.3)
        for k, s in enumerate(lines):
            p.text(s, (4, H - 6 - 12 * (len(lines) - 1 - k)), ccol, scale)
        p.kinds.append("calipers")
    if draw[3] and rng.random() < 0.6:  # ROI box
        m = rng.uniform(4, 12)
        p.rect((int(rx - m), int(ry - m)), (int(rx + rw + m), int(ry + rh + m)), MARK_COLOURS[rng.integers(4)])
        p.kinds.append("roi_box")
    if draw[4] and rng.random() < 0.6:  # arrow pointing at the structure
        ang = rng.uniform(0, 2 * np.pi)
        tip = np.array([rx + rw / 2, ry + rh / 2]) + 0.6 * np.array([rw * np.cos(ang), rh * np.sin(ang)])
        tail = tip + rng.uniform(18, 30) * np.array([np.cos(ang), np.sin(ang)])
        tail = np.clip(tail, 2, [W - 3, H - 3])
        p.arrow(tuple(int(v) for v in tail), tuple(int(v) for v in tip), MARK_COLOURS[rng.integers(4)] if rng.random() < 0.7 else WHITE, 1)
        p.kinds.append("arrow")
    if draw[5] and rng.random() < 0.4:  # colour Doppler box
        bw, bh = rng.uniform(0.25, 0.4) * W, rng.uniform(0.2, 0.35) * H
        bx = rng.uniform(xs.min(), max(xs.max() - bw, xs.min() + 1))
        by = rng.uniform(ys.min() + 0.1 * H, max(ys.max() - bh, ys.min() + 0.1 * H + 1))
        _doppler(p, rng, bx, by, bw, bh, fan)
        if rng.random() < 0.7:  # colour bar at the left
            for k in range(40):
                v = 1 - k / 39
                c = (0, 0, int(255 * v)) if k < 20 else (int(255 * (k - 19) / 20), 0, 0)
                p.line((3, 30 + k), (7, 30 + k), c)
    if draw[6] and rng.random() < 0.5:  # thin grey pencil-like trace around the structure
        th = np.linspace(0, 2 * np.pi, 40)
        jit = 1 + rng.normal(0, 0.04, 40)
        pts = np.stack([rx + rw / 2 + jit * rw / 2 * 1.1 * np.cos(th), ry + rh / 2 + jit * rh / 2 * 1.1 * np.sin(th)], 1)
        g = int(rng.integers(140, 215))
        p.poly(pts[: int(rng.integers(20, 41))], (g, g, g))
        p.kinds.append("pencil")
    if draw[7] and rng.random() < 0.5:  # grey-scale bar (grey marks)
        for k in range(48):
            g = int(255 * (1 - k / 47))
            p.line((W - 6, 30 + k), (W - 3, 30 + k), (g, g, g))
        p.kinds.append("grey_bar")
    if draw[8]:  # frame rate / mode text bottom-right
        s = f"{rng.integers(12, 60)}Hz  {['B', 'THI', 'B/CF', 'GEN'][rng.integers(4)]}"
        (tw, _), _ = cv2.getTextSize(s, FONT, scale * 0.85, 1)
        p.text(s, (W - tw - 3, H - 5), GREY, scale * 0.85)
    return p.apply(bgr), p.mask, p.kinds
