"""Procedural cartoon-face renderer: the "world" our small StyleGAN2 learns.

A face is fully described by a parameter vector ``z`` of ``PARAM_DIM``
standard-normal numbers.  Each entry is pushed through the normal CDF to a
uniform value in (0, 1) and then mapped linearly into its attribute's range
(see ``PARAMS``), so interpolating ``z`` changes the face smoothly.

Rendering is deterministic (no hidden RNG) and fast: the geometry of a whole
batch is computed with numpy, each face is rasterised with PIL polygons at
``supersample`` x the output size and box-downsampled for anti-aliasing, and
lighting/background are applied with numpy at the output size.

Coordinates
-----------
Geometry is built in a head-local frame measured in fractions of the image
height: origin at the head centre, x to the right, y down.  ``_to_pixels``
maps that frame to output pixels, where pixel centres sit at integer
coordinates (pixel (0, 0) covers [-0.5, 0.5]^2).  Landmarks come from the very
same geometry that is drawn, so they are exact.  "Left" always means image
left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# the one list of landmark names (and their order) lives in the core: the app's detector needs it
from draggan_core.model.landmark_net import LANDMARK_NAMES

# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------

# (name, low, high): z -> u = Phi(z) in (0, 1) -> low + (high - low) * u
PARAMS: tuple[tuple[str, float, float], ...] = (
    ("head_x", -0.05, 0.05),        # head centre offset, fraction of width
    ("head_y", -0.04, 0.04),        # head centre offset, fraction of height
    ("head_scale", 0.93, 1.07),
    ("tilt", -10.0, 10.0),          # in-plane rotation, degrees (clockwise)
    ("yaw", -0.26, 0.26),           # radians; > 0 turns the face to image right
    ("head_width", 0.245, 0.295),   # half-width of the head
    ("jaw", 0.0, 1.0),              # 0 oval/pointed chin .. 1 square jaw
    ("skin_tone", 0.0, 1.0),        # light .. dark
    ("hair_color", 0.0, 1.0),       # position along the hair palette
    ("hair_volume", 0.0, 0.085),    # hair thickness around the skull
    ("hair_length", -0.05, 0.62),   # how far hair falls below ear level
    ("hairline", 0.0, 1.0),         # 0 bald-ish .. 1 heavy fringe / bangs
    ("eye_spacing", 0.105, 0.13),   # eye centre distance from the midline
    ("eye_size", 0.056, 0.074),     # eye half-width
    ("eye_open", 0.55, 1.0),
    ("gaze_x", -0.38, 0.38),        # pupil offset, fraction of eye half-width
    ("gaze_y", -0.12, 0.12),
    ("iris_color", 0.0, 1.0),
    ("brow_height", 0.055, 0.085),  # brow centre above the eye centre
    ("brow_angle", -1.0, 1.0),      # > 0 raises the inner ends (worried)
    ("brow_thickness", 0.012, 0.028),
    ("nose_length", 0.125, 0.18),   # eye line -> nose tip
    ("nose_width", 0.034, 0.058),   # half-width of the nose base
    ("mouth_width", 0.095, 0.15),   # half-width of the mouth
    ("mouth_open", 0.0, 1.0),       # closed for u < 0.4, then opens smoothly
    ("smile", -0.3, 1.0),           # frown .. smile (corners up)
    ("lip_thickness", 0.0, 1.0),
    ("bg_hue", 0.0, 1.0),
    ("bg_value", 0.0, 1.0),
    ("shirt_hue", 0.0, 1.0),
    ("light_dir", -1.2, 1.2),       # radians from straight above; < 0 = from left
    ("brightness", 0.82, 1.1),
)
PARAM_NAMES: tuple[str, ...] = tuple(p[0] for p in PARAMS)
PARAM_DIM: int = len(PARAMS)

PART_NAMES: tuple[str, ...] = ("eyes", "brows", "nose", "mouth", "ears", "shirt")
# loss-region masks; the parts check (training/model_metrics.py) looks at the first four only

_LM = {name: i for i, name in enumerate(LANDMARK_NAMES)}

# Fixed layout of the head-local frame (fractions of image height).
_HEAD_CENTER = (0.5, 0.52)      # absolute position of the head centre
_HEAD_HALF_HEIGHT = 0.33        # skull top / chin distance from the centre
_EYE_Y = -0.075
_MOUTH_Y = 0.205
_EAR_Y = 0.0


# --------------------------------------------------------------------------
# Palettes (RGB 0..255); a parameter walks along the list piecewise-linearly
# --------------------------------------------------------------------------

_SKIN = [(255, 226, 208), (241, 196, 164), (214, 160, 120), (178, 120, 82),
         (132, 84, 56), (88, 55, 38)]
# natural colours first, a few unusual ones at the end (~13 % of the range)
_HAIR = [(22, 20, 20), (58, 38, 26), (104, 66, 38), (150, 62, 30), (196, 92, 42),
         (176, 134, 76), (226, 192, 122), (236, 226, 200), (168, 168, 170),
         (92, 92, 100), (52, 84, 190), (140, 70, 178), (224, 98, 160)]
_HAIR_KNOTS = [0.0, 0.13, 0.26, 0.36, 0.44, 0.53, 0.63, 0.70, 0.77, 0.86, 0.91, 0.955, 1.0]
_IRIS = [(72, 44, 26), (118, 74, 40), (128, 112, 48), (62, 122, 72),
         (58, 112, 176), (110, 134, 156)]
_BG = [(92, 110, 140), (70, 130, 130), (120, 146, 106), (190, 170, 130),
       (150, 126, 170), (140, 140, 140), (206, 146, 120), (92, 110, 140)]
_SHIRT = [(200, 50, 50), (230, 160, 40), (60, 150, 70), (40, 100, 190),
          (120, 60, 160), (240, 240, 235), (40, 40, 48), (200, 50, 50)]

_SCLERA = (246, 246, 240)
_PUPIL = (8, 8, 10)
_LASH = (28, 22, 22)
_MOUTH_INSIDE = (70, 18, 24)
_TEETH = (242, 240, 228)


def _palette(u: np.ndarray, colors, knots=None) -> np.ndarray:
    """(N,) in [0,1] -> (N, 3) float RGB, piecewise-linear along ``colors``."""
    colors = np.asarray(colors, np.float64)
    if knots is None:
        knots = np.linspace(0.0, 1.0, len(colors))
    return np.stack([np.interp(u, knots, colors[:, c]) for c in range(3)], axis=-1)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

@dataclass
class FaceBatch:
    images: np.ndarray      # float32 (N, 3, H, W) in [-1, 1]
    landmarks: np.ndarray   # float32 (N, K, 2) as (x, y) output pixels
    part_masks: np.ndarray  # float32 (N, len(PART_NAMES), H, W) in [0, 1]
    visible: np.ndarray     # bool (N, K)


def sample_z(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, PARAM_DIM)).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz & Stegun 7.1.26 erf, |err| < 1.5e-7)."""
    x = np.abs(z) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def decode_params(z: np.ndarray) -> dict[str, np.ndarray]:
    """z (N, PARAM_DIM) or (PARAM_DIM,) -> {name: (N,) float64 attribute value}."""
    z = np.atleast_2d(np.asarray(z, np.float64))
    if z.shape[1] != PARAM_DIM:
        raise ValueError(f"z must have {PARAM_DIM} columns, got shape {z.shape}")
    u = _norm_cdf(z)
    return {name: lo + (hi - lo) * u[:, i] for i, (name, lo, hi) in enumerate(PARAMS)}


