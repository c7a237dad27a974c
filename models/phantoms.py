"""Procedurally drawn radiograph phantoms for the demo bundle and the tests.

A phantom is built in three steps:

1. An anatomy builder lays out bones and soft tissue for one region in a canonical frame whose
   long side is 1 unit, centred on the origin, with y pointing down.
2. A pose (scale, rotation, translation and a mirror for laterality) maps that frame onto the
   pixel canvas. Bones are drawn per bone into small crops and summed, so overlapping bones add up
   the way attenuation does on film.
3. Exposure, blur, a side marker and noise turn the attenuation map into a display image.

Every random choice comes from one of several child generators spawned from the caller's
generator in a fixed order. The fracture stream is always consumed, so drawing with
``fractured=False`` and ``fractured=True`` from the same generator state gives two images that
differ only around the fractures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

PARTS: tuple[str, ...] = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
OTHER_REGIONS: tuple[str, ...] = ("CHEST", "KNEE", "PELVIS")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Phantom:
    """One synthetic radiograph and its ground truth.

    Attributes:
        pixels: float32 array (H, W) in [0, 1]; 1 is bright bone.
        region: One of ``PARTS`` or ``OTHER_REGIONS``.
        fractured: Whether fractures were drawn.
        fracture_boxes: ``(x0, y0, x1, y1)`` pixel boxes around each break, exclusive upper
            corner; empty when not fractured.
        laterality: ``"L"`` or ``"R"``; left-sided anatomy is the mirror image of right.
    """

    pixels: np.ndarray
    region: str
    fractured: bool
    fracture_boxes: tuple[Box, ...]
    laterality: str


# --------------------------------------------------------------------------------------------
# Geometry primitives (canonical frame)
# --------------------------------------------------------------------------------------------


@dataclass
class _Bone:
    """A bone as an outer (cortex) and inner (medulla) polygon plus an axis for fractures."""

    outer: np.ndarray
    inner: np.ndarray
    axis: np.ndarray  # (n, 2) centre line samples
    half_width: np.ndarray  # (n,) half width along the axis
    density: float = 1.0
    marrow: float = 0.55  # medulla brightness relative to cortex
    span: tuple[float, float] | None = None  # axis fraction where a fracture may sit


@dataclass
class _Scene:
    """Everything an anatomy builder lays out for one image."""

    bones: list[_Bone] = field(default_factory=list)
    soft: list[tuple[np.ndarray, float]] = field(default_factory=list)  # polygon, density


def _rot(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _unit(angle_deg: float) -> np.ndarray:
    """Unit vector at ``angle_deg`` from straight down (+y), turning towards -x."""
    a = np.deg2rad(angle_deg)
    return np.array([-np.sin(a), np.cos(a)])


def _centre_line(ctrl: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    if len(ctrl) == 2:
        return ctrl[0] + t * (ctrl[1] - ctrl[0])
    # Quadratic Bezier gives gently bowed shafts (radius, clavicle, ribs).
    return (1 - t) ** 2 * ctrl[0] + 2 * (1 - t) * t * ctrl[1] + t**2 * ctrl[2]


def _outline(
    c: np.ndarray, hw: np.ndarray, tangent: np.ndarray, normal: np.ndarray, cap: float
) -> np.ndarray:
    """Closed polygon around centre line ``c`` with elliptical end caps (``cap`` = depth/hw)."""
    a = np.linspace(0.0, np.pi, 9)[1:-1, None]
    left = c + normal * hw[:, None]
    right = c - normal * hw[:, None]
    end = c[-1] + hw[-1] * (np.cos(a) * normal[-1] + cap * np.sin(a) * tangent[-1])
    start = c[0] + hw[0] * (-np.cos(a) * normal[0] - cap * np.sin(a) * tangent[0])
    return np.concatenate([left, end, right[::-1], start])


def _shaft(
    ctrl: list[tuple[float, float]] | np.ndarray,
    profile: list[float] | np.ndarray,
    *,
    density: float = 1.0,
    cortex: float = 0.38,
    marrow: float = 0.55,
    cap: float = 0.8,
    span: tuple[float, float] | None = (0.2, 0.8),
    n: int = 28,
) -> _Bone:
    """A tubular bone along a straight or bowed centre line with a half-width profile."""
    ctrl_arr = np.asarray(ctrl, dtype=float)
    c = _centre_line(ctrl_arr, n)
    t = np.linspace(0.0, 1.0, n)
    hw = np.interp(t, np.linspace(0.0, 1.0, len(profile)), np.asarray(profile, dtype=float))
    tangent = np.gradient(c, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    # Diaphyseal cortex is thick, metaphyseal cortex thin: real shafts look like that and it
    # gives the model a bright-edged tube to read.
    frac = cortex * (0.45 + 0.55 * np.sin(np.pi * t))
    outer = _outline(c, hw, tangent, normal, cap)
    inner = _outline(c, hw * (1 - frac), tangent, normal, cap)
    return _Bone(outer, inner, c, hw, density, marrow, span)


def _blob(
    centre: tuple[float, float],
    rx: float,
    ry: float,
    angle: float = 0.0,
    *,
    density: float = 1.0,
    cortex: float = 0.25,
    marrow: float = 0.6,
    power: float = 2.0,
    span: tuple[float, float] | None = None,
) -> _Bone:
    """An elliptical (``power`` 2) or rounded-block (``power`` > 2) bone; axis along ``rx``."""
    a = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    ca, sa = np.cos(a), np.sin(a)
    unit = np.stack(
        [np.sign(ca) * np.abs(ca) ** (2 / power), np.sign(sa) * np.abs(sa) ** (2 / power)], 1
    )
    r = _rot(angle)
    ctr = np.asarray(centre, dtype=float)
    outer = (unit * [rx, ry]) @ r.T + ctr
    inner = (unit * [rx * (1 - cortex), ry * (1 - cortex)]) @ r.T + ctr
    s = np.linspace(-0.95, 0.95, 15)
    axis = np.stack([s * rx, np.zeros_like(s)], 1) @ r.T + ctr
    hw = ry * np.sqrt(np.clip(1 - s**2, 0.05, 1.0))
    return _Bone(outer, inner, axis, hw, density, marrow, span)


def _plate(poly: list[tuple[float, float]], *, density: float = 0.6, rim: float = 0.12) -> _Bone:
    """A flat bone (scapula, iliac wing): a polygon with a bright rim. Never fractured here."""
    outer = np.asarray(poly, dtype=float)
    ctr = outer.mean(axis=0)
    inner = ctr + (outer - ctr) * (1 - rim)
    return _Bone(outer, inner, outer[:2], np.zeros(2), density, 0.6, None)


def _envelope(
    ctrl: list[tuple[float, float]], profile: list[float], cap: float = 1.0
) -> np.ndarray:
    """A soft-tissue outline around a centre line."""
    return _shaft(ctrl, profile, cap=cap, span=None, n=16).outer


def _ellipse(centre: tuple[float, float], rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    return _blob(centre, rx, ry, angle).outer


# --------------------------------------------------------------------------------------------
# Anatomy builders. Canonical frame: long side 1, y down; portrait regions span x in about
# [-0.37, 0.37], landscape ones (shoulder, pelvis) span x in [-0.5, 0.5].
# --------------------------------------------------------------------------------------------


def _forearm(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.15)
    gap = rng.uniform(0.1, 0.14)
    bow = rng.uniform(0.0, 0.03)
    s.soft.append((_envelope([(0, -0.65), (0, 0.65)], [0.22 * w, 0.19 * w, 0.15 * w]), 0.35))
    s.bones.append(
        _shaft(
            [(-gap / 2 + 0.02, -0.46), (-gap / 2 - bow, 0.0), (-gap / 2, 0.44)],
            np.array([0.03, 0.022, 0.024, 0.03, 0.055]) * w,
            span=(0.12, 0.88),
        )
    )
    s.bones.append(
        _shaft(
            [(gap / 2, -0.48), (gap / 2 + bow / 2, 0.0), (gap / 2 - 0.01, 0.42)],
            np.array([0.05, 0.032, 0.026, 0.021, 0.024]) * w,
            span=(0.12, 0.88),
        )
    )
    return s


def _humerus(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.15)
    tilt = rng.uniform(-0.03, 0.03)
    s.soft.append((_envelope([(0, -0.6), (0, 0.6)], [0.26 * w, 0.22 * w, 0.18 * w]), 0.4))
    s.bones.append(
        _shaft(
            [(0.02, -0.33), (0.01 + tilt, 0.0), (0.0, 0.36)],
            np.array([0.065, 0.046, 0.04, 0.044, 0.075]) * w,
            span=(0.12, 0.88),
            cap=0.5,
        )
    )
    s.bones.append(_blob((0.045, -0.38), 0.09 * w, 0.085 * w, density=1.0, cortex=0.18))
    s.bones.append(_blob((0.0, 0.41), 0.11 * w, 0.045 * w, 0.0, power=2.6, cortex=0.22))
    return s


def _elbow(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.12)
    j = np.array([rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.02)])
    up_angle = 180 + rng.uniform(-15, 15)
    up = _unit(up_angle)
    flex = rng.choice([-1.0, 1.0]) * rng.uniform(20, 80)
    down = _unit(up_angle + 180 + flex)
    perp_up = np.array([-up[1], up[0]])
    perp_dn = np.array([-down[1], down[0]])

    def pt(v: np.ndarray) -> tuple[float, float]:
        return float(v[0]), float(v[1])

    s.soft.append((_envelope([pt(j + up * 0.7), pt(j)], [0.24 * w, 0.24 * w], 0.3), 0.3))
    s.soft.append((_envelope([pt(j), pt(j + down * 0.7)], [0.22 * w, 0.19 * w], 0.3), 0.3))
    s.soft.append((_ellipse(pt(j), 0.2 * w, 0.2 * w), 0.1))
    s.bones.append(
        _shaft(
            [pt(j + up * 0.65), pt(j + up * 0.06)],
            np.array([0.05, 0.052, 0.1]) * w,
            span=(0.55, 0.9),
            cap=0.5,
        )
    )
    s.bones.append(
        _blob(
            pt(j), 0.11 * w, 0.065 * w, np.degrees(np.arctan2(perp_up[1], perp_up[0])), cortex=0.2
        )
    )
    # Radius and ulna side by side below the joint; the ulna carries the olecranon.
    s.bones.append(
        _shaft(
            [pt(j + down * 0.1 + perp_dn * 0.05), pt(j + down * 0.7 + perp_dn * 0.05)],
            np.array([0.042, 0.03, 0.028, 0.03]) * w,
            span=(0.08, 0.6),
        )
    )
    s.bones.append(
        _shaft(
            [pt(j + down * 0.04 - perp_dn * 0.045), pt(j + down * 0.7 - perp_dn * 0.045)],
            np.array([0.06, 0.036, 0.03, 0.028]) * w,
            span=(0.1, 0.6),
        )
    )
    return s


def _wrist(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.12)
    dy = rng.uniform(-0.05, 0.05)
    s.soft.append((_envelope([(0, -0.65), (0, 0.65)], [0.21 * w, 0.23 * w, 0.26 * w]), 0.38))
    s.bones.append(
        _shaft(
            [(-0.06 * w, -0.65), (-0.07 * w, -0.09 + dy)],
            np.array([0.045, 0.05, 0.1]) * w,
            span=(0.55, 0.95),
            cap=0.35,
        )
    )
    s.bones.append(
        _shaft(
            [(0.11 * w, -0.65), (0.1 * w, -0.1 + dy)],
            np.array([0.03, 0.032, 0.042]) * w,
            span=(0.55, 0.95),
        )
    )
    # Two carpal rows of rounded blocks.
    proximal = [
        (-0.12, 0.0, 0.05, 0.03, -30, (0.25, 0.75)),
        (-0.03, -0.01, 0.038, 0.034, 0, None),
        (0.055, 0.0, 0.035, 0.03, 10, None),
        (0.11, 0.02, 0.022, 0.022, 0, None),
    ]
    distal = [
        (-0.13, 0.1, 0.032, 0.03, 20, None),
        (-0.075, 0.11, 0.026, 0.03, 0, None),
        (-0.01, 0.1, 0.038, 0.048, 0, None),
        (0.07, 0.1, 0.038, 0.04, 0, None),
    ]
    for x, y, rx, ry, ang, span in proximal + distal:
        s.bones.append(
            _blob(
                (x * w, (y + dy) * w),
                rx * w,
                ry * w,
                ang + rng.uniform(-8, 8),
                power=2.6,
                cortex=0.28,
                span=span,
            )
        )
    for i, x in enumerate([-0.075, -0.02, 0.035, 0.085]):
        a = 8 - 5 * i + rng.uniform(-3, 3)
        base = np.array([x * w, (0.18 + dy) * w])
        tip = base + _unit(a) * 0.6
        s.bones.append(
            _shaft(
                [tuple(base), tuple(tip)],
                np.array([0.03, 0.022, 0.022]) * w,
                span=(0.05, 0.45),
                cap=0.5,
            )
        )
    thumb = np.array([-0.15 * w, (0.14 + dy) * w])
    s.bones.append(
        _shaft(
            [tuple(thumb), tuple(thumb + _unit(40 + rng.uniform(-8, 8)) * 0.4)],
            np.array([0.032, 0.024, 0.026]) * w,
            span=(0.05, 0.45),
            cap=0.5,
        )
    )
    return s


def _digit(
    s: _Scene,
    base: np.ndarray,
    angle: float,
    lengths: list[float],
    widths: list[float],
    rng: np.random.Generator,
    spans: list[tuple[float, float] | None],
    joint_gap: float,
    tissue: float,
) -> None:
    """Lay out a chain of phalanges from ``base`` along ``angle`` with small joint bends."""
    p = base.copy()
    chain = [tuple(p)]
    for length, width, span in zip(lengths, widths, spans, strict=True):
        d = _unit(angle)
        q = p + d * length
        s.bones.append(
            _shaft(
                [tuple(p), tuple(q)], [width * 1.25, width * 0.9, width * 1.15], span=span, cap=0.55
            )
        )
        p = q + d * joint_gap
        chain.append(tuple(p))
        angle += rng.uniform(-6, 6)
    s.soft.append((_envelope([chain[0], chain[-1]], [tissue, tissue * 0.85], cap=1.0), 0.3))


def _hand(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.92, 1.08)
    spread = rng.uniform(0.7, 1.3)
    s.soft.append((_envelope([(0.0, 0.7), (0.0, 0.05)], [0.14 * w, 0.18 * w, 0.17 * w]), 0.35))
    s.bones.append(
        _shaft([(-0.06, 0.75), (-0.055, 0.42)], np.array([0.045, 0.065]) * w, span=None, cap=0.35)
    )
    s.bones.append(_shaft([(0.07, 0.75), (0.065, 0.43)], np.array([0.03, 0.032]) * w, span=None))
    for x, y, r in [
        (-0.06, 0.37, 0.03),
        (-0.005, 0.37, 0.027),
        (0.05, 0.37, 0.025),
        (-0.075, 0.31, 0.025),
        (-0.03, 0.3, 0.023),
        (0.015, 0.3, 0.03),
        (0.065, 0.31, 0.027),
    ]:
        s.bones.append(
            _blob(
                (x * w, y),
                r * w,
                r * w * rng.uniform(0.85, 1.15),
                rng.uniform(0, 90),
                power=2.5,
                cortex=0.3,
            )
        )
    # Index to little finger: metacarpal then three phalanges, fanning out.
    meta_len = [0.2, 0.19, 0.175, 0.16]
    prox_len = [0.12, 0.13, 0.12, 0.1]
    for i in range(4):
        angle = 180 + (-10 + 7 * i) * spread + rng.uniform(-2, 2)
        base = np.array([(-0.045 + 0.035 * i) * w, 0.26])
        _digit(
            s,
            base,
            angle,
            [meta_len[i] * w, prox_len[i] * w, 0.075 * w, 0.05 * w],
            [0.021 * w, 0.019 * w, 0.016 * w, 0.013 * w],
            rng,
            [(0.25, 0.85), (0.2, 0.8), None, None],
            0.014,
            0.034 * w,
        )
    thumb_angle = 180 - 40 * spread + rng.uniform(-5, 5)
    _digit(
        s,
        np.array([-0.085 * w, 0.28]),
        thumb_angle,
        [0.13 * w, 0.09 * w, 0.06 * w],
        [0.02 * w, 0.017 * w, 0.014 * w],
        rng,
        [(0.2, 0.8), (0.2, 0.8), None],
        0.014,
        0.035 * w,
    )
    return _zoom(s, 1.3, (0.0, 0.12))


def _zoom(scene: _Scene, factor: float, about: tuple[float, float]) -> _Scene:
    """Scale a whole scene about a point (lets a builder fill the frame)."""
    c = np.asarray(about, dtype=float)
    for b in scene.bones:
        b.outer = c + (b.outer - c) * factor
        b.inner = c + (b.inner - c) * factor
        b.axis = c + (b.axis - c) * factor
        b.half_width = b.half_width * factor
    scene.soft = [(c + (p - c) * factor, d) for p, d in scene.soft]
    return scene


def _finger(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.85, 1.1)
    base = np.array([rng.uniform(-0.03, 0.03), 0.75])
    angle = 180 + rng.uniform(-6, 6)
    _digit(
        s,
        base,
        angle,
        [0.4 * w, 0.3 * w, 0.2 * w, 0.13 * w],
        [0.06 * w, 0.058 * w, 0.05 * w, 0.042 * w],
        rng,
        [(0.45, 0.9), (0.15, 0.85), (0.15, 0.85), (0.2, 0.7)],
        0.03 * w,
        0.12 * w,
    )
    return s


def _shoulder(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.1)
    h = np.array([0.1 + rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)])
    s.soft.append((_ellipse((0.0, 0.05), 0.65, 0.45), 0.35))
    s.soft.append((_envelope([tuple(h), (h[0] + 0.05, 0.7)], [0.18, 0.17]), 0.2))
    for k in range(3):  # faint ribs behind the scapula
        y = -0.05 + 0.14 * k
        s.bones.append(
            _shaft(
                [(-0.55, y), (-0.35, y - 0.06), (-0.12, y + 0.08)],
                [0.014, 0.014],
                density=0.45,
                cortex=0.5,
                span=None,
                n=16,
            )
        )
    s.bones.append(
        _plate([(h[0] - 0.15, -0.1), (-0.5, -0.14), (-0.4, 0.45), (h[0] - 0.16, 0.12)], density=0.5)
    )
    s.bones.append(_blob((h[0] - 0.135, h[1] + 0.01), 0.03 * w, 0.085 * w, 0.0, cortex=0.35))
    s.bones.append(_blob(tuple(h), 0.11 * w, 0.105 * w, cortex=0.15, marrow=0.6))
    s.bones.append(_blob((h[0] + 0.085 * w, h[1] - 0.01), 0.045 * w, 0.05 * w, cortex=0.2))
    s.bones.append(
        _shaft(
            [(h[0] + 0.01, h[1] + 0.06), (h[0] + 0.03, 0.45), (h[0] + 0.05, 0.8)],
            np.array([0.085, 0.06, 0.055, 0.055]) * w,
            span=(0.05, 0.5),
            cap=0.4,
        )
    )
    s.bones.append(
        _shaft(
            [(h[0] - 0.45, -0.22), (h[0] - 0.15, -0.21), (h[0] + 0.05, -0.15)],
            np.array([0.02, 0.026, 0.04]) * w,
            density=0.8,
            span=None,
        )
    )
    s.bones.append(
        _shaft(
            [(-0.6, -0.38), (h[0] - 0.3, -0.33), (h[0] + 0.02, -0.22)],
            np.array([0.035, 0.028, 0.032]) * w,
            span=(0.35, 0.85),
        )
    )
    return s


def _chest(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.05)
    s.soft.append((_envelope([(0, -0.65), (0, 0.65)], [0.4 * w, 0.46 * w, 0.46 * w], 0.3), 0.55))
    for side in (-1, 1):
        s.soft.append((_ellipse((side * 0.2 * w, -0.02), 0.16 * w, 0.34), -0.4))
        for k in range(10):
            y = -0.4 + 0.085 * k
            s.bones.append(
                _shaft(
                    [
                        (side * 0.03, y - 0.02),
                        (side * 0.33 * w, y - 0.06),
                        (side * 0.4 * w, y + 0.12),
                    ],
                    [0.011, 0.013, 0.012],
                    density=0.6,
                    cortex=0.55,
                    span=None,
                    n=18,
                )
            )
        s.bones.append(
            _shaft(
                [(side * 0.05, -0.4), (side * 0.2, -0.43), (side * 0.35 * w, -0.46)],
                [0.02, 0.016, 0.018],
                density=0.9,
                span=None,
            )
        )
    s.soft.append((_ellipse((0.06, 0.2), 0.17 * w, 0.14, rng.uniform(-10, 10)), 0.25))
    for k in range(11):
        s.bones.append(
            _blob((0.0, -0.48 + 0.095 * k), 0.04, 0.036, power=3.0, density=0.8, cortex=0.3)
        )
    return s


def _knee(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.1)
    jy = rng.uniform(-0.05, 0.05)
    s.soft.append((_envelope([(0, -0.65), (0, 0.65)], [0.3 * w, 0.33 * w, 0.27 * w]), 0.45))
    s.bones.append(
        _shaft(
            [(0.0, -0.65), (0.0, jy - 0.1)], np.array([0.075, 0.08, 0.15]) * w, span=None, cap=0.4
        )
    )
    for side in (-1, 1):
        s.bones.append(_blob((side * 0.07 * w, jy - 0.07), 0.075 * w, 0.06 * w, cortex=0.2))
    s.bones.append(
        _shaft(
            [(0.0, jy + 0.03), (0.01, 0.7)], np.array([0.15, 0.09, 0.065]) * w, span=None, cap=0.25
        )
    )
    s.bones.append(
        _shaft([(0.14 * w, jy + 0.08), (0.12 * w, 0.7)], np.array([0.03, 0.018]) * w, span=None)
    )
    s.bones.append(
        _blob((rng.uniform(-0.02, 0.02), jy - 0.16), 0.06 * w, 0.08 * w, density=0.75, cortex=0.25)
    )
    return s


def _pelvis(rng: np.random.Generator) -> _Scene:
    s = _Scene()
    w = rng.uniform(0.9, 1.05)
    s.soft.append((_ellipse((0.0, 0.05), 0.62, 0.5), 0.5))
    s.bones.append(_blob((0.0, -0.33), 0.06, 0.035, power=3.0, density=0.8))
    s.bones.append(
        _plate(
            [(-0.09, -0.27), (0.09, -0.27), (0.05, 0.02), (0.0, 0.08), (-0.05, 0.02)], density=0.6
        )
    )
    for side in (-1, 1):
        s.bones.append(
            _plate(
                [
                    (side * 0.09, -0.25),
                    (side * 0.38 * w, -0.34),
                    (side * 0.46 * w, -0.15),
                    (side * 0.26 * w, 0.05),
                    (side * 0.1, 0.0),
                ],
                density=0.55,
            )
        )
        head = (side * 0.23 * w, 0.09)
        s.bones.append(_blob(head, 0.06 * w, 0.06 * w, cortex=0.18))
        s.bones.append(_blob((side * 0.13 * w, 0.22), 0.085 * w, 0.06 * w, cortex=0.35, marrow=0.0))
        s.bones.append(
            _shaft(
                [head, (side * 0.34 * w, 0.17), (side * 0.33 * w, 0.6)],
                np.array([0.04, 0.045, 0.06, 0.05]) * w,
                span=None,
            )
        )
    return s


# Builder, landscape canvas, and the range of short/long side ratios.
_REGIONS: dict[str, tuple[Callable[[np.random.Generator], _Scene], bool, tuple[float, float]]] = {
    "ELBOW": (_elbow, False, (0.75, 1.0)),
    "FINGER": (_finger, False, (0.6, 0.8)),
    "FOREARM": (_forearm, False, (0.62, 0.82)),
    "HAND": (_hand, False, (0.75, 0.95)),
    "HUMERUS": (_humerus, False, (0.62, 0.82)),
    "SHOULDER": (_shoulder, True, (0.8, 1.0)),
    "WRIST": (_wrist, False, (0.75, 1.0)),
    "CHEST": (_chest, False, (0.85, 1.0)),
    "KNEE": (_knee, False, (0.7, 0.9)),
    "PELVIS": (_pelvis, True, (0.7, 0.85)),
}


# --------------------------------------------------------------------------------------------
# Fractures
# --------------------------------------------------------------------------------------------


@dataclass
class _Fracture:
    """A break in canonical coordinates; ``moved`` maps points of the displaced fragment."""

    bone: int
    gap: np.ndarray  # polygon of the dark fracture line
    far_side: np.ndarray  # polygon covering the fragment that moves
    move: np.ndarray  # 2x3 affine for the displaced fragment (identity when undisplaced)
    depth: float  # how much bone the gap removes, 0..1
    centre: np.ndarray
    swelling: np.ndarray  # soft-tissue polygon around the break
    swelling_density: float


def _plan_fracture(bone_index: int, bone: _Bone, rng: np.random.Generator) -> _Fracture:
    """Pick a site on the bone's axis and draw a jagged, possibly displaced break there."""
    assert bone.span is not None
    n = len(bone.axis)
    pos = rng.uniform(*bone.span) * (n - 1)
    i = min(int(pos), n - 2)
    f = pos - i
    centre = bone.axis[i] * (1 - f) + bone.axis[i + 1] * f
    hw = float(bone.half_width[i] * (1 - f) + bone.half_width[i + 1] * f)
    tangent = bone.axis[i + 1] - bone.axis[i]
    tangent /= np.linalg.norm(tangent)
    normal = np.array([-tangent[1], tangent[0]])
    # Transverse to oblique breaks; the line overshoots the cortex so it cuts it cleanly.
    phi = np.deg2rad(rng.uniform(-35, 35))
    across = normal * np.cos(phi) + tangent * np.sin(phi)
    half_len = hw * 1.2 / np.cos(phi)
    width = rng.uniform(0.03, 0.045)
    k = 9
    along = np.linspace(-half_len, half_len, k)
    jag = rng.uniform(-0.6, 0.6, k) * width
    jag[[0, -1]] = 0.0
    line = centre + along[:, None] * across + jag[:, None] * tangent
    gap = np.concatenate([line + tangent * width / 2, (line - tangent * width / 2)[::-1]])
    # The shorter fragment is the one that moves.
    toward = tangent if pos / (n - 1) > 0.5 else -tangent
    far = 3.0
    far_side = np.concatenate(
        [
            [line[0] - across * far],
            line,
            [
                line[-1] + across * far,
                line[-1] + across * far + toward * far,
                line[0] - across * far + toward * far,
            ],
        ]
    )
    move = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    if rng.random() < 0.95:
        # Thin bones (phalanges, metacarpals) get a floor on the shift so the step in the
        # cortex stays visible at the few-pixel widths a low-resolution model sees.
        shift = normal * rng.choice([-1, 1]) * max(rng.uniform(0.6, 1.1) * hw, 0.02)
        shift = shift + toward * rng.uniform(-0.2, 0.3) * hw
        r = _rot(rng.uniform(-14, 14))
        move[:, :2] = r
        move[:, 2] = centre - r @ centre + shift
    depth = rng.uniform(0.9, 1.0)
    # Soft-tissue swelling over the break: a real indirect sign, and one that survives
    # downsampling better than the line itself.
    radius = min(rng.uniform(2.5, 3.5) * hw, 0.15)
    swelling = _ellipse(tuple(centre), radius, radius * rng.uniform(0.6, 1.0), rng.uniform(0, 180))
    return _Fracture(
        bone_index, gap, far_side, move, depth, centre, swelling, rng.uniform(0.15, 0.25)
    )


