"""Gradio Blocks UI for the CPU DragGAN editor.

The session logic lives in `webui.state` (no gradio there); this module lays out the page and turns
`UIError`s into warning toasts. Every click handler has an API twin (``/add_point`` etc.) because
``.select`` events cannot be sent by gradio_client.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

from draggan_core.models import CHECKPOINTS_DIR  # noqa: E402
from draggan_core.registry import DownloadError, download, list_models  # noqa: E402

from .state import (EDITOR_SIZE, EditorState, UIError, editor_alpha, env_max_steps,  # noqa: E402
                    model_choices, parse_setting, resolve_model_path)
from . import state as editor_state  # noqa: E402  (its ENGINE is set before the UI is built)

MAX_UPLOAD = "20mb"
# Mask layers are decoded by gradio (PIL) before any handler runs; a tiny PNG can declare 9000x9000
# pixels (measured: 79 KB upload -> 1.4 GB peak RSS, 17 s CPU). PIL refuses images above twice this
# limit (DecompressionBombError), so nothing larger than 2048x2048 is decoded. The editor sends 256x256.
MAX_IMAGE_PIXELS = 2048 * 2048 // 2
STATE_TTL_S = 3 * 3600
NEW_STATE_S = 60  # how long App.ensure hands a new session's state to its other first events

CSS = """
#canvas img { cursor: crosshair; }
#canvas { min-height: 540px; }
#status textarea, #points textarea, #mask_info textarea { font-family: ui-monospace, monospace; font-size: 13px; }
.hint { font-size: 14px; }
"""

# measured: docs/evaluation.md#masks (default model, 30 test pairs, 1 point)
MASK_HINT = ("The mask keeps the rest of the image close, not frozen: on the default model's test edits "
             "the mean change outside it fell from 6.8 to 2.0 (of 255), mostly near the region's edge, and handles ended "
             "about 0.4 px further from their targets. The image is always the generator's own.")

INTRO = """### DragGAN on CPU
**1.** Click a point on the image (**red** handle), **2.** click where it should go (**blue** target),
**3.** press **Start**. Add more pairs for several points; paint a mask to say what may change."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _log_unexpected(e: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return f"internal error: {text}"


def _warn(msg: str) -> str:
    gr.Warning(msg)
    return f"⚠ {msg}"


def _mask_of(st: EditorState, value, mode):
    """The flexible-region mask a canvas value would give, without applying it."""
    alpha = editor_alpha(value)
    if alpha is None or not (alpha > 0).any():
        return None
    return st.flexible_from_layer(alpha, paint_fixed=(mode == "fixed"))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def view_handler(fn):
    """fn(app, st, *args) -> status; outputs [canvas, points, status, state]; errors become toasts."""
    @functools.wraps(fn)
    def wrapper(self, st, *args):
        try:
            st = self.ensure(st)
            return self.view(st, fn(self, st, *args))
        except UIError as e:
            return gr.skip(), gr.skip(), _warn(str(e)), st
        except Exception as e:  # never show a traceback to the user
            return gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st
    return wrapper


def latent_handler(fn):
    """Like view_handler, for handlers that replace the image: also the mask canvas, seed and mask info."""
    @functools.wraps(fn)
    def wrapper(self, st, *args):
        try:
            st = self.ensure(st)
            status = fn(self, st, *args)
            return (*self.view(st, status), st.editor_value(), st.seed, st.mask_info())
        except UIError as e:
            return gr.skip(), gr.skip(), _warn(str(e)), st, gr.skip(), gr.skip(), gr.skip()
        except Exception as e:
            return gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st, gr.skip(), gr.skip(), gr.skip()
    return wrapper


