"""What a drag is told and what it reports: `DragConfig` (the settings; None means the model's
default, filled in by `DragConfig.resolve`), `PointPair` (a handle, its target and the features it
was placed on), `StepResult` (one step's outcome), `DragError` (bad user input) and `as_point` (a
point as stored). The session that uses them is in session.py, its step in steps.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..model.networks import Generator

COMPAT_MODES = ("ours", "official")
# how a run ends: every handle arrived; max steps; a handle lost its feature; the latent went too far
# from the start; no progress; rolled back
# settings beyond the paper that stay off (0) unless a model's drag defaults set them
OFF_UNLESS_SET = (("lost_match", float), ("patience", int), ("max_shift", float), ("lambda_w0", float),
                  ("lambda_local", float), ("motion_anchor", float))
RUN_ENDS = ("arrived", "max_steps", "lost_handle", "limit", "stalled", "diverged")
# drag-default settings a model card may give a separate value for edits with several points
MULTI_POINT_SETTINGS = ("lr", "r1")
# a model card's "many_points" dict replaces settings from this many handles on ("from" overrides it):
# moving many landmarks at once reshapes the whole face, which the rules made for one feature hold back
MANY_POINTS_FROM = 3


@dataclass
class DragConfig:
    """Optimisation settings. None means 'the model's default' (resolved by `resolve`)."""
    lr: float | None = None
    r1: float | None = None            # motion-supervision disc radius, image pixels
    r2: int | None = None              # point-tracking half window, image pixels
    lambda_mask: float | None = None   # weight of the keep-outside-the-mask term on the feature block
    lambda_image: float | None = None  # weight of the same term on the image (mean |G(w) - G(w0)|, RGB in [-1, 1])
    mask_hold_steps: int | None = None  # with a mask: steps spent on the keep terms after every handle arrived
    mask_hold_anchor: float | None = None  # during them: weight pinning each handle's first features at its target
    mask_feather: float | None = None  # keep weight ramps from 0 to 1 over this many px outside the flexible region
    feature_res: int | None = None     # feature block by resolution; default 6th block or the last
    track_res: int | None = None       # block whose features track the handles (default: feature_res)
    num_optimized_ws: int | None = None  # style vectors optimised (paper: the first 6)
    w_mode: str | None = None          # "w+" (one vector per layer) or "w" (one shared vector)
    tracking: str | None = None        # "l1" (paper) or "l2" (official)
    track_patch: int | None = None     # 0: match single-pixel features (paper); k: (2k+1)^2 patches
    stop_distance: float | None = None
    subpixel: bool | None = None       # refine tracked handles below a pixel (not in the paper)
    adaptive_step: bool | None = None  # motion step min(1, distance) px instead of 1 px (not in the paper)
    # knowing when to stop (not in the paper; 0 turns each off): a handle whose best match in its
    # tracking window differs from its reference by more than `lost_match` (relative L1) has lost its
    # feature; a run whose best distance has not improved for `patience` steps is stuck. Either ends
    # the run at the best state seen (the smallest mean tracked distance while every handle was held)
    lost_match: float | None = None
    patience: int | None = None
    # a latent further than this from where the edit started (RMS over W+, `latent_shift`) is beyond
    # what the model draws well: the run ends at the best state within it (0: no limit)
    max_shift: float | None = None
    lambda_w0: float | None = None     # pull towards the latent the edit started from: mean (w - w0)^2
    # without a mask, keep the features far from every handle and target as they were when the points
    # were placed (weight `lambda_local`; 0: off): the region within |target - handle| / 2 + local_margin
    # px of each pair's midpoint is free, the keep weight then ramps up over another local_margin px
    lambda_local: float | None = None
    local_margin: float | None = None
    # motion supervision pulls F(q + d) towards F(q) of the current latent (paper); with
    # `motion_anchor` = b in (0, 1] towards (1 - b) F(q) + b F0(q0), F0(q0) being the features around
    # the handle when it was placed: the dragged content keeps its look instead of drifting
    motion_anchor: float | None = None
    max_steps: int = 300
    noise_mode: str = "const"
    display_every: int = 10            # render the image every k steps (0: only at the end)
    compat: str = "ours"
    windowed: bool = True              # compute features only around the handles when no mask is set

    def resolve(self, G: Generator, num_points: int, model_defaults: dict | None = None,
                masked: bool = False) -> "DragConfig":
        """Fill the None fields for this generator (model card defaults first, then generic rules).

        masked: a mask is set, so the model's mask settings (the "mask" dict inside its drag
        defaults) replace its other defaults where they name the same setting. With several points the
        `<setting>_multi_point` values apply, and from MANY_POINTS_FROM points (or the dict's "from")
        those of the "many_points" dict.
        """
        res = G.img_resolution
        md = dict(model_defaults or {})
        mask_md, many_md = md.pop("mask", None), md.pop("many_points", None)
        c = dataclasses.replace(self)
        if c.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}")
        official = c.compat == "official"
        # later tiers win where they name the same setting: several points, many points, a mask
        if num_points > 1:  # a model card may recommend other values when several handles must settle together
            md.update({key: md[f"{key}_multi_point"] for key in MULTI_POINT_SETTINGS if f"{key}_multi_point" in md})
        if isinstance(many_md, dict) and num_points >= int(many_md.get("from", MANY_POINTS_FROM)):
            md.update({key: value for key, value in many_md.items() if key != "from"})
        if masked and isinstance(mask_md, dict):
            md.update(mask_md)
        blocks = G.synthesis.block_resolutions
        if c.feature_res is None:
            c.feature_res = md.get("feature_res") if not official else None
            if c.feature_res is None:
                c.feature_res = blocks[5] if len(blocks) > 5 else blocks[-1]
        if c.feature_res not in blocks:
            raise ValueError(f"feature block {c.feature_res} does not exist; blocks are {blocks}")
        if c.track_res is None:
            c.track_res = c.feature_res if official else md.get("track_res", c.feature_res)
        if c.track_res not in blocks:
            raise ValueError(f"tracking block {c.track_res} does not exist; blocks are {blocks}")
        if c.lr is None:
            c.lr = 1e-3 if official else md.get("lr", 2e-3)
        if c.r1 is None:
            c.r1 = round(3 * res / 512) if official else md.get("r1", max(3 * res / 512, 2.0))
        if c.r2 is None:
            c.r2 = round(12 * res / 512) if official else md.get("r2", max(round(12 * res / 512), 4))
        if c.w_mode is None:
            c.w_mode = "w+" if official else md.get("w_mode", "w+")
        if c.num_optimized_ws is None:
            c.num_optimized_ws = 6 if official else int(md.get("num_optimized_ws", 6))
        if c.tracking is None:
            c.tracking = "l2" if official else md.get("tracking", "l1")
        if c.track_patch is None:
            c.track_patch = 0 if official else int(md.get("track_patch", 0))
        if c.subpixel is None:
            c.subpixel = False if official else bool(md.get("subpixel", False))
        if c.adaptive_step is None:
            c.adaptive_step = False if official else bool(md.get("adaptive_step", False))
        if c.lambda_mask is None:
            c.lambda_mask = 20.0 if official else float(md.get("lambda_mask", 20.0))
        if c.lambda_image is None:  # not in the paper; needs the whole image every step
            c.lambda_image = 0.0 if official else float(md.get("lambda_image", 0.0))
        if c.mask_hold_steps is None:  # not in the paper
            c.mask_hold_steps = 0 if official else int(md.get("mask_hold_steps", 0))
        if c.mask_hold_anchor is None:  # not in the paper
            c.mask_hold_anchor = 0.0 if official else float(md.get("mask_hold_anchor", 0.0))
        if c.mask_feather is None:  # not in the paper (a hard edge)
            c.mask_feather = 0.0 if official else float(md.get("mask_feather", 0.0))
        for name, kind in OFF_UNLESS_SET:  # not in the paper: off, unless the model's defaults set them
            if getattr(c, name) is None:
                setattr(c, name, kind(0) if official else kind(md.get(name, 0)))
        if c.local_margin is None:
            c.local_margin = float(md.get("local_margin", 16 * res / 128))
        if c.stop_distance is None:
            paper_rule = 1.0 if num_points <= 5 else 2.0
            c.stop_distance = max(2 * res / 512, 2.0) if official else md.get("stop_distance", paper_rule)
        if c.tracking not in ("l1", "l2"):
            raise ValueError("tracking must be 'l1' or 'l2'")
        if c.w_mode not in ("w", "w+"):
            raise ValueError("w_mode must be 'w' or 'w+'")
        if (not (0 < c.lr < 1) or c.r1 <= 0 or c.r2 < 1 or c.max_steps < 0 or c.lambda_mask < 0
                or c.lambda_image < 0 or c.mask_hold_steps < 0 or c.mask_feather < 0 or c.mask_hold_anchor < 0
                or c.lost_match < 0 or c.patience < 0 or c.max_shift < 0 or c.lambda_w0 < 0 or c.lambda_local < 0 or c.local_margin < 0):
            raise ValueError("invalid drag settings: need 0 < lr < 1, r1 > 0, r2 >= 1, max_steps >= 0, lambda >= 0")
        c.num_optimized_ws = int(min(max(c.num_optimized_ws, 1), G.num_ws))
        return c