def _apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ affine[:, :2].T + affine[:, 2]


# --------------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------------


def _fill(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon (pixel coordinates relative to a crop) as a 0/1 float mask."""
    img = Image.new("F", (shape[1], shape[0]), 0.0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in poly.tolist()], fill=1.0)
    return np.asarray(img, dtype=np.float32)


def _bone_layer(
    outer: np.ndarray, inner: np.ndarray, marrow: float, shape: tuple[int, int]
) -> np.ndarray:
    return _fill(outer, shape) - (1.0 - marrow) * _fill(inner, shape)


def _draw_bone(
    acc: np.ndarray,
    bone: _Bone,
    to_px: np.ndarray,
    fractures: list[_Fracture],
) -> None:
    """Add one bone (with any fractures of it) to the attenuation map ``acc`` in place."""
    outer = _apply(to_px, bone.outer)
    inner = _apply(to_px, bone.inner)
    moved = [_apply(to_px, _apply(f.move, bone.outer)) for f in fractures]
    pts = np.concatenate([outer, *moved])
    h, w = acc.shape
    x0 = max(int(np.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 2, w)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return
    off = np.array([x0, y0], dtype=float)
    shape = (y1 - y0, x1 - x0)
    layer = _bone_layer(outer - off, inner - off, bone.marrow, shape)
    for f in fractures:
        far = _apply(to_px, f.far_side) - off
        gap = _fill(_apply(to_px, f.gap) - off, shape)
        if not np.allclose(f.move, [[1, 0, 0], [0, 1, 0]]):
            m_outer = _apply(to_px, _apply(f.move, bone.outer)) - off
            m_inner = _apply(to_px, _apply(f.move, bone.inner)) - off
            m_far = _apply(to_px, _apply(f.move, f.far_side)) - off
            fragment = _bone_layer(m_outer, m_inner, bone.marrow, shape) * _fill(m_far, shape)
            layer = layer * (1.0 - _fill(far, shape)) + fragment
            m_gap = _fill(_apply(to_px, _apply(f.move, f.gap)) - off, shape)
            gap = np.maximum(gap, m_gap)
        layer = layer * (1.0 - f.depth * gap)
    acc[y0:y1, x0:x1] += layer * bone.density


def _fracture_box(f: _Fracture, to_px: np.ndarray, shape: tuple[int, int]) -> Box:
    pts = np.concatenate([_apply(to_px, f.gap), _apply(to_px, _apply(f.move, f.gap))])
    h, w = shape
    x0 = int(np.clip(np.floor(pts[:, 0].min()) - 1, 0, w - 1))
    y0 = int(np.clip(np.floor(pts[:, 1].min()) - 1, 0, h - 1))
    x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 1, x0 + 1, w))
    y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 1, y0 + 1, h))
    return x0, y0, x1, y1


def _soft_tissue(scene: _Scene, to_px: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Soft tissue drawn at quarter resolution and upsampled, which gives it blurred edges."""
    h, w = shape
    sh, sw = max(h // 4, 1), max(w // 4, 1)
    low = np.zeros((sh, sw), dtype=np.float32)
    quarter = np.array([[sw / w, 0, 0], [0, sh / h, 0]]) @ np.vstack([to_px, [0, 0, 1]])
    for poly, density in scene.soft:
        low += density * _fill(_apply(quarter, poly), (sh, sw))
    low = _box_blur(low, 1)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] (trabecular texture, uneven exposure)."""
    h, w = shape
    low = rng.standard_normal((cells, max(int(cells * w / h), 2))).astype(np.float32)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding; two passes approximate the detector's blur.

    Shifted sums rather than a running cumsum keep every output pixel a function of its own
    neighbourhood only, so a local change (a fracture) leaves distant pixels bit-identical.
    """
    if radius <= 0:
        return img
    k = 2 * radius + 1
    out = img.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for d in range(k):
            acc += np.take(padded, np.arange(d, d + n), axis=axis)
        out = (acc / k).astype(out.dtype, copy=False)
    return out


def _marker(img: np.ndarray, letter: str, rng: np.random.Generator) -> None:
    """Burn a lead side marker (bright block with a dark letter) into a random corner."""
    h, w = img.shape
    side = max(int(min(h, w) * rng.uniform(0.05, 0.075)), 6)
    inset = int(min(h, w) * rng.uniform(0.02, 0.06))
    corner = int(rng.integers(4))
    x0 = inset if corner in (0, 2) else w - inset - side
    y0 = inset if corner in (0, 1) else h - inset - side
    block = Image.new("F", (side, side), float(rng.uniform(0.85, 1.0)))
    draw = ImageDraw.Draw(block)
    u = side / 10.0
    ink = float(rng.uniform(0.15, 0.35))
    draw.rectangle([2.5 * u, 2 * u, 4 * u, 8 * u], fill=ink)
    if letter == "L":
        draw.rectangle([2.5 * u, 6.5 * u, 7.5 * u, 8 * u], fill=ink)
    else:
        draw.rectangle([2.5 * u, 2 * u, 7 * u, 3.2 * u], fill=ink)
        draw.rectangle([6 * u, 2 * u, 7.3 * u, 5.2 * u], fill=ink)
        draw.rectangle([2.5 * u, 4.3 * u, 7 * u, 5.5 * u], fill=ink)
        draw.polygon([(4.5 * u, 5 * u), (6 * u, 5 * u), (8 * u, 8 * u), (6.5 * u, 8 * u)], fill=ink)
    img[y0 : y0 + side, x0 : x0 + side] = np.asarray(block)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def draw_phantom(
    region: str, *, fractured: bool, rng: np.random.Generator, size: int = 512
) -> Phantom:
    """Draw one synthetic radiograph of ``region``.

    Args:
        region: One of ``PARTS`` (the seven MURA parts) or ``OTHER_REGIONS``.
        fractured: Draw one or two breaks. Only the seven parts can be fractured.
        rng: Source of all randomness; the same state gives an identical phantom, and the same
            state with ``fractured`` flipped gives the same image apart from the breaks.
        size: Length of the long side in pixels; the short side varies per region.

    Returns:
        The phantom with its pixels and ground truth.

    Raises:
        ValueError: Unknown region, a fracture asked for outside the seven parts, or a size
            under 32 pixels.
    """
    if region not in _REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {PARTS + OTHER_REGIONS}")
    if fractured and region not in PARTS:
        raise ValueError(f"fractures are only drawn for {PARTS}, not {region!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")

    anatomy_rng, pose_rng, fracture_rng, film_rng = (
        np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=4)
    )
    builder, landscape, ratio = _REGIONS[region]
    scene = builder(anatomy_rng)

    short = int(round(size * pose_rng.uniform(*ratio)))
    h, w = (short, size) if landscape else (size, short)
    laterality = "L" if pose_rng.random() < 0.5 else "R"
    mirror = np.diag([-1.0 if laterality == "L" else 1.0, 1.0])
    scale = size * pose_rng.uniform(0.88, 1.05)
    turn = _rot(pose_rng.uniform(-20, 20))
    shift = np.array([w / 2, h / 2]) + pose_rng.uniform(-0.05, 0.05, 2) * [w, h]
    to_px = np.hstack([scale * turn @ mirror, shift[:, None]])

    # Always consume the fracture stream so both arms of a fractured/intact pair stay aligned.
    candidates = [i for i, b in enumerate(scene.bones) if b.span is not None]
    n_breaks = 1 + int(fracture_rng.random() < 0.25)
    # Favour thick bones: their breaks are the ones a low-resolution model can learn.
    weights = np.array([scene.bones[i].half_width.mean() ** 2 for i in candidates], dtype=float)
    order: list[int] = (
        [
            int(i)
            for i in fracture_rng.choice(
                candidates, size=len(candidates), replace=False, p=weights / weights.sum()
            )
        ]
        if candidates
        else []
    )
    breaks: list[_Fracture] = []
    fallback: tuple[float, _Fracture] | None = None
    frame = np.array([w, h], dtype=float)
    for i in order:
        if len(breaks) == n_breaks:
            break
        for _ in range(6):  # a site that the frame crops away would be an invisible label
            f = _plan_fracture(int(i), scene.bones[int(i)], fracture_rng)
            c = _apply(to_px, f.centre[None])[0]
            if np.all(c > 0.06 * frame) and np.all(c < 0.94 * frame):
                breaks.append(f)
                break
            off_centre = float(np.abs(c / frame - 0.5).max())
            if fallback is None or off_centre < fallback[0]:
                fallback = (off_centre, f)
    if not breaks and fallback is not None:
        breaks.append(fallback[1])
    if not fractured:
        breaks = []
    scene.soft.extend((f.swelling, f.swelling_density) for f in breaks)

    bones = np.zeros((h, w), dtype=np.float32)
    for i, bone in enumerate(scene.bones):
        _draw_bone(bones, bone, to_px, [f for f in breaks if f.bone == i])

    # Film: bone density, texture, exposure curve, detector blur, marker, then noise.
    bone_gain = film_rng.uniform(0.75, 1.1)
    texture = 1.0 + 0.12 * _smooth_noise(film_rng, (h, w), 24)
    atten = _soft_tissue(scene, to_px, (h, w)) + bones * texture * bone_gain
    k = film_rng.uniform(1.1, 1.7)
    img = 1.0 - np.exp(-k * np.clip(atten, 0.0, None))
    background = film_rng.uniform(0.0, 0.12)
    img = background + (1.0 - background) * img
    img *= 1.0 + film_rng.uniform(0.0, 0.12) * _smooth_noise(film_rng, (h, w), 3)
    img = np.clip(img * film_rng.uniform(0.8, 1.1), 0.0, 1.0) ** film_rng.uniform(0.7, 1.4)
    img = _box_blur(_box_blur(img.astype(np.float32), 1), 1)
    _marker(img, laterality, film_rng)
    quantum = film_rng.uniform(0.0003, 0.002)
    sigma = film_rng.uniform(0.004, 0.015)
    img = img + np.sqrt(np.clip(img, 0.0, None) * quantum) * film_rng.standard_normal((h, w))
    img = img + sigma * film_rng.standard_normal((h, w))
    pixels = np.clip(img, 0.0, 1.0).astype(np.float32)

    boxes = tuple(_fracture_box(f, to_px, (h, w)) for f in breaks)
    return Phantom(pixels, region, bool(breaks), boxes, laterality)
