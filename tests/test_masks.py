"""Masks: the fixed region stays (much) closer to the original while the handle still moves; masks
that fix or free the whole image behave sensibly and say so; the model carries its mask settings."""
import json

import numpy as np
import pytest
import torch

from draggan_core.edit.session import DragSession, paste_fixed_region
from draggan_core.edit.settings import DragConfig
from draggan_core.evaluation.protocol import flexible_mask
from draggan_core.model.checkpoints import load_generator, read_native_metadata
from draggan_core.model.latents import seed_to_w
from draggan_core.model.networks import Generator, GeneratorConfig
from draggan_core.model.store import CHECKPOINTS_DIR, drag_defaults_of

from conftest import ui_model_path

SHIPPED = ("embedded-faces64-parts.safetensors", "embedded-faces64.safetensors", "embedded-faces128-parts.safetensors")
HANDLE, TARGET = (44.0, 42.0), (47.0, 39.0)  # the right mouth corner of seed 11, up and outwards


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    path = ui_model_path()  # HANDLE, TARGET and the masks are 64 px pixels
    return load_generator(path), drag_defaults_of(path)


def edit(model, mask, steps=80):
    G, defaults = model
    s = DragSession(G, seed_to_w(G, 11, psi=0.7), DragConfig(display_every=0), model_defaults=defaults)
    s.add_pair(HANDLE, TARGET)
    s.set_mask(mask)
    for r in s.run(max_steps=steps):
        pass
    return s, r


def outside_change(s, mask):
    before, after = s.render(s.w_initial).astype(np.float64), s.render().astype(np.float64)
    return float(np.abs(after - before).mean(axis=2)[mask < 0.5].mean())


def test_mask_keeps_the_fixed_region_and_the_handle_still_moves(model):
    G, _ = model
    mask = flexible_mask([HANDLE], [TARGET], G.img_resolution)
    free, r_free = edit(model, None)
    held, r_held = edit(model, mask)
    start = np.hypot(TARGET[0] - HANDLE[0], TARGET[1] - HANDLE[1])
    # the handle still gets (close to) the target with the mask: at least 2/3 of the way
    assert r_held.distances[0] < start / 3, r_held.distances
    # and the rest of the image changes far less than without it (measured: 6.71 -> 1.76 of 255)
    assert outside_change(held, mask) < 0.5 * outside_change(free, mask)


def test_all_flexible_mask_is_no_mask(model):
    everything = np.ones((64, 64), np.float32)
    free, _ = edit(model, None, steps=5)
    full, _ = edit(model, everything, steps=5)
    assert not full.mask_active and "whole image change" in full.mask_message
    assert torch.equal(free.latent, full.latent)  # the same optimisation, bit for bit


def test_all_fixed_mask_is_ignored_with_a_message(model):
    G, defaults = model
    s = DragSession(G, seed_to_w(G, 11), model_defaults=defaults)
    s.set_mask(np.zeros((64, 64)))
    assert s.mask is None and not s.mask_active
    assert "fixes the whole image" in s.mask_message and "ignored" in s.mask_message
    s.set_mask(None)
    assert s.mask_message is None


def test_points_in_the_fixed_region_are_reported(model):
    G, defaults = model
    s = DragSession(G, seed_to_w(G, 11), model_defaults=defaults)
    s.add_pair((10, 10), (12, 12))
    s.add_pair(HANDLE, TARGET)
    s.set_mask(flexible_mask([HANDLE], [TARGET], 64))
    warnings = s.mask_warnings()
    assert len(warnings) == 2 and all(w.startswith("point pair 1") for w in warnings)


def test_mask_settings_apply_only_while_a_mask_is_set():
    G = Generator(GeneratorConfig(z_dim=8, w_dim=16, img_resolution=32, mapping_layers=1, channel_base=256,
                                  channel_max=16))
    card = {"w_mode": "w", "lambda_mask": 2.0, "mask": {"w_mode": "w+", "lambda_mask": 7.0, "lambda_image": 3.0}}
    plain = DragConfig().resolve(G, 1, card)
    masked = DragConfig().resolve(G, 1, card, masked=True)
    assert (plain.w_mode, plain.lambda_mask, plain.lambda_image) == ("w", 2.0, 0.0)
    assert (masked.w_mode, masked.lambda_mask, masked.lambda_image) == ("w+", 7.0, 3.0)
    assert DragConfig(lambda_image=0.5).resolve(G, 1, card, masked=True).lambda_image == 0.5  # user wins
    # no metadata (e.g. an NVIDIA pickle): the paper's mask, on the feature block only (speed at 512 px)
    bare = DragConfig().resolve(G, 1, {}, masked=True)
    assert (bare.w_mode, bare.num_optimized_ws, bare.lambda_mask, bare.lambda_image) == ("w+", 6, 20.0, 0.0)
    with pytest.raises(ValueError):
        DragConfig(lambda_image=-1.0).resolve(G, 1, card, masked=True)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_carry_mask_settings(name):
    path = CHECKPOINTS_DIR / name
    mask = drag_defaults_of(path).get("mask")
    assert isinstance(mask, dict) and mask, "the model's drag defaults name no mask settings"
    assert json.loads(read_native_metadata(path)["drag_defaults"])["mask"] == mask


