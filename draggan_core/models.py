"""Old import path, kept so that existing code keeps working: the model store now lives in
draggan_core/model/store.py. New code: `from draggan_core import ModelStore, default_model_path`."""
from .model.store import (CHECKPOINTS_DIR, DEFAULT_MODEL_NAME, LoadedModel, ModelStore,  # noqa: F401
                          default_model_path, drag_defaults_of, list_local_models)
