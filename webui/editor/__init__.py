"""One visitor's editor state behind the web UI (no gradio here): `EditorState` (state.py), kept per
browser session, with its run loop (running.py), run history (history.py), downloads (exports.py)
and what it draws (render.py). It refers to the process-wide models and engine of webui/services.py
and never copies a generator.

May import: draggan_core, webui.services.
"""
