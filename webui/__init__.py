"""Gradio web UI for the CPU DragGAN editor (`python app.py`), in layers; each module imports only
those above it in this list (tests/test_layout.py checks):

    services.py          process-wide services: the shared models, the CPU thread budget, the frame
                         renderer, the drag engine (no gradio)
    editor/              one visitor's editor state (`EditorState`: points, mask, runs, history,
                         downloads), over the services (no gradio)
    app.py, handlers.py  the page: gradio layout, wiring and event handlers
    launcher.py          start-up: parse -> services -> model -> first state -> page -> serve

draggan_core never imports this package.
"""


def build_demo(*args, **kwargs):
    from .app import build_demo as _build
    return _build(*args, **kwargs)


__all__ = ["build_demo"]
