"""The DragGAN loop: point-based editing by latent optimisation, as a resumable streaming session.

One step (Pan et al. 2023, Eqs. 1-2), run on the *current* latent's features F:
  1. point tracking: each handle moves to the pixel of the r2 square around it whose feature is nearest
     (L1 in the paper, L2 in the official code) to the handle's reference feature (optionally refined
     to a quarter and then a sixteenth of a pixel: `subpixel`);
  2. motion supervision: over the disc of radius r1 around each handle that has not arrived,
     L = mean |F(q).detach() - F(q + d)| with d the unit vector towards the target, plus
     lambda * mean |(F - F0) * (1 - M)| when a mask M of the flexible region is set (a model's mask
     settings may add the same term on the image, `lambda_image`, and feather (1 - M): `keep_weights`);
  3. an Adam step on the first `num_optimized_ws` style vectors.
A handle that is within `stop_distance` of its target stops pulling; the run ends when all have.

Our default formulation samples F on its native grid with bilinear interpolation (identical to
bilinearly up-sampling F to image size and indexing it at pixel centres, without materialising that
map), and, with no mask, computes F only in windows around the handles (exact, see windowed.py).
`compat="official"` reproduces the official implementation's choices step for step.

Points are (x, y) image pixel coordinates: x = column, y = row, origin top-left, pixel centres at
integers. Our formulation accepts and tracks sub-pixel points; the official one rounds them to pixels.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .devices import fused_modconv_for
from .networks import Generator, to_uint8_image
from .windowed import features_in_window

COMPAT_MODES = ("ours", "official")
# how a run ends: every handle arrived; max steps; a handle lost its feature; the latent went too far
# from the start; no progress; rolled back
RUN_ENDS = ("arrived", "max_steps", "lost_handle", "limit", "stalled", "diverged")
# drag-default settings a model card may give a separate value for edits with several points
MULTI_POINT_SETTINGS = ("lr", "r1")


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
        defaults) replace its other defaults where they name the same setting.
        """
        res = G.img_resolution
        md = dict(model_defaults or {})
        mask_md = md.pop("mask", None)
        c = dataclasses.replace(self)
        if c.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}")
        official = c.compat == "official"
        if masked and isinstance(mask_md, dict):
            md.update(mask_md)
            for key in mask_md:  # a mask setting wins over the several-point value of the same setting
                md.pop(f"{key}_multi_point", None)
        if num_points > 1:  # a model card may recommend other values when several handles must settle together
            md.update({key: md[f"{key}_multi_point"] for key in MULTI_POINT_SETTINGS if f"{key}_multi_point" in md})
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
        if c.lost_match is None:
            c.lost_match = 0.0 if official else float(md.get("lost_match", 0.0))
        if c.patience is None:
            c.patience = 0 if official else int(md.get("patience", 0))
        if c.max_shift is None:
            c.max_shift = 0.0 if official else float(md.get("max_shift", 0.0))
        if c.lambda_w0 is None:
            c.lambda_w0 = 0.0 if official else float(md.get("lambda_w0", 0.0))
        if c.lambda_local is None:
            c.lambda_local = 0.0 if official else float(md.get("lambda_local", 0.0))
        if c.motion_anchor is None:
            c.motion_anchor = 0.0 if official else float(md.get("motion_anchor", 0.0))
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


