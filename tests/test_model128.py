"""The 128 px embedded model (grown from the 64 px default) ships as an option: it loads as a 128 px
generator with its own drag and mask settings, stays out of the default's place, fits the size
budget, and a short drag on it moves the handle."""
import numpy as np
import pytest
import torch

from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.model.checkpoints import load_generator
from draggan_core.model.latents import seed_to_w
from draggan_core.model.store import CHECKPOINTS_DIR, DEFAULT_MODEL_NAME, drag_defaults_of, list_local_models

MODEL_128 = CHECKPOINTS_DIR / "embedded-faces128-parts.safetensors"


@pytest.fixture(scope="module")
def model128():
    return load_generator(MODEL_128), drag_defaults_of(MODEL_128)


def test_128px_model_is_listed_as_an_option_not_the_default():
    names = [p.name for p in list_local_models()]
    assert names[0] == DEFAULT_MODEL_NAME
    assert MODEL_128.name in names
    assert MODEL_128.stat().st_size <= 10 * 2**20


def test_128px_model_carries_settings_for_its_own_blocks(model128):
    G, defaults = model128
    assert G.img_resolution == 128 and G.num_ws == 12
    for masked in (False, True):
        cfg = DragConfig().resolve(G, 1, defaults, masked=masked)
        assert cfg.feature_res in G.synthesis.block_resolutions and cfg.track_res in G.synthesis.block_resolutions
    masked = DragConfig().resolve(G, 1, defaults, masked=True)
    assert masked.num_optimized_ws == G.num_ws and masked.lambda_image > 0


def test_drag_on_the_128px_model_moves_the_handle(model128):
    G, defaults = model128
    torch.set_num_threads(1)
    s = DragSession(G, seed_to_w(G, 11, psi=0.7), DragConfig(display_every=0), model_defaults=defaults)
    handle, target = (88.0, 84.0), (94.0, 78.0)  # seed 11's right mouth corner (the 64 px test's, x2)
    s.add_pair(handle, target)
    for r in s.run(max_steps=60):
        pass
    start = float(np.hypot(target[0] - handle[0], target[1] - handle[1]))
    assert r.distances[0] < start / 3, r.distances


def test_editor_shows_the_128px_model_enlarged_4x():
    from webui.editor.state import EditorState

    st = EditorState.create(MODEL_128, seed=3)
    try:
        assert st.resolution == 128 and st.factor == 4
        shown = st.display()
        assert shown.shape[:2] == (512, 512)
        assert st.click(127, 0) == "handle"  # the whole 128 px grid is clickable
    finally:
        st.cleanup()
