"""Cheaper preview frames (draggan_core/edit/frames.py): the skip image after block R/2 is what the
full forward accumulates there, large models preview with it, small and resnet ones render in full,
DRAGGAN_PREVIEW overrides the rule, and a run still ends on the exact render."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from draggan_core.edit import frames
from draggan_core.edit.engine import FrameEvent, LocalEngine, StepEvent
from draggan_core.edit.frames import (HALF_PREVIEW_FROM, PREVIEW_ENV, FrameRenderer, preview_image, preview_res,
                                      render_batch)
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.model.networks import Generator, GeneratorConfig
from draggan_core.model.ops import upsample2d


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Exact comparisons across threads need one intra-op thread (see tests/test_frames.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv(PREVIEW_ENV, raising=False)
    yield
    torch.set_num_threads(before)


def _generator(res=32, architecture="skip", seed=0, channel_max=16):
    """A small random generator; channel_max 4 gives every block 4 channels (a 512 px one stays cheap)."""
    torch.manual_seed(seed)
    G = Generator(GeneratorConfig(z_dim=16, w_dim=16, img_resolution=res, mapping_layers=2,
                                  channel_base=max(256, 4 * res), channel_max=channel_max, architecture=architecture))
    with torch.no_grad():  # non-zero biases and noise strengths, as a trained model has
        for name, p in G.named_parameters():
            if name.endswith("bias") or name.endswith("noise_strength"):
                p.normal_(0, 0.1)
    return G


def _ws(G, n=2, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return G.mapping(torch.randn(n, G.z_dim), truncation_psi=0.7)


def test_the_skip_image_is_what_the_full_forward_accumulates_there():
    G = _generator(32)
    ws = _ws(G)
    seen = {}
    hooks = [G.synthesis.block(r).register_forward_hook(lambda m, i, o, r=r: seen.__setitem__(r, o))
             for r in (16, 32)]
    with torch.no_grad():
        full = G.synthesis(ws)  # the hooks keep what each block of the full forward returned
    for h in hooks:
        h.remove()
    with torch.no_grad():
        half = G.synthesis(ws, image_res=16)
    assert half.shape == (2, 3, 16, 16) and full.shape == (2, 3, 32, 32)
    x16, img16 = seen[16]
    assert torch.equal(half, img16)  # the running image of the full forward after block 16, bit for bit
    # by hand: the last block up-samples that image with its FIR filter and adds its ToRGB output
    x32, _ = seen[32]
    b32 = G.synthesis.block(32)
    start = G.synthesis.ws_offset(32)
    with torch.no_grad():
        manual = upsample2d(half, b32.resample_filter) + b32.torgb(x32, ws[:, start + b32.num_conv])
    torch.testing.assert_close(manual, full, rtol=0, atol=1e-6)
    with torch.no_grad():  # a lower block, and a feature map from below the image block
        img8, feat = G.synthesis(ws, image_res=8, feature_res=4)
    assert img8.shape == (2, 3, 8, 8) and feat.shape[-1] == 4
    with pytest.raises(ValueError, match="image block"):
        G.synthesis(ws, image_res=12)
    with pytest.raises(ValueError, match="comes after"):
        G.synthesis(ws, image_res=8, feature_res=16)


def test_resnet_generators_fall_back_to_the_full_render():
    G = _generator(32, architecture="resnet")
    ws = _ws(G)
    with torch.no_grad():
        assert torch.equal(G.synthesis(ws, image_res=16), G.synthesis(ws))
    assert preview_res(G, "half") is None and preview_res(G, "auto") is None
    with torch.no_grad():
        img = G.synthesis(ws)
        assert preview_image(G, img) is img  # a full-size image is shown as it is
    latents = [ws[:1], ws[1:]]
    assert all(np.array_equal(a, b) for a, b in zip(render_batch(G, latents, image_res=16)[0],
                                                     render_batch(G, latents)[0]))


def test_the_rule_and_its_environment_override(monkeypatch, caplog):
    small, large = _generator(64), _generator(HALF_PREVIEW_FROM, channel_max=4)
    assert HALF_PREVIEW_FROM >= 256  # the 128 px default keeps full previews
    assert preview_res(small) is None and preview_res(large) == HALF_PREVIEW_FROM // 2
    monkeypatch.setenv(PREVIEW_ENV, "full")
    assert preview_res(large) is None
    monkeypatch.setenv(PREVIEW_ENV, "Half")
    assert preview_res(small) == 32 and preview_res(large) == HALF_PREVIEW_FROM // 2
    monkeypatch.setenv(PREVIEW_ENV, "auto")
    assert preview_res(small) is None
    monkeypatch.setenv(PREVIEW_ENV, "quarter")  # unknown: auto, said once in the log
    with caplog.at_level("WARNING", logger=frames.__name__):
        assert preview_res(small) is None and preview_res(large) == HALF_PREVIEW_FROM // 2
    assert "DRAGGAN_PREVIEW" in caplog.text
    with pytest.raises(ValueError):
        preview_res(small, "quarter")


def test_the_preview_image_is_bicubic_plus_the_last_torgb_bias():
    G = _generator(32)
    ws = _ws(G)
    with torch.no_grad():
        half = G.synthesis(ws, image_res=16)
        quarter = G.synthesis(ws, image_res=8)
        full = G.synthesis(ws)
    bias32 = G.synthesis.b32.torgb.bias.view(1, 3, 1, 1)
    expected = F.interpolate(half, size=(32, 32), mode="bicubic", align_corners=False) + bias32
    assert torch.equal(preview_image(G, half), expected)
    from_quarter = preview_image(G, quarter)  # two blocks skipped: both biases
    torch.testing.assert_close(from_quarter, F.interpolate(quarter, size=(32, 32), mode="bicubic", align_corners=False)
                               + bias32 + G.synthesis.b16.torgb.bias.view(1, 3, 1, 1))
    images = render_batch(G, [ws[:1]], image_res=16)[0]
    assert images[0].shape == (32, 32, 3)
    assert not np.array_equal(images[0], render_batch(G, [ws[:1]])[0][0])  # a preview, not the render
    assert full.shape == expected.shape


def _wait_for(stream, step, timeout=20.0):
    deadline = time.time() + timeout
    while (stream.newest(after_step=step - 1) is None) and time.time() < deadline:
        time.sleep(0.01)
    return stream.newest(after_step=step - 1)


def test_large_models_preview_with_the_half_image_by_default():
    G = _generator(HALF_PREVIEW_FROM, channel_max=4)
    ws = _ws(G, n=1)
    renderer = FrameRenderer(threads=1)
    with renderer.open_stream() as stream:
        stream.submit(G, ws, 1)
        frame = _wait_for(stream, 1)
    assert frame is not None and frame.image.shape == (HALF_PREVIEW_FROM, HALF_PREVIEW_FROM, 3)
    assert np.array_equal(frame.image, render_batch(G, [ws], image_res=HALF_PREVIEW_FROM // 2)[0][0])
    assert not np.array_equal(frame.image, render_batch(G, [ws])[0][0])


@pytest.mark.parametrize("mode", ["half", "full"])
def test_runs_preview_as_set_and_end_on_the_exact_render(monkeypatch, mode):
    monkeypatch.setenv(PREVIEW_ENV, mode)
    G = _generator(64)
    torch.manual_seed(3)
    with torch.no_grad():
        w = G.mapping(torch.randn(1, G.z_dim), truncation_psi=0.7)
    s = DragSession(G, w, DragConfig(display_every=0, stop_distance=0.01, max_steps=8))
    s.add_pair((30, 30), (36, 33))
    engine = LocalEngine(renderer=FrameRenderer(threads=1))
    latents, previews, last = {}, [], None
    for ev in engine.run_session(s, "random-64", 8):
        if isinstance(ev, StepEvent):
            latents[ev.result.step] = s.latent
            last = ev.result
            time.sleep(0.05)  # give the renderer time: frames of this run are what is checked
        elif isinstance(ev, FrameEvent):
            previews.append(ev)
    assert last is not None and last.done
    assert np.array_equal(last.image, s.render())  # the final image is the exact render, bit for bit
    assert previews
    res = 32 if mode == "half" else None
    for f in previews:
        assert np.array_equal(f.image, render_batch(G, [latents[f.step]], image_res=res)[0][0]), f.step


def test_the_editor_ends_on_the_exact_render_with_half_previews(monkeypatch):
    from conftest import ui_model_path
    from webui.editor.state import EditorState
    monkeypatch.setenv(PREVIEW_ENV, "half")
    # bit for bit at the same thread count: the renderer's final frame and the render here, 1 each
    monkeypatch.setenv("DRAGGAN_TORCH_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    st = EditorState.create(ui_model_path(), seed=3)
    try:
        st.add_pair(20, 40, 27, 44)
        updates = list(st.run_stream(st.configure(max_steps=15, stop_distance=0.1)))
        assert updates[-1].final
        assert np.array_equal(st.image, st.session.render())
        assert np.array_equal(updates[-1].image, st.display(st.session.render()))
    finally:
        st.cleanup()
        torch.set_num_threads(threads)