class DragSession:
    """State of one user's edit: latents, point pairs, mask, optimiser. Holds G by reference."""

    def __init__(self, G: Generator, w_init: torch.Tensor, config: DragConfig | None = None,
                 model_defaults: dict | None = None):
        if w_init.ndim == 2:
            w_init = w_init.unsqueeze(0)
        if tuple(w_init.shape) != (1, G.num_ws, G.w_dim):
            raise DragError(f"latent must have shape (1, {G.num_ws}, {G.w_dim}), got {tuple(w_init.shape)}")
        if not torch.isfinite(w_init).all():
            raise DragError("latent contains NaN or infinite values")
        self.G = G
        self.device = next(G.parameters()).device
        self.model_defaults = dict(model_defaults or {})
        self.config = config or DragConfig()
        self.w_initial = w_init.detach().to(self.device, torch.float32).clone()
        self.pairs: list[PointPair] = []
        self.mask: torch.Tensor | None = None  # [S, S] float, 1 = may change
        self.mask_message: str | None = None   # why the mask given was not used as given
        self.step_count = 0
        self._reference_key = None  # (compat, track_res, track_patch) the references were taken with
        self._reset_latent()

    # ------------------------------------------------------------------ editing state
    @property
    def resolution(self) -> int:
        return self.G.img_resolution

    @property
    def latent(self) -> torch.Tensor:
        """Current W+ latent [1, num_ws, w_dim] (detached copy)."""
        with torch.no_grad():
            return self._ws().detach().clone()

    def _reset_latent(self, w: torch.Tensor | None = None):
        self._w_full = (self.w_initial if w is None else w).clone()
        self._param = None        # created at run start (depends on w_mode / num_optimized_ws)
        self._opt = None
        self._mask_reference = None
        self._mask_reference_image = None
        self._param_layout = None

    def set_latent(self, w: torch.Tensor):
        """Start a new edit from latent w (points are kept, references recomputed)."""
        session = DragSession(self.G, w)  # validates
        self.w_initial = session.w_initial
        self._reset_latent()
        for p in self.pairs:
            p.reference = None
        self.step_count = 0

    def check_point(self, point, name="point") -> tuple[float, float]:
        if isinstance(point, (str, bytes)):  # "12" would otherwise iterate to (1, 2)
            raise DragError(f"{name} must be two numbers (x, y), got {point!r}")
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            raise DragError(f"{name} must be two numbers (x, y), got {point!r}") from None
        s = self.resolution
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DragError(f"{name} ({x}, {y}) is not finite")
        if not (-0.5 <= x <= s - 0.5 and -0.5 <= y <= s - 0.5):
            raise DragError(f"{name} ({x:g}, {y:g}) is outside the {s}x{s} image")
        return as_point(x, y)

    def add_pair(self, handle, target, max_pairs: int = 128) -> int:
        if len(self.pairs) >= max_pairs:
            raise DragError(f"at most {max_pairs} point pairs")
        h = self.check_point(handle, "handle")
        t = self.check_point(target, "target")
        self.pairs.append(PointPair(handle=h, target=t, origin=h))
        return len(self.pairs) - 1

    def remove_pair(self, index: int):
        if not 0 <= index < len(self.pairs):
            raise DragError(f"no point pair {index}")
        del self.pairs[index]

    def undo_pair(self):
        if self.pairs:
            self.pairs.pop()

    def clear_pairs(self):
        self.pairs.clear()

    def set_mask(self, mask: np.ndarray | torch.Tensor | None):
        """mask: HxW (any size; resized), nonzero/1 = flexible region; None clears it.

        A mask with nothing flexible is ignored (no handle could move; the whole image may change)
        and one with nothing fixed changes nothing (the edit runs as without a mask); both set
        `mask_message` to say so.
        """
        self._mask_reference = None
        self._mask_reference_image = None
        self.mask_message = None
        if mask is None:
            self.mask = None
            return
        try:
            m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        except (TypeError, ValueError):
            raise DragError(f"mask must be a numeric 2-D array, got {type(mask).__name__}") from None
        if m.ndim != 2 or min(m.shape) < 1 or not torch.isfinite(m).all():
            raise DragError(f"mask must be a finite 2-D array, got shape {tuple(m.shape)}")
        m = m.clamp(0, 1)
        s = self.resolution
        if m.shape != (s, s):
            m = F.interpolate(m[None, None], size=(s, s), mode="area" if m.shape[0] >= s else "nearest")[0, 0]
        self.mask = m.to(self.device) if m.max() > 0 else None
        if self.mask is None:
            self.mask_message = ("the mask fixes the whole image, so no handle could move: it is ignored and the "
                                 "whole image may change; paint the region that may change (or clear the mask)")
        elif not self.mask_active:
            self.mask_message = "the mask lets the whole image change: the edit runs as without a mask"

    @property
    def mask_active(self) -> bool:
        """A mask is set and fixes some of the image (an all-flexible mask constrains nothing)."""
        return self.mask is not None and bool((self.mask < 1).any())

    def mask_warnings(self) -> list[str]:
        """Points the mask works against: a handle or target in the fixed region cannot move freely."""
        if not self.mask_active:
            return []
        out = []
        m = self.mask.detach().cpu()
        s = self.resolution
        for i, p in enumerate(self.pairs):
            for name, (x, y) in (("handle", p.handle), ("target", p.target)):
                col, row = min(max(round(x), 0), s - 1), min(max(round(y), 0), s - 1)
                if m[row, col] < 0.5:
                    out.append(f"point pair {i + 1}: the {name} is in the fixed region; the mask will hold it back")
        return out

    def reset(self):
        """Back to the initial latent; handles back to where the user placed them."""
        self._reset_latent()
        for p in self.pairs:
            p.handle = p.origin
        self.step_count = 0

    # ------------------------------------------------------------------ generator access
    def _ws(self) -> torch.Tensor:
        if self._param is None:
            return self._w_full
        n, mode = self._param_layout
        head = self._param.expand(-1, n, -1) if mode == "w" else self._param
        return torch.cat([head, self._w_full[:, n:]], dim=1)

    def _prepare(self, cfg: DragConfig):
        layout = (cfg.num_optimized_ws, cfg.w_mode)
        if self._param is None or self._param_layout != layout:
            self._w_full = self._ws().detach().clone()
            n = cfg.num_optimized_ws
            init = self._w_full[:, :1] if cfg.w_mode == "w" else self._w_full[:, :n]
            self._param = init.clone().requires_grad_(True)
            self._param_layout = layout
            self._opt = torch.optim.Adam([self._param], lr=cfg.lr)
        for group in self._opt.param_groups:
            group["lr"] = cfg.lr

    def latent_shift(self, param: torch.Tensor | None = None) -> float:
        """RMS distance over W+ between the latent (with `param` as its optimised head) and the start."""
        if self._param is None:
            return float((self._w_full - self.w_initial).square().mean().sqrt())
        n, mode = self._param_layout
        head = (self._param if param is None else param).detach()
        squares = (head - self._start_param()).square().sum() * (n if mode == "w" else 1)
        squares = squares + (self._w_full[:, n:] - self.w_initial[:, n:]).square().sum()
        return float((squares / self.w_initial.numel()).sqrt())

    def _start_param(self) -> torch.Tensor:
        """The initial latent in the optimised parameter's layout."""
        n, mode = self._param_layout
        return self.w_initial[:, :1] if mode == "w" else self.w_initial[:, :n]

    def _rollback(self, good_param: torch.Tensor, good_handles, cfg: DragConfig):
        """Restore the last finite latent and handles; Adam's moments may be poisoned: start fresh."""
        with torch.no_grad():
            self._param.copy_(good_param)
        self._opt = torch.optim.Adam([self._param], lr=cfg.lr)
        for p, h in zip(self.pairs, good_handles):
            p.handle = h
        self.step_count = max(self.step_count - 1, 0)

    def render(self, ws: torch.Tensor | None = None) -> np.ndarray:
        with torch.no_grad():
            img = self.G.synthesis(self._ws() if ws is None else ws, noise_mode=self.config.noise_mode)
        return to_uint8_image(img)

    # ------------------------------------------------------------------ the loop
    def run(self, max_steps: int | None = None) -> Iterator[StepResult]:
        """Optimise until every handle reaches its target or max_steps; yields one result per step.

        Closing the generator (or breaking out of the loop) between steps keeps all state; calling
        run() again resumes with the same reference features and optimiser moments.
        """
        if not self.pairs:
            raise DragError("add at least one handle/target pair first")
        cfg = self.config.resolve(self.G, len(self.pairs), self.model_defaults, masked=self.mask_active)
        steps = cfg.max_steps if max_steps is None else max_steps
        self._prepare(cfg)
        key = (cfg.compat, cfg.track_res, cfg.track_patch)
        if self._reference_key not in (None, key):  # references from another block/shape: retake
            for p in self.pairs:
                p.reference = None
        self._reference_key = key
        engine = _OfficialEngine(self, cfg) if cfg.compat == "official" else _Engine(self, cfg)
        best = _BestState(self) if cfg.compat != "official" else None
        for k in range(steps + 1):
            t0 = time.perf_counter()
            good_param = self._param.detach().clone()
            good_handles = [p.handle for p in self.pairs]
            result = engine.step(optimise=k < steps)
            result.seconds = time.perf_counter() - t0
            if not (math.isfinite(result.loss) and torch.isfinite(self._param).all()
                    and self._param.abs().max() < MAX_LATENT_ABS):
                self._rollback(good_param, good_handles, cfg)
                result.handles = good_handles
                result.distances = [math.dist(p.handle, p.target) for p in self.pairs]
                result.done, result.reached, result.end = True, False, "diverged"
                result.message = (f"the optimisation diverged (non-finite or huge values) at step {self.step_count}; "
                                  "rolled back to the last good latent - try a smaller learning rate")
            elif best is not None:
                best.observe(result, good_param, cfg)
            if result.done and result.end is None:
                result.end = "arrived" if result.reached else "max_steps"
            if result.done or k == steps or (cfg.display_every and result.step % cfg.display_every == 0):
                result.image = self.render()
            yield result
            if result.done:
                return


