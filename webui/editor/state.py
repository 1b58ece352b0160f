"""Per-browser-session editing state behind the web UI (no gradio here).

One `EditorState` per browser session (kept in a `gr.State`, created lazily by the handlers). It
holds only small things: latents, point pairs, the mask, the run history and its frames, and the
`DragSession` -- which refers to the shared Generator by reference. The Generator itself lives in
the process-wide `webui.services.STORE` and is never copied.

Every user-facing failure raises `UIError` (a one-line message); the gradio layer turns it into a
warning toast and leaves the state as it was. Running (`webui.editor.running`) and files out
(`webui.editor.exports`) are mixins of the same class.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from draggan_core.edit.recipe import EditRecorder
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig, DragError
from draggan_core.model.latents import MAX_SEED, LatentError, load_latent, seed_to_w

from ..services import UIError, load_model
from . import render
from .exports import ExportMixin
from .history import Marks, snapshot
from .render import EDITOR_SIZE, fmt_point, upscale_factor
from .running import RunMixin

MAX_POINT_PAIRS = 32
INITIAL_LATENT = "initial_latent.npy"  # a recipe's start when it is not a seed (saved next to it)


@dataclass
class EditorState(RunMixin, ExportMixin):
    model_path: str
    seed: int = 0
    psi: float = 0.7
    latent_source: str = "seed"                # "seed" or the uploaded file's name
    session: DragSession | None = None
    pending: tuple[int, int] | None = None     # a handle clicked, waiting for its target
    show_mask: bool = True
    pixels: bool = False                        # show model pixels as squares (nearest up-scale)
    mask_paint_fixed: bool = False              # the brush painted the fixed region (mask = the rest)
    mask_layer: np.ndarray | None = None        # the mask as painted (editor pixels, bool), while it is current
    _cancel_run: bool = False                   # the streaming caller went away (gradio's cancel)
    image: np.ndarray | None = None             # current image at model resolution
    frames: list = field(default_factory=list)  # the current run's trajectory frames
    start_frame: np.ndarray | None = None       # the new image's first frame
    start_w: torch.Tensor | None = None         # the new image's latent (CPU): history step 0
    history: list = field(default_factory=list)  # HistoryStep per finished or stopped run
    cursor: int = 0                             # runs applied: 0 = the new image, len(history) = the newest
    cleared: Marks | None = None                # points and mask a new image cleared (restore_cleared)
    just_cleared: bool = False                  # the last new image cleared something
    running: bool = False
    stop_requested: bool = False
    last_status: str = ""
    last_distances: list = field(default_factory=list)
    last_engine: dict = field(default_factory=dict)  # who served the last run (engine, replica)
    tmpdir: str | None = None
    recorder: EditRecorder | None = None        # the runs since the new image, as a recipe replays them
    version: int = 0                            # bumped whenever the image or the history changes

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, model_path, seed: int = 0, psi: float = 0.7) -> "EditorState":
        st = cls(model_path=str(model_path))
        st.set_seed(seed, psi)
        return st

    @property
    def model(self):
        return load_model(self.model_path)

    @property
    def G(self):
        return self.session.G

    @property
    def resolution(self) -> int:
        return self.session.resolution

    @property
    def factor(self) -> int:
        return upscale_factor(self.resolution)

    def workdir(self) -> Path:
        if self.tmpdir is None or not Path(self.tmpdir).is_dir():
            self.tmpdir = tempfile.mkdtemp(prefix="draggan-webui-")
        return Path(self.tmpdir)

    def cleanup(self):
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def _check_idle(self):
        if self.running:
            raise UIError("a drag is running: press Stop first")

    # ------------------------------------------------------------------ points and mask as a whole
    def marks(self) -> Marks:
        s = self.session
        return Marks(self.resolution, [(p.origin, p.handle, p.target) for p in s.pairs], self.pending,
                     None if self.mask_array() is None else self.mask_array().copy(), self.mask_paint_fixed,
                     None if self.mask_layer is None else self.mask_layer.copy())

    def _apply_marks(self, marks: Marks | None, at_origin: bool = False):
        """Replace the session's points and mask by `marks` (scaled to this image)."""
        s = self.session
        s.clear_pairs()
        self.pending, self.mask_layer = None, None
        s.set_mask(None)
        if marks is None:
            return
        m = marks.scaled(self.resolution, at_origin=at_origin)
        try:
            for origin, handle, target in m.pairs:
                s.add_pair(handle, target, max_pairs=MAX_POINT_PAIRS)
                s.pairs[-1].origin = s.check_point(origin, "point")
        except DragError as e:
            raise UIError(str(e)) from None
        self.pending = m.pending
        self.mask_paint_fixed = m.paint_fixed
        if m.mask is not None:
            s.set_mask(m.mask.astype(np.float32))
            self.mask_layer = m.layer

    def _rebuild(self, w: torch.Tensor, marks: Marks | None, at_origin: bool = False):
        """A new session at latent w with `marks` (a step of the history, or the start)."""
        model = self.model
        session = self._session_at(model, w)
        old = self.session
        self.session = session
        try:
            self._apply_marks(marks, at_origin=at_origin)
        except UIError:
            self.session = old
            raise
        self.image = session.render()
        self.frames = []
        self.last_distances = []
        self.version += 1

    def _start_recording(self):
        """A new start for the recipe: this image's model and seed (or its latent, saved with it)."""
        latent = None if self.latent_source == "seed" else INITIAL_LATENT
        self.recorder = EditRecorder(model=Path(self.model_path).name, seed=None if latent else self.seed,
                                     latent=latent, psi=self.psi)

    def _session_at(self, model, w) -> DragSession:
        config = self.session.config if self.session is not None else DragConfig()
        try:
            return DragSession(model.G, w.to(next(model.G.parameters()).device), config=config,
                               model_defaults=model.drag_defaults)
        except DragError as e:
            raise UIError(str(e)) from None

    def _new_image(self, model, w) -> bool:
        """Start a new edit at latent w: history, points and mask start empty. The points and mask
        it clears are kept for `restore_cleared`. Returns whether anything was cleared."""
        session = self._session_at(model, w)
        old = self.marks() if self.session is not None else None
        self.session = session
        self.pending, self.mask_layer = None, None
        self.image = session.render()
        self.frames = []
        self.start_frame = render.trajectory_frame(self.image)
        self.start_w = session.w_initial.detach().cpu()
        self.history, self.cursor = [], 0
        self.last_distances = []
        self.version += 1
        self.just_cleared = old is not None and not old.empty()
        if self.just_cleared:
            self.cleared = old
        return self.just_cleared

    def cleared_note(self) -> str:
        """For the status after a new image: what it cleared, and how to get it back."""
        if not (self.just_cleared and self.cleared is not None):
            return ""
        return f" - {self.cleared.describe()} cleared (↶ Undo clear brings them back)"

    def restore_cleared(self) -> str:
        """Bring back the points and mask the last new image cleared; the ones there now take their
        place (pressing again swaps back). Returns what came back."""
        self._check_idle()
        if self.cleared is None:
            raise UIError("no cleared points to bring back")
        current, back = self.marks(), self.cleared
        self._apply_marks(back, at_origin=True)
        self.cleared = None if current.empty() else current
        self.just_cleared = False
        return back.describe()

    # ------------------------------------------------------------------ history of runs
    def goto(self, index: int):
        """Show the state after `index` runs (0: the new image): the session exactly as the next run
        started it (points, mask, optimiser), or for the newest step as the last run ended it."""
        self._check_idle()
        n = len(self.history)
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise UIError("history step must be a number") from None
        if not 0 <= index <= n:
            raise UIError(f"no history step {index} (there are {n} runs)")
        if n == 0:
            return
        step = self.history[min(index, n - 1)]
        snap, marks = (step.snap_before, step.before) if index < n else (step.snap_after, step.after)
        if snap is None:
            raise UIError(f"step {index} is too far back to return to (the editor keeps the newest "
                          "runs' states); the recipe still has it")
        # points or a mask changed since the step shown would be lost: Undo clear keeps them
        current, here = self.marks(), self._marks_at(self.cursor)
        self.just_cleared = here is not None and not current.empty() and not current.same(here)
        if self.just_cleared:
            self.cleared = current
        self.session, self.recorder = snapshot(*snap)
        self.pending = None
        self.mask_paint_fixed, self.mask_layer = marks.paint_fixed, marks.layer
        self.image = self.session.render()
        self.frames = []
        self.last_distances = []
        self.cursor = index
        self.version += 1

    def _marks_at(self, index: int) -> Marks | None:
        """The points and mask that history step `index` shows (None without history)."""
        n = len(self.history)
        if n == 0 or not 0 <= index <= n:
            return None
        return self.history[index].before if index < n else self.history[-1].after

    def undo_run(self) -> int:
        if self.cursor == 0:
            raise UIError("no run to undo")
        self.goto(self.cursor - 1)
        return self.cursor

    def redo_run(self) -> int:
        if self.cursor >= len(self.history):
            raise UIError("no run to redo")
        self.goto(self.cursor + 1)
        return self.cursor

    def history_items(self) -> list[tuple[np.ndarray, str]]:
        """(thumbnail, caption) of the start and of every run, for the history strip; the step shown
        is marked with ▶."""
        mark = lambda i: "▶ " if i == self.cursor else ""  # noqa: E731
        items = [(render.thumbnail(self.start_frame), mark(0) + "start")]
        for i, step in enumerate(self.history):
            frame = step.frames[-1] if step.frames else render.trajectory_frame(
                self.session.render(step.latent.to(self.session.device)))
            items.append((render.thumbnail(frame), mark(i + 1) + step.caption(i + 1)))
        return items

    # ------------------------------------------------------------------ latent
    def set_seed(self, seed, psi: float | None = None):
        self._check_idle()
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise UIError(f"seed must be an integer, got {seed!r}") from None
        if not 0 <= seed <= MAX_SEED:
            raise UIError(f"seed must be between 0 and {MAX_SEED}")
        psi = self.psi if psi is None else float(psi)
        if not (math.isfinite(psi) and -2 <= psi <= 2):
            raise UIError("truncation psi must be between -2 and 2")
        model = self.model
        try:
            w = seed_to_w(model.G, seed, psi=psi)
        except LatentError as e:
            raise UIError(str(e)) from None
        self._new_image(model, w)
        self.seed, self.psi, self.latent_source = seed, psi, "seed"
        self._start_recording()
        self.last_status = f"seed {seed}, psi {psi:g}"

    def random_seed(self) -> int:
        seed = random.randint(0, 99_999)
        self.set_seed(seed)
        return seed

    def upload_latent(self, path_or_bytes, name: str | None = None):
        self._check_idle()
        if path_or_bytes is None:
            raise UIError("no file uploaded")
        model = self.model
        try:
            w = load_latent(path_or_bytes, model.G)
        except LatentError as e:
            msg = str(e)
            if isinstance(path_or_bytes, (str, os.PathLike)):  # hide server temp paths
                msg = msg.replace(str(path_or_bytes), name or Path(path_or_bytes).name)
            raise UIError(msg) from None
        self._new_image(model, w)
        self.latent_source = name or (Path(path_or_bytes).name if isinstance(path_or_bytes, (str, os.PathLike)) else "upload")
        self._start_recording()
        self.last_status = f"latent loaded from {self.latent_source}"

    def invert_image(self, path, name: str | None = None, steps: int = 150):
        """Project an uploaded image into the latent space (GAN inversion), streaming progress.

        Yields (status, preview HxWx3 uint8 or None); at the end the edit starts from the found latent.
        Uses the shared generator unchanged (no per-session tuning); Stop cancels between steps.
        """
        from draggan_core.edit.inversion import InversionError, invert_iter
        self._check_idle()
        if path is None:
            raise UIError("no image uploaded")
        name = name or Path(str(path)).name
        model = self.model
        try:
            events = invert_iter(model.G, path, steps=steps)
        except InversionError as e:
            raise UIError(str(e).replace(str(path), name)) from None
        self.running, self.stop_requested = True, False
        result = None
        try:
            for ev in events:
                if self.stop_requested:
                    break
                if ev.done:
                    result = ev.result
                yield f"fitting {name}: step {ev.step} / {ev.total}, PSNR {ev.psnr:.1f} dB", ev.image
        finally:
            self.running = False
            events.close()
        if result is None:
            raise UIError("image upload cancelled")
        self._new_image(model, result.w_plus)
        self.latent_source = f"image {name}"
        self._start_recording()
        self.last_status = (f"{name} projected into the model (PSNR {result.psnr:.1f} dB): "
                            "click a handle, then its target")
        yield self.last_status, None

    def set_model(self, path):
        """Switch model (shared, cached): the same seed's image on it, points and mask cleared."""
        self._check_idle()
        model = load_model(path)  # raises UIError; the current model stays
        try:
            w = seed_to_w(model.G, self.seed, psi=self.psi)
        except LatentError as e:
            raise UIError(str(e)) from None
        self._new_image(model, w)
        self.model_path = str(model.path)
        self.latent_source = "seed"
        self._start_recording()
        self.last_status = f"model {model.name} ({model.G.img_resolution} px)"

    def load_example(self, seed: int, psi: float, pairs, model_path=None):
        """An example edit: its model (when another), its seed, its point pairs ready to run."""
        self._check_idle()
        model = load_model(model_path or self.model_path)
        try:
            w = seed_to_w(model.G, seed, psi=psi)
        except LatentError as e:
            raise UIError(str(e)) from None
        res = model.G.img_resolution
        for p in pairs:
            if not all(0 <= v <= res - 1 for v in p):
                raise UIError(f"example point {tuple(p)} is outside the {res}x{res} image of {model.name}")
        self._new_image(model, w)
        self.model_path = str(model.path)
        self.seed, self.psi, self.latent_source = int(seed), float(psi), "seed"
        self._start_recording()
        for hx, hy, tx, ty in pairs:
            self.session.add_pair((hx, hy), (tx, ty), max_pairs=MAX_POINT_PAIRS)

    def reset(self):
        """Back to the new image; handles back to where they were placed (the runs stay in the
        history: redo brings them back until the next run)."""
        self._check_idle()
        self._rebuild(self.start_w, self.marks(), at_origin=True)
        self._start_recording()
        self.cursor = 0
        self.last_status = "image reset"

    # ------------------------------------------------------------------ points
    def click(self, x, y) -> str:
        """A click on model pixel (x, y): first a handle, then its target. Returns what it was."""
        self._check_idle()
        try:
            x, y = int(x), int(y)
        except (TypeError, ValueError, OverflowError):
            raise UIError(f"point must be two integers, got ({x!r}, {y!r})") from None
        res = self.resolution
        if not (0 <= x < res and 0 <= y < res):
            raise UIError(f"point ({x:.6g}, {y:.6g}) is outside the {res}x{res} image")
        if self.pending is None:
            if len(self.session.pairs) >= MAX_POINT_PAIRS:
                raise UIError(f"at most {MAX_POINT_PAIRS} point pairs")
            self.pending = (x, y)
            return "handle"
        handle, self.pending = self.pending, None
        try:
            self.session.add_pair(handle, (x, y), max_pairs=MAX_POINT_PAIRS)
        except DragError as e:
            raise UIError(str(e)) from None
        return "target"

    def add_pair(self, hx, hy, tx, ty):
        self._check_idle()
        self.pending = None
        try:
            self.session.add_pair((hx, hy), (tx, ty), max_pairs=MAX_POINT_PAIRS)
        except DragError as e:
            raise UIError(str(e)) from None

    def undo(self):
        self._check_idle()
        if self.pending is not None:
            self.pending = None
        else:
            self.session.undo_pair()

    def clear_points(self):
        self._check_idle()
        self.pending = None
        self.session.clear_pairs()

    # ------------------------------------------------------------------ mask
    def set_mask_from_layer(self, alpha: np.ndarray | None, paint_fixed: bool = False):
        """alpha: HxW painted-ness of the editor layer (any size). Painted = flexible region, or
        the fixed region when paint_fixed. Nothing painted clears the mask."""
        self._check_idle()
        if alpha is None or not np.any(np.asarray(alpha) > 0):
            self.session.set_mask(None)
            self.mask_layer = None
            return
        flexible = self.flexible_from_layer(alpha, paint_fixed)
        try:
            self.session.set_mask(flexible.astype(np.float32))
        except DragError as e:
            raise UIError(str(e)) from None
        self.mask_paint_fixed = bool(paint_fixed)
        painted = np.asarray(alpha) > 0
        self.mask_layer = painted if painted.shape == (EDITOR_SIZE, EDITOR_SIZE) else None

    def flexible_from_layer(self, alpha: np.ndarray, paint_fixed: bool = False) -> np.ndarray:
        """The model-resolution flexible region (bool) that a painted layer's alpha stands for."""
        a = (np.asarray(alpha) > 0)
        if a.ndim != 2:
            raise UIError(f"mask must be a 2-D image, got shape {a.shape}")
        res = self.resolution
        small = Image.fromarray(a.astype(np.uint8) * 255).resize((res, res), Image.BOX)
        m = np.asarray(small, dtype=np.float32) / 255.0 >= 0.3
        return ~m if paint_fixed else m

    def reinterpret_mask(self, paint_fixed: bool):
        """The brush's meaning changed (may change <-> keep fixed): the same paint, the other region."""
        self._check_idle()
        paint_fixed = bool(paint_fixed)
        if paint_fixed == self.mask_paint_fixed:
            return
        if self.mask_layer is not None:
            self.set_mask_from_layer(self.mask_layer.astype(np.uint8) * 255, paint_fixed)
            return
        m = self.mask_array()
        if m is not None:
            try:
                self.session.set_mask((~m).astype(np.float32))
            except DragError as e:
                raise UIError(str(e)) from None
        self.mask_paint_fixed = paint_fixed

    def mask_array(self) -> np.ndarray | None:
        m = self.session.mask
        return None if m is None else (m.detach().cpu().numpy() > 0.5)

    def mask_info(self) -> str:
        m = self.mask_array()
        if m is None:
            return "mask: none (the whole image may change)"
        ys, xs = np.nonzero(m)
        if not len(xs):
            return "mask: none"
        return (f"mask: {int(m.sum())} of {m.size} px flexible, bbox x {xs.min()}-{xs.max()}, "
                f"y {ys.min()}-{ys.max()}")

    # ------------------------------------------------------------------ rendering
    def painted(self) -> np.ndarray | None:
        """The region the brush painted, model pixels."""
        return render.painted_region(self.mask_array(), self.mask_paint_fixed)

    def editor_value(self) -> dict:
        """The mask canvas: the current image (with the points) behind the mask as painted, in the
        brush's colour (green: may change, red: keep fixed)."""
        layers = []
        painted = self.mask_layer if self.mask_layer is not None else self.painted()
        if painted is not None and painted.any():
            layers = [render.editor_layer(painted, self.mask_paint_fixed)]
        return {"background": self.editor_background(), "layers": layers, "composite": None}

    def editor_background(self) -> np.ndarray:
        return render.editor_background(self.display(show_mask=False))

    def display(self, image: np.ndarray | None = None, show_mask: bool | None = None) -> np.ndarray:
        """The image upscaled by the integer factor (smooth, or pixels), with the mask and markers."""
        img = self.image if image is None else image
        show = self.show_mask if show_mask is None else show_mask
        return render.compose(img, self.factor, self.session.pairs, self.pending,
                              self.painted() if show else None, self.mask_paint_fixed, self.pixels)

    def points_text(self) -> str:
        pairs = self.session.pairs
        lines = []
        for i, p in enumerate(pairs):
            d = math.dist(p.handle, p.target)
            moved = f", now at {fmt_point(p.handle)}" if p.handle != p.origin else ""
            lines.append(f"{i + 1}: handle {fmt_point(p.origin)} -> target {fmt_point(p.target)}"
                         f"{moved}, distance {d:.1f}")
        if self.pending is not None:
            lines.append(f"handle ({self.pending[0]}, {self.pending[1]}) placed: click its target")
        if not lines:
            lines.append("no points: click a handle (red), then its target (blue)")
        return "\n".join(lines)

    def debug_info(self) -> dict:
        m = self.mask_array()
        return {
            "model": Path(self.model_path).name, "resolution": self.resolution, "factor": self.factor,
            "seed": self.seed, "psi": self.psi, "latent_source": self.latent_source,
            "pairs": [{"handle": list(p.handle), "target": list(p.target), "origin": list(p.origin)}
                      for p in self.session.pairs],
            "pending": list(self.pending) if self.pending else None,
            "step": self.session.step_count, "running": self.running, "engine": self.last_engine,
            "mask_pixels": int(m.sum()) if m is not None else 0,
            "mask_bbox": render.bbox(m), "image_mean": float(self.image.mean()),
            "frames": len(self.gif_frames()), "runs": len(self.history), "cursor": self.cursor,
            "cleared": None if self.cleared is None else self.cleared.describe(),
        }


def editor_alpha(value) -> np.ndarray | None:
    """The painted alpha of a gr.ImageEditor value (type='numpy'): layers' alpha, or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        layers = value.get("layers") or []
        alpha = None
        for layer in layers:
            if layer is None:
                continue
            arr = np.asarray(layer)
            if arr.ndim != 3 or arr.shape[2] != 4:
                raise UIError(f"mask layer must be an RGBA image, got shape {arr.shape}")
            a = arr[..., 3]
            alpha = a if alpha is None else np.maximum(alpha, a)
        return alpha
    arr = np.asarray(value)  # a plain image: white/opaque = painted
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr[..., 3]
    if arr.ndim == 3:
        return arr.max(axis=2)
    if arr.ndim == 2:
        return arr
    raise UIError(f"mask image has an unexpected shape {arr.shape}")


__all__ = ["EditorState", "MAX_POINT_PAIRS", "editor_alpha"]
