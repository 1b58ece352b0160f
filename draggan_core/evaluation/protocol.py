"""Quantitative drag evaluation: the DragGAN paper's face-landmark protocol (Pan et al. 2023, Sec. 4.2).

For each of N seeded pairs (A, B) of latent seeds:
  1. render G(A) and G(B) and detect their landmarks with our detector (model/landmark_net.py);
  2. choose the points: "1" = one random landmark visible in both; "5" = FIVE_POINTS (outer eye corners,
     nose tip, mouth corners); "all" = every landmark visible in both images;
  3. drag: handles = A's landmarks, targets = B's, with the model's default drag settings
     (max `steps` optimisation steps, the engine's own stop rule);
  4. detect the landmarks of the edited image.
Reported (each edit weighs equally: per-pair means, then the mean over pairs):
  md_before  mean |lm_A - lm_B| over the chosen points (px)         "no edit" row of the paper's Table 1
  md_after   mean |lm_edited - lm_B| (px, re-detected)              "DragGAN" row
  reduction  100 * (md_before - md_after) / md_before (%)
  md_tracked mean |tracked handle - target| from the session itself (px, not re-detected)
  seconds_per_edit, seconds_per_step, steps (mean), reached (fraction where the session says all handles arrived)
  kid_lm     image change: KID between edited and initial images on the landmark detector's 128-d
             embedding ("KID-lm", x1000; our stand-in for the paper's FID, which needs Inception
             features and thousands of images: not comparable in value, only across our runs)
  pixel_change  mean |edited - initial| over all pixels (0..255 units)
  md_before_512 / md_after_512  the MDs scaled to a 512 px image (the paper's units), for comparison
With `mask=True` every pair is dragged twice, without and with a mask (a disc around each handle and
its target, see `flexible_mask`; the masked drag uses the model's mask settings, docs/masks.md), and
`outside_change_nomask` / `outside_change_mask` give the mean absolute pixel change (0..255) outside
that mask, i.e. how well the rest of the image is kept, and `fixed_drift_nomask` / `fixed_drift_mask`
the mean displacement (px, re-detected) of the landmarks lying in the fixed region: a mean over
pixels can be small while an eye visibly changes shape. The detector reads the whole face, so a changed
mouth moves its estimate of an eye whose pixels did not change: `fixed_drift_floor_*` is the drift of
the same edit with every fixed pixel restored (the measurement's floor), `fixed_drift_own_*` the drift
between the edit and that composite (what the change of the fixed pixels themselves adds).

Seeds: the "val" split draws pair seeds from [0, 10000) (use it for sweeps), "test" from
[10000, 20000) (use it for reported numbers); the two never overlap.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..edit.session import DragSession
from ..edit.settings import DragConfig
from ..model.landmark_net import Detection, LandmarkDetector
from ..model.latents import seed_to_w

SPLITS = {"val": (0, 10_000), "test": (10_000, 20_000)}
POINT_MODES = ("1", "5", "all")
FIVE_POINTS = ("eye_left_outer", "eye_right_outer", "nose_tip", "mouth_left", "mouth_right")
VISIBLE_THRESHOLD = 0.5
RESULT_KEYS = ("md_before", "md_after", "reduction", "seconds_per_edit", "points", "pairs")


@dataclass
class EvalConfig:
    pairs: int = 20
    points: str = "1"
    steps: int = 300
    seed: int = 0
    split: str = "test"
    psi: float = 0.7
    mask: bool = False
    mask_margin: float = 8.0     # px at 64x64 (scaled with the resolution)
    round_points: bool = False   # round handles/targets to pixel centres (what a click gives)

    def check(self) -> "EvalConfig":
        if self.points not in POINT_MODES:
            raise ValueError(f"points must be one of {POINT_MODES}, got {self.points!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {self.split!r}")
        lo, hi = SPLITS[self.split]
        if not 1 <= self.pairs <= (hi - lo) // 2:
            raise ValueError(f"pairs must be in [1, {(hi - lo) // 2}]")
        if self.steps < 0:
            raise ValueError("steps must be >= 0")
        return self


# ------------------------------------------------------------------------------------------ pieces
def pair_seeds(split: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n pairs of distinct latent seeds from the split's range, a pure function of (split, n, seed)."""
    lo, hi = SPLITS[split]
    rng = np.random.default_rng([seed, lo])
    s = rng.choice(np.arange(lo, hi), size=2 * n, replace=False)
    return [(int(s[2 * i]), int(s[2 * i + 1])) for i in range(n)]


def choose_points(mode: str, names: list[str], vis_a: np.ndarray, vis_b: np.ndarray,
                  rng: np.random.Generator) -> list[int]:
    """Landmark indices used as handles/targets for one pair."""
    both = np.flatnonzero(np.asarray(vis_a) & np.asarray(vis_b))
    if mode == "5":
        return [names.index(n) for n in FIVE_POINTS]
    if len(both) == 0:  # nothing confidently visible (e.g. an untrained model): fall back to all
        both = np.arange(len(names))
    if mode == "1":
        return [int(rng.choice(both))]
    if mode == "all":
        return [int(i) for i in both]
    raise ValueError(f"points must be one of {POINT_MODES}")


