"""Old import path, kept so that existing code keeps working: the drag session now lives in
draggan_core/edit/ (session.py, settings.py, steps.py). New code: `from draggan_core import
DragSession, DragConfig`."""
from .edit.session import DragSession, paste_fixed_region  # noqa: F401
from .edit.settings import DragConfig, DragError, PointPair, StepResult, as_point  # noqa: F401
