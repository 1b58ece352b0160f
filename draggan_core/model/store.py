"""Loaded generators shared by every session: one instance per checkpoint, loaded once, never copied.

A checkpoint may carry recommended drag settings (`drag_defaults` JSON in native metadata); the
engine uses them for settings the user leaves unset.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import NATIVE_FORMAT, CheckpointError, load_generator, read_native_metadata
from .networks import Generator
from .paths import CHECKPOINTS_DIR

# the 64 px parts model grown to 128 px: meets every bar set for a new default (checkpoints/README.md);
# the 64 px models (embedded-faces64-parts, the L1 embedded-faces64) stay available, opt-in
PARTS_64_MODEL_NAME = "embedded-faces64-parts.safetensors"
PARTS_128_MODEL_NAME = "embedded-faces128-parts.safetensors"
DEFAULT_MODEL_NAME = PARTS_128_MODEL_NAME
CHECKPOINT_SUFFIXES = (".safetensors", ".pkl", ".pt", ".pth")


def default_model_path() -> Path:
    return CHECKPOINTS_DIR / DEFAULT_MODEL_NAME


@dataclass
class LoadedModel:
    path: Path
    G: Generator
    drag_defaults: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def drag_defaults_of(path: Path) -> dict:
    """Recommended drag settings stored in a native checkpoint's metadata ({} for other formats)."""
    try:
        meta = read_native_metadata(path)
    except Exception:  # not a safetensors file: no recommendations
        return {}
    try:
        value = json.loads(meta.get("drag_defaults", "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _may_be_generator(path: Path) -> bool:
    """Our .safetensors files say what they hold (the landmark detector lives there too)."""
    if path.suffix.lower() != ".safetensors":
        return True
    try:
        return read_native_metadata(path).get("format") == NATIVE_FORMAT
    except Exception:
        return False


class ModelStore:
    """Thread-safe cache path -> LoadedModel. Loading the same file twice returns the same object."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._models: dict[Path, LoadedModel] = {}
        self._lock = threading.Lock()

    def set_device(self, device) -> None:
        """Load models on `device` from now on; models already loaded elsewhere are dropped."""
        with self._lock:
            if str(device) != str(self.device):
                self._models.clear()
            self.device = device

    def get(self, path: str | Path) -> LoadedModel:
        path = Path(path).resolve()
        with self._lock:
            model = self._models.get(path)
            if model is None:
                G = load_generator(path, device=self.device)
                model = LoadedModel(path=path, G=G, drag_defaults=drag_defaults_of(path))
                self._models[path] = model
            return model


def list_local_models(directory: str | Path = CHECKPOINTS_DIR) -> list[Path]:
    """Checkpoint files in `directory`, the embedded default first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
                   and _may_be_generator(p))
    files.sort(key=lambda p: p.name != DEFAULT_MODEL_NAME)
    return files


__all__ = ["CheckpointError", "LoadedModel", "ModelStore", "default_model_path", "drag_defaults_of",
           "list_local_models"]