def mean_distance(p, q) -> float:
    """Mean Euclidean distance between matching rows of two [K, 2] point arrays."""
    p, q = np.asarray(p, np.float64).reshape(-1, 2), np.asarray(q, np.float64).reshape(-1, 2)
    return float(np.linalg.norm(p - q, axis=1).mean())


def reduction_percent(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before > 0 else float("nan")


def kid(x, y, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel) between feature sets [n, d].

    Any embedding can be used (here the landmark detector's). Returns (mean, std) over random subsets.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    d = x.shape[1]
    m = min(len(x), len(y), subset_size)
    if m < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def flexible_mask(handles, targets, resolution: int, margin: float = 8.0) -> np.ndarray:
    """Union of discs, one per pair, centred between handle and target with radius |h - t| / 2 + margin
    (margin given at 64 px, scaled with the resolution). 1 = may change."""
    m = margin * resolution / 64
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64)
    out = np.zeros((resolution, resolution), np.float32)
    for (hx, hy), (tx, ty) in zip(handles, targets):
        cx, cy = (hx + tx) / 2, (hy + ty) / 2
        r = math.dist((hx, hy), (tx, ty)) / 2 + m
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1.0
    return out


def fixed_landmarks(points, visible, flexible: np.ndarray, exclude=(), margin: float = 1.0) -> list[int]:
    """Visible landmarks lying in the fixed region (flexible < 0.5) at least `margin` px (at 64 px,
    scaled) from the flexible region, other than the dragged ones."""
    res = flexible.shape[0]
    m = margin * res / 64
    yy, xx = np.mgrid[0:res, 0:res]
    flex_y, flex_x = yy[flexible >= 0.5], xx[flexible >= 0.5]
    out = []
    for k, (x, y) in enumerate(np.asarray(points, np.float64)):
        if k in exclude or not visible[k] or not (0 <= x <= res - 1 and 0 <= y <= res - 1):
            continue
        if len(flex_x) and np.hypot(flex_x - x, flex_y - y).min() < m:
            continue
        out.append(k)
    return out


def clamp_points(points: np.ndarray, resolution: int) -> np.ndarray:
    return np.clip(np.asarray(points, np.float64), 0, resolution - 1)


# ------------------------------------------------------------------------------------------ one edit
def drag_edit(G, w, handles, targets, steps: int, model_defaults: dict | None = None,
              mask: np.ndarray | None = None) -> dict:
    """Run one drag to completion; returns the edited image, tracked handles, steps, seconds."""
    session = DragSession(G, w, DragConfig(max_steps=steps, display_every=0), model_defaults=model_defaults)
    for h, t in zip(handles, targets):
        session.add_pair(tuple(h), tuple(t))
    if mask is not None:
        session.set_mask(mask)
    last = None
    t0 = time.perf_counter()
    for last in session.run(max_steps=steps):
        pass
    seconds = time.perf_counter() - t0
    image = last.image if last.image is not None else session.render()
    return {"image": image, "handles": np.asarray(last.handles, np.float64), "steps": session.step_count,
            "reached": bool(last.reached), "seconds": seconds}


def evaluate(G, detector: Callable[[np.ndarray], Detection], cfg: EvalConfig,
             model_defaults: dict | None = None, progress: Callable[[int, dict], None] | None = None,
             pairs: Iterable[tuple[int, int]] | None = None) -> dict:
    """Run the protocol; returns the summary dict (RESULT_KEYS + extras + per_pair records)."""
    cfg.check()
    res = G.img_resolution
    names = list(getattr(detector, "names", None) or [])
    pairs = list(pairs) if pairs is not None else pair_seeds(cfg.split, cfg.pairs, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 7])
    records, initial_feats, edited_feats = [], [], []
    for i, (sa, sb) in enumerate(pairs):
        wa, wb = seed_to_w(G, sa, psi=cfg.psi), seed_to_w(G, sb, psi=cfg.psi)
        with torch.no_grad():
            imgs = [DragSession(G, w).render() for w in (wa, wb)]
        det = detector(np.stack(imgs))
        vis = (det.visible.numpy() > VISIBLE_THRESHOLD)
        idx = choose_points(cfg.points, names or [str(k) for k in range(det.points.shape[1])],
                            vis[0], vis[1], rng)
        lm_a = clamp_points(det.points[0].numpy()[idx], res)
        lm_b = clamp_points(det.points[1].numpy()[idx], res)
        # sub-pixel points (the engine accepts them); rounding to pixels alone would leave ~0.5 px of
        # error at 64 px, 15 % of the typical distance (docs/evaluation.md)
        handles, targets = (np.rint(lm_a), np.rint(lm_b)) if cfg.round_points else (lm_a, lm_b)
        runs = {"": None}
        if cfg.mask:
            runs["_mask"] = flexible_mask(handles, targets, res, cfg.mask_margin)
        rec = {"seed_a": sa, "seed_b": sb, "landmarks": [names[k] if names else k for k in idx],
               "lm_a": lm_a.round(3).tolist(), "lm_b": lm_b.round(3).tolist(),
               "md_before": mean_distance(lm_a, lm_b)}
        for suffix, mask in runs.items():
            out = drag_edit(G, wa, handles, targets, cfg.steps, model_defaults, mask)
            det_e = detector(out["image"][None])
            lm_e = det_e.points[0].numpy()[idx]
            rec.update({f"md_after{suffix}": mean_distance(lm_e, lm_b),
                        f"md_tracked{suffix}": mean_distance(out["handles"], targets),
                        f"steps{suffix}": out["steps"], f"reached{suffix}": out["reached"],
                        f"seconds{suffix}": out["seconds"],
                        f"pixel_change{suffix}": float(np.abs(out["image"].astype(np.float64)
                                                              - imgs[0].astype(np.float64)).mean())})
            if suffix == "":
                rec["lm_edited"] = lm_e.round(3).tolist()
                initial_feats.append(det.features[0].numpy())
                edited_feats.append(det_e.features[0].numpy())
            if cfg.mask:
                outside = runs["_mask"] < 0.5
                diff = np.abs(out["image"].astype(np.float64) - imgs[0].astype(np.float64)).mean(axis=2)
                rec[f"outside_change{suffix or '_nomask'}"] = float(diff[outside].mean()) if outside.any() else 0.0
                # a mean over pixels hides a moved eye: the landmarks in the fixed region must stay put.
                # The detector sees the whole face, so a changed mouth moves its eye estimates too: the
                # same edit with every fixed pixel restored gives that floor, and the edit against that
                # composite what the fixed pixels' own change adds
                fixed = fixed_landmarks(det.points[0].numpy(), vis[0], runs["_mask"], exclude=idx)
                drifts = {"": math.nan, "_floor": math.nan, "_own": math.nan}
                if fixed:
                    start, edited = det.points[0].numpy()[fixed], det_e.points[0].numpy()[fixed]
                    composite = np.where(outside[..., None], imgs[0], out["image"])
                    restored = detector(composite[None]).points[0].numpy()[fixed]
                    drifts = {name: float(np.linalg.norm(b - a, axis=1).mean()) for name, (a, b) in
                              {"": (start, edited), "_floor": (start, restored), "_own": (restored, edited)}.items()}
                for name, value in drifts.items():
                    rec[f"fixed_drift{name}{suffix or '_nomask'}"] = value
        records.append(rec)
        if progress is not None:
            progress(i, rec)
    return summarize(records, cfg, initial_feats, edited_feats, resolution=res)