@dataclass
class PointPair:
    handle: tuple[float, float]     # current (tracked) handle position
    target: tuple[float, float]
    origin: tuple[float, float]     # where the user put the handle
    reference: torch.Tensor | None = None  # features around the handle when it was placed, [K, C]
    anchor: torch.Tensor | None = None     # the same on the motion-supervision block (mask_hold_anchor)
    match: float = 0.0                     # relative L1 distance of the last tracked match to the reference
    disc_reference: torch.Tensor | None = None  # features of the motion disc when placed (motion_anchor)


@dataclass
class StepResult:
    step: int                          # steps taken in this session (all runs)
    handles: list[tuple[float, float]]  # ints when on pixel centres
    targets: list[tuple[float, float]]
    distances: list[float]
    loss: float
    loss_motion: float
    loss_mask: float                   # keep term on the features (unweighted mean)
    done: bool
    reached: bool
    seconds: float
    image: np.ndarray | None = None    # HxWx3 uint8 when rendered this step
    message: str | None = None         # how the run ended, when not simply "arrived" (for the user)
    loss_image: float = 0.0            # keep term on the image (unweighted mean), when used
    matches: list[float] = dataclasses.field(default_factory=list)  # per handle: relative match distance
    end: str | None = None             # on the last result of a run: one of RUN_ENDS


class DragError(ValueError):
    """Invalid user input for a drag (points, mask, latent)."""


def as_point(x: float, y: float) -> tuple:
    """A point as stored: ints on pixel centres (clicks), else floats to 1/1000 px."""
    x, y = round(float(x), 3), round(float(y), 3)
    return (int(x), int(y)) if x.is_integer() and y.is_integer() else (x, y)
