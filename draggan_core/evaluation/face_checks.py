"""Is the face still a face? Per image and face part (eyes, brows, nose, mouth), whether the part is
drawn: the landmark detector finds its landmarks confidently (heatmap spread below SPREAD_MAX px,
visibility > 0.5 where it applies) AND a local contrast check holds: pupils much darker than the
sclera beside them, brows differ in colour from the cheek, nostrils darker than the cheek, lips
redder than the cheek, a mouth line darker than it or teeth brighter than it (open mouths).

Used by the model card's metrics (training/model_metrics.py) and by the user-edit benchmark
(user_edits.py), which asks it whether an edit left the face intact. The thresholds were calibrated
at the detector's 64 px on clean renders, blurred renders and an untrained generator; larger images
are area down-sampled to 64 px first, as the detector sees them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model.landmark_net import LandmarkDetector

SPREAD_MAX = 4.0               # px: a confident landmark has a peaked heatmap (renders: 2.4-3.1)

# contrast thresholds (0..1 intensity units), calibrated on renders vs blurred renders
PUPIL_CONTRAST = 0.40          # sclera brightness - pupil brightness (renders: 5th percentile 0.65)
BROW_DISTANCE = 0.10           # RGB distance brow vs cheek (renders: 5th percentile 0.13)
NOSTRIL_RATIO = 0.75           # nostril luminance / cheek luminance must be below (renders: <= 0.65)
LIP_REDNESS = 0.10             # (R - G) of lips minus (R - G) of cheek ...
MOUTH_DARK_RATIO = 0.70        # ... or mouth-line luminance / cheek luminance below this
TEETH_RATIO = 1.4              # ... or its brightest pixel / cheek luminance above this: teeth of an open mouth (in
                               # calibration renders failing the two tests above: 1.55-2.9; blurred by 2.5 px: <= 1.32)
PARTS = ("eyes", "brows", "nose", "mouth")
PART_LANDMARKS = {
    "eyes": ("eye_left_outer", "eye_left_inner", "eye_right_inner", "eye_right_outer", "pupil_left", "pupil_right"),
    "brows": ("brow_left_outer", "brow_left_inner", "brow_right_inner", "brow_right_outer"),
    "nose": ("nose_tip", "nostril_left", "nostril_right"),
    "mouth": ("mouth_left", "mouth_right", "lip_upper", "lip_lower"),
}


# ------------------------------------------------------------------------------------------ helpers
def to_unit(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> [0, 1] NHWC float64."""
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).double().numpy()


def luminance(c: np.ndarray) -> np.ndarray:
    return c @ np.array([0.299, 0.587, 0.114])


def _patch(img: np.ndarray, x: float, y: float, r: int) -> np.ndarray:
    h, w, _ = img.shape
    xi, yi = int(round(float(np.clip(x, 0, w - 1)))), int(round(float(np.clip(y, 0, h - 1))))
    return img[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1].reshape(-1, 3)


