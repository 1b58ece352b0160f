"""Gradio Blocks UI for the CPU DragGAN editor: the page's layout and its wiring.

The handlers live in `webui.handlers` (a thin layer over `webui.editor.state.EditorState`, which holds the
`DragSession`). Every click handler has an API twin (``/add_point`` etc.) because ``.select`` events
cannot be sent by gradio_client.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402

from draggan_core.model.registry import list_models  # noqa: E402

from . import services  # noqa: E402  (its ENGINE is set before the UI is built)
from .editor.render import EDITOR_SIZE  # noqa: E402
from .editor.state import EditorState  # noqa: E402
from .handlers import App, brush  # noqa: E402
from .services import (downloads_allowed_by_default, env_max_steps, first_line, load_examples,  # noqa: E402
                       model_choices, resolve_model_path)

MAX_UPLOAD = "20mb"
# Mask layers are decoded by gradio (PIL) before any handler runs; a tiny PNG can declare 9000x9000
# pixels (measured: 79 KB upload -> 1.4 GB peak RSS, 17 s CPU). PIL refuses images above twice this
# limit (DecompressionBombError), so nothing larger than 2048x2048 is decoded. The editor sends 256x256.
MAX_IMAGE_PIXELS = 2048 * 2048 // 2
STATE_TTL_S = 3 * 3600
CANVAS_HEIGHT = 530

CSS = """
#canvas img { cursor: crosshair; }
#canvas, #editor { min-height: 530px; }
#status textarea, #points textarea, #mask_info textarea { font-family: ui-monospace, monospace; font-size: 13px; }
.hint { font-size: 14px; }
#history { min-height: 0; }
#downloads button { white-space: nowrap; }
"""

# measured: docs/evaluation.md#masks (default model, 100 test pairs, 1 point)
MASK_HINT = ("The mask keeps the rest of the image close, not frozen: on the default model's test edits "
             "the mean change outside it fell from 9.4 to 1.7 (of 255), landmarks there moved 1.6 px instead of 4.0, "
             "and handles ended about 0.7 px further from their targets. The image is always the generator's own.")

INTRO = """**DragGAN on CPU.** **Points**: click a handle (**red**), then where it should go (**blue**), press
**▶ Start**. **Mask** (optional): paint on the image. Every run lands in the history: click a step to
go back to it. New here? Try an example on the right."""


def _registry_choices():
    try:
        return [(f"{e.name} ({e.resolution or '?'} px)", e.name) for e in list_models()]
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------
# gradio's log: a refused input is one line, not a traceback
# ---------------------------------------------------------------------------------------------

class _OneLineRefusals:
    """Stands in for the `traceback` module in gradio's queue and routes: an input that gradio's own
    components refuse (a value not among a dropdown's choices, a number that is not one, an image
    that will not decode) is logged as one line; anything else keeps its full traceback."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def print_exc(self, *args, **kwargs):
        e = sys.exc_info()[1]
        if e is not None and _refused_input(e):
            print(f"gradio refused an input: {type(e).__name__}: {first_line(e, 300)}", file=sys.stderr, flush=True)
            return
        self._module.print_exc(*args, **kwargs)


def _refused_input(e: BaseException) -> bool:
    if isinstance(e, gr.Error):
        return True
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("preprocess", "preprocess_data"):
            return True
        tb = tb.tb_next
    return False


def quiet_refusals():
    import gradio.queueing
    import gradio.routes
    import gradio.utils
    for module in (gradio.queueing, gradio.routes, gradio.utils):
        if getattr(module, "traceback", None) is traceback:
            module.traceback = _OneLineRefusals(traceback)


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------