def summarize(records: list[dict], cfg: EvalConfig, initial_feats=None, edited_feats=None,
              resolution: int | None = None) -> dict:
    mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
    nanmean = lambda key: float(np.nanmean([r.get(key, np.nan) for r in records]))  # noqa: E731
    before, after = mean("md_before"), mean("md_after")
    out = {"md_before": before, "md_after": after, "reduction": reduction_percent(before, after),
           "seconds_per_edit": mean("seconds"), "points": cfg.points, "pairs": len(records),
           "md_tracked": mean("md_tracked"), "steps": mean("steps"),
           "seconds_per_step": float(sum(r["seconds"] for r in records) / max(sum(r["steps"] for r in records), 1)), "reached": mean("reached"),
           "pixel_change": mean("pixel_change"), "split": cfg.split, "seed": cfg.seed,
           "max_steps": cfg.steps, "psi": cfg.psi, "num_points_mean": float(np.mean([len(r["lm_a"])
                                                                                    for r in records]))}
    if resolution:
        # the paper's distances are in 512 px images: the same relative error in its units
        out["resolution"] = resolution
        out["md_before_512"] = before * 512 / resolution
        out["md_after_512"] = after * 512 / resolution
    if initial_feats is not None and len(initial_feats) >= 2:
        k, ks = kid(np.stack(edited_feats), np.stack(initial_feats))
        out["kid_lm"], out["kid_lm_std"] = 1000 * k, 1000 * ks
        out["kid_lm_note"] = "KID x1000 between edited and initial images on landmark-detector features"
    if cfg.mask:
        out.update({"md_after_mask": mean("md_after_mask"), "reduction_mask": reduction_percent(before, mean("md_after_mask")),
                    "seconds_per_edit_mask": mean("seconds_mask"), "reached_mask": mean("reached_mask"),
                    "outside_change_nomask": mean("outside_change_nomask"),
                    "outside_change_mask": mean("outside_change_mask"),
                    **{f"fixed_drift{name}{run}": nanmean(f"fixed_drift{name}{run}")
                       for name in ("", "_floor", "_own") for run in ("_nomask", "_mask")}})
    out["config"] = asdict(cfg)
    out["per_pair"] = records
    return out


def load_detector(path=None, device: str = "cpu") -> LandmarkDetector:
    return LandmarkDetector.load(path, device=device)