class _BestState:
    """Watches a run of our engine: remembers the best state (smallest mean tracked distance while
    every handle still matched its feature) and ends the run there when a handle has lost its
    feature (`lost_match`) or when nothing improved for `patience` steps.

    A result's handles and distances describe the latent *before* that step's update (tracking runs
    on the current features first), so the state kept with them is the parameter before the step.
    """

    def __init__(self, session: DragSession):
        self.s = session
        self.score = math.inf
        self.param = self.handles = self.distances = None
        self.step = session.step_count

    def observe(self, result: StepResult, param_before: torch.Tensor, cfg: DragConfig):
        s = self.s
        lost = [i for i, m in enumerate(result.matches) if cfg.lost_match > 0 and m > cfg.lost_match]
        step_of_result = s.step_count - (1 if not result.done else 0)  # the result describes the state before the step
        score = sum(result.distances) / len(result.distances)
        too_far = cfg.max_shift > 0 and s.latent_shift(param_before) > cfg.max_shift
        if not lost and not too_far and score < self.score - 1e-6:
            self.score, self.param, self.step = score, param_before, step_of_result
            self.handles, self.distances = list(result.handles), list(result.distances)
        if result.done and result.reached and not too_far:  # arrived: this very state is the result
            return
        if lost:
            end = "lost_handle"
            who = "the handle" if len(result.distances) == 1 else \
                "handle " + " and ".join(str(i + 1) for i in lost)
            why = f"{who} stopped following {'its feature' if len(lost) == 1 else 'their features'} at step {step_of_result}"
        elif too_far:
            end = "limit"
            why = (f"the edit reached the limit of what the model draws well at step {step_of_result} "
                   f"(latent moved {s.latent_shift(param_before):.2f} RMS, limit {cfg.max_shift:g})")
        elif cfg.patience and step_of_result - self.step >= cfg.patience:
            end, why = "stalled", f"no handle came closer for {cfg.patience} steps (step {step_of_result})"
        else:  # max steps is a pause, not an end: Start goes on from here as if it had never stopped
            return
        kept = "kept this result"
        if self.param is not None:  # (also undoes this step's update when the best is the state before it)
            self.restore()
            if self.step != step_of_result:
                kept = f"kept the best result (step {self.step})"
        result.handles, result.distances = [p.handle for p in s.pairs], [math.dist(p.handle, p.target) for p in s.pairs]
        result.done, result.reached, result.end = True, False, end
        result.step = s.step_count
        result.message = f"{why}: {kept}; distances " + ", ".join(f"{d:.1f}" for d in result.distances) + " px"

    def restore(self):
        s = self.s
        with torch.no_grad():
            s._param.copy_(self.param)
        s._opt = torch.optim.Adam([s._param], lr=s._opt.param_groups[0]["lr"])  # moments of a later state
        for p, h in zip(s.pairs, self.handles):
            p.handle = h
        s.step_count = self.step