def test_fixed_mode_brushing_inverts_the_region():
    from webui.editor.state import EditorState, editor_alpha

    st = EditorState.create(ui_model_path(), seed=2)
    try:
        layer = np.zeros((256, 256, 4), np.uint8)
        layer[:128, :, 3] = 255  # the top half of the canvas painted
        st.set_mask_from_layer(editor_alpha({"background": None, "layers": [layer]}), paint_fixed=False)
        flexible = st.mask_array().copy()
        st.set_mask_from_layer(editor_alpha({"background": None, "layers": [layer]}), paint_fixed=True)
        fixed_mode = st.mask_array()
        assert flexible[:32].all() and not flexible[32:].any()
        np.testing.assert_array_equal(fixed_mode, ~flexible)
    finally:
        st.cleanup()


def test_paste_back_export_is_separate_from_the_edit():
    original = np.zeros((4, 4, 3), np.uint8)
    edited = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), np.float32)
    mask[1:3, 1:3] = 1
    out = paste_fixed_region(edited, original, mask)
    assert (out[1:3, 1:3] == 200).all() and out.sum() == 4 * 3 * 200
    with pytest.raises(ValueError):
        paste_fixed_region(edited, original[:2], mask)


def test_keep_weights_hard_edge_and_feathered_ramp():
    from draggan_core.edit.steps import keep_weights
    mask = torch.zeros(11, 11)
    mask[5, 5] = 1
    assert torch.equal(keep_weights(mask, 0), 1 - mask)
    ramp = keep_weights(mask, 3)
    # k px (Chebyshev) from the flexible pixel: k / 4, then 1; the flexible pixel itself stays free
    assert ramp[5, 5] == 0
    assert ramp[5, 6] == pytest.approx(0.25) and ramp[3, 7] == pytest.approx(0.5)
    assert ramp[2, 5] == pytest.approx(0.75) and ramp[1, 5] == 1 and ramp[0, 0] == 1
    soft = torch.full((6, 6), 0.25)  # a soft mask keeps its own weights inside
    assert torch.allclose(keep_weights(soft, 2), 1 - soft)


def test_feathered_mask_still_holds_and_negative_feather_is_refused(model):
    G, defaults = model
    mask = flexible_mask([HANDLE], [TARGET], G.img_resolution)
    free, _ = edit(model, None)
    s = DragSession(G, seed_to_w(G, 11, psi=0.7), DragConfig(display_every=0, mask_feather=4), model_defaults=defaults)
    s.add_pair(HANDLE, TARGET)
    s.set_mask(mask)
    for r in s.run(max_steps=80):
        pass
    assert r.distances[0] < np.hypot(3, 3) / 3
    assert outside_change(s, mask) < 0.5 * outside_change(free, mask)
    with pytest.raises(ValueError):
        DragConfig(mask_feather=-1).resolve(G, 1, defaults, masked=True)


def _held_edit(model, anchor):
    G, defaults = model
    cfg = DragConfig(display_every=0, mask_hold_steps=20, mask_hold_anchor=anchor)
    s = DragSession(G, seed_to_w(G, 11, psi=0.7), cfg, model_defaults=defaults)
    s.add_pair(HANDLE, TARGET)
    s.set_mask(flexible_mask([HANDLE], [TARGET], G.img_resolution))
    results = list(s.run(max_steps=120))
    return s, results


def test_hold_anchor_keeps_the_dragged_content_at_the_target(model):
    """Hold steps run after the handle arrives (the run does not stop there); with the anchor, the
    features at the target stay closer to the handle's first features than without it."""
    from draggan_core.edit.steps import FeatureWindow

    G, defaults = model
    resolved = DragConfig().resolve(G, 1, defaults, masked=True)
    gaps = {}
    for anchor in (0.0, 1.0):
        s, results = _held_edit(model, anchor)
        arrived = next(i for i, r in enumerate(results) if r.reached)
        assert len(results) > arrived + 10  # the hold steps ran past the arrival
        pair = s.pairs[0]
        assert pair.anchor is not None and pair.anchor.shape[0] == pair.reference.shape[0]  # one row per patch pixel
        with torch.no_grad():
            _, feat = G.synthesis(s._ws(), noise_mode="const", feature_res=resolved.feature_res, fused=False)
        k = resolved.track_patch
        d = torch.arange(-k, k + 1, dtype=torch.float32)
        py, px = torch.meshgrid(d, d, indexing="ij")
        at = torch.tensor(TARGET) + torch.stack([px.reshape(-1), py.reshape(-1)], dim=1)
        fr = resolved.feature_res
        here = FeatureWindow(feat, (0, fr, 0, fr), G.img_resolution, fr).sample(at)
        gaps[anchor] = float((here - pair.anchor).abs().mean())
    assert gaps[1.0] < gaps[0.0], gaps
    with pytest.raises(ValueError):
        DragConfig(mask_hold_anchor=-1).resolve(G, 1, defaults, masked=True)
