"""The web UI's event handlers: a thin layer over `webui.editor.state.EditorState` (which wraps the
`DragSession`). Every handler returns its outputs in the order `webui.app` wires them, turns
`UIError`s into warning toasts and never lets a traceback reach the browser.

Output groups (the order `webui.app` lists the components in):
  VIEW  canvas, points, status, state
  LOAD  VIEW + mask canvas, seed, mask info          (anything that replaces the image)
  SIDE  history strip, undo-clear button, undo run, redo run, PNG, latent, GIF, recipe downloads
"""
from __future__ import annotations

import functools
import sys
import threading
import time
import traceback
from pathlib import Path

import gradio as gr
import numpy as np

from draggan_core.model.registry import DownloadError, download
from draggan_core.model.store import CHECKPOINTS_DIR

from . import services
from .editor.render import paint_css
from .editor.state import EditorState, editor_alpha
from .services import UIError, first_line, local_model_paths, model_choices, parse_setting

NEW_STATE_S = 60   # how long App.ensure hands a new session's state to its other first events
BRUSH_SIZE = 14    # editor pixels (the canvas is 256 px: 3.5 model px on a 64 px model, 7 on 128)
N_SIDE = 8


def log_unexpected(e: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"internal error: {first_line(e)}"


def warn(msg: str) -> str:
    gr.Warning(msg)
    return f"⚠ {msg}"


def brush(paint_fixed: bool) -> gr.Brush:
    return gr.Brush(default_size=BRUSH_SIZE, colors=[paint_css(paint_fixed)], color_mode="fixed")


def _mask_of(st: EditorState, value, mode):
    """The flexible-region mask a canvas value would give, without applying it."""
    alpha = editor_alpha(value)
    if alpha is None or not (alpha > 0).any():
        return None
    return st.flexible_from_layer(alpha, paint_fixed=(mode == "fixed"))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _skips(n):
    return (gr.skip(),) * n


def view_handler(fn):
    """fn(app, st, *args) -> status; outputs VIEW; errors become toasts."""
    @functools.wraps(fn)
    def wrapper(self, st, *args):
        try:
            st = self.ensure(st)
            return self.view(st, fn(self, st, *args))
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st
        except Exception as e:  # never show a traceback to the user
            return gr.skip(), gr.skip(), warn(log_unexpected(e)), st
    return wrapper


def latent_handler(fn):
    """fn(app, st, *args) -> status; outputs LOAD (the image, its mask canvas, seed, mask info)."""
    @functools.wraps(fn)
    def wrapper(self, st, *args):
        try:
            st = self.ensure(st)
            status = fn(self, st, *args)
            return self.load_view(st, status)
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st, gr.skip(), gr.skip(), gr.skip()
        except Exception as e:
            return gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip(), gr.skip(), gr.skip()
    return wrapper


class App:
    """Handlers bound to the model chosen at start."""

    def __init__(self, model_path: Path, allow_downloads: bool = True, examples: list[dict] | None = None):
        self.model_path = Path(model_path)
        self.allow_downloads = bool(allow_downloads)
        self.examples = list(examples or [])
        # a new visitor's page fires its load event and, if the user is quick, a click at the same
        # time; both handlers see no state yet, and the one returning last would replace the other's
        # state (the click lost). Keyed by session, both get the same new state for NEW_STATE_S.
        self._new_states: dict[str, tuple[float, EditorState]] = {}
        self._new_states_lock = threading.Lock()

    def ensure(self, st: EditorState | None, request: gr.Request | None = None) -> EditorState:
        if st is not None:
            return st
        session = getattr(request, "session_hash", None)
        if session is None:
            return EditorState.create(self.model_path)
        with self._new_states_lock:
            now = time.monotonic()
            self._new_states = {k: v for k, v in self._new_states.items() if now - v[0] < NEW_STATE_S}
            if session not in self._new_states:
                self._new_states[session] = (now, EditorState.create(self.model_path))
            return self._new_states[session][1]

    def view(self, st: EditorState, status: str | None = None):
        # return the status passed in, not st.last_status read back: a run that has just ended may
        # write its own final status from its thread meanwhile (Stop raced with it, seen under load)
        if status is not None:
            st.last_status = status
        else:
            status = st.last_status
        return st.frame_output(), st.points_text(), status, st

    def load_view(self, st: EditorState, status: str | None = None):
        return (*self.view(st, status), st.editor_value(), st.seed, st.mask_info())

    def model_paths(self) -> dict[str, Path]:
        """The checkpoints the model list offers, by file name (never a path from the browser)."""
        return {**local_model_paths(), self.model_path.name: self.model_path.resolve()}

    # ------------------------------------------------------------------ page load / latent
    def on_load(self, st, request: gr.Request = None):
        try:
            st = self.ensure(st, request)
            # a new visitor's image is already on the page (the canvas's initial value); gradio
            # caches files by content, so the same image comes back under the same URL: no reload
            return self.load_view(st, "click a handle, then its target, then Start - or pick an example")
        except Exception as e:
            msg = warn(e.args[0] if isinstance(e, UIError) else log_unexpected(e))
            return gr.skip(), gr.skip(), msg, st, gr.skip(), gr.skip(), gr.skip()

    @latent_handler
    def set_seed(self, st, seed_value, psi_value):
        st.set_seed(seed_value, psi_value)
        return f"new image from seed {st.seed} (psi {st.psi:g})" + st.cleared_note()

    @latent_handler
    def random_seed(self, st, psi_value):
        st.psi = float(psi_value)
        st.random_seed()
        return f"new image from seed {st.seed} (psi {st.psi:g})" + st.cleared_note()

    @latent_handler
    def _upload_latent(self, st, path):
        if path is None:
            return st.last_status
        st.upload_latent(path, name=Path(str(path)).name)
        return f"latent loaded from {st.latent_source}" + st.cleared_note()

    def upload_latent(self, st, path):
        return (*self._upload_latent(st, path), None)  # empty the drop zone again for the next upload

    def upload_image(self, st, path):
        """Stream the inversion's progress, then show the projected image ready to drag."""
        try:
            st = self.ensure(st)
            if path is None:
                yield gr.skip(), gr.skip(), st.last_status, st, gr.skip(), gr.skip(), gr.skip(), None
                return
            for status, preview in st.invert_image(path, name=Path(str(path)).name):
                shown = st.frame_output(preview) if preview is not None else gr.skip()
                yield shown, gr.skip(), status, st, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            yield (*self.load_view(st, st.last_status + st.cleared_note()), None)
        except UIError as e:
            yield gr.skip(), gr.skip(), warn(str(e)), st, gr.skip(), gr.skip(), gr.skip(), None
        except Exception as e:
            yield gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip(), gr.skip(), gr.skip(), None

    @latent_handler
    def reset_image(self, st):
        st.reset()
        return "image reset to the start; points are back where you placed them (↷ Redo run brings the runs back)"

    @latent_handler
    def _change_model(self, st, name):
        path = self.model_paths().get(name) if name else None
        if path is None or str(path) == str(Path(st.model_path).resolve()):
            return st.last_status
        st.set_model(path)
        return st.last_status + st.cleared_note()

    def select_model(self, st, name):
        out = self._change_model(st, name)
        current = Path(out[3].model_path if isinstance(out[3], EditorState) else self.model_path).name
        return (*out, gr.update(value=current), f"Loaded: `{current}`")

    def download_model(self, name, progress=gr.Progress(track_tqdm=True)):
        if not self.allow_downloads:
            return gr.skip(), warn("model downloads are turned off on this server")
        if not name:
            gr.Warning("choose a model to download first")
            return gr.skip(), "choose a model first"
        try:
            path = download(name, dest_dir=CHECKPOINTS_DIR, progress=True)
        except (DownloadError, ValueError) as e:
            return gr.skip(), warn(first_line(e, 300))
        except Exception as e:
            return gr.skip(), warn(log_unexpected(e))
        return gr.update(choices=model_choices()), f"Downloaded `{path.name}`: choose it above to load it"

    def load_example(self, st, index):
        """An example edit: its seed (and model) and its point pairs, ready to Start."""
        try:
            st = self.ensure(st)
            try:
                ex = self.examples[int(index)]
            except (TypeError, ValueError, IndexError):
                raise UIError("no such example") from None
            path = self.model_paths().get(ex["model"])
            if path is None:
                raise UIError(f"example '{ex['name']}' needs the model {ex['model']}, which this server does not have")
            st.load_example(ex["seed"], ex["psi"], ex["pairs"], path)
            status = (f"example '{ex['name']}': seed {ex['seed']}, {len(ex['pairs'])} point pair"
                      f"{'s' if len(ex['pairs']) > 1 else ''} placed - press Start" + st.cleared_note())
            current = Path(st.model_path).name
            return (*self.load_view(st, status), gr.update(value=current), f"Loaded: `{current}`")
        except UIError as e:
            return (gr.skip(), gr.skip(), warn(str(e)), st, *_skips(5))
        except Exception as e:
            return (gr.skip(), gr.skip(), warn(log_unexpected(e)), st, *_skips(5))

    # ------------------------------------------------------------------ history
    @latent_handler
    def restore_cleared(self, st):
        back = st.restore_cleared()
        return f"{back} brought back" + (" (the ones you had replaced them: ↶ again swaps back)" if st.cleared else "")

    @latent_handler
    def undo_run(self, st):
        st.undo_run()
        return (f"undid a run: showing {'the start' if st.cursor == 0 else f'the result of run {st.cursor}'}"
                + st.cleared_note())

    @latent_handler
    def redo_run(self, st):
        st.redo_run()
        return f"redid run {st.cursor}" + st.cleared_note()

    @latent_handler
    def goto_step(self, st, index):
        if index is None:
            raise UIError("give a history step")
        st.goto(index)
        shown = "the start" if st.cursor == 0 else f"the result of {st.history[st.cursor - 1].label(st.cursor)}"
        return f"back to {shown}" + (
            f" ({len(st.history) - st.cursor} later run{'s' if len(st.history) - st.cursor > 1 else ''}: ↷ Redo)"
            if st.cursor < len(st.history) else "") + st.cleared_note()

    def on_history_select(self, st, evt: gr.SelectData):
        if evt is None or evt.index is None:
            return gr.skip(), gr.skip(), gr.skip(), st, gr.skip(), gr.skip(), gr.skip()
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return self.goto_step(st, index)

    def side(self, st, scale):
        """SIDE: the history strip, the undo buttons and the download buttons' files."""
        if not isinstance(st, EditorState) or st.running:
            return _skips(N_SIDE)
        try:
            items = st.history_items()
            gallery = gr.update(value=items)
            restore = gr.update(visible=st.cleared is not None,
                                value=f"↶ Undo clear ({st.cleared.describe()})" if st.cleared else "↶ Undo clear")
            undo = gr.update(interactive=st.cursor > 0)
            redo = gr.update(interactive=st.cursor < len(st.history))
            files = st.download_files(scale)
            dls = [gr.update(value=str(files[k]) if files[k] else None) for k in ("png", "latent", "gif", "recipe")]
            return gallery, restore, undo, redo, *dls
        except UIError as e:
            warn(str(e))
            return _skips(N_SIDE)
        except Exception as e:
            warn(log_unexpected(e))
            return _skips(N_SIDE)

    def download_hint(self, kind: str):
        """A download button pressed with no file behind it: the GIF and the recipe need a run."""
        def hint(st):
            if isinstance(st, EditorState) and kind in ("gif", "recipe") and st.cursor == 0:
                what = "the GIF shows" if kind == "gif" else "the recipe replays"
                return warn(f"nothing to download yet: {what} the runs; press Start first")
            return gr.skip()
        return hint

    # ------------------------------------------------------------------ points
    @view_handler
    def add_point(self, st, x, y):
        if x is None or y is None:
            raise UIError("give both x and y")
        kind = st.click(x, y)
        return f"{kind} at ({int(x)}, {int(y)})" + (": now click its target" if kind == "handle" else
                                                    ": press Start to drag")

    def on_click(self, st, evt: gr.SelectData, request: gr.Request = None):
        try:
            st = self.ensure(st, request)
            if evt is None or evt.index is None:
                raise UIError("click inside the image")
            f = st.factor
            return self.add_point(st, int(evt.index[0]) // f, int(evt.index[1]) // f)
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st

    @view_handler
    def add_pair(self, st, hx, hy, tx, ty):
        if None in (hx, hy, tx, ty):
            raise UIError("give hx, hy, tx, ty")
        st.add_pair(hx, hy, tx, ty)
        return f"pair added: ({int(hx)}, {int(hy)}) -> ({int(tx)}, {int(ty)})"

    @view_handler
    def undo(self, st):
        st.undo()
        return "last point removed"

    @view_handler
    def clear_points(self, st):
        st.clear_points()
        return "points cleared"

    # ------------------------------------------------------------------ mask
    def set_mask(self, st, value, mode, show):
        """Apply the painted layer as the mask (outputs: canvas, mask info, status, state)."""
        if st is None and not (isinstance(value, dict) and value.get("layers")):
            return gr.skip(), gr.skip(), gr.skip(), st  # editor initialised before the session exists
        try:
            st = self.ensure(st)
            st.show_mask = bool(show)
            st.set_mask_from_layer(editor_alpha(value), paint_fixed=(mode == "fixed"))
            # a mask that fixes everything is ignored, one that fixes nothing does nothing; a point in
            # the fixed region works against the mask: the user hears about each
            note = st.session.mask_message or "; ".join(st.session.mask_warnings())
            return st.frame_output(), st.mask_info(), warn(note) if note else "mask updated", st
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st
        except Exception as e:
            return gr.skip(), gr.skip(), warn(log_unexpected(e)), st

    def sync_mask(self, st, value, mode, show):
        """A stroke on the mask canvas (or the canvas replaced by the app): apply it, but when the mask
        is the same as before, leave the image and the status alone (a run's final status stays, and
        no extra image swap can swallow the user's next click). The canvas sends its value with no
        layers at all while it starts up: nothing was painted, nothing changes."""
        if isinstance(value, dict) and not value.get("layers"):
            return gr.skip(), gr.skip(), gr.skip(), st
        if isinstance(st, EditorState):
            if st.running:
                return gr.skip(), gr.skip(), gr.skip(), st
            try:
                same_mask = _same(st.mask_array(), _mask_of(st, value, mode))
            except UIError:
                same_mask = False
            if same_mask and bool(show) == st.show_mask and (mode == "fixed") == st.mask_paint_fixed:
                return gr.skip(), gr.skip(), gr.skip(), st
        return self.set_mask(st, value, mode, show)

    def clear_mask(self, st):
        try:
            st = self.ensure(st)
            st.set_mask_from_layer(None)
            return st.frame_output(), st.mask_info(), "mask cleared", st, st.editor_value()
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st, gr.skip()

    def change_mask_mode(self, st, mode, show):
        """The brush's meaning changed: the same paint now marks the other region, in its colour."""
        try:
            st = self.ensure(st)
            st.show_mask = bool(show)
            st.reinterpret_mask(mode == "fixed")
            what = "kept fixed (red)" if mode == "fixed" else "that may change (green)"
            note = st.session.mask_message
            status = warn(note) if note else f"the brush paints the region {what}"
            return (st.frame_output(), st.mask_info(), status, st,
                    gr.update(value=st.editor_value(), brush=brush(st.mask_paint_fixed)))
        except UIError as e:
            return gr.skip(), gr.skip(), warn(str(e)), st, gr.skip()
        except Exception as e:
            return gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip()

    def toggle_mask(self, st, show):
        if st is None:
            return gr.skip(), st
        st.show_mask = bool(show)
        return st.frame_output(), st

    def set_pixels(self, st, pixels):
        """Smooth (Lanczos) or pixel (nearest) up-scaling of the shown image and the exports."""
        if st is None:
            return gr.skip(), st
        st.pixels = bool(pixels)
        return (gr.skip() if st.running else st.frame_output()), st

    def set_mode(self, st, mode, value, mask_mode):
        """Points | Mask: clicks place points on the image, or the brush paints the mask on it
        (outputs: canvas, mask canvas, status, state)."""
        try:
            st = self.ensure(st)
            if mode == "Mask":
                what = "what may change (green)" if mask_mode != "fixed" else "what stays (red)"
                editor = gr.update(visible=True, value=st.editor_value(), brush=brush(mask_mode == "fixed"))
                return (gr.update(visible=False), editor,
                        f"mask mode: paint {what} on the image; the eraser takes paint away", st)
            status = gr.skip()
            if not st.running and isinstance(value, dict) and value.get("layers"):
                _, _, status, st = self.sync_mask(st, value, mask_mode, st.show_mask)
            canvas = gr.update(visible=True) if st.running else gr.update(visible=True, value=st.frame_output())
            return canvas, gr.update(visible=False), status, st
        except UIError as e:
            return gr.update(visible=True), gr.update(visible=False), warn(str(e)), st
        except Exception as e:
            return gr.update(visible=True), gr.update(visible=False), warn(log_unexpected(e)), st

    # ------------------------------------------------------------------ files out (API)
    def _files(self, st, make):
        try:
            st = self.ensure(st)
            return [str(f) for f in make(st)], st
        except UIError as e:
            warn(str(e))
            return gr.skip(), st
        except Exception as e:
            warn(log_unexpected(e))
            return gr.skip(), st

    def download_latent(self, st):
        return self._files(st, lambda s: [s.save_current_latent()])

    def export_png(self, st, scale=1):
        return self._files(st, lambda s: [s.export_png(scale or 1)])

    def export_gif(self, st):
        return self._files(st, lambda s: [s.export_gif()])

    def export_recipe(self, st):
        return self._files(st, lambda s: s.export_recipe())

    def debug_state(self, st):
        try:
            st = self.ensure(st)
            return st.debug_info(), st
        except Exception as e:
            return {"error": str(e)}, st

    # ------------------------------------------------------------------ run / stop
    def run(self, st, n_steps, lr_v, r1_v, r2_v, lam_v, stop_v, tracking_v, w_mode_v, every_v):
        """Start: stream (canvas, points, status, state, mask canvas) while the drag runs."""
        try:
            st = self.ensure(st)
            t0 = time.perf_counter()
            while st.running and time.perf_counter() - t0 < 3:  # a stopped run finishing its step
                time.sleep(0.05)
            if st.running:
                raise UIError("a drag is already running")
            if not st.session.pairs:
                raise UIError("add a handle and a target first: click the image twice")
            steps = st.configure(max_steps=n_steps, lr=lr_v, r1=r1_v, r2=r2_v, lambda_mask=lam_v,
                                 stop_distance=stop_v,
                                 tracking=None if tracking_v in (None, "", "default") else tracking_v,
                                 w_mode=w_mode_v)
            every = parse_setting(every_v, "k (show a frame every k steps)", 1, 100_000, integer=True) or 1
        except UIError as e:
            yield gr.skip(), gr.skip(), warn(str(e)), st, gr.skip()
            return
        except Exception as e:
            yield gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip()
            return
        updates = st.run_stream(steps, display_every=every)
        try:
            for u in updates:
                image = gr.skip() if u.image is None else u.image
                status = warn(u.status) if u.warning else u.status
                # the mask canvas follows the image once the run has ended
                yield image, u.points, status, st, (st.editor_value() if u.final else gr.skip())
        except ValueError as e:  # DragError etc.: the session stays usable
            yield gr.skip(), gr.skip(), warn(str(e)), st, gr.skip()
        except Exception as e:
            yield gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip()
        finally:
            updates.close()

    def stop(self, st):
        """Cooperative flag + cancels=[run]; waits for the run to leave its step, then shows the
        exact image of the latent it stopped at (outputs like `run`)."""
        if st is None:
            return gr.skip(), gr.skip(), "nothing is running", st, gr.skip()
        was_running = st.running
        st.stop_requested = True
        t0 = time.perf_counter()
        while st.running and time.perf_counter() - t0 < 10:  # a step is never interrupted; a busy CPU can make one slow
            time.sleep(0.02)
        if not was_running:
            return gr.skip(), gr.skip(), st.last_status or "nothing is running", st, gr.skip()
        if st.running:  # still inside a long step: it will stop at the next one
            return gr.skip(), gr.skip(), "stopping...", st, gr.skip()
        try:
            status = st.stop_view()
        except Exception as e:
            return gr.skip(), gr.skip(), warn(log_unexpected(e)), st, gr.skip()
        return (*self.view(st, status), st.editor_value())


# the examples and the history strip use these; `services` is imported for the engine's users
__all__ = ["App", "brush", "services"]
