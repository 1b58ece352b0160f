"""Editing: from a latent to an edited image, built on draggan_core.model.

- session.py: `DragSession`, one user's edit (points, mask, latent, optimiser) and its resumable run loop.
- settings.py: `DragConfig` and what a run reports (`StepResult`, `PointPair`, `DragError`).
- steps.py: one drag step, our formulation and the official one, and the feature-window sampling.
- engine.py: the engine protocol (start/stream/stop a run as events) and `LocalEngine`, in process.
- frames.py: preview frames of running edits, rendered in a background thread.
- recipe.py: edit recipes (JSON) that the CLI replays and the web UI exports.
- inversion.py: a photo -> the W+ latent whose image matches it, so it can be dragged.

May import: draggan_core.model. Never the evaluation, the CLI, serving, gradio or ray.
"""