# --------------------------------------------------------------------------
# Geometry helpers (all batched: per-face values have shape (N,) or (N, 1))
# --------------------------------------------------------------------------

def _col(v):
    """(N,) -> (N, 1) (a scalar -> (1, 1)) to broadcast against (N, V) arrays."""
    return np.reshape(np.asarray(v, np.float64), (-1, 1))


def _pts(x, y) -> np.ndarray:
    """Stack x and y (broadcastable) into (N, V, 2)."""
    x, y = np.broadcast_arrays(x, y)
    return np.stack([x, y], axis=-1)


def _ellipse(cx, cy, rx, ry, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return _pts(_col(cx) + _col(rx) * np.cos(t), _col(cy) + _col(ry) * np.sin(t))


class _Pose:
    """Head placement, used to map head-local points to output pixels."""

    def __init__(self, p: dict, resolution: int):
        self.res = resolution
        self.cx = _HEAD_CENTER[0] + p["head_x"]
        self.cy = _HEAD_CENTER[1] + p["head_y"]
        self.scale = p["head_scale"]
        ang = np.deg2rad(p["tilt"])
        self.cos, self.sin = np.cos(ang), np.sin(ang)
        self.a = p["head_width"]
        self.yaw_sin = np.sin(p["yaw"])
        self.yaw_cos = np.cos(p["yaw"])
        self.depth = 0.9 * self.a     # face surface ~ a sphere-ish cylinder

    def yaw(self, pts: np.ndarray, extra_depth=0.0) -> np.ndarray:
        """Rotate points on the face surface about the vertical axis."""
        x, y = pts[..., 0], pts[..., 1]
        a = _col(self.a)
        d = _col(self.depth) * np.sqrt(np.clip(1.0 - (x / a) ** 2, 0.0, 1.0)) + extra_depth
        return _pts(x * _col(self.yaw_cos) + d * _col(self.yaw_sin), y)

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """Head-local (N, V, 2) -> output pixel coords (centres at integers)."""
        x, y = pts[..., 0] * _col(self.scale), pts[..., 1] * _col(self.scale)
        c, s = _col(self.cos), _col(self.sin)
        ax = _col(self.cx) + c * x - s * y
        ay = _col(self.cy) + s * x + c * y
        return _pts(ax * self.res - 0.5, ay * self.res - 0.5)

    def face(self, pts, extra_depth=0.0):
        return self.to_pixels(self.yaw(pts, extra_depth))

    def absolute(self, ax, ay) -> np.ndarray:
        """Points given in absolute image fractions (not attached to the head)."""
        return _pts(np.asarray(ax) * self.res - 0.5, np.asarray(ay) * self.res - 0.5)


# --------------------------------------------------------------------------
# Parts.  Each returns a dict of polygons (N, V, 2) in output pixels and,
# where relevant, landmarks {name: (N, 2)}.
# --------------------------------------------------------------------------

def _head_outline_x(p, pose, y):
    """Right half-width of the head outline at local height(s) y (N, V)."""
    a, b = _col(pose.a), _HEAD_HALF_HEIGHT
    n = _col(2.0 + 2.2 * p["jaw"])           # superellipse exponent of the jaw
    taper = _col(0.36 - 0.3 * p["jaw"])       # chin narrowing
    yb = np.clip(np.abs(y) / b, 0.0, 1.0)
    lower = a * (1.0 - yb ** n) ** (1.0 / n) * (1.0 - taper * yb ** 2)
    upper = a * np.sqrt(1.0 - yb ** 2)
    return np.where(y > 0, lower, upper)


def _jaw_yaw_shift(pose, y):
    """Horizontal shift of the lower outline under yaw (chin turns with face)."""
    yb = np.clip(y / _HEAD_HALF_HEIGHT, 0.0, 1.0)
    return 0.6 * _col(pose.depth * pose.yaw_sin) * yb ** 2


def head(p, pose, n: int = 64):
    t = np.linspace(-np.pi / 2, np.pi / 2, n)      # right side, top -> bottom
    y = np.broadcast_to(_HEAD_HALF_HEIGHT * np.sin(t), (len(pose.a), n))
    xr = _head_outline_x(p, pose, y)
    shift = _jaw_yaw_shift(pose, y)
    x = np.concatenate([xr + shift, (-xr + shift)[:, ::-1]], axis=1)
    yy = np.concatenate([y, y[:, ::-1]], axis=1)
    local = _pts(x, yy)

    def contour(side, yv):
        yv = np.full((len(pose.a), 1), yv, np.float64) if np.ndim(yv) == 0 else _col(yv)
        xv = side * _head_outline_x(p, pose, yv) + _jaw_yaw_shift(pose, yv)
        return pose.to_pixels(_pts(xv, yv))[:, 0]

    lms = {
        "chin": contour(0.0, _HEAD_HALF_HEIGHT),
        "jaw_left_mouth": contour(-1.0, _MOUTH_Y),
        "jaw_right_mouth": contour(1.0, _MOUTH_Y),
        "jaw_left_eye": contour(-1.0, _EYE_Y),
        "jaw_right_eye": contour(1.0, _EYE_Y),
    }
    return {"local": local, "head": pose.to_pixels(local)}, lms


def hairline(p, x, pose):
    """Local y of the front hairline over the forehead at local x (N, V)."""
    h = _col(p["hairline"])
    a = _col(pose.a)
    brow_top = _EYE_Y - _col(p["brow_height"]) - 0.5 * _col(p["brow_thickness"]) - 0.03
    top = -_HEAD_HALF_HEIGHT - 0.02
    y0 = top + (brow_top - top) * h ** 0.8
    arch = 0.05 + 0.2 * (1.0 - h)                  # temples lower than the centre
    y = y0 + arch * (x / a) ** 2
    # bangs: a scalloped lower edge that grows in as the fringe comes down
    y = y + 0.018 * np.clip((h - 0.55) / 0.45, 0, 1) * np.abs(np.sin(x * np.pi / 0.055))
    return np.minimum(y, brow_top)


def hair(p, pose, head_local, n: int = 40):
    """Hair mass behind the head, and the face region below the front hairline.

    The head is drawn in hair colour and the face (head outline with y clamped
    to lie below the hairline) in skin colour on top of it.  Clamping a shape
    that is convex along y gives the exact intersection without degenerate
    zero-width slivers (which PIL would still rasterise as 1-pixel lines).
    """
    v = _col(p["hair_volume"])
    a, b = _col(pose.a), _HEAD_HALF_HEIGHT
    # back mass: the skull outline grown by the volume, plus hanging length
    t = np.linspace(0.0, np.pi, n)                 # right ear level -> over top -> left
    top_cover = np.clip(_col(p["hairline"]) / 0.3, 0.0, 1.0)     # bald-ish: no hair on top
    xo = (a + v) * np.cos(t)
    yo = -(b + (0.012 + 1.3 * v) * top_cover) * np.sin(t)
    length = _col(p["hair_length"])
    bottom = np.maximum(length, 0.0) + 0.02
    flare = 0.04 * np.clip(length / 0.6, 0, 1)
    xl = -(a + v + flare)
    xr = a + v + flare
    back = np.concatenate([
        _pts(xo, yo),
        _pts(xl, bottom - 0.03), _pts(xl * 0.92, bottom),
        _pts(xr * 0.92, bottom), _pts(xr, bottom - 0.03),
    ], axis=1)
    hx, hy = head_local[..., 0], head_local[..., 1]
    face = _pts(hx, np.maximum(hy, hairline(p, hx, pose)))
    return {"hair_back": pose.to_pixels(back), "face": pose.to_pixels(face)}


def ears(p, pose):
    """Ears sit behind the head outline; under yaw the far ear slides behind it."""
    a = pose.a
    rx, ry = 0.036 * np.ones_like(a), 0.068 * np.ones_like(a)
    shift = -0.9 * pose.depth * pose.yaw_sin       # ears are behind the face plane
    out, lms = {}, {}
    for side, name in ((-1.0, "left"), (1.0, "right")):
        cx = side * (a + 0.012) + shift
        outer = _ellipse(cx, _EAR_Y, rx, ry, 20)
        inner = _ellipse(cx + side * 0.006, _EAR_Y + 0.004, rx * 0.5, ry * 0.6, 14)
        out[f"ear_{name}"] = pose.to_pixels(outer)
        out[f"ear_{name}_inner"] = pose.to_pixels(inner)
        tip_x = cx + side * rx
        lms[f"ear_{name}"] = pose.to_pixels(_pts(_col(tip_x), _col(np.full_like(a, _EAR_Y))))[:, 0]
        # hidden when the ear's outermost point lies inside the head outline
        lms[f"ear_{name}_visible"] = side * tip_x > a
    return out, lms


def _eye_lids(p, u):
    """Upper / lower lid offsets from the eye centre at u in [-1, 1] (N, V)."""
    w = _col(p["eye_size"])
    o = _col(p["eye_open"])
    s = np.clip(1.0 - u ** 2, 0.0, 1.0)
    return -0.72 * w * o * s ** 0.7, 0.45 * w * o * s ** 0.85


def _clip_to_eye(p, pts, ex, ey):
    """Intersect a convex shape (N, V, 2) with the eye opening (exact, by clamping)."""
    w = _col(p["eye_size"])
    x = np.clip(pts[..., 0], ex - w, ex + w)
    up, lo = _eye_lids(p, (x - ex) / w)
    return _pts(x, np.clip(pts[..., 1], ey + up, ey + lo))


def eyes(p, pose, n: int = 24):
    w = _col(p["eye_size"])
    ey = _EYE_Y
    u = np.linspace(-1.0, 1.0, n)[None, :]
    up, lo = _eye_lids(p, u)
    r_iris = 0.64 * w
    r_pupil = 0.55 * r_iris
    out, lms = {}, {}
    for side, name in ((-1.0, "left"), (1.0, "right")):
        ex = side * _col(p["eye_spacing"])
        x = ex + u * w
        sclera = np.concatenate([_pts(x, ey + up), _pts(x, ey + lo)[:, ::-1]], axis=1)
        gx = ex + _col(p["gaze_x"]) * w
        gy = ey + _col(p["gaze_y"]) * w
        iris = _clip_to_eye(p, _ellipse(gx[:, 0], gy[:, 0], r_iris[:, 0], r_iris[:, 0], 24), ex, ey)
        pupil = _clip_to_eye(p, _ellipse(gx[:, 0], gy[:, 0], r_pupil[:, 0], r_pupil[:, 0], 16), ex, ey)
        # lash line: a band above the upper lid, thicker towards the outer corner
        ue = np.linspace(-1.0, 1.0, n)[None, :]
        lash_t = 0.011 + 0.006 * np.clip(side * ue, 0, 1)
        lash = np.concatenate([_pts(x, ey + up - lash_t), _pts(x, ey + up + 0.002)[:, ::-1]], axis=1)
        lower_lid = np.concatenate([_pts(x, ey + lo - 0.002), _pts(x, ey + lo + 0.005)[:, ::-1]], axis=1)
        for key, poly in (("sclera", sclera), ("iris", iris), ("pupil", pupil), ("lash", lash),
                          ("lower_lid", lower_lid)):
            out[f"{key}_{name}"] = pose.face(poly)

        def lm(lx, ly):
            return pose.face(_pts(lx, ly))[:, 0]
        lms[f"eye_{name}_outer"] = lm(ex + side * w, np.full_like(ex, ey))
        lms[f"eye_{name}_inner"] = lm(ex - side * w, np.full_like(ex, ey))
        up0, lo0 = _eye_lids(p, np.zeros((1, 1)))
        lms[f"eye_{name}_top"] = lm(ex, ey + up0)
        lms[f"eye_{name}_bottom"] = lm(ex, ey + lo0)
        lms[f"pupil_{name}"] = lm(gx, gy)
        up_g, lo_g = _eye_lids(p, (gx - ex) / w)
        lms[f"pupil_{name}_visible"] = ((gy > ey + up_g) & (gy < ey + lo_g))[:, 0]
    return out, lms


def brows(p, pose, n: int = 16):
    w = _col(p["eye_size"])
    u = np.linspace(-1.0, 1.0, n)[None, :]         # -1 inner end, +1 outer end
    half_len = 1.2 * w
    by = _EYE_Y - _col(p["brow_height"])
    th = _col(p["brow_thickness"])
    centre_y = by - 0.012 * (1.0 - u ** 2) + 0.02 * _col(p["brow_angle"]) * u
    thick = th * (1.0 - 0.35 * (u + 1.0) / 2.0) * np.sqrt(np.clip(1.0 - u ** 8, 0, 1)) + 0.003
    out, lms = {}, {}
    for side, name in ((-1.0, "left"), (1.0, "right")):
        bx = side * (_col(p["eye_spacing"]) + 0.1 * w)
        x = bx + side * u * half_len
        poly = np.concatenate([_pts(x, centre_y - thick / 2), _pts(x, centre_y + thick / 2)[:, ::-1]], axis=1)
        out[f"brow_{name}"] = pose.face(poly)
        ends = pose.face(_pts(x[:, [0, -1]], centre_y[:, [0, -1]]))
        lms[f"brow_{name}_inner"] = ends[:, 0]
        lms[f"brow_{name}_outer"] = ends[:, 1]
    return out, lms


def nose(p, pose):
    nw = _col(p["nose_width"])
    tip_y = _EYE_Y + _col(p["nose_length"])
    protrude = 0.05                                 # nose tip sticks out of the face
    zero = np.zeros_like(nw)
    base = _ellipse(zero[:, 0], (tip_y + 0.004)[:, 0], nw[:, 0], np.full(len(nw), 0.022), 20)
    ball = _ellipse(zero[:, 0], (tip_y - 0.005)[:, 0], 0.55 * nw[:, 0], np.full(len(nw), 0.017), 16)
    # bridge shadow on the side away from the light
    lx = _col(-np.sin(p["light_dir"])) * 0.5 * nw
    t = np.linspace(0.0, 1.0, 6)[None, :]
    by = (_EYE_Y + 0.03) + t * (tip_y - 0.02 - (_EYE_Y + 0.03))
    bw = 0.004 + 0.004 * t
    bridge = np.concatenate([_pts(lx - bw, by), _pts(lx + bw, by)[:, ::-1]], axis=1)
    out = {
        "nose_base": pose.face(base, protrude * 0.5),
        "nose_ball": pose.face(ball, protrude),
        "nose_bridge": pose.face(bridge, protrude * np.concatenate([t, t[:, ::-1]], axis=1)),
    }
    lms = {"nose_tip": pose.face(_pts(zero, tip_y), protrude)[:, 0]}
    for side, name in ((-1.0, "left"), (1.0, "right")):
        nx = side * 0.52 * nw
        ny = tip_y + 0.013
        out[f"nostril_{name}"] = pose.face(
            _ellipse(nx[:, 0], ny[:, 0], 0.32 * nw[:, 0], np.full(len(nw), 0.0085), 12), protrude * 0.4)
        lms[f"nostril_{name}"] = pose.face(_pts(nx, ny), protrude * 0.4)[:, 0]
    return out, lms


def _mouth_curves(p, u):
    """Four lip curves (outer upper, inner upper, inner lower, outer lower) at u."""
    s = np.clip(1.0 - u ** 2, 0.0, 1.0)
    mw = _col(p["mouth_width"])
    corner = -0.055 * _col(p["smile"]) * u ** 2 * (mw / 0.12)        # corners rise
    opening = 0.075 * np.clip((_col(p["mouth_open"]) - 0.4) / 0.6, 0.0, 1.0) ** 1.5
    inner_up = corner - 0.3 * opening * s ** 0.55
    inner_lo = corner + 0.7 * opening * s ** 0.55
    lt = _col(p["lip_thickness"])
    bow = 1.0 - 0.25 * np.exp(-(u / 0.18) ** 2)                      # cupid's bow dip
    outer_up = inner_up - (0.016 + 0.012 * lt) * s ** 0.4 * bow
    outer_lo = inner_lo + (0.021 + 0.014 * lt) * s ** 0.4
    return outer_up, inner_up, inner_lo, outer_lo, opening


def mouth(p, pose, n: int = 28):
    mw = _col(p["mouth_width"])
    u = np.linspace(-1.0, 1.0, n)[None, :]
    x = u * mw
    oup, iup, ilo, olo, opening = _mouth_curves(p, u)
    my = _MOUTH_Y
    lips = np.concatenate([_pts(x, my + oup), _pts(x, my + olo)[:, ::-1]], axis=1)
    inside = np.concatenate([_pts(x, my + iup), _pts(x, my + ilo)[:, ::-1]], axis=1)
    teeth_lo = np.minimum(iup + np.maximum(0.35 * opening - 0.004, 0.0), ilo)
    teeth = np.concatenate([_pts(x * 0.7, my + iup), _pts(x * 0.7, my + teeth_lo)[:, ::-1]], axis=1)
    seam_c = 0.5 * (iup + ilo)
    seam = np.concatenate([_pts(x, my + seam_c - 0.004), _pts(x, my + seam_c + 0.004)[:, ::-1]], axis=1)
    out = {name: pose.face(poly) for name, poly in
           (("lips", lips), ("mouth_seam", seam), ("mouth_inside", inside), ("teeth", teeth))}
    c = np.array([[-1.0, 1.0]])
    ends = pose.face(_pts(c * mw, my + _mouth_curves(p, c)[1]))
    mid = _mouth_curves(p, np.zeros((1, 1)))
    lms = {
        "mouth_left": ends[:, 0], "mouth_right": ends[:, 1],
        "lip_upper": pose.face(_pts(np.zeros_like(mw), my + mid[0]))[:, 0],
        "lip_lower": pose.face(_pts(np.zeros_like(mw), my + mid[3]))[:, 0],
    }
    return out, lms


def body(p, pose):
    """Neck (attached to the rotated head) and shoulders (upright)."""
    a = _col(pose.a)
    neck_local = _pts(np.concatenate([-0.42 * a, 0.42 * a], axis=1), np.full((len(a), 2), 0.15))
    neck_top = pose.to_pixels(neck_local)
    cx = pose.cx[:, None]
    base_y = 0.93 + 0.5 * (pose.cy[:, None] - _HEAD_CENTER[1])
    nw = 0.44 * a * pose.scale[:, None]
    neck_bottom = pose.absolute(cx + np.concatenate([nw, -nw], axis=1), base_y + 0.02)
    neck = np.concatenate([neck_top, neck_bottom], axis=1)
    sx = np.array([[-0.13, -0.36, -0.52, -0.52, 0.52, 0.52, 0.36, 0.13]])
    sy = np.array([[0.0, 0.035, 0.12, 0.2, 0.2, 0.12, 0.035, 0.0]])
    shirt = pose.absolute(cx + sx, base_y + sy)
    collar = _ellipse(cx[:, 0], base_y[:, 0], 1.02 * nw[:, 0], np.full(len(cx), 0.03), 16)
    return {"neck": neck, "shirt": shirt, "collar": pose.absolute(collar[..., 0], collar[..., 1])}


# --------------------------------------------------------------------------
# Colours, background and lighting
# --------------------------------------------------------------------------

def colors(p) -> dict[str, np.ndarray]:
    """Per-face colours (N, 3) in 0..255."""
    skin = _palette(p["skin_tone"], _SKIN)
    hair_c = _palette(p["hair_color"], _HAIR, _HAIR_KNOTS)
    lip = np.clip(skin * np.array([0.80, 0.50, 0.52]) + np.array([28.0, 4.0, 10.0]), 0, 255)
    brow = 0.7 * hair_c * 0.8 + 0.3 * skin * 0.35
    n = len(skin)
    return {
        "skin": skin,
        "skin_shade": skin * 0.82,
        "skin_dark": skin * 0.45,
        "skin_light": np.minimum(skin * 1.05 + 4, 255),
        "ear_inner": skin * 0.76,
        "neck": skin * 0.80,
        "hair": hair_c,
        "hair_back": hair_c * 0.82,
        "brow": brow,
        "lip": lip,
        "iris": _palette(p["iris_color"], _IRIS),
        "shirt": _palette(p["shirt_hue"], _SHIRT),
        "collar": skin * 0.80,
        "sclera": np.tile(_SCLERA, (n, 1)),
        "pupil": np.tile(_PUPIL, (n, 1)),
        "lash": 0.5 * np.tile(_LASH, (n, 1)) + 0.5 * np.minimum(hair_c, 80) * 0.5,
        "mouth_inside": np.tile(_MOUTH_INSIDE, (n, 1)),
        "mouth_seam": lip * 0.45,
        "teeth": np.tile(_TEETH, (n, 1)),
    }


def background(p, res: int) -> np.ndarray:
    """Vertical two-tone gradient, (N, 3, H, W) in 0..1."""
    base = _palette(p["bg_hue"], _BG) / 255.0
    v = 0.75 + 0.45 * p["bg_value"][:, None]
    top = np.clip(base * v * 1.15, 0, 1)
    bottom = np.clip(base * v * 0.72, 0, 1)
    t = (np.arange(res) + 0.5) / res
    grad = top[:, :, None] * (1 - t) + bottom[:, :, None] * t          # (N, 3, H)
    return np.broadcast_to(grad[:, :, :, None], (len(base), 3, res, res))


def lighting(p, pose, res: int) -> np.ndarray:
    """Multiplicative shading of the person layer, (N, 1, H, W)."""
    g = (np.arange(res) + 0.5) / res
    X = g[None, None, :] - pose.cx[:, None, None]
    Y = g[None, :, None] - pose.cy[:, None, None]
    r_head = (pose.scale * _HEAD_HALF_HEIGHT)[:, None, None]
    ang = p["light_dir"][:, None, None]
    directional = np.clip((X * np.sin(ang) - Y * np.cos(ang)) / r_head, -1.3, 1.3)
    ex = X / (pose.scale * pose.a)[:, None, None]
    ey = Y / r_head
    rr = np.sqrt(ex ** 2 + ey ** 2)
    rim = np.clip((rr - 0.6) / 0.45, 0.0, 1.0) ** 2
    shade = (1.0 + 0.26 * directional) * (1.0 - 0.18 * rim)
    return shade[:, None]


# --------------------------------------------------------------------------
# Part masks: anti-aliased rounded boxes around each part's landmarks
# --------------------------------------------------------------------------

def _rounded_box_coverage(res, centre, axis, half_a, half_b, radius):
    """Coverage (N, H, W) of rotated rounded boxes (exact signed distance).

    centre, axis: (N, 2) box centre and long-axis unit vector in output pixels;
    half_a, half_b: (N,) half extents along / across the axis; radius (N,):
    corner radius (at most the smaller half extent).
    """
    f32 = np.float32
    g = np.arange(res, dtype=f32)
    cos, sin = (axis[:, k, None, None].astype(f32) for k in (0, 1))
    dx = g[None, None, :] - centre[:, 0, None, None].astype(f32)
    dy = g[None, :, None] - centre[:, 1, None, None].astype(f32)
    r = np.minimum(np.minimum(half_a, half_b), radius)[:, None, None].astype(f32)
    ka = np.abs(dx * cos + dy * sin) - (half_a[:, None, None].astype(f32) - r)
    kb = np.abs(dy * cos - dx * sin) - (half_b[:, None, None].astype(f32) - r)
    outside = np.sqrt(np.maximum(ka, 0) ** 2 + np.maximum(kb, 0) ** 2)
    dist = outside + np.minimum(np.maximum(ka, kb), 0) - r
    return np.clip(f32(0.5) - dist, 0.0, 1.0)


def _box_around(res, pts, direction, margin_a, margin_b):
    """Coverage of the smallest box (aligned with direction) holding pts (N, M, 2),
    grown by the margins (N,) along / across it, with corners rounded by at most
    the smaller margin, so every point stays inside."""
    u = direction / np.linalg.norm(direction, axis=1, keepdims=True)
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)
    pa = np.einsum("nmk,nk->nm", pts, u)
    pb = np.einsum("nmk,nk->nm", pts, v)
    ca = 0.5 * (pa.min(1) + pa.max(1))
    cb = 0.5 * (pb.min(1) + pb.max(1))
    centre = ca[:, None] * u + cb[:, None] * v
    half_a = 0.5 * (pa.max(1) - pa.min(1)) + margin_a
    half_b = 0.5 * (pb.max(1) - pb.min(1)) + margin_b
    return _rounded_box_coverage(res, centre, u, half_a, half_b, np.minimum(margin_a, margin_b))


