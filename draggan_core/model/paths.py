"""Where the bundled checkpoints and the package's data files live.

In a source checkout (and an editable install) the checkpoints are in `checkpoints/` beside the
package. A built wheel carries the same files as `draggan_core/bundled_checkpoints/` (pyproject.toml
maps the folder there), because an installed package has no repository around it. Data files of
the package itself (`registry.json`) are in `draggan_core/`, PACKAGE_DIR.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # draggan_core/ (this file is in draggan_core/model/)
WHEEL_CHECKPOINTS_DIR = PACKAGE_DIR / "bundled_checkpoints"
SOURCE_CHECKPOINTS_DIR = PACKAGE_DIR.parent / "checkpoints"


def bundled_checkpoints_dir() -> Path:
    # the wheel's folder first: it exists only in an installed wheel, whereas site-packages/checkpoints
    # (the source rule applied to an installed package) could belong to anything
    if WHEEL_CHECKPOINTS_DIR.is_dir():
        return WHEEL_CHECKPOINTS_DIR
    return SOURCE_CHECKPOINTS_DIR


CHECKPOINTS_DIR = bundled_checkpoints_dir()