MAX_LATENT_ABS = 1e4


def paste_fixed_region(edited: np.ndarray, original: np.ndarray, flexible: np.ndarray) -> np.ndarray:
    """Export helper, *not* how the mask works: the edited pixels inside the flexible region, the
    original pixels elsewhere (a soft mask blends). The result is no longer an image the generator
    made (seams are possible); the edit itself (G(w)) keeps the fixed region through its loss."""
    edited, original = np.asarray(edited), np.asarray(original)
    m = np.asarray(flexible, np.float32)
    if edited.shape != original.shape or edited.ndim != 3 or m.shape != edited.shape[:2]:
        raise ValueError(f"need HxWx3 images and an HxW mask of the same size, got {edited.shape}, "
                         f"{original.shape}, {m.shape}")
    m = np.clip(m, 0, 1)[..., None]
    out = edited.astype(np.float32) * m + original.astype(np.float32) * (1 - m)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def as_point(x: float, y: float) -> tuple:
    """A point as stored: ints on pixel centres (clicks), else floats to 1/1000 px."""
    x, y = round(float(x), 3), round(float(y), 3)
    return (int(x), int(y)) if x.is_integer() and y.is_integer() else (x, y)


def _pixel_to_feature(coord: torch.Tensor, image_res: int, feature_res: int) -> torch.Tensor:
    """Image pixel-centre coordinates -> feature-map coordinates (align_corners=False convention)."""
    return (coord + 0.5) * (feature_res / image_res) - 0.5


def keep_weights(mask: torch.Tensor, feather: float) -> torch.Tensor:
    """Weight of the keep terms per pixel of an [S, S] mask (1 = flexible): 1 - mask, or with
    `feather` = n > 0 a ramp outside the flexible region, k / (n + 1) at k px from its edge
    (Chebyshev distance), 1 from n + 1 px on.

    A generator changes images smoothly, so a hard edge makes the pixels just outside the region
    fight every move of the content inside it; the ramp lets them follow a little.
    """
    n = int(round(feather))
    if n <= 0:
        return 1 - mask
    grown, covered = mask[None, None], mask.clone()
    for _ in range(n):  # the mask grown by 1, 2, ... n px: a pixel k px away is covered n - k + 1 times
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        covered = covered + grown[0, 0]
    return (1 - covered / (n + 1)).clamp(0, 1)


def local_keep_weights(pairs, resolution: int, margin: float, feature_shape) -> torch.Tensor:
    """Keep weights of the local term on the feature grid [1, 1, h, w]: 0 within |t - o| / 2 + margin
    of each pair's midpoint (o: where the handle was placed), ramping to 1 over another margin px."""
    yy, xx = torch.meshgrid(torch.arange(resolution, dtype=torch.float32),
                            torch.arange(resolution, dtype=torch.float32), indexing="ij")
    free = torch.full((resolution, resolution), math.inf)
    for p in pairs:  # distance outside each pair's free disc
        (ox, oy), (tx, ty) = p.origin, p.target
        cx, cy, r = (ox + tx) / 2, (oy + ty) / 2, math.dist((ox, oy), (tx, ty)) / 2 + margin
        free = torch.minimum(free, ((xx - cx).square() + (yy - cy).square()).sqrt() - r)
    keep = (free / max(margin, 1e-6)).clamp(0, 1)
    device = pairs[0].reference.device if pairs and pairs[0].reference is not None else "cpu"
    return F.interpolate(keep[None, None], size=tuple(feature_shape), mode="area").to(device)