def part_masks(p, lm: np.ndarray, pose, res: int, polys: dict) -> np.ndarray:
    """(N, len(PART_NAMES), H, W) coverage of each part and its surroundings (polys: the drawn polygons)."""
    def pts(*names):
        return np.stack([lm[:, _LM[nm]] for nm in names], axis=1)

    px = res * pose.scale                               # output pixels per local unit
    margin = 0.022 * px
    eyes_m = brows_m = 0.0
    for s in ("left", "right"):
        eye = pts(f"eye_{s}_outer", f"eye_{s}_inner", f"eye_{s}_top", f"eye_{s}_bottom", f"pupil_{s}")
        eyes_m = np.maximum(eyes_m, _box_around(res, eye, eye[:, 1] - eye[:, 0], margin, margin))
        brow = pts(f"brow_{s}_outer", f"brow_{s}_inner")
        across = (0.5 * p["brow_thickness"] + 0.012) * px + margin   # thickness + arch
        brows_m = np.maximum(brows_m, _box_around(res, brow, brow[:, 1] - brow[:, 0], margin, across))
    bridge = 0.5 * (lm[:, _LM["eye_left_inner"]] + lm[:, _LM["eye_right_inner"]])
    nose_pts = np.concatenate([bridge[:, None], pts("nose_tip", "nostril_left", "nostril_right")], axis=1)
    nose_m = _box_around(res, nose_pts, nose_pts[:, 1] - nose_pts[:, 0], margin,
                         (0.02 + 0.35 * p["nose_width"]) * px + margin)
    mouth = pts("mouth_left", "mouth_right", "lip_upper", "lip_lower")
    mouth_m = _box_around(res, mouth, mouth[:, 1] - mouth[:, 0], margin, margin)
    # ears: the outer ellipse of each (also where it hides behind the head outline), boxed along the
    # face's horizontal axis
    across = lm[:, _LM["eye_right_outer"]] - lm[:, _LM["eye_left_outer"]]
    ears_m = np.maximum(*(_box_around(res, polys[f"ear_{s}"], across, margin, margin) for s in ("left", "right")))
    # shirt: its colour is a parameter of its own, on a strip at the image bottom (upright, like the body)
    upright = np.tile(np.array([[1.0, 0.0]]), (len(lm), 1))
    shirt_m = _box_around(res, polys["shirt"], upright, margin, margin)
    return np.stack([eyes_m, brows_m, nose_m, mouth_m, ears_m, shirt_m], axis=1).astype(np.float32)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

