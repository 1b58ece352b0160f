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
map), and, with no mask, computes F only in windows around the handles (exact, see
model/windowed.py). `compat="official"` reproduces the official implementation's choices step for step.

This module holds the session and its run loop; the settings and the records it reports are in
settings.py, the step itself (both formulations) in steps.py.

Points are (x, y) image pixel coordinates: x = column, y = row, origin top-left, pixel centres at
integers. Our formulation accepts and tracks sub-pixel points; the official one rounds them to pixels.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..model.devices import refresh_threads
from ..model.networks import Generator, to_uint8_image
from .settings import DragConfig, DragError, PointPair, StepResult, as_point
from .steps import OfficialStep, OursStep


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
    def run(self, max_steps: int | None = None, render_final: bool = True) -> Iterator[StepResult]:
        """Optimise until every handle reaches its target or max_steps; yields one result per step.

        Closing the generator (or breaking out of the loop) between steps keeps all state; calling
        run() again resumes with the same reference features and optimiser moments. The last result
        carries the exact render of the final latent, unless `render_final` is False (a caller that
        renders it elsewhere, e.g. the engine's frame renderer).
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
        engine = OfficialStep(self, cfg) if cfg.compat == "official" else OursStep(self, cfg)
        best = _BestState(self) if cfg.compat != "official" else None
        for k in range(steps + 1):
            refresh_threads()  # follow the thread share when other runs or processes start or stop
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
            last = result.done or k == steps
            if (last and render_final) or (not last and cfg.display_every and result.step % cfg.display_every == 0):
                result.image = self.render()
            yield result
            if result.done:
                return


PROGRESS_PX = 0.1  # patience counts steps since the mean tracked distance last fell by this much


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
        self.progress_score, self.progress_step = math.inf, session.step_count  # the last real progress

    def observe(self, result: StepResult, param_before: torch.Tensor, cfg: DragConfig):
        s = self.s
        lost = [i for i, m in enumerate(result.matches) if cfg.lost_match > 0 and m > cfg.lost_match]
        step_of_result = s.step_count - (1 if not result.done else 0)  # the result describes the state before the step
        score = sum(result.distances) / len(result.distances)
        shift = s.latent_shift(param_before) if cfg.max_shift > 0 else 0.0
        too_far = shift > cfg.max_shift > 0
        if score < self.progress_score - PROGRESS_PX:
            self.progress_score, self.progress_step = score, step_of_result
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
                   f"(latent moved {shift:.2f} RMS, limit {cfg.max_shift:g})")
        elif cfg.patience and step_of_result - self.progress_step >= cfg.patience:
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
