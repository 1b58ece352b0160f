"""Per-browser-session editing state and the pure-Python logic behind the web UI (no gradio here).

One `EditorState` per browser session (kept in a `gr.State`, created lazily by the handlers). It
holds only small things: latents, point pairs, the mask, the trajectory frames, and the
`DragSession` -- which refers to the shared Generator by reference. The Generator itself lives in
the module-level `ModelStore` (`STORE`) and is never copied.

Every user-facing failure raises `UIError` (a one-line message); the gradio layer turns it into a
warning toast and leaves the state as it was.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from draggan_core.checkpoints import CheckpointError
from draggan_core.devices import ThreadBudget
from draggan_core.drag import DragConfig, DragError, DragSession
from draggan_core.engine import EndEvent, FrameEvent, LocalEngine, StartEvent, StepEvent
from draggan_core.frames import FrameRenderer
from draggan_core.latents import MAX_SEED, LatentError, load_latent, save_latent, seed_to_w
from draggan_core.models import ModelStore, default_model_path, list_local_models
from draggan_core.recipe import Recipe

STORE = ModelStore()          # the app sets its device before loading anything (`configure_device`)
THREADS = ThreadBudget()      # CPU threads shared by the running drags and the frame renderer
RENDERER = FrameRenderer(threads=THREADS.share)  # previews in the background, newest latent only
ENGINE = LocalEngine(RENDERER, THREADS, STORE)  # runs the drags; `python app.py --engine ray` replaces it
DISPLAY_TARGET = 512          # the main image is upscaled by an integer factor to about this size
EDITOR_SIZE = 256             # mask canvas size (editor pixels)
MAX_FRAMES = 300              # trajectory frames kept for the GIF
GIF_SIZE = 256                # trajectory frames (and the GIF) are at most this size, at least upscaled to it
MAX_POINT_PAIRS = 32
FRAME_INTERVAL = 0.1          # at most 10 streamed frames per second
STATUS_INTERVAL = 0.5         # without a new frame, the status still updates this often
JPEG_FROM_RESOLUTION = 256    # larger models stream JPEG frames (2 ms to encode at 512 px, PNG ~60 ms)
JPEG_QUALITY = 92
HANDLE_RGB = (230, 40, 40)
TARGET_RGB = (40, 90, 235)
MASK_RGB = np.array([60, 220, 120], dtype=np.float32)


class UIError(Exception):
    """A user-facing problem; the message is shown as a warning, the state is unchanged."""


def env_max_steps() -> int | None:
    """Upper bound on steps per run from DRAGGAN_MAX_STEPS (used by tests and hosted demos)."""
    value = os.environ.get("DRAGGAN_MAX_STEPS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def resolve_model_path(requested: str | os.PathLike | None = None) -> Path:
    """--model argument / DRAGGAN_MODEL env / the embedded default / the first local checkpoint."""
    requested = requested or os.environ.get("DRAGGAN_MODEL") or None
    if requested:
        p = Path(requested).expanduser()
        if not p.is_file():
            local = [m for m in list_local_models() if m.name == str(requested) or m.stem == str(requested)]
            if not local:
                raise UIError(f"model {requested}: no such checkpoint file")
            p = local[0]
        return p.resolve()
    default = default_model_path()
    if default.is_file():
        return default.resolve()
    local = list_local_models()
    if local:
        return local[0].resolve()
    raise UIError(f"no checkpoint found: {default} does not exist and checkpoints/ is empty "
                  "(pass --model PATH)")


def set_engine(engine) -> None:
    """Run every drag of this process on `engine` (a draggan_core.engine.Engine)."""
    global ENGINE
    ENGINE = engine


def configure_device(name: str | None = None):
    """Put every model of this process on `name` (auto/cpu/cuda/mps; DeviceError if unavailable)."""
    from draggan_core.devices import resolve_device
    STORE.set_device(resolve_device(name))
    return STORE.device


def load_model(path):
    try:
        return STORE.get(path)
    except CheckpointError as e:
        raise UIError(f"cannot load model {Path(path).name}: {e}") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UIError(f"cannot load model {Path(path).name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def upscale_factor(res: int) -> int:
    return max(1, DISPLAY_TARGET // res)


def _resize_nearest(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor == 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def parse_setting(v, name, lo, hi, integer=False):
    """A run-settings field: None for blank (the model's default), else a finite number in [lo, hi]
    (rounded for integer settings); UIError says what is wrong."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a number") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise UIError(f"{name} must be between {lo:g} and {hi:g}")
    return int(round(v)) if integer else v