def build_demo(model: str | os.PathLike | None = None, first_state: EditorState | None = None,
               allow_downloads: bool | None = None) -> gr.Blocks:
    """The editor's page. `first_state`: a new visitor's state, already rendered (the launcher's);
    its image is the canvas's initial value, so the page shows it without waiting for a request.
    `allow_downloads`: may visitors download models into this server (None: not on a Space)."""
    model_path = resolve_model_path(model)
    if allow_downloads is None:
        allow_downloads = downloads_allowed_by_default()
    examples = load_examples()
    app = App(model_path, allow_downloads=allow_downloads, examples=examples)
    first = first_state or EditorState.create(model_path)
    step_bound = env_max_steps()
    default_steps = min(300, step_bound) if step_bound else 300
    max_steps_limit = step_bound or 2000
    quiet_refusals()

    with gr.Blocks(title="DragGAN (CPU)") as demo:
        state = gr.State(None, time_to_live=STATE_TTL_S,
                         delete_callback=lambda st: st.cleanup() if isinstance(st, EditorState) else None)
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- main column
            with gr.Column(scale=3, min_width=560):
                gr.Markdown(INTRO, elem_classes=["hint"])
                with gr.Row(equal_height=True):
                    mode = gr.Radio(["Points", "Mask"], value="Points", label="Clicks on the image",
                                    elem_id="mode", scale=2)
                    mask_mode = gr.Radio([("may change (green)", "flexible"), ("stays fixed (red)", "fixed")],
                                         value="flexible", label="The brush paints what", elem_id="mask_mode",
                                         scale=3)
                    pixels = gr.Checkbox(False, label="Show pixels", elem_id="pixels", scale=1,
                                         info="nearest up-scaling")
                canvas = gr.Image(first.display(), label="Image (click: handle, then target)", type="numpy",
                                  format="png", interactive=False, elem_id="canvas", height=CANVAS_HEIGHT,
                                  buttons=[])
                editor = gr.ImageEditor(
                    first.editor_value(), label="Paint the mask (brush and eraser on the left)", type="numpy",
                    image_mode="RGBA", sources=(), transforms=(), layers=False, brush=brush(False),
                    eraser=gr.Eraser(default_size=14), canvas_size=(EDITOR_SIZE, EDITOR_SIZE),
                    height=CANVAS_HEIGHT, elem_id="editor", buttons=[], format="png", visible=False)
                with gr.Row():
                    start_btn = gr.Button("▶ Start", variant="primary", elem_id="start", min_width=80)
                    stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop", min_width=80)
                    undo_run_btn = gr.Button("↶ Undo run", elem_id="undo_run", min_width=80, interactive=False)
                    redo_run_btn = gr.Button("↷ Redo run", elem_id="redo_run", min_width=80, interactive=False)
                status_box = gr.Textbox(label="Status", interactive=False, elem_id="status", max_lines=2)
                with gr.Row():
                    undo_btn = gr.Button("Undo point", elem_id="undo", min_width=80, size="sm")
                    clear_btn = gr.Button("Clear points", elem_id="clear", min_width=80, size="sm")
                    # beside what it undoes; in the run row its label wrapped into a tall, narrow button
                    restore_btn = gr.Button("↶ Undo clear", elem_id="restore_points", min_width=160, visible=False,
                                            variant="secondary", size="sm")
                    reset_btn = gr.Button("Reset image", elem_id="reset", min_width=80, size="sm")
                gallery = gr.Gallery(first.history_items(), label="History (click a step to go back to it)",
                                     elem_id="history", columns=7, rows=1, height=160, allow_preview=False, fit_columns=False,
                                     object_fit="contain", interactive=False, buttons=[])
                with gr.Row(elem_id="downloads", equal_height=False):
                    dl_png = gr.DownloadButton("⬇ PNG", elem_id="dl_png", min_width=70, size="sm")
                    png_scale = gr.Dropdown([("PNG 1x", "1x"), ("PNG 2x", "2x"), ("PNG 4x", "4x"), ("PNG 8x", "8x")],
                                            value="4x", show_label=False, container=False, elem_id="png_scale",
                                            min_width=90, filterable=False)
                    dl_latent = gr.DownloadButton("⬇ Latent .npy", elem_id="dl_latent", min_width=90, size="sm")
                    dl_gif = gr.DownloadButton("⬇ GIF", elem_id="dl_gif", min_width=70, size="sm")
                    dl_recipe = gr.DownloadButton("⬇ Recipe", elem_id="dl_recipe", min_width=80, size="sm")
                points_box = gr.Textbox(label="Points (model pixels, x = column)", interactive=False,
                                        elem_id="points", lines=2, max_lines=8)
                # API twins of the click handlers and the file exports (hidden)
                with gr.Row(visible=False):
                    px = gr.Number(label="x", precision=0, elem_id="api_x")
                    py = gr.Number(label="y", precision=0, elem_id="api_y")
                    ptx = gr.Number(label="target x", precision=0)
                    pty = gr.Number(label="target y", precision=0)
                    step_no = gr.Number(label="history step", precision=0)
                    example_no = gr.Number(label="example", precision=0)
                    add_point_btn = gr.Button("add point")
                    add_pair_btn = gr.Button("add pair")
                    goto_btn = gr.Button("goto")
                    example_btn = gr.Button("example")
                    debug_btn = gr.Button("debug")
                    debug_box = gr.JSON(label="debug")
                    export_files = gr.File(label="Files", file_count="multiple", interactive=False)
                    latent_dl_btn = gr.Button("download latent")
                    png_btn = gr.Button("PNG")
                    npy_btn = gr.Button("Latent .npy")
                    gif_btn = gr.Button("GIF")
                    recipe_btn = gr.Button("Recipe .json")

            # ---------------------------------------------------------------- side panel
            with gr.Column(scale=2, min_width=360):
                if examples:
                    examples_ds = gr.Dataset(components=["textbox"], samples=[[e["name"]] for e in examples],
                                             label="Examples (seed and points in one click)", type="index",
                                             elem_id="examples", samples_per_page=12)
                with gr.Accordion("Latent", open=True):
                    with gr.Row():
                        # no `minimum`: gradio would refuse with a server traceback; set_seed says why instead
                        seed = gr.Number(label="Seed", value=first.seed, precision=0, elem_id="seed", scale=2,
                                         info="press Enter for a new image")
                        rand_btn = gr.Button("Random seed", elem_id="random_seed", scale=1)
                    psi = gr.Slider(0.0, 1.2, value=0.7, step=0.05, label="Truncation psi",
                                    info="lower = more average, cleaner images", elem_id="psi")
                    w_mode = gr.Radio(["model default", "W+", "W"], value="model default", label="Optimise in",
                                      info="W+: one vector per layer (more flexible); W: one shared vector")
                    latent_file = gr.File(label="Upload latent (.npy / .pt)", file_types=[".npy", ".pt", ".pth"],
                                          type="filepath", elem_id="latent_upload", height=110)
                    image_file = gr.File(label="Edit your own image (GAN inversion, 150 steps)", type="filepath",
                                         file_types=["image"], elem_id="image_upload", height=110)

                with gr.Accordion("Mask", open=True):
                    gr.Markdown("Switch the image to **Mask** and paint on it: green = may change, "
                                "red = stays fixed (the brush's meaning is chosen above the image). "
                                "Each stroke applies at once.", elem_classes=["hint"])
                    gr.Markdown(MASK_HINT, elem_classes=["hint"])
                    with gr.Row():
                        show_mask = gr.Checkbox(value=True, label="Show mask on the image", elem_id="show_mask")
                        clear_mask_btn = gr.Button("Clear mask", elem_id="clear_mask", size="sm")
                    mask_info = gr.Textbox(label="Mask received", interactive=False, elem_id="mask_info",
                                           value=first.mask_info())

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
                    if model_path.name not in [v for _, v in local_choices]:
                        local_choices.append((model_path.name, model_path.name))
                    model_dd = gr.Dropdown(local_choices, value=model_path.name, label="Local checkpoint",
                                           elem_id="model", allow_custom_value=False)
                    with gr.Row(visible=allow_downloads):
                        registry_dd = gr.Dropdown(_registry_choices() if allow_downloads else [], value=None,
                                                  label="Download a known model", elem_id="registry", scale=3)
                        dl_model_btn = gr.Button("Download", elem_id="download_model", scale=1)
                    if not allow_downloads:
                        gr.Markdown("Model downloads are off on this server (start it with `--allow-downloads`).",
                                    elem_classes=["hint"])
                    model_info = gr.Markdown(f"Loaded: `{model_path.name}`")

        VIEW = [canvas, points_box, status_box, state]
        LOAD = [*VIEW, editor, seed, mask_info]
        SIDE = [gallery, restore_btn, undo_run_btn, redo_run_btn, dl_png, dl_latent, dl_gif, dl_recipe]
        quiet = dict(show_progress="hidden")
        side = dict(fn=app.side, inputs=[state, png_scale], outputs=SIDE, api_visibility="private", **quiet)

        # ------------------------------------------------------------------ page load / latent
        demo.load(app.on_load, [state], LOAD, api_name="new_session", **quiet).then(**side)
        seed.submit(app.set_seed, [state, seed, psi], LOAD, api_name="set_seed", **quiet).then(**side)
        psi.release(app.set_seed, [state, seed, psi], LOAD, api_visibility="private", **quiet).then(**side)
        rand_btn.click(app.random_seed, [state, psi], LOAD, api_name="random_seed", **quiet).then(**side)
        latent_file.upload(app.upload_latent, [state, latent_file], [*LOAD, latent_file],
                           api_name="upload_latent").then(**side)
        image_file.upload(app.upload_image, [state, image_file], [*LOAD, image_file], api_name="upload_image",
                          **quiet).then(**side)
        reset_btn.click(app.reset_image, [state], LOAD, api_name="reset", **quiet).then(**side)
        model_dd.input(app.select_model, [state, model_dd], [*LOAD, model_dd, model_info],
                       api_name="set_model").then(**side)
        dl_model_btn.click(app.download_model, [registry_dd], [model_dd, model_info], api_name="download_model")
        if examples:
            examples_ds.click(app.load_example, [state, examples_ds], [*LOAD, model_dd, model_info],
                              api_visibility="private", **quiet).then(**side)
        example_btn.click(app.load_example, [state, example_no], [*LOAD, model_dd, model_info],
                          api_name="load_example", **quiet).then(**side)

        # ------------------------------------------------------------------ history
        restore_btn.click(app.restore_cleared, [state], LOAD, api_name="restore_points", **quiet).then(**side)
        undo_run_btn.click(app.undo_run, [state], LOAD, api_name="undo_run", **quiet).then(**side)
        redo_run_btn.click(app.redo_run, [state], LOAD, api_name="redo_run", **quiet).then(**side)
        gallery.select(app.on_history_select, [state], LOAD, api_visibility="private", **quiet).then(**side)
        goto_btn.click(app.goto_step, [state, step_no], LOAD, api_name="goto_step", **quiet).then(**side)

        # ------------------------------------------------------------------ points
        canvas.select(app.on_click, [state], VIEW, api_visibility="private", trigger_mode="multiple", **quiet)
        add_point_btn.click(app.add_point, [state, px, py], VIEW, api_name="add_point", **quiet)
        add_pair_btn.click(app.add_pair, [state, px, py, ptx, pty], VIEW, api_name="add_pair", **quiet)
        undo_btn.click(app.undo, [state], VIEW, api_name="undo", **quiet)
        clear_btn.click(app.clear_points, [state], VIEW, api_name="clear_points", **quiet)

        # ------------------------------------------------------------------ mask, view
        mask_inputs, mask_outputs = [state, editor, mask_mode, show_mask], [canvas, mask_info, status_box, state]
        mode.change(app.set_mode, [state, mode, editor, mask_mode], [canvas, editor, status_box, state],
                    api_visibility="private", **quiet)
        # each stroke (and eraser stroke) applies at once; a repeated value changes nothing
        editor.input(app.sync_mask, mask_inputs, mask_outputs, api_visibility="private", trigger_mode="always_last",
                     **quiet)
        editor.clear(app.clear_mask, [state], [*mask_outputs, editor], api_name="canvas_cleared",
                     api_visibility="private", **quiet)
        mask_mode.input(app.change_mask_mode, [state, mask_mode, show_mask], [*mask_outputs, editor],
                        api_visibility="private", **quiet)
        clear_mask_btn.click(app.clear_mask, [state], [*mask_outputs, editor], api_name="clear_mask", **quiet)
        show_mask.change(app.toggle_mask, [state, show_mask], [canvas, state], api_visibility="private", **quiet)
        pixels.change(app.set_pixels, [state, pixels], [canvas, state], api_visibility="private",
                      **quiet).then(**side)
        png_scale.change(**side)
        # API: apply a mask canvas value (the browser applies strokes through `editor.input`)
        gr.Button("set mask", visible=False).click(app.set_mask, mask_inputs, mask_outputs, api_name="set_mask",
                                                   **quiet)

        # ------------------------------------------------------------------ run / stop
        run_inputs = [state, max_steps, lr, r1, r2, lam, stop_d, tracking, w_mode, display_every]
        # an engine elsewhere (Ray Serve) takes more runs at once than this process's CPU share allows
        run_limit = getattr(services.ENGINE, "concurrent_runs", None) or "default"
        start_btn.click(None, None, mode, js="() => 'Points'")  # the run is shown on the image
        run_event = start_btn.click(app.run, run_inputs, [*VIEW, editor], api_name="run",
                                    concurrency_limit=run_limit, **quiet)
        run_event.then(**side)
        stop_btn.click(app.stop, [state], [*VIEW, editor], cancels=[run_event], api_name="stop",
                       **quiet).then(**side)

        # ------------------------------------------------------------------ files out
        for button, kind in ((dl_png, "png"), (dl_latent, "latent"), (dl_gif, "gif"), (dl_recipe, "recipe")):
            button.click(app.download_hint(kind), [state], [status_box], api_visibility="private", **quiet)
        latent_dl_btn.click(app.download_latent, [state], [export_files, state], api_name="download_latent")
        png_btn.click(app.export_png, [state], [export_files, state], api_name="export_png")
        npy_btn.click(app.download_latent, [state], [export_files, state], api_name="export_latent")
        gif_btn.click(app.export_gif, [state], [export_files, state], api_name="export_gif")
        recipe_btn.click(app.export_recipe, [state], [export_files, state], api_name="export_recipe")
        debug_btn.click(app.debug_state, [state], [debug_box, state], api_name="debug_state", **quiet)

    PIL.Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    demo.queue(default_concurrency_limit=2)
    demo.draggan_model_path = model_path  # for launchers / tests
    demo.draggan_allow_downloads = allow_downloads
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
    # one write, so a reader of the log never sees the banner without the address
    print(f"DragGAN web UI: {info or Path(demo.draggan_model_path).name}\n"
          f"open {local_url}" + ("" if share else "  (python app.py --share for a public link)"), flush=True)
    if not getattr(demo, "draggan_allow_downloads", True):
        print("model downloads by visitors: off (--allow-downloads turns them on)", flush=True)
    if share:
        if share_url:
            print(f"public link: {share_url}", flush=True)
        else:
            print("Could not create a public share link (offline or tunnel blocked); "
                  f"still serving locally at {local_url}", flush=True)
    demo.block_thread()