def disc_offsets(r1: float) -> torch.Tensor:
    """Integer (dx, dy) with dx^2 + dy^2 < r1^2: the disc on pixel centres around a handle."""
    r = int(math.ceil(r1))
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = dx.square() + dy.square() < r1 * r1
    return torch.stack([dx[keep], dy[keep]], dim=1)  # [K, 2] as (x, y)


def _optimise_and_report(s: DragSession, cfg: DragConfig, distances, done: bool, loss_motion: torch.Tensor,
                         loss_mask: torch.Tensor, optimise: bool, loss_image: torch.Tensor | None = None,
                         arrived: bool | None = None) -> StepResult:
    """The part of a step both engines share: the Adam step on the latent, then the step's result."""
    loss = loss_motion + cfg.lambda_mask * loss_mask
    if loss_image is not None:
        loss = loss + cfg.lambda_image * loss_image
    if cfg.lambda_w0 > 0:  # stay near the face the edit started from
        loss = loss + cfg.lambda_w0 * (s._param - s._start_param()).square().mean()
    if optimise and not done:
        s._opt.zero_grad(set_to_none=True)
        loss.backward()
        s._opt.step()
        s.step_count += 1
    return StepResult(step=s.step_count, handles=[p.handle for p in s.pairs], targets=[p.target for p in s.pairs],
                      distances=distances, loss=loss.detach().item(), loss_motion=loss_motion.detach().item(),
                      loss_mask=loss_mask.detach().item(), done=done or not optimise,
                      reached=done if arrived is None else arrived, seconds=0.0,
                      loss_image=0.0 if loss_image is None else loss_image.detach().item(),
                      matches=[p.match for p in s.pairs])


class _FeatureWindow:
    """Features of a window of the feature map, sampled at image pixel coordinates."""

    def __init__(self, feat: torch.Tensor, window, image_res: int, feature_res: int):
        self.feat, self.window = feat, window  # feat [1, C, h, w] covers window (y0, y1, x0, x1)
        self.image_res, self.feature_res = image_res, feature_res

    def sample(self, xy: torch.Tensor) -> torch.Tensor:
        """Bilinear features at image coordinates xy [K, 2] (x, y) -> [K, C]; border-clamped."""
        y0, y1, x0, x1 = self.window
        uv = _pixel_to_feature(xy, self.image_res, self.feature_res).clamp(0, self.feature_res - 1)
        u = uv[:, 0] - x0
        v = uv[:, 1] - y0
        w, h = x1 - x0, y1 - y0
        assert (u >= 0).all() and (u <= w - 1).all() and (v >= 0).all() and (v <= h - 1).all(), \
            "sample outside the computed feature window"
        gx = 2 * u / max(w - 1, 1) - 1
        gy = 2 * v / max(h - 1, 1) - 1
        grid = torch.stack([gx, gy], dim=1).reshape(1, 1, -1, 2).to(self.feat.dtype)
        return F.grid_sample(self.feat, grid, mode="bilinear", align_corners=True)[0, :, 0].t()


def merged_windows(centres, margin: int, size: int):
    """Square image windows of half-size `margin` around centres, clipped, overlapping ones merged.

    Returns (windows, members): windows as [y0, y1, x0, x1]; members[j] lists the centres in window j.
    """
    windows: list[list[int]] = []
    members: list[list[int]] = []
    for i, (x, y) in enumerate(centres):
        b = [max(math.floor(y) - margin, 0), min(math.ceil(y) + margin + 1, size),
             max(math.floor(x) - margin, 0), min(math.ceil(x) + margin + 1, size)]
        for j, m in enumerate(windows):
            if b[0] < m[1] and m[0] < b[1] and b[2] < m[3] and m[2] < b[3]:
                windows[j] = [min(b[0], m[0]), max(b[1], m[1]), min(b[2], m[2]), max(b[3], m[3])]
                members[j].append(i)
                break
        else:
            windows.append(b)
            members.append([i])
    return windows, members


def feature_window_for(image_window, image_res: int, feature_res: int):
    """Feature-map window holding every bilinear neighbour of the image window's pixel centres."""
    y0, y1, x0, x1 = image_window
    lo = lambda v: max(math.floor((v + 0.5) * feature_res / image_res - 0.5), 0)  # noqa: E731
    hi = lambda v: min(math.ceil((v + 0.5) * feature_res / image_res - 0.5) + 2, feature_res)  # noqa: E731
    return lo(y0), hi(y1 - 1), lo(x0), hi(x1 - 1)