class App:
    """Builds handlers bound to the model chosen at start."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
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

    # ------------------------------------------------------------------ page load / latent
    def on_load(self, st, request: gr.Request = None):
        try:
            st = self.ensure(st, request)
            # a new visitor's image is already on the page (the canvas's initial value); gradio
            # caches files by content, so the same image comes back under the same URL: no reload
            out = self.view(st, "click a handle, then its target, then Start")
            return (*out, st.editor_value(), st.seed, st.mask_info())
        except Exception as e:
            msg = _warn(e.args[0] if isinstance(e, UIError) else _log_unexpected(e))
            return gr.skip(), gr.skip(), msg, st, gr.skip(), gr.skip(), gr.skip()

    @latent_handler
    def set_seed(self, st, seed_value, psi_value):
        st.set_seed(seed_value, psi_value)
        return f"new image from seed {st.seed} (psi {st.psi:g})"

    @latent_handler
    def random_seed(self, st, psi_value):
        st.psi = float(psi_value)
        st.random_seed()
        return f"new image from seed {st.seed} (psi {st.psi:g})"

    @latent_handler
    def _upload_latent(self, st, path):
        if path is None:
            return st.last_status
        st.upload_latent(path, name=Path(str(path)).name)
        return f"latent loaded from {st.latent_source}"

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
            yield (*self.view(st, st.last_status), st.editor_value(), st.seed, st.mask_info(), None)
        except UIError as e:
            yield gr.skip(), gr.skip(), _warn(str(e)), st, gr.skip(), gr.skip(), gr.skip(), None
        except Exception as e:
            yield gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st, gr.skip(), gr.skip(), gr.skip(), None

    @latent_handler
    def reset_image(self, st):
        st.reset()
        return "image reset to the start latent; points are back where you placed them"

    @latent_handler
    def _change_model(self, st, path):
        if not path or str(Path(path).resolve()) == str(Path(st.model_path).resolve()):
            return st.last_status
        st.set_model(path)
        return st.last_status

    def select_model(self, st, path):
        out = self._change_model(st, path)
        current = out[3].model_path if isinstance(out[3], EditorState) else str(self.model_path)
        return (*out, gr.update(value=current), f"Loaded: `{Path(current).name}`")

    @staticmethod
    def download_model(name, progress=gr.Progress(track_tqdm=True)):
        if not name:
            gr.Warning("choose a model to download first")
            return gr.skip(), "choose a model first"
        try:
            path = download(name, dest_dir=CHECKPOINTS_DIR, progress=True)
        except (DownloadError, ValueError) as e:
            gr.Warning(str(e))
            return gr.skip(), f"⚠ {e}"
        except Exception as e:
            return gr.skip(), _warn(_log_unexpected(e))
        return gr.update(choices=model_choices()), f"Downloaded `{path.name}`: choose it above to load it"

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
            return gr.skip(), gr.skip(), _warn(str(e)), st

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
        """Apply the painted editor layer as the mask (outputs: canvas, mask info, status, state)."""
        if st is None and not (isinstance(value, dict) and value.get("layers")):
            return gr.skip(), gr.skip(), gr.skip(), st  # editor initialised before the session exists
        try:
            st = self.ensure(st)
            st.show_mask = bool(show)
            st.set_mask_from_layer(editor_alpha(value), paint_fixed=(mode == "fixed"))
            # a mask that fixes everything is ignored, one that fixes nothing does nothing; a point in
            # the fixed region works against the mask: the user hears about each
            note = st.session.mask_message or "; ".join(st.session.mask_warnings())
            return st.frame_output(), st.mask_info(), _warn(note) if note else "mask updated", st
        except UIError as e:
            return gr.skip(), gr.skip(), _warn(str(e)), st
        except Exception as e:
            return gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st

    def sync_mask(self, st, value, mode, show):
        """The mask canvas changed (painted, or replaced by the app after a run): apply it, but when
        the mask is the same as before, leave the image and the status alone (a run's final status
        stays, and no extra image swap can swallow the user's next click)."""
        if isinstance(st, EditorState) and not st.running:
            try:
                same_mask = _same(st.mask_array(), _mask_of(st, value, mode))
            except UIError:
                same_mask = False
            if same_mask and bool(show) == st.show_mask:
                return gr.skip(), gr.skip(), gr.skip(), st
        return self.set_mask(st, value, mode, show)

    def clear_mask(self, st):
        try:
            st = self.ensure(st)
            st.set_mask_from_layer(None)
            return st.frame_output(), st.mask_info(), "mask cleared", st, st.editor_value()
        except UIError as e:
            return gr.skip(), gr.skip(), _warn(str(e)), st, gr.skip()

    def toggle_mask(self, st, show):
        if st is None:
            return gr.skip(), st
        st.show_mask = bool(show)
        return st.frame_output(), st

    # ------------------------------------------------------------------ files out
    def _files(self, st, make):
        try:
            st = self.ensure(st)
            return [str(f) for f in make(st)], st
        except UIError as e:
            _warn(str(e))
            return gr.skip(), st
        except Exception as e:
            _warn(_log_unexpected(e))
            return gr.skip(), st

    def download_latent(self, st):
        return self._files(st, lambda s: [s.save_current_latent()])

    def export_png(self, st):
        return self._files(st, lambda s: [s.export_png()])

    def export_gif(self, st):
        return self._files(st, lambda s: [s.export_gif()])

    def export_recipe(self, st):
        def make(s):
            if not s.session.pairs:
                raise UIError("a recipe needs at least one point pair")
            return s.export_recipe()
        return self._files(st, make)

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
            yield gr.skip(), gr.skip(), _warn(str(e)), st, gr.skip()
            return
        except Exception as e:
            yield gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st, gr.skip()
            return
        updates = st.run_stream(steps, display_every=every)
        try:
            for u in updates:
                image = gr.skip() if u.image is None else u.image
                status = _warn(u.status) if u.warning else u.status
                # the mask canvas follows the image once the run has ended
                yield image, u.points, status, st, (st.editor_value() if u.final else gr.skip())
        except ValueError as e:  # DragError etc.: the session stays usable
            yield gr.skip(), gr.skip(), _warn(str(e)), st, gr.skip()
        except Exception as e:
            yield gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st, gr.skip()
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
            return gr.skip(), gr.skip(), _warn(_log_unexpected(e)), st, gr.skip()
        return (*self.view(st, status), st.editor_value())


def _registry_choices():
    try:
        return [(f"{e.name} ({e.resolution or '?'} px)", e.name) for e in list_models()]
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------

def build_demo(model: str | os.PathLike | None = None, first_state: EditorState | None = None) -> gr.Blocks:
    """The editor's page. `first_state`: a new visitor's state, already rendered (the launcher's);
    its image is the canvas's initial value, so the page shows it without waiting for a request."""
    model_path = resolve_model_path(model)
    app = App(model_path)
    first_image = (first_state or EditorState.create(model_path)).display()
    step_bound = env_max_steps()
    default_steps = min(300, step_bound) if step_bound else 300
    max_steps_limit = step_bound or 2000

    with gr.Blocks(title="DragGAN (CPU)") as demo:
        state = gr.State(None, time_to_live=STATE_TTL_S,
                         delete_callback=lambda st: st.cleanup() if isinstance(st, EditorState) else None)
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- main column
            with gr.Column(scale=3, min_width=560):
                gr.Markdown(INTRO, elem_classes=["hint"])
                canvas = gr.Image(first_image, label="Image (click: handle, then target)", type="numpy",
                                  format="png", interactive=False, elem_id="canvas", height=540, buttons=[])
                with gr.Row():
                    start_btn = gr.Button("▶ Start", variant="primary", elem_id="start", min_width=90, size="md")
                    stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop", min_width=90, size="md")
                    undo_btn = gr.Button("Undo point", elem_id="undo", min_width=90, size="md")
                    clear_btn = gr.Button("Clear points", elem_id="clear", min_width=90, size="md")
                    reset_btn = gr.Button("Reset image", elem_id="reset", min_width=90, size="md")
                status_box = gr.Textbox(label="Status", interactive=False, elem_id="status", max_lines=2)
                points_box = gr.Textbox(label="Points (model pixels, x = column)", interactive=False,
                                        elem_id="points", lines=2, max_lines=8)
                # API twins of the click handler (hidden)
                with gr.Row(visible=False):
                    px = gr.Number(label="x", precision=0, elem_id="api_x")
                    py = gr.Number(label="y", precision=0, elem_id="api_y")
                    ptx = gr.Number(label="target x", precision=0)
                    pty = gr.Number(label="target y", precision=0)
                    add_point_btn = gr.Button("add point")
                    add_pair_btn = gr.Button("add pair")
                    debug_btn = gr.Button("debug")
                    debug_box = gr.JSON(label="debug")

            # ---------------------------------------------------------------- side panel
            with gr.Column(scale=2, min_width=360):
                with gr.Accordion("Latent", open=True):
                    with gr.Row():
                        # no `minimum`: gradio would refuse with a server traceback; set_seed says why instead
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=2,
                                     info="press Enter for a new image")
                        rand_btn = gr.Button("Random seed", elem_id="random_seed", scale=1)
                    psi = gr.Slider(0.0, 1.2, value=0.7, step=0.05, label="Truncation psi",
                                    info="lower = more average, cleaner images", elem_id="psi")
                    w_mode = gr.Radio(["model default", "W+", "W"], value="model default", label="Optimise in",
                                      info="W+: one vector per layer (more flexible); W: one shared vector")
                    latent_file = gr.File(label="Upload latent (.npy / .pt)", file_types=[".npy", ".pt", ".pth"],
                                          type="filepath", elem_id="latent_upload", height=120)
                    latent_dl_btn = gr.Button("Download current latent (.npy)", elem_id="latent_download", size="sm")
                    image_file = gr.File(label="Edit your own image (GAN inversion, 150 steps)", type="filepath",
                                         file_types=["image"], elem_id="image_upload", height=120)

                with gr.Accordion("Mask (optional)", open=True):
                    mask_mode = gr.Radio(["flexible", "fixed"], value="flexible", label="The brush paints the region that is",
                                         info="flexible: paint what may change; fixed: paint what must stay",
                                         elem_id="mask_mode")
                    gr.Markdown(MASK_HINT, elem_classes=["hint"])
                    editor = gr.ImageEditor(
                        label="Paint the mask", type="numpy", image_mode="RGBA", sources=(), transforms=(),
                        layers=False, brush=gr.Brush(default_size=14, colors=["#ffffff"], color_mode="fixed"),
                        eraser=gr.Eraser(default_size=14), canvas_size=(EDITOR_SIZE, EDITOR_SIZE), height=330,
                        elem_id="editor", buttons=[], format="png")
                    with gr.Row():
                        apply_mask_btn = gr.Button("Apply mask", elem_id="apply_mask", size="sm")
                        clear_mask_btn = gr.Button("Clear mask", elem_id="clear_mask", size="sm")
                        refresh_mask_btn = gr.Button("Canvas ← current image", elem_id="refresh_mask", size="sm")
                    show_mask = gr.Checkbox(value=True, label="Show mask on the image", elem_id="show_mask")
                    mask_info = gr.Textbox(label="Mask received", interactive=False, elem_id="mask_info",
                                           value="mask: none (the whole image may change)")

                with gr.Accordion("Run settings", open=False):
                    max_steps = gr.Slider(1, max_steps_limit, value=default_steps, step=1, label="Max steps",
                                          elem_id="max_steps")
                    with gr.Accordion("Advanced", open=False):
                        gr.Markdown("Blank fields use the model's defaults.")
                        with gr.Row():
                            lr = gr.Textbox(label="learning rate", value="", placeholder="model default", elem_id="lr")
                            lam = gr.Textbox(label="mask lambda", value="", placeholder="model default", elem_id="lambda")
                        with gr.Row():
                            r1 = gr.Textbox(label="r1 (motion radius, px)", value="", placeholder="model default", elem_id="r1")
                            r2 = gr.Textbox(label="r2 (tracking radius, px)", value="", placeholder="model default",
                                            elem_id="r2")
                        with gr.Row():
                            stop_d = gr.Textbox(label="stop distance (px)", value="", placeholder="auto", elem_id="stop_distance")
                            display_every = gr.Number(label="show a frame every k steps", value=1,
                                                      precision=0, elem_id="display_every")  # checked in run
                        tracking = gr.Radio(["default", "L1", "L2"], value="default", label="Tracking norm",
                                            elem_id="tracking")

                with gr.Accordion("Model", open=False):
                    local_choices = model_choices()
                    if str(model_path) not in [v for _, v in local_choices]:
                        local_choices.append((model_path.name, str(model_path)))
                    model_dd = gr.Dropdown(local_choices, value=str(model_path), label="Local checkpoint",
                                           elem_id="model", allow_custom_value=False)
                    with gr.Row():
                        registry_dd = gr.Dropdown(_registry_choices(), value=None, label="Download a known model",
                                                  elem_id="registry", scale=3)
                        dl_model_btn = gr.Button("Download", elem_id="download_model", scale=1)
                    model_info = gr.Markdown(f"Loaded: `{model_path.name}`")

                with gr.Accordion("Export", open=False):
                    with gr.Row():
                        png_btn = gr.Button("PNG", elem_id="export_png", size="sm")
                        npy_btn = gr.Button("Latent .npy", elem_id="export_latent", size="sm")
                        gif_btn = gr.Button("GIF", elem_id="export_gif", size="sm")
                        recipe_btn = gr.Button("Recipe .json", elem_id="export_recipe", size="sm")
                    export_files = gr.File(label="Files", file_count="multiple", interactive=False,
                                           elem_id="export_files")

        VIEW = [canvas, points_box, status_box, state]
        load_outputs = [*VIEW, editor, seed, mask_info]
        quiet = dict(show_progress="hidden")

        # ------------------------------------------------------------------ page load / latent
        demo.load(app.on_load, [state], load_outputs, api_name="new_session", **quiet)
        seed.submit(app.set_seed, [state, seed, psi], load_outputs, api_name="set_seed", **quiet)
        psi.release(app.set_seed, [state, seed, psi], load_outputs, api_visibility="private", **quiet)
        rand_btn.click(app.random_seed, [state, psi], load_outputs, api_name="random_seed", **quiet)
        latent_file.upload(app.upload_latent, [state, latent_file], [*load_outputs, latent_file],
                           api_name="upload_latent")
        image_file.upload(app.upload_image, [state, image_file], [*load_outputs, image_file], api_name="upload_image",
                          **quiet)
        reset_btn.click(app.reset_image, [state], load_outputs, api_name="reset", **quiet)
        model_dd.input(app.select_model, [state, model_dd], [*load_outputs, model_dd, model_info], api_name="set_model")
        dl_model_btn.click(app.download_model, [registry_dd], [model_dd, model_info], api_name="download_model")
        latent_dl_btn.click(app.download_latent, [state], [export_files, state], api_name="download_latent")

        # ------------------------------------------------------------------ points
        canvas.select(app.on_click, [state], VIEW, api_visibility="private", trigger_mode="multiple", **quiet)
        add_point_btn.click(app.add_point, [state, px, py], VIEW, api_name="add_point", **quiet)
        add_pair_btn.click(app.add_pair, [state, px, py, ptx, pty], VIEW, api_name="add_pair", **quiet)
        undo_btn.click(app.undo, [state], VIEW, api_name="undo", **quiet)
        clear_btn.click(app.clear_points, [state], VIEW, api_name="clear_points", **quiet)

        # ------------------------------------------------------------------ mask
        mask_inputs, mask_outputs = [state, editor, mask_mode, show_mask], [canvas, mask_info, status_box, state]
        apply_mask_btn.click(app.set_mask, mask_inputs, mask_outputs, api_name="set_mask", **quiet)
        editor.change(app.sync_mask, mask_inputs, mask_outputs, api_visibility="private", trigger_mode="always_last",
                      **quiet)
        mask_mode.change(app.set_mask, mask_inputs, mask_outputs, api_visibility="private", **quiet)
        clear_mask_btn.click(app.clear_mask, [state], [*mask_outputs, editor], api_name="clear_mask", **quiet)
        refresh_mask_btn.click(app.clear_mask, [state], [*mask_outputs, editor], api_visibility="private", **quiet)
        show_mask.change(app.toggle_mask, [state, show_mask], [canvas, state], api_visibility="private", **quiet)

        # ------------------------------------------------------------------ run / stop
        run_inputs = [state, max_steps, lr, r1, r2, lam, stop_d, tracking, w_mode, display_every]
        # an engine elsewhere (Ray Serve) takes more runs at once than this process's CPU share allows
        run_limit = getattr(editor_state.ENGINE, "concurrent_runs", None) or "default"
        run_event = start_btn.click(app.run, run_inputs, [*VIEW, editor], api_name="run",
                                    concurrency_limit=run_limit, **quiet)
        stop_btn.click(app.stop, [state], [*VIEW, editor], cancels=[run_event], api_name="stop", **quiet)

        # ------------------------------------------------------------------ export
        png_btn.click(app.export_png, [state], [export_files, state], api_name="export_png")
        npy_btn.click(app.download_latent, [state], [export_files, state], api_name="export_latent")
        gif_btn.click(app.export_gif, [state], [export_files, state], api_name="export_gif")
        recipe_btn.click(app.export_recipe, [state], [export_files, state], api_name="export_recipe")
        debug_btn.click(app.debug_state, [state], [debug_box, state], api_name="debug_state", **quiet)

    PIL.Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    demo.queue(default_concurrency_limit=2)
    demo.draggan_model_path = model_path  # for launchers / tests
    return demo


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

def launch(demo: gr.Blocks, host: str, port: int, share: bool = False, info: str = ""):
    """Serve a demo that `launcher.prepare` built (device, threads and model are set up there)."""
    # quiet: gradio's own banner suggests `share=True` in `launch()`, which users set with --share here
    _, local_url, share_url = demo.launch(server_name=host, server_port=port, share=share,
                                          max_file_size=MAX_UPLOAD, prevent_thread_lock=True, css=CSS,
                                          footer_links=["api"], show_error=False, quiet=True)
    print(f"DragGAN web UI: {info or Path(demo.draggan_model_path).name}", flush=True)
    print(f"open {local_url}" + ("" if share else "  (python app.py --share for a public link)"), flush=True)
    if share:
        if share_url:
            print(f"public link: {share_url}", flush=True)
        else:
            print("Could not create a public share link (offline or tunnel blocked); "
                  f"still serving locally at {local_url}", flush=True)
    demo.block_thread()