@dataclass
class EditorState:
    model_path: str
    seed: int = 0
    psi: float = 0.7
    latent_source: str = "seed"                # "seed" or the uploaded file's name
    session: DragSession | None = None
    pending: tuple[int, int] | None = None     # a handle clicked, waiting for its target
    show_mask: bool = True
    mask_painted: int = 0                       # painted pixels in the editor (for the readout)
    mask_paint_fixed: bool = False              # the brush painted the fixed region (mask = the rest)
    _cancel_run: bool = False                   # the streaming caller went away (gradio's cancel)
    image: np.ndarray | None = None             # current image at model resolution
    frames: list = field(default_factory=list)  # trajectory (model resolution)
    running: bool = False
    stop_requested: bool = False
    last_status: str = ""
    last_distances: list = field(default_factory=list)
    last_engine: dict = field(default_factory=dict)  # who served the last run (engine, replica)
    tmpdir: str | None = None

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

    def _new_session(self, model, w):
        """Replace the session by one starting at latent w; point pairs (as placed) are kept."""
        old = self.session
        config = old.config if old is not None else DragConfig()
        try:
            session = DragSession(model.G, w, config=config, model_defaults=model.drag_defaults)
        except DragError as e:
            raise UIError(str(e)) from None
        if old is not None and old.resolution == session.resolution:
            for p in old.pairs:
                session.add_pair(p.origin, p.target)
        else:
            self.pending = None
        self.session = session
        self.mask_painted = 0
        self.image = session.render()
        self.frames = [_trajectory_frame(self.image)]
        self.last_distances = []

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
        self._new_session(model, w)
        self.seed, self.psi, self.latent_source = seed, psi, "seed"
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
        self._new_session(model, w)
        self.latent_source = name or (Path(path_or_bytes).name if isinstance(path_or_bytes, (str, os.PathLike)) else "upload")
        self.last_status = f"latent loaded from {self.latent_source}"

    def invert_image(self, path, name: str | None = None, steps: int = 150):
        """Project an uploaded image into the latent space (GAN inversion), streaming progress.

        Yields (status, preview HxWx3 uint8 or None); at the end the edit starts from the found latent.
        Uses the shared generator unchanged (no per-session tuning); Stop cancels between steps.
        """
        from draggan_core.inversion import InversionError, invert_iter
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
        self._new_session(model, result.w_plus)
        self.latent_source = f"image {name}"
        self.last_status = (f"{name} projected into the model (PSNR {result.psnr:.1f} dB): "
                            "click a handle, then its target")
        yield self.last_status, None

    def save_current_latent(self) -> Path:
        path = self.workdir() / "latent.npy"
        save_latent(path, self.session.latent)
        return path

    def set_model(self, path):
        """Switch model (shared, cached). Keeps points when the resolution is unchanged."""
        self._check_idle()
        model = load_model(path)  # raises UIError; the current model stays
        old_path = self.model_path
        self.model_path = str(model.path)
        try:
            w = seed_to_w(model.G, self.seed, psi=self.psi)
            self._new_session(model, w)
        except Exception:
            self.model_path = old_path
            raise
        self.latent_source = "seed"
        self.last_status = f"model {model.name} ({model.G.img_resolution} px)"

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

    def reset(self):
        """Back to the initial latent; handles back to where they were placed."""
        self._check_idle()
        self.session.reset()
        self.image = self.session.render()
        self.frames = [_trajectory_frame(self.image)]
        self.last_distances = []
        self.last_status = "image reset"

    # ------------------------------------------------------------------ mask
    def set_mask_from_layer(self, alpha: np.ndarray | None, paint_fixed: bool = False):
        """alpha: HxW painted-ness of the editor layer (any size). Painted = flexible region, or
        the fixed region when paint_fixed. Nothing painted clears the mask."""
        self._check_idle()
        if alpha is None or not np.any(np.asarray(alpha) > 0):
            self.session.set_mask(None)
            self.mask_painted = 0
            return
        flexible = self.flexible_from_layer(alpha, paint_fixed)
        self.mask_painted = int((np.asarray(alpha) > 0).sum())
        self.mask_paint_fixed = bool(paint_fixed)
        try:
            self.session.set_mask(flexible.astype(np.float32))
        except DragError as e:
            raise UIError(str(e)) from None

    def flexible_from_layer(self, alpha: np.ndarray, paint_fixed: bool = False) -> np.ndarray:
        """The model-resolution flexible region (bool) that a painted layer's alpha stands for."""
        a = (np.asarray(alpha) > 0)
        if a.ndim != 2:
            raise UIError(f"mask must be a 2-D image, got shape {a.shape}")
        res = self.resolution
        small = Image.fromarray(a.astype(np.uint8) * 255).resize((res, res), Image.BOX)
        m = np.asarray(small, dtype=np.float32) / 255.0 >= 0.3
        return ~m if paint_fixed else m

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
    def editor_value(self) -> dict:
        """The mask canvas: the current image behind the mask as painted (fixed or flexible brush)."""
        layers = []
        m = self.mask_array()
        if m is not None:
            painted = ~m if self.mask_paint_fixed else m
            alpha = Image.fromarray(painted.astype(np.uint8) * 255).resize((EDITOR_SIZE, EDITOR_SIZE), Image.NEAREST)
            layer = np.full((EDITOR_SIZE, EDITOR_SIZE, 4), 255, dtype=np.uint8)
            layer[..., 3] = np.asarray(alpha)
            layers = [layer]
        return {"background": self.editor_background(), "layers": layers, "composite": None}

    def editor_background(self) -> np.ndarray:
        img = Image.fromarray(self.image).resize(
            (EDITOR_SIZE, EDITOR_SIZE), Image.NEAREST if self.resolution <= EDITOR_SIZE else Image.BOX)
        return np.asarray(img.convert("RGBA"))

    def display(self, image: np.ndarray | None = None) -> np.ndarray:
        """The image upscaled by the integer factor, with mask overlay, arrows and markers."""
        img = self.image if image is None else image
        f = self.factor
        big = _resize_nearest(img, f)
        m = self.mask_array() if self.show_mask else None
        if m is not None:
            mm = _resize_nearest(m[..., None], f)
            tinted = big.astype(np.float32) * 0.6 + MASK_RGB * 0.4
            big = np.where(mm, tinted, big.astype(np.float32) * 0.85).astype(np.uint8)
        canvas = Image.fromarray(np.ascontiguousarray(big))
        draw = ImageDraw.Draw(canvas)
        c = lambda p: (p[0] * f + f / 2, p[1] * f + f / 2)  # noqa: E731  pixel centre in display px
        r = max(3.0, f * 0.75)
        width = max(2, round(f / 3))
        for pair in self.session.pairs:
            h, t = c(pair.handle), c(pair.target)
            if pair.origin != pair.handle:  # where the handle started, and the path it took
                o = c(pair.origin)
                draw.line([o, h], fill=HANDLE_RGB, width=max(1, width // 2))
                draw.ellipse([o[0] - r * 0.6, o[1] - r * 0.6, o[0] + r * 0.6, o[1] + r * 0.6],
                             outline=HANDLE_RGB, width=2)
            _arrow(draw, h, t, fill=(255, 255, 255), width=width, head=max(6.0, 2 * r))
            _dot(draw, t, r * 1.3, TARGET_RGB)
            _dot(draw, h, r, HANDLE_RGB)
        if self.pending is not None:
            _dot(draw, c(self.pending), r, HANDLE_RGB)
        return np.asarray(canvas)

    def points_text(self) -> str:
        pairs = self.session.pairs
        lines = []
        for i, p in enumerate(pairs):
            d = math.dist(p.handle, p.target)
            moved = f", now at {_fmt_point(p.handle)}" if p.handle != p.origin else ""
            lines.append(f"{i + 1}: handle {_fmt_point(p.origin)} -> target {_fmt_point(p.target)}"
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
            "mask_bbox": _bbox(m), "image_mean": float(self.image.mean()), "frames": len(self.frames),
        }

    # ------------------------------------------------------------------ running
    def configure(self, max_steps=None, lr=None, r1=None, r2=None, lambda_mask=None, stop_distance=None,
                  tracking=None, w_mode=None) -> int:
        """Apply run settings (None / blank = model default). Returns the number of steps to run."""
        steps = parse_setting(max_steps, "max steps", 1, 100_000, integer=True) or 300
        bound = env_max_steps()
        if bound is not None:
            steps = min(steps, bound)
        cfg = self.session.config
        lam = parse_setting(lambda_mask, "lambda", 0, 1e4)
        tracking = (tracking or "").lower() or None
        if tracking not in (None, "l1", "l2"):
            raise UIError("tracking must be L1 or L2")
        w_mode = (w_mode or "").lower()
        w_mode = None if w_mode in ("", "model default") else w_mode  # None: the model's recommendation
        if w_mode not in (None, "w", "w+"):
            raise UIError("latent space must be W or W+")
        new = DragConfig(
            lr=parse_setting(lr, "learning rate", 1e-6, 0.5), r1=parse_setting(r1, "r1", 0.5, 64), r2=parse_setting(r2, "r2", 1, 64, integer=True),
            lambda_mask=lam,
            feature_res=cfg.feature_res, num_optimized_ws=cfg.num_optimized_ws, w_mode=w_mode,
            tracking=tracking, stop_distance=parse_setting(stop_distance, "stop distance", 0, 64), max_steps=steps,
            noise_mode=cfg.noise_mode, display_every=0, compat=cfg.compat, windowed=cfg.windowed)
        try:
            new.resolve(self.G, max(1, len(self.session.pairs)), self.session.model_defaults)
        except ValueError as e:
            raise UIError(str(e)) from None
        self.session.config = new
        return steps

    def record_frame(self, img: np.ndarray):
        self.image = img
        if len(self.frames) >= MAX_FRAMES:  # keep the first frame, thin the rest
            self.frames = self.frames[:1] + self.frames[2::2]
        self.frames.append(_trajectory_frame(img))

    def status_text(self, result, run_steps: int, first_step: int, state: str) -> str:
        """'step 82 (this run: 3 / 300) - distances: 4.1 px - running': totals and this run's count."""
        d = ", ".join(f"{v:.1f}" for v in result.distances)
        return (f"step {result.step} (this run: {result.step - first_step} / {run_steps}) - "
                f"distances: {d} px - {state}")

    def frame_output(self, image: np.ndarray | None = None):
        """The display image as the canvas gets it: an array (PNG, crisp pixels for small models)
        or, from JPEG_FROM_RESOLUTION up, the path of a JPEG written here (2 ms instead of ~60 ms
        of PNG encoding per 512 px frame, time the optimisation would otherwise wait)."""
        shown = self.display(image)
        if self.resolution < JPEG_FROM_RESOLUTION:
            return shown
        self._frame_counter = getattr(self, "_frame_counter", 0) + 1
        # gradio copies a frame right after it is taken; 8 names outlast the newest-only hand-over
        path = self.workdir() / f"frame-{self._frame_counter % 8}.jpg"
        Image.fromarray(shown).save(path, "JPEG", quality=JPEG_QUALITY)
        return str(path)

    def run_stream(self, steps: int, display_every: int = 1):
        """Run the drag in a thread of its own and yield its newest `RunUpdate` whenever the caller
        (gradio, sending the previous one to the browser) asks: neither the previews nor the sending
        of updates hold the optimisation back, and a slow browser gets the newest update, never a
        queue of stale ones. Final updates are always delivered. Closing this generator (gradio's
        cancel) stops the run at its next step; like Stop, it leaves the final image to `stop_view`."""
        slot = _UpdateSlot()
        self._cancel_run = False
        self.running, self.stop_requested = True, False

        def drive():
            try:
                for update in self._run_updates(steps, display_every):
                    slot.put(update)
            except BaseException as e:  # handed to the caller's thread, raised there
                slot.finish(e)
            else:
                slot.finish()

        worker = threading.Thread(target=drive, name="draggan-run", daemon=True)
        worker.start()
        try:
            while True:
                updates, error = slot.take()
                yield from updates
                if error is not None:
                    raise error
                if not updates:  # finished and emptied
                    return
        finally:
            self._cancel_run = True
            worker.join()

    def _run_updates(self, steps: int, display_every: int = 1):
        """The run itself (in `run_stream`'s thread): a frame whenever the background renderer has a
        newer one (at most every FRAME_INTERVAL), else the status every STATUS_INTERVAL; the last
        update shows `render(final latent)` exactly; Stop leaves that to `stop_view`."""
        s = self.session
        first_step = s.step_count
        self.pending = None
        result = end = newest = None
        shown_step = first_step
        last_yield = time.perf_counter()
        # the engine keeps `s` at the newest state it has streamed (a remote engine that goes away
        # mid-run leaves it at the last step seen here)
        run = ENGINE.run_session(s, self.model_path, steps, display_every)
        try:
            for event in run:
                if isinstance(event, FrameEvent):
                    if event.step > shown_step:
                        newest = event
                    continue
                if isinstance(event, EndEvent):
                    end = event
                    break
                if isinstance(event, StartEvent):
                    self.last_engine = dict(event.engine)
                    continue
                if not isinstance(event, StepEvent):
                    continue
                result = event.result
                self.last_distances = result.distances
                if self.stop_requested or self._cancel_run:
                    break
                if result.done:
                    continue  # the end event follows
                now = time.perf_counter()
                first = result.step == first_step + 1
                if newest is not None and now - last_yield >= FRAME_INTERVAL:
                    self.record_frame(newest.image)
                    shown_step, newest = newest.step, None
                    image = self.frame_output()
                elif first or now - last_yield >= STATUS_INTERVAL:
                    image = self.frame_output() if first else None  # first answer: moved markers
                else:
                    continue
                # the interval counts from this decision, not from when gradio has sent the update, so
                # frames come every FRAME_INTERVAL (8 per second) when renders keep up
                last_yield = now
                # a step that has every handle there but goes on is a mask's hold step (mask_hold_steps)
                how = "handles there, the fixed region settles" if result.reached else "running"
                yield RunUpdate(image, self.points_text(), self.status_text(result, steps, first_step, how))
        finally:
            run.close()
            self.running = False
        if end is not None and end.engine:
            self.last_engine = dict(end.engine)
        stopped = self.stop_requested or self._cancel_run  # the stop handler shows the exact image
        if end is not None and end.reason in ("lost", "error") and not stopped:
            self.record_frame(s.render())  # the last state streamed back, exactly
            self.last_status = end.message
            yield RunUpdate(self.frame_output(), self.points_text(), end.message, final=True, warning=True)
            return
        if result is None:
            yield RunUpdate(None, self.points_text(), "nothing to do", final=True)
            return
        if stopped:
            return
        self.record_frame(result.image if result.image is not None else s.render())
        if result.message:  # divergence: the session rolled back to the last good latent
            self.last_status = result.message
            yield RunUpdate(self.frame_output(), self.points_text(), result.message, final=True, warning=True)
            return
        how = ("done: every handle reached its target" if result.reached
               else "max steps reached: press Start to continue")
        self.last_status = self.status_text(result, steps, first_step, how)
        yield RunUpdate(self.frame_output(), self.points_text(), self.last_status, final=True)

    def warm_up(self, steps: int = 2):
        """A throwaway drag of a few steps, so the first user's Start does not pay one-time costs
        (torch imports its compiler stack when the first optimiser is built, ~2 s; kernel set-up)."""
        res = self.resolution
        session = DragSession(self.G, self.session.w_initial, model_defaults=self.session.model_defaults)
        session.add_pair((res // 2, res // 2), (res // 2 + max(2, res // 16), res // 2))
        for _ in session.run(max_steps=steps):
            pass

    def stop_view(self) -> str:
        """After a stop: the exact image of the latent the run stopped at, and the status to show."""
        self.record_frame(self.session.render())
        d = ", ".join(f"{math.dist(p.handle, p.target):.1f}" for p in self.session.pairs)
        return f"stopped at step {self.session.step_count} - distances: {d} px - press Start to resume"

    # ------------------------------------------------------------------ export
    def export_png(self) -> Path:
        path = self.workdir() / "draggan.png"
        Image.fromarray(self.image).save(path)
        return path

    def export_gif(self) -> Path:
        frames = self.frames or [_trajectory_frame(self.image)]
        scale = max(1, GIF_SIZE // frames[0].shape[0])
        imgs = [Image.fromarray(_resize_nearest(f, scale)) for f in frames]
        path = self.workdir() / "trajectory.gif"
        durations = [80] * len(imgs)
        durations[-1] = 1000
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)
        return path

    def export_recipe(self) -> list[Path]:
        """recipe.json (+ the initial latent when it was uploaded, + mask.png when a mask is set)."""
        d = self.workdir()
        files = []
        s = self.session
        settings = {}
        cfg = s.config
        for name in ("lr", "r1", "r2", "tracking", "stop_distance", "w_mode"):
            v = getattr(cfg, name)
            if v is not None:
                settings[name] = v
        if s.mask is not None and cfg.lambda_mask is not None:
            settings["lambda_mask"] = cfg.lambda_mask
        latent = None
        if self.latent_source != "seed":
            latent = "initial_latent.npy"
            save_latent(d / latent, s.w_initial)
            files.append(d / latent)
        mask = None
        if s.mask is not None:
            mask = "mask.png"
            Image.fromarray((self.mask_array().astype(np.uint8) * 255)).save(d / mask)
            files.append(d / mask)
        recipe = Recipe(drags=[(*p.origin, *p.target) for p in s.pairs],
                        seed=self.seed if latent is None else None, latent=latent, psi=self.psi,
                        model=Path(self.model_path).name, mask=mask,
                        steps=max(s.step_count, 1) if s.step_count else (cfg.max_steps or 300), settings=settings)
        path = d / "recipe.json"
        path.write_text(recipe.to_json())
        return [path] + files


class _UpdateSlot:
    """Hands a running drag's updates to the thread that sends them: the newest pending progress
    update replaces an older one; final updates are kept in order."""

    def __init__(self):
        self._cv = threading.Condition()
        self._progress: RunUpdate | None = None
        self._finals: list[RunUpdate] = []
        self._done = False
        self._error: BaseException | None = None

    def put(self, update: "RunUpdate") -> None:
        with self._cv:
            if update.final:
                self._finals.append(update)
            else:
                self._progress = update
            self._cv.notify()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cv:
            self._done, self._error = True, error
            self._cv.notify()

    def take(self) -> tuple[list["RunUpdate"], BaseException | None]:
        """Wait for news: (updates, error); ([], None) once the run has finished and all was taken."""
        with self._cv:
            while self._progress is None and not self._finals and not self._done:
                self._cv.wait()
            updates = ([self._progress] if self._progress is not None else []) + self._finals
            self._progress, self._finals = None, []
            error, self._error = self._error, None
            return updates, error


@dataclass
class RunUpdate:
    """One streamed update of a run: image None means 'keep the one shown'."""
    image: object              # HxWx3 uint8 array, a JPEG path, or None
    points: str
    status: str
    final: bool = False
    warning: bool = False      # the status is a problem to show as a warning


def _trajectory_frame(img: np.ndarray) -> np.ndarray:
    """Trajectory frames are kept at most GIF_SIZE px: 300 full 1024 px frames would hold 900 MB."""
    if img.shape[0] <= GIF_SIZE:
        return img
    return np.asarray(Image.fromarray(img).resize((GIF_SIZE, GIF_SIZE), Image.BOX))


def _bbox(m):
    if m is None or not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def _dot(draw, c, r, fill):
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill, outline=(255, 255, 255), width=2)


def _arrow(draw, a, b, fill, width, head):
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy)
    if length < 1e-6:
        return
    ux, uy = dx / length, dy / length
    draw.line([a, b], fill=(0, 0, 0), width=width + 2)
    draw.line([a, b], fill=fill, width=width)
    if length > head:
        bx, by = b[0] - ux * head * 0.3, b[1] - uy * head * 0.3
        left = (bx - ux * head - uy * head * 0.5, by - uy * head + ux * head * 0.5)
        right = (bx - ux * head + uy * head * 0.5, by - uy * head - ux * head * 0.5)
        draw.polygon([(bx, by), left, right], fill=fill, outline=(0, 0, 0))


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


def model_choices() -> list[tuple[str, str]]:
    """(label, path) of the local checkpoints, the default first and labelled as such."""
    default = default_model_path().name
    return [(p.name + (" (default)" if p.name == default else ""), str(p.resolve())) for p in list_local_models()]


__all__ = ["EditorState", "RunUpdate", "UIError", "STORE", "RENDERER", "THREADS", "ENGINE", "set_engine", "configure_device", "editor_alpha", "model_choices", "resolve_model_path",
           "env_max_steps", "upscale_factor"]


def _fmt_point(p) -> str:
    """(12, 40) for pixel points, (12.4, 40.1) for sub-pixel ones."""
    return "(" + ", ".join(f"{round(v, 1):g}" for v in p) + ")"
