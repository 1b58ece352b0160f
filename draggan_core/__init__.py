"""DragGAN on a plain CPU: the generator, the drag editor, its evaluation and the `draggan` command.

The public Python API is these names (docs/python-api.md):

    from draggan_core import ModelStore, default_model_path, seed_to_w, DragSession, DragConfig

Subpackages, each importing only those above it in this list (tests/test_layout.py checks):

    model/       the networks (StyleGAN2 generator, landmark net), their files, latents, devices
    edit/        the drag session and its step, the engine protocol, frames, recipes, inversion
    evaluation/  the landmark protocol, the face parts check, the user-edit benchmark
    cli/         the `draggan` command (`python -m draggan_core`)
    serving/     the drag engine on Ray Serve (optional)

drag.py, models.py and latents.py only re-export their old names for existing code. The names
below load on first use, so `import draggan_core` alone does not import torch.
"""
from __future__ import annotations

import importlib

_API = {
    "ModelStore": "draggan_core.model.store",
    "default_model_path": "draggan_core.model.store",
    "load_generator": "draggan_core.model.checkpoints",
    "seed_to_w": "draggan_core.model.latents",
    "load_latent": "draggan_core.model.latents",
    "save_latent": "draggan_core.model.latents",
    "DragSession": "draggan_core.edit.session",
    "DragConfig": "draggan_core.edit.settings",
    "DragError": "draggan_core.edit.settings",
    "StepResult": "draggan_core.edit.settings",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'draggan_core' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