def windowed_features(G: Generator, cfg: DragConfig, ws, centres, margin: int, full: bool):
    """One _FeatureWindow per centre covering image pixels within `margin` of it (None: full map).

    With `full` (a mask needs the whole map), when windows would cover most of the map, or when the
    network cannot be cropped exactly, the whole feature map is computed instead.
    Returns (per-centre feature windows, per-centre image windows, full feature map or None).
    """
    fr, res = cfg.feature_res, G.img_resolution
    if not full and cfg.windowed and G.cfg.architecture == "skip" and cfg.noise_mode != "random":
        image_wins, members = merged_windows(centres, margin, res)
        feat_wins = [feature_window_for(w, res, fr) for w in image_wins]
        area = sum((b[1] - b[0]) * (b[3] - b[2]) for b in feat_wins)
        if area < 0.6 * fr * fr:
            out_f, out_i = [None] * len(centres), [None] * len(centres)
            for fwin, iwin, idx in zip(feat_wins, image_wins, members):
                feat = features_in_window(G.synthesis, ws, fr, fwin, cfg.noise_mode, fused=fused_modconv_for(G))
                fw = _FeatureWindow(feat, fwin, res, fr)
                for i in idx:
                    out_f[i], out_i[i] = fw, tuple(iwin)
            return out_f, out_i, None
    _, feat = G.synthesis(ws, noise_mode=cfg.noise_mode, feature_res=fr, stop_at_feature=True, fused=fused_modconv_for(G))
    fw = _FeatureWindow(feat, (0, fr, 0, fr), res, fr)
    return [fw] * len(centres), [(0, res, 0, res)] * len(centres), feat


