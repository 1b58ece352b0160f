"""Gradio web UI for the CPU DragGAN editor (`python app.py`). Session logic: `webui.state`."""


def build_demo(*args, **kwargs):
    from .app import build_demo as _build
    return _build(*args, **kwargs)


__all__ = ["build_demo"]
