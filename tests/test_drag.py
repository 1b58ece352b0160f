"""Drag engine: official-trajectory parity, exactness of our fast formulation, session semantics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig, DragError
from draggan_core.edit.steps import FeatureWindow, disc_offsets
from draggan_core.model.checkpoints import load_generator
from draggan_core.model.windowed import features_in_window
from official_pickle import FIXTURES, tiny64_pickle



@pytest.fixture(scope="module")
def G():
    return load_generator(tiny64_pickle())


@pytest.fixture(scope="module")
def w0():
    return torch.from_numpy(np.load(FIXTURES / "tiny64_seed0.npz")["w_plus"]).float()


def official_session(G, w0):
    s = DragSession(G, w0, DragConfig(compat="official", feature_res=32, r1=3, r2=12, display_every=0))
    s.add_pair((20, 20), (30, 36))
    return s


def test_official_trajectory_matches_fixture(G, w0):
    ref = np.load(FIXTURES / "tiny64_drag_lr1e-3.npz")
    s = official_session(G, w0)
    results = list(s.run(max_steps=30))
    handles_yx = np.array([[r.handles[0][1], r.handles[0][0]] for r in results[:30]])
    assert np.abs(handles_yx - ref["points_yx"]).max() <= 1
    np.testing.assert_array_equal(handles_yx, ref["points_yx"])  # in practice it is exact
    np.testing.assert_allclose([r.loss_motion for r in results[:30]], ref["loss_motion"], rtol=1e-4, atol=1e-6)
    assert (s.latent - torch.from_numpy(ref["final_w"])).abs().max() < 1e-4
    assert results[-1].handles[0] == (20, 23)  # fixture README: the handle ends at (x=20, y=23)


def test_official_first_steps_latents(G, w0):
    ref = np.load(FIXTURES / "tiny64_drag_lr1e-3.npz")
    s = official_session(G, w0)
    for k, _ in zip(range(5), s.run(max_steps=5)):
        np.testing.assert_allclose(s.latent[0].numpy(), ref["w_after"][k], atol=1e-5)


def test_native_grid_sampling_equals_upsample_then_index(G, w0):
    """Sampling the native feature map at pixel centres == bilinear upsampling to image size + indexing."""
    for fr in (8, 16, 32, 64):
        _, feat = G.synthesis(w0, feature_res=fr, stop_at_feature=True)
        up = F.interpolate(feat, size=(64, 64), mode="bilinear", align_corners=False)
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
        sampled = FeatureWindow(feat, (0, fr, 0, fr), 64, fr).sample(xy)
        expected = up[0].reshape(feat.shape[1], -1).t()
        assert (sampled - expected).abs().max() < 1e-5, fr


def test_windowed_features_equal_full(G, w0):
    for fr in (16, 32, 64):
        _, full = G.synthesis(w0, feature_res=fr, stop_at_feature=True)
        for win in [(0, fr, 0, fr), (1, 4, 2, 6), (fr - 3, fr + 2, -2, 5), (fr // 2 - 2, fr // 2 + 3, fr // 2, fr // 2 + 4)]:
            part = features_in_window(G.synthesis, w0, fr, win)
            y0, y1, x0, x1 = max(win[0], 0), min(win[1], fr), max(win[2], 0), min(win[3], fr)
            assert part.shape[-2:] == (y1 - y0, x1 - x0)
            assert (part - full[..., y0:y1, x0:x1]).abs().max() < 1e-5


def test_windowed_and_full_runs_agree(G, w0):
    latents, handles = [], []
    for windowed in (True, False):
        s = DragSession(G, w0, DragConfig(feature_res=32, r1=3, r2=6, windowed=windowed, display_every=0))
        s.add_pair((20, 20), (28, 30))
        s.add_pair((50, 45), (44, 40))
        res = list(s.run(max_steps=15))
        latents.append(s.latent)
        handles.append([r.handles for r in res])
    assert handles[0] == handles[1]
    # Adam divides by sqrt(v): float-rounding differences in near-zero gradient entries can grow
    # to a fraction of one step (lr = 2e-3); anything beyond one step would be a real difference.
    assert (latents[0] - latents[1]).abs().max() < 2e-3


def test_disc_offsets_on_pixel_centres():
    off = disc_offsets(3)
    assert (off.square().sum(1) < 9).all()
    assert len(off) == 25  # lattice points strictly inside radius 3 (5 columns of 5)
    assert torch.equal(off.mean(0), torch.zeros(2))  # symmetric: no drift


def test_stop_and_resume_equals_uninterrupted(G, w0):
    a = DragSession(G, w0, DragConfig(feature_res=32, display_every=0))
    a.add_pair((20, 20), (30, 30))
    list(a.run(max_steps=10))
    b = DragSession(G, w0, DragConfig(feature_res=32, display_every=0))
    b.add_pair((20, 20), (30, 30))
    gen = b.run(max_steps=10)
    for i, _ in enumerate(gen):
        if i == 3:
            break
    gen.close()
    list(b.run(max_steps=6))
    assert a.step_count == b.step_count == 10
    assert (a.latent - b.latent).abs().max() < 1e-6
    assert a.pairs[0].handle == b.pairs[0].handle


def test_reset_undo_and_validation(G, w0):
    s = DragSession(G, w0, DragConfig(feature_res=32, display_every=0))
    s.add_pair((10, 10), (20, 20))
    s.add_pair((40, 40), (30, 30))
    s.undo_pair()
    assert len(s.pairs) == 1
    list(s.run(max_steps=5))
    assert not torch.equal(s.latent, w0)
    s.reset()
    assert torch.equal(s.latent, w0) and s.pairs[0].handle == (10, 10) and s.step_count == 0
    for bad in [(64, 3), (-1, 5), (float("nan"), 3), (3, float("inf")), ("a", 2), (1,)]:
        with pytest.raises(DragError):
            s.add_pair(bad, (5, 5))
    with pytest.raises(DragError):
        DragSession(G, torch.full_like(w0, float("nan")))
    s.clear_pairs()
    with pytest.raises(DragError):
        next(s.run())


def test_yields_images_at_interval_and_stops_when_reached(G, w0):
    s = DragSession(G, w0, DragConfig(feature_res=32, display_every=3, stop_distance=50))
    s.add_pair((20, 20), (22, 22))  # already within the stop distance: done at once, no step
    results = list(s.run(max_steps=10))
    assert len(results) == 1 and results[0].done and results[0].reached and s.step_count == 0
    assert results[0].image.shape == (64, 64, 3) and results[0].image.dtype == np.uint8
    s = DragSession(G, w0, DragConfig(feature_res=32, display_every=3))
    s.add_pair((20, 20), (40, 40))
    results = list(s.run(max_steps=7))
    shown = [r.step for r in results if r.image is not None]
    assert shown == [3, 6, 7]
    assert results[-1].done and not results[-1].reached


def test_mask_keeps_fixed_region(G, w0):
    def change_outside(mask):
        s = DragSession(G, w0, DragConfig(feature_res=32, display_every=0, lr=5e-3))
        s.add_pair((20, 20), (28, 28))
        s.set_mask(mask)
        list(s.run(max_steps=20))
        before, after = s.render(w0), s.render()
        return np.abs(before.astype(int) - after.astype(int))[40:, 40:].mean()

    mask = np.zeros((64, 64), np.float32)
    mask[5:35, 5:35] = 1  # flexible region around the edit only
    assert change_outside(mask) < change_outside(None)


def test_official_compat_windowed_equals_full(G, w0):
    runs = []
    for windowed in (True, False):
        s = DragSession(G, w0, DragConfig(compat="official", feature_res=32, r1=3, r2=4, windowed=windowed,
                                          display_every=0))
        s.add_pair((30, 30), (38, 36))
        runs.append(([r.handles for r in s.run(max_steps=15)], s.latent))
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1] - runs[1][1]).abs().max() < 2e-3


def test_divergence_rolls_back_to_last_good_latent(G, w0):
    s = DragSession(G, w0, DragConfig(feature_res=32, display_every=0))
    s.add_pair((20, 20), (40, 40))
    list(s.run(max_steps=3))
    good = s.latent
    s._param.register_hook(lambda grad: grad * float("nan"))  # poison the next update
    results = list(s.run(max_steps=5))
    assert results[-1].done and not results[-1].reached and "rolled back" in results[-1].message
    assert torch.isfinite(s.latent).all() and torch.equal(s.latent, good)
    assert s.step_count == 3 and results[-1].image is not None


def _peak_rss_growth(G, w0, warmup, steps):
    import resource
    s = DragSession(G, w0, DragConfig(feature_res=32, display_every=50, stop_distance=0))
    s.add_pair((20, 20), (40, 40))
    rss = {}
    for r in s.run(max_steps=steps):
        if r.step in (warmup, steps):
            rss[r.step] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss[steps] - rss[warmup]) / 1024  # MB


def test_run_memory_is_flat(G, w0):
    assert _peak_rss_growth(G, w0, 30, 150) < 20


@pytest.mark.slow
def test_thousand_step_run_memory_is_flat(G, w0):
    assert _peak_rss_growth(G, w0, 100, 1100) < 20


def test_points_keep_sub_pixel_positions(G, w0):
    s = DragSession(G, w0)
    s.add_pair((10, 12), (20.0, 30.0))
    s.add_pair((10.25, 12.5), (20.123456, 30.9))
    assert s.pairs[0].handle == (10, 12) and isinstance(s.pairs[0].target[0], int)  # clicks stay ints
    assert s.pairs[1].handle == (10.25, 12.5) and s.pairs[1].target == (20.123, 30.9)


@pytest.mark.parametrize("subpixel", [True, False])
def test_subpixel_tracking_recovers_a_fractional_shift(G, w0, subpixel):
    """Reference taken at h; the handle is then put 0.3/-0.2 px off. Pixel-step tracking cannot come
    back (every candidate keeps the fractional offset); the refinement lands within 1/16 px of h."""
    h = (30.0, 28.0)
    s = DragSession(G, w0, DragConfig(feature_res=32, subpixel=subpixel, display_every=0))
    s.add_pair(h, (40, 28))
    list(s.run(max_steps=0))  # a tracking-only step takes the reference at h
    s.pairs[0].handle = (h[0] + 0.3, h[1] - 0.2)
    list(s.run(max_steps=0))
    err = np.hypot(s.pairs[0].handle[0] - h[0], s.pairs[0].handle[1] - h[1])
    if subpixel:
        assert err < 1 / 16
    else:
        assert err == pytest.approx(np.hypot(0.3, 0.2), abs=1e-3)


def test_adaptive_step_only_changes_moves_shorter_than_a_pixel(G, w0):
    def latent_after_one_step(target, adaptive):
        s = DragSession(G, w0, DragConfig(feature_res=32, adaptive_step=adaptive, stop_distance=0.1,
                                          display_every=0))
        s.add_pair((30, 28), target)
        list(s.run(max_steps=1))
        return s.latent
    far, near = (36, 28), (30.5, 28)
    assert torch.equal(latent_after_one_step(far, True), latent_after_one_step(far, False))
    assert not torch.equal(latent_after_one_step(near, True), latent_after_one_step(near, False))


def test_official_compat_rounds_sub_pixel_points(G, w0):
    s = DragSession(G, w0, DragConfig(compat="official", feature_res=32, r1=3, r2=12, display_every=0))
    s.add_pair((20.4, 19.6), (30.2, 36.4))
    results = list(s.run(max_steps=2))
    assert s.pairs[0].target == (30, 36) and s.pairs[0].origin == (20, 20)
    assert all(isinstance(v, int) for r in results for h in r.handles for v in h)


def test_tracking_block_can_differ_and_changing_it_between_runs_is_safe(G, w0):
    s = DragSession(G, w0, DragConfig(feature_res=16, track_res=32, display_every=0))
    s.add_pair((30, 28), (36, 28))
    list(s.run(max_steps=2))
    c32 = G.synthesis(w0, feature_res=32, stop_at_feature=True)[1].shape[1]
    assert s.pairs[0].reference.shape[-1] == c32
    s.config = DragConfig(feature_res=16, display_every=0)   # tracking back on b16: references retaken
    list(s.run(max_steps=2))
    c16 = G.synthesis(w0, feature_res=16, stop_at_feature=True)[1].shape[1]
    assert s.pairs[0].reference.shape[-1] == c16
    s.config = DragConfig(compat="official", feature_res=32, r1=3, r2=12, display_every=0)
    assert list(s.run(max_steps=2))[-1].step == 6
    bad = DragSession(G, w0, DragConfig(track_res=24))
    bad.add_pair((30, 28), (36, 28))
    with pytest.raises(ValueError, match="tracking block"):
        list(bad.run(max_steps=1))


def test_mask_weight_comes_from_the_model_unless_set(G):
    """lambda_mask follows the model card (the embedded model needs a much smaller weight than the
    paper's), an explicit value wins, and --compat official keeps the official weight."""
    card = {"lambda_mask": 1.5}
    assert DragConfig().resolve(G, 1, card).lambda_mask == 1.5
    assert DragConfig().resolve(G, 1, {}).lambda_mask == 20.0
    assert DragConfig(lambda_mask=7.0).resolve(G, 1, card).lambda_mask == 7.0
    assert DragConfig(compat="official", r1=3, r2=12).resolve(G, 1, card).lambda_mask == 20.0
    with pytest.raises(ValueError):
        DragConfig(lambda_mask=-1.0).resolve(G, 1, card)


def test_model_card_may_set_a_multi_point_lr(G):
    card = {"lr": 4e-3, "lr_multi_point": 3e-3}
    assert DragConfig().resolve(G, 1, card).lr == 4e-3
    assert DragConfig().resolve(G, 5, card).lr == 3e-3
    assert DragConfig().resolve(G, 5, {"lr": 4e-3}).lr == 4e-3
    assert DragConfig(lr=1e-2).resolve(G, 5, card).lr == 1e-2


def test_model_card_may_set_a_multi_point_radius_and_a_mask_setting_wins(G):
    card = {"r1": 12.0, "r1_multi_point": 6.0, "lr": 4e-3, "lr_multi_point": 3e-3, "mask": {"r1": 9.0}}
    assert DragConfig().resolve(G, 1, card).r1 == 12.0
    assert DragConfig().resolve(G, 5, card).r1 == 6.0
    assert DragConfig(r1=2.0).resolve(G, 5, card).r1 == 2.0
    masked = DragConfig().resolve(G, 5, card, masked=True)
    assert masked.r1 == 9.0 and masked.lr == 3e-3  # the mask names r1, not lr
    assert DragConfig().resolve(G, 1, card, masked=True).r1 == 9.0


def test_model_card_may_set_values_for_many_points(G):
    card = {"motion_anchor": 0.8, "patience": 60, "lr": 8e-3, "lr_multi_point": 3e-3,
            "many_points": {"motion_anchor": 0.0, "patience": 0}, "mask": {"patience": 7}}
    two, three = DragConfig().resolve(G, 2, card), DragConfig().resolve(G, 3, card)
    assert (two.motion_anchor, two.patience, two.lr) == (0.8, 60, 3e-3)   # a smile's two corners keep the rules
    assert (three.motion_anchor, three.patience, three.lr) == (0.0, 0, 3e-3)
    assert DragConfig().resolve(G, 3, card, masked=True).patience == 7    # the mask's value wins
    assert DragConfig(patience=9).resolve(G, 5, card).patience == 9        # and the user's over both
    later = {**card, "many_points": {"from": 6, "patience": 0}}
    assert DragConfig().resolve(G, 5, later).patience == 60 and DragConfig().resolve(G, 6, later).patience == 0


def test_the_default_model_drags_many_points_with_the_rules_of_its_previous_defaults():
    # chosen on validation pairs: the motion anchor and end rules help 1-2 point edits and cost the
    # 5-point protocol, so from 3 points the default model drags as it did before they existed
    from draggan_core.model.store import ModelStore, default_model_path
    model = ModelStore().get(default_model_path())
    one, five = (DragConfig().resolve(model.G, n, model.drag_defaults) for n in (1, 5))
    assert one.motion_anchor > 0 and one.max_shift > 0 and one.patience > 0 and one.lost_match > 0
    assert (five.motion_anchor, five.max_shift, five.patience, five.lost_match) == (0, 0, 0, 0)
