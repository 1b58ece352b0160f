"""Where the bundled checkpoints live.

In a source checkout (and an editable install) they are in `checkpoints/` beside the package. A
built wheel carries the same files as `draggan_core/bundled_checkpoints/` (pyproject.toml maps the
folder there), because an installed package has no repository around it.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
WHEEL_CHECKPOINTS_DIR = PACKAGE_DIR / "bundled_checkpoints"
SOURCE_CHECKPOINTS_DIR = PACKAGE_DIR.parent / "checkpoints"


def bundled_checkpoints_dir() -> Path:
    # the wheel's folder first: it exists only in an installed wheel, whereas site-packages/checkpoints
    # (the source rule applied to an installed package) could belong to anything
    if WHEEL_CHECKPOINTS_DIR.is_dir():
        return WHEEL_CHECKPOINTS_DIR
    return SOURCE_CHECKPOINTS_DIR


CHECKPOINTS_DIR = bundled_checkpoints_dir()