def part_scores(images: torch.Tensor, detector: LandmarkDetector) -> dict[str, np.ndarray]:
    """Continuous per-image evidence for each part (see the module docstring). images [-1, 1] NCHW,
    checked at the detector's resolution (larger images area down-sampled, as the detector sees them)."""
    size = detector.net.cfg.resolution
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    det = detector(images)
    names = detector.names
    ix = {n: names.index(n) for n in names}
    pts, spread, vis = det.points.numpy(), det.spread.numpy(), det.visible.numpy()
    imgs = to_unit(images)
    n = len(imgs)
    keys = ("pupil_contrast", "pupil_visible", "brow_distance", "nostril_ratio", "lip_redness", "mouth_dark_ratio",
            "teeth_ratio")
    out = {k: np.zeros(n) for k in keys}
    for p in PARTS:
        out[f"{p}_spread"] = spread[:, [ix[m] for m in PART_LANDMARKS[p]]].max(axis=1)
    for i in range(n):
        img, P = imgs[i], pts[i]
        L = lambda name: P[ix[name]]  # noqa: E731
        cheeks = [(L("eye_left_outer") + L("mouth_left")) / 2, (L("eye_right_outer") + L("mouth_right")) / 2]
        cheek = np.mean([_patch(img, *c, 1).mean(0) for c in cheeks], axis=0)
        cheek_lum = max(luminance(cheek), 1e-3)
        # eyes: each pupil much darker than the brightest sclera pixel between it and the eye corners
        contrast = []
        for s in ("left", "right"):
            pupil = L(f"pupil_{s}")
            sclera = max(luminance(_patch(img, *(0.4 * pupil + 0.6 * L(f"eye_{s}_{c}")), 1)).max()
                         for c in ("outer", "inner"))
            contrast.append(sclera - luminance(_patch(img, *pupil, 1)).min())
        out["pupil_contrast"][i] = min(contrast)
        out["pupil_visible"][i] = min(vis[i, ix["pupil_left"]], vis[i, ix["pupil_right"]])
        # brows: colour clearly different from the cheek (darker or lighter)
        out["brow_distance"][i] = min(
            np.linalg.norm(_patch(img, *((L(f"brow_{s}_outer") + L(f"brow_{s}_inner")) / 2), 1) - cheek, axis=1).max()
            for s in ("left", "right"))
        # nose: both nostrils darker than the cheek
        out["nostril_ratio"][i] = max(luminance(_patch(img, *L(f"nostril_{s}"), 1)).min()
                                      for s in ("left", "right")) / cheek_lum
        # the mouth line: from corner to corner through the middle of the lips (a parabola; the straight
        # chord of a smile runs above the mouth, through the upper lip and the skin over it)
        left, right, middle = L("mouth_left"), L("mouth_right"), (L("lip_upper") + L("lip_lower")) / 2
        bend = middle - (left + right) / 2
        along = lambda t: t * left + (1 - t) * right + 4 * t * (1 - t) * bend  # noqa: E731
        # mouth: lips redder (R - G) than the cheek
        lips = [L("lip_upper"), L("lip_lower"), along(0.7), along(0.3)]
        red = max((_patch(img, *q, 0)[:, 0] - _patch(img, *q, 0)[:, 1]).max() for q in lips)
        out["lip_redness"][i] = red - (cheek[0] - cheek[1])
        # ... or the mouth line (seam / open mouth) darker than the cheek
        line = [luminance(_patch(img, *along(t), 1)) for t in (0.3, 0.5, 0.7)]
        out["mouth_dark_ratio"][i] = min(v.min() for v in line) / cheek_lum
        # ... or teeth in an open mouth, brighter than the cheek (a blurred mouth has no bright pixel)
        out["teeth_ratio"][i] = max(v.max() for v in line) / cheek_lum
    return out


def part_checks(images: torch.Tensor, detector: LandmarkDetector, scores: dict | None = None) -> dict[str, np.ndarray]:
    """Per image and part, whether the part is there: confident landmarks AND its contrast check."""
    s = scores if scores is not None else part_scores(images, detector)
    conf = {p: s[f"{p}_spread"] < SPREAD_MAX for p in PARTS}
    out = {
        "eyes": conf["eyes"] & (s["pupil_visible"] > 0.5) & (s["pupil_contrast"] > PUPIL_CONTRAST),
        "brows": conf["brows"] & (s["brow_distance"] > BROW_DISTANCE),
        "nose": conf["nose"] & (s["nostril_ratio"] < NOSTRIL_RATIO),
        "mouth": conf["mouth"] & ((s["lip_redness"] > LIP_REDNESS) | (s["mouth_dark_ratio"] < MOUTH_DARK_RATIO)
                                  | (s["teeth_ratio"] > TEETH_RATIO)),
    }
    out["all_parts"] = np.all([out[p] for p in PARTS], axis=0)
    return out