# Back-to-front drawing order: (polygon key, colour key)
_DRAW_ORDER = (
    ("hair_back", "hair_back"), ("shirt", "shirt"), ("neck", "neck"), ("collar", "collar"),
    ("ear_left", "skin"), ("ear_left_inner", "ear_inner"),
    ("ear_right", "skin"), ("ear_right_inner", "ear_inner"),
    ("head", "hair"), ("face", "skin"),
    ("sclera_left", "sclera"), ("iris_left", "iris"), ("pupil_left", "pupil"), ("lash_left", "lash"),
    ("lower_lid_left", "skin_shade"),
    ("sclera_right", "sclera"), ("iris_right", "iris"), ("pupil_right", "pupil"), ("lash_right", "lash"),
    ("lower_lid_right", "skin_shade"),
    ("brow_left", "brow"), ("brow_right", "brow"),
    ("nose_bridge", "skin_shade"), ("nose_base", "skin_shade"), ("nose_ball", "skin_light"),
    ("nostril_left", "skin_dark"), ("nostril_right", "skin_dark"),
    ("lips", "lip"), ("mouth_seam", "mouth_seam"), ("mouth_inside", "mouth_inside"), ("teeth", "teeth"),
)


def _geometry(p, pose):
    head_geo, lms = head(p, pose)
    polys = {"head": head_geo["head"]}
    polys.update(hair(p, pose, head_geo["local"]))
    polys.update(body(p, pose))
    for part in (ears, eyes, brows, nose, mouth):
        geo, part_lms = part(p, pose)
        polys.update(geo)
        lms.update(part_lms)
    return polys, lms