class _Engine:
    """Our formulation: native-grid bilinear features, windowed computation when possible."""

    def __init__(self, session: DragSession, cfg: DragConfig):
        self.s, self.cfg = session, cfg
        self.G = session.G
        self.res = session.resolution
        self.offsets = disc_offsets(cfg.r1).to(session.device)
        r2 = int(cfg.r2)
        d = torch.arange(-r2, r2 + 1, dtype=torch.float32, device=session.device)
        gy, gx = torch.meshgrid(d, d, indexing="ij")
        self.square = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # row-major (y, then x)
        k = int(cfg.track_patch)
        d = torch.arange(-k, k + 1, dtype=torch.float32, device=session.device)
        py, px = torch.meshgrid(d, d, indexing="ij")
        self.patch = torch.stack([px.reshape(-1), py.reshape(-1)], dim=1)  # [K, 2]; K = 1 for the paper
        f = torch.linspace(-0.5, 0.5, 5, device=session.device)
        fy, fx = torch.meshgrid(f, f, indexing="ij")
        self.fine = torch.stack([fx.reshape(-1), fy.reshape(-1)], dim=1)  # quarter-pixel offsets, [25, 2]
        # tracking square (and its patches), then the disc (plus one step) around any pixel of it
        self.margin = int(cfg.r2) + max(math.ceil(cfg.r1) + 1, k)
        self.held = 0  # steps taken after every handle arrived (mask_hold_steps)
        self._keep = None  # (mask, its keep weights): the mask cannot change during a run
        self._local_keep = None  # keep weights of the local term, on the feature grid

    def features(self, ws, centres, full: bool, image: bool = False):
        """(feature windows per centre, full feature map or None, image or None).

        The image is computed only when the mask is also compared on it (`lambda_image`): that needs
        the whole generator every step instead of stopping at the feature block.
        """
        if full and image and self.cfg.lambda_image > 0:
            fr = self.cfg.feature_res
            img, feat = self.G.synthesis(ws, noise_mode=self.cfg.noise_mode, feature_res=fr, fused=False)
            return [_FeatureWindow(feat, (0, fr, 0, fr), self.res, fr)] * len(centres), feat, img
        wins, _, feat = windowed_features(self.G, self.cfg, ws, centres, self.margin, full)
        return wins, feat, None

    @torch.no_grad()
    def tracking_features(self, ws, centres, wins):
        """Feature windows for point tracking: the motion-supervision ones unless track_res differs."""
        if self.cfg.track_res == self.cfg.feature_res:
            return wins
        cfg = dataclasses.replace(self.cfg, feature_res=self.cfg.track_res)
        return windowed_features(self.G, cfg, ws.detach(), centres, self.margin, full=False)[0]

    def _nearest(self, fw: "_FeatureWindow", reference: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The candidate point [2] whose (patch) features are nearest to the reference, and how far
        they are from it relative to the reference's own size (0: the feature itself)."""
        cand = cand[((cand >= 0) & (cand <= self.res - 1)).all(dim=1)]
        feats = fw.sample((cand[:, None] + self.patch[None]).reshape(-1, 2)).reshape(len(cand), len(self.patch), -1)
        diff = feats - reference[None]
        if self.cfg.tracking == "l1":
            dist, size = diff.abs().sum(dim=(1, 2)), reference.abs().sum()
        else:
            dist, size = diff.square().sum(dim=(1, 2)), reference.square().sum()
        best = int(torch.argmin(dist))
        return cand[best], float(dist[best] / size.clamp_min(1e-12))

    # --- one step
    def step(self, optimise: bool) -> StepResult:
        s, cfg, device = self.s, self.cfg, self.s.device
        pairs = s.pairs
        masked = s.mask_active and (cfg.lambda_mask > 0 or cfg.lambda_image > 0)
        local = not masked and cfg.lambda_local > 0  # the automatic region around the points
        ws = s._ws()
        # references for newly placed handles and for the mask term, from the current latent (new
        # points start a new edit: the local term then keeps the image as it is now)
        need_ref = [p for p in pairs if p.reference is None]
        need_mask_ref = (masked and (s._mask_reference is None
                                     or (cfg.lambda_image > 0 and s._mask_reference_image is None))
                         or local and (s._mask_reference is None or bool(need_ref)))
        if need_ref or need_mask_ref:
            with torch.no_grad():
                centres = [p.handle for p in need_ref] or [(0, 0)]
                wins, full_feat, image = self.features(ws.detach(), centres, full=masked or local, image=masked)
                for p, fw, mw in zip(need_ref, self.tracking_features(ws, centres, wins), wins):
                    at = torch.tensor(p.handle, dtype=torch.float32, device=device) + self.patch
                    p.reference = fw.sample(at)
                    p.anchor = mw.sample(at)
                    p.disc_reference = mw.sample(torch.tensor(p.handle, dtype=torch.float32, device=device) + self.offsets)
                if masked or local:
                    s._mask_reference = full_feat.detach()
                    s._mask_reference_image = None if image is None else image.detach()
        wins, full_feat, image = self.features(ws, [p.handle for p in pairs], full=masked or local, image=masked)

        # 1. point tracking on this step's features
        with torch.no_grad():
            for p, fw in zip(pairs, self.tracking_features(ws, [p.handle for p in pairs], wins)):
                centre = torch.tensor(p.handle, dtype=torch.float32, device=device)
                best, p.match = self._nearest(fw, p.reference, centre + self.square)
                if cfg.subpixel:  # two finer searches around the best pixel: 1/4 px, then 1/16 px
                    best, p.match = self._nearest(fw, p.reference, best + self.fine)
                    best, p.match = self._nearest(fw, p.reference, best + self.fine / 4)
                p.handle = as_point(best[0], best[1])

        distances = [math.dist(p.handle, p.target) for p in pairs]
        active = [d > cfg.stop_distance for d in distances]
        arrived = done = not any(active)
        holding = done and masked and self.held < cfg.mask_hold_steps
        loss_motion = torch.zeros((), device=device)
        if holding:
            # every handle is there: the keep terms pull the rest of the image back, while the
            # anchor holds each handle's first features at its target (a handle that drifts off
            # its target is pulled again by motion supervision)
            self.held += 1
            done = False
            if cfg.mask_hold_anchor > 0:
                for p, fw in zip(pairs, wins):
                    if p.anchor is None:  # a state from before anchors were kept: hold without one
                        continue
                    here = fw.sample(torch.tensor(p.target, dtype=torch.float32, device=device) + self.patch)
                    loss_motion = loss_motion + cfg.mask_hold_anchor * (here - p.anchor).abs().mean()
        for p, fw, act, dist in zip(pairs, wins, active, distances):
            if not act:
                continue
            centre = torch.tensor(p.handle, dtype=torch.float32, device=device)
            q = centre + self.offsets
            inside = ((q >= 0) & (q <= self.res - 1)).all(dim=1)
            q = q[inside]
            step = min(dist, 1.0) if cfg.adaptive_step else 1.0  # a full pixel overshoots a closer target
            direction = (torch.tensor(p.target, dtype=torch.float32, device=device) - centre) * (step / dist)
            goal = fw.sample(q).detach()
            if cfg.motion_anchor > 0 and p.disc_reference is not None:
                goal = (1 - cfg.motion_anchor) * goal + cfg.motion_anchor * p.disc_reference[inside]
            loss_motion = loss_motion + (goal - fw.sample(q + direction)).abs().mean()
        loss_mask = torch.zeros((), device=device)
        loss_image = None
        if masked:
            if self._keep is None or self._keep[0] is not s.mask:
                self._keep = (s.mask, keep_weights(s.mask, cfg.mask_feather))
            keep = self._keep[1]
            keep_feat = F.interpolate(keep[None, None], size=full_feat.shape[-2:], mode="area")
            loss_mask = ((full_feat - s._mask_reference).abs() * keep_feat).mean()
            if image is not None:
                loss_image = ((image - s._mask_reference_image).abs() * keep).mean()
        if local:
            if self._local_keep is None:  # the points cannot change during a run
                self._local_keep = local_keep_weights(pairs, self.res, cfg.local_margin, full_feat.shape[-2:])
            loss_motion = loss_motion + cfg.lambda_local * ((full_feat - s._mask_reference).abs() * self._local_keep).mean()
        return _optimise_and_report(s, cfg, distances, done, loss_motion, loss_mask, optimise, loss_image, arrived)


class _OfficialEngine:
    """The official implementation's choices: features bilinearly up-sampled to image size, L2
    tracking on integer pixels, disc from a linspace grid, mean-L1 losses, its stop rule.

    Without a mask the up-sampled map is only built in tiles around the handles (from windowed
    features); the numbers are those of the full map, up to float rounding.
    """

    def __init__(self, session: DragSession, cfg: DragConfig):
        self.s, self.cfg = session, cfg
        for p in session.pairs:  # the official code works on integer pixels
            p.handle, p.target, p.origin = (tuple(round(v) for v in q) for q in (p.handle, p.target, p.origin))
        res = session.resolution
        grid = torch.linspace(0, res, res, device=session.device)  # sic: spacing res/(res-1)
        self.rows, self.cols = torch.meshgrid(grid, grid, indexing="ij")
        # tracking square + drifted disc (< r1 + 1) + one step + bilinear neighbour
        self.margin = int(cfg.r2) + math.ceil(cfg.r1) + 3

    def _tiles(self, ws, centres, full: bool):
        """Per centre: (up-sampled features [C, h, w], image window (y0, y1, x0, x1)); and the full map."""
        res = self.s.resolution
        wins, image_wins, feat = windowed_features(self.s.G, self.cfg, ws, centres, self.margin, full)
        if feat is not None:
            up = F.interpolate(feat, size=(res, res), mode="bilinear", align_corners=False)
            return [(up[0], (0, res, 0, res))] * len(centres), up
        tiles, built = [], {}
        for fw, (y0, y1, x0, x1) in zip(wins, image_wins):
            if id(fw) not in built:
                ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32, device=ws.device),
                                        torch.arange(x0, x1, dtype=torch.float32, device=ws.device), indexing="ij")
                xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
                built[id(fw)] = fw.sample(xy).t().reshape(-1, y1 - y0, x1 - x0)
            tiles.append((built[id(fw)], (y0, y1, x0, x1)))
        return tiles, None

    def step(self, optimise: bool) -> StepResult:
        s, cfg, res = self.s, self.cfg, self.s.resolution
        pairs = s.pairs
        masked = s.mask_active and (cfg.lambda_mask > 0 or cfg.lambda_image > 0)
        need_ref = [p for p in pairs if p.reference is None]
        if need_ref or (masked and s._mask_reference is None):
            with torch.no_grad():
                tiles, full = self._tiles(s._ws().detach(), [p.handle for p in need_ref] or [(0, 0)], masked)
                for p, (tile, (y0, _, x0, _)) in zip(need_ref, tiles):
                    p.reference = tile[:, p.handle[1] - y0, p.handle[0] - x0].clone()
                if masked:
                    s._mask_reference = full
        tiles, full = self._tiles(s._ws(), [p.handle for p in pairs], masked)
        r2 = int(cfg.r2)
        with torch.no_grad():
            for p, (tile, (y0, _, x0, _)) in zip(pairs, tiles):
                x, y = p.handle
                top, bottom, left, right = max(y - r2, 0), min(y + r2 + 1, res), max(x - r2, 0), min(x + r2 + 1, res)
                patch = tile[:, top - y0:bottom - y0, left - x0:right - x0]
                dist = torch.linalg.norm(patch - p.reference[:, None, None], dim=0)
                idx = int(torch.argmin(dist.reshape(-1)))
                w = right - left
                p.handle = (idx % w + left, idx // w + top)
        distances = [math.dist(p.handle, p.target) for p in pairs]
        done = all(d <= cfg.stop_distance for d in distances)
        loss_motion = torch.zeros((), device=s.device)
        for p, dist, (tile, (y0, y1, x0, x1)) in zip(pairs, distances, tiles):
            if dist <= 1:
                continue
            x, y = p.handle
            dx, dy = (p.target[0] - x) / (dist + 1e-7), (p.target[1] - y) / (dist + 1e-7)
            rows, cols = torch.where(((self.rows - y) ** 2 + (self.cols - x) ** 2).sqrt() < cfg.r1)
            rows, cols = rows - y0, cols - x0  # tile coordinates
            gy = (rows + dy) / (y1 - y0 - 1) * 2 - 1
            gx = (cols + dx) / (x1 - x0 - 1) * 2 - 1
            grid = torch.stack([gx, gy], dim=-1).reshape(1, 1, -1, 2)
            moved = F.grid_sample(tile[None], grid, align_corners=True)[0, :, 0]  # zero outside the image
            loss_motion = loss_motion + F.l1_loss(tile[:, rows, cols].detach(), moved)
        loss_mask = torch.zeros((), device=s.device)
        if masked:
            keep = 1 - s.mask
            loss_mask = F.l1_loss(full * keep, s._mask_reference * keep)
        return _optimise_and_report(s, cfg, distances, done, loss_motion, loss_mask, optimise)