def _polygon_thickness(v: np.ndarray) -> np.ndarray:
    """Mean thickness 2 * area / perimeter of polygons (N, V, 2) -> (N,)."""
    x, y = v[..., 0], v[..., 1]
    xn, yn = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    area = 0.5 * np.abs(np.sum(x * yn - xn * y, axis=1))
    perimeter = np.sum(np.hypot(xn - x, yn - y), axis=1)
    return 2.0 * area / np.maximum(perimeter, 1e-9)


def _rasterize(polys, cols, res: int, ss: int):
    """Draw all faces at ss x resolution and box-downsample.

    Returns premultiplied RGB (N, 3, H, W) and coverage (N, 1, H, W) in [0, 1].
    PIL has no "premultiplied RGB + coverage" mode, so we draw into CMYK and use
    its four channels as (R, G, B, alpha) on a black, zero-alpha canvas:
    reduce() box-averages them independently, which is exactly premultiplied
    colour + coverage.  PIL fills pixels whose centres are on a polygon's
    boundary, so polygons thinner than half a (supersampled) pixel (a closed
    mouth's teeth, ...) would still leave 1-pixel lines: they are skipped.
    """
    n = len(next(iter(polys.values())))
    ss_polys = {k: (v + 0.5) * ss for k, v in polys.items()}    # PIL: pixel edges at ints
    flat = {k: v.reshape(n, -1).tolist() for k, v in ss_polys.items()}
    drawn = {k: (_polygon_thickness(v) >= 0.5).tolist() for k, v in ss_polys.items()}
    fills = {k: [tuple(row) + (255,) for row in np.rint(np.clip(v, 0, 255)).astype(int).tolist()]
             for k, v in cols.items()}
    layer = np.empty((n, res, res, 4), np.uint8)
    for i in range(n):
        im = Image.new("CMYK", (res * ss, res * ss), (0, 0, 0, 0))
        draw = ImageDraw.Draw(im)
        for poly_key, col_key in _DRAW_ORDER:
            if drawn[poly_key][i]:
                draw.polygon(flat[poly_key][i], fill=fills[col_key][i])
        layer[i] = np.asarray(im.reduce(ss) if ss > 1 else im)
    layer = layer.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return layer[:, :3], layer[:, 3:]


def render(z: np.ndarray, resolution: int = 64, supersample: int = 4) -> FaceBatch:
    p = decode_params(z)
    n = len(p["head_x"])
    res, ss = int(resolution), int(supersample)
    pose = _Pose(p, res)
    polys, lms = _geometry(p, pose)
    cols = colors(p)

    person, alpha = _rasterize(polys, cols, res, ss)

    shade = lighting(p, pose, res)
    bright = p["brightness"][:, None, None, None]
    img = (person * shade + (1.0 - alpha) * background(p, res)) * bright
    images = (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)

    landmarks = np.stack([lms[name] for name in LANDMARK_NAMES], axis=1)
    visible = np.ones((n, len(LANDMARK_NAMES)), bool)
    for s in ("left", "right"):
        visible[:, _LM[f"ear_{s}"]] = lms[f"ear_{s}_visible"]
        visible[:, _LM[f"pupil_{s}"]] = lms[f"pupil_{s}_visible"]
    inside = np.all((landmarks > -0.5) & (landmarks < res - 0.5), axis=2)
    visible &= inside

    return FaceBatch(
        images=images,
        landmarks=landmarks.astype(np.float32),
        part_masks=part_masks(p, landmarks, pose, res, polys),
        visible=visible,
    )
