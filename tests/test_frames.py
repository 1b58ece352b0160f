"""The frame pipeline: background previews never go back in time, runs end on the exact image,
concurrent sessions keep their own frames; devices and the app's start-up errors."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from draggan_core.edit.frames import FrameRenderer, render_batch
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.model.devices import DeviceError, ThreadBudget, measure_fused_modconv, resolve_device
from draggan_core.model.latents import seed_to_w
from draggan_core.model.networks import Generator, GeneratorConfig
from draggan_core.model.store import ModelStore, default_model_path



@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Results here are compared exactly across threads (the drag's, the frame renderer's, the test's).
    With several intra-op threads, a thread whose pool is busy or sized differently splits reductions
    differently (e.g. two sessions' latents 5e-5 apart after 15 steps at 128 px): not what is tested.
    The web UI's budget too (its renderer draws a run's final frame with every thread it has)."""
    monkeypatch.setenv("DRAGGAN_TORCH_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return ModelStore().get(default_model_path())


def _session(model, seed, pair=((20, 40), (27, 44))):
    s = DragSession(model.G, seed_to_w(model.G, seed), DragConfig(display_every=0, stop_distance=0.1),
                    model_defaults=model.drag_defaults)
    s.add_pair(*pair)
    return s


def _stream_run(s, renderer, steps, record):
    """Drag `steps` steps submitting every latent; record (step -> latent) and the frames taken."""
    taken = []
    with renderer.open_stream() as stream:
        shown = 0
        for r in s.run(max_steps=steps):
            if r.done:
                break
            record[r.step] = s.latent
            stream.submit(s.G, s.latent, r.step)
            frame = stream.newest(after_step=shown)
            if frame is not None:
                taken.append(frame)
                shown = frame.step
        time.sleep(0.3)  # let the last submitted frame arrive
        frame = stream.newest(after_step=shown)
        if frame is not None:
            taken.append(frame)
    return taken


def test_frames_only_move_forward_and_show_their_steps_latent(model):
    renderer = FrameRenderer(threads=1)
    s = _session(model, 3)
    latents = {}
    frames = _stream_run(s, renderer, 20, latents)
    steps = [f.step for f in frames]
    assert len(frames) >= 2 and steps == sorted(set(steps)), steps  # strictly increasing, never stale
    for f in frames:
        expected = render_batch(model.G, [latents[f.step]])[0][0]
        assert np.abs(f.image.astype(int) - expected.astype(int)).max() <= 1


class _SlowSynthesis(torch.nn.Module):
    """Renders a latent as a flat image of value ws[0, 0, 0], slowly (a big model on a small CPU)."""

    def forward(self, ws, noise_mode="const"):
        time.sleep(0.2)
        return ws[:, :1, :1, None].expand(-1, 3, 8, 8) / 127.5


class _SlowG(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.synthesis = _SlowSynthesis()


def test_a_slow_renderer_skips_stale_latents_instead_of_queueing_them():
    renderer, G = FrameRenderer(threads=1), _SlowG()
    with renderer.open_stream() as stream:
        for step in range(1, 21):  # 20 steps arrive while the first frame renders
            stream.submit(G, torch.full((1, 1, 1), float(step)), step)
        stream.submit(G, torch.full((1, 1, 1), 5.0), 5)  # an older step is ignored
        deadline = time.time() + 5
        while (stream.newest(after_step=0) is None or stream.newest(after_step=0).step < 20) and time.time() < deadline:
            time.sleep(0.02)
        frame = stream.newest(after_step=0)
    assert frame.step == 20 and int(frame.image[0, 0, 0]) == 128 + 20  # the newest latent's own image
    assert renderer.frames_rendered <= 2  # (the first one, if it started before the rest came,) then the newest


def test_two_concurrent_sessions_keep_their_own_frames(model):
    renderer = FrameRenderer(threads=1)
    runs = {3: {}, 11: {}}
    frames = {}
    sessions = {seed: _session(model, seed) for seed in runs}

    def work(seed):
        frames[seed] = _stream_run(sessions[seed], renderer, 15, runs[seed])

    threads = [threading.Thread(target=work, args=(seed,)) for seed in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for seed in runs:
        assert frames[seed], seed
        for f in frames[seed]:
            expected = render_batch(model.G, [runs[seed][f.step]])[0][0]
            # batched renders may round differently by one level; another session's image differs a lot
            assert np.abs(f.image.astype(int) - expected.astype(int)).max() <= 1, (seed, f.step)
    # and each edit equals the same edit run alone
    for seed in runs:
        alone = _session(model, seed)
        for _ in alone.run(max_steps=15):
            pass
        torch.testing.assert_close(alone.latent, sessions[seed].latent, rtol=0, atol=1e-5)


def test_closed_stream_drops_its_pending_latent(model):
    renderer = FrameRenderer(threads=1)
    stream = renderer.open_stream()
    stream.close()
    stream.submit(model.G, seed_to_w(model.G, 1), 1)
    time.sleep(0.2)
    assert stream.newest(after_step=0) is None


# ------------------------------------------------------------------ the editor's run loop
@pytest.fixture()
def editor():
    from webui.editor.state import EditorState
    from conftest import ui_model_path
    st = EditorState.create(ui_model_path(), seed=3)  # the pair and the brush strokes below are 64 px pixels
    st.add_pair(20, 40, 27, 44)
    yield st
    st.cleanup()


def test_run_ends_on_the_exact_render_of_the_final_latent(editor):
    steps = editor.configure(max_steps=25, stop_distance=0.1)
    updates = list(editor.run_stream(steps))
    assert updates[-1].final and "max steps" in updates[-1].status
    assert np.array_equal(editor.image, editor.session.render())
    assert np.array_equal(updates[-1].image, editor.display(editor.session.render()))
    # the run's own step count is shown, with the total (issue: "step 79 / 379" after a finished drag)
    assert "this run: 25 / 25" in updates[-1].status
    again = list(editor.run_stream(editor.configure(max_steps=5, stop_distance=0.1)))
    assert "step 30 (this run: 5 / 5)" in again[-1].status


def test_stop_and_resume_show_the_exact_image(editor):
    steps = editor.configure(max_steps=200, stop_distance=0.1)
    updates = editor.run_stream(steps)
    next(updates)
    next(updates)
    editor.stop_requested = True
    rest = list(updates)  # the run notices the flag at its next step and ends without a final frame
    assert not rest and not editor.running
    status = editor.stop_view()
    assert status.startswith(f"stopped at step {editor.session.step_count}")
    assert np.array_equal(editor.image, editor.session.render())
    stopped_at = editor.session.step_count
    final = list(editor.run_stream(editor.configure(max_steps=10, stop_distance=0.1)))[-1]
    assert editor.session.step_count == stopped_at + 10 and final.final
    assert np.array_equal(editor.image, editor.session.render())


def test_closing_the_stream_like_gradio_cancel_keeps_a_usable_state(editor):
    updates = editor.run_stream(editor.configure(max_steps=200, stop_distance=0.1))
    next(updates)
    updates.close()  # what gradio's cancels=[run] does
    assert not editor.running
    editor.stop_view()
    assert np.array_equal(editor.image, editor.session.render())


def test_large_models_stream_jpeg_small_ones_png():
    from webui.editor.state import EditorState
    from webui.services import STORE
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=32, w_dim=32, img_resolution=256, mapping_layers=2, channel_base=512,
                                  channel_max=32))
    from draggan_core.model.checkpoints import save_native
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g256.safetensors"
        save_native(G, path)
        st = EditorState.create(path)
        out = st.frame_output()
        assert isinstance(out, str) and out.endswith(".jpg")
        from PIL import Image
        assert Image.open(out).size == (512, 512)
        st.cleanup()
        STORE._models.pop(path.resolve(), None)
    small = EditorState.create(default_model_path())
    assert isinstance(small.frame_output(), np.ndarray)


# ------------------------------------------------------------------ devices and threads
def test_device_resolution_and_errors(monkeypatch):
    monkeypatch.delenv("DRAGGAN_DEVICE", raising=False)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    monkeypatch.setenv("DRAGGAN_DEVICE", "cpu")
    assert resolve_device(None).type == "cpu"
    monkeypatch.setenv("DRAGGAN_DEVICE", "gpu")
    with pytest.raises(DeviceError):
        resolve_device(None)


def test_thread_budget_splits_the_cores():
    budget = ThreadBudget(total=8, adaptive=False)
    assert budget.share() == 4  # a lone run and the renderer, half each
    with budget.run():
        assert budget.runs == 1 and torch.get_num_threads() == 4
        with budget.run():
            assert budget.share() == 2
    assert budget.runs == 0
    assert ThreadBudget(total=1).share() == 1
    assert ThreadBudget(total=8, renderer=False, adaptive=False).share() == 8  # the CLI: no renderer


def test_fused_modconv_measurement_runs(model):
    out = measure_fused_modconv(model.G, repeats=1)
    assert set(out["seconds"]) == {"fused", "non_fused"} and isinstance(out["fused"], bool)


def test_trajectory_frames_of_large_models_are_kept_small():
    from webui.editor.render import GIF_SIZE, trajectory_frame
    big = np.random.RandomState(0).randint(0, 255, (1024, 1024, 3), dtype=np.uint8)
    assert trajectory_frame(big).shape == (GIF_SIZE, GIF_SIZE, 3)
    small = big[:64, :64]
    assert trajectory_frame(small) is small


def test_the_mask_canvas_follows_the_image_when_a_run_ends(editor):
    from webui.app import App
    alpha = np.zeros((256, 256), np.uint8)
    alpha[100:180, 60:140] = 255  # painted = flexible
    editor.set_mask_from_layer(alpha)
    before = editor.editor_background()
    outs = list(App(editor.model_path).run(editor, 5, "", "", "", "", "0.1", "default", "model default", 1))
    canvas = outs[-1][4]
    assert all("background" not in o[4] for o in outs[:-1])  # streamed updates skip the canvas
    assert "background" in canvas and np.array_equal(canvas["background"], editor.editor_background())
    assert not np.array_equal(canvas["background"], before)
    painted = canvas["layers"][0][..., 3] > 0  # the painted mask is kept on the new background
    assert painted[140, 100] and not painted[20, 20]
    editor.set_mask_from_layer(canvas["layers"][0][..., 3])  # the canvas round-trips to the same mask
    assert editor.mask_array()[35, 25] and not editor.mask_array()[5, 5]


def test_mask_messages_reach_the_status(editor):
    """An all-fixed mask is ignored and a point in the fixed region works against the mask: the
    status says so (a warning), an ordinary mask just reports the update."""
    from webui.app import App
    app = App(editor.model_path)
    everything = {"background": None, "layers": [np.full((256, 256, 4), 255, np.uint8)], "composite": None}
    status = app.set_mask(editor, everything, "fixed", True)[2]
    assert status.startswith("⚠") and "ignored" in status, status
    assert editor.session.mask is None or not editor.session.mask_active
    corner = np.zeros((256, 256, 4), np.uint8)
    corner[:64, :64] = 255  # flexible: the top-left corner only; the pair (20,40)->(27,44) is outside it
    status = app.set_mask(editor, {"background": None, "layers": [corner], "composite": None}, "flexible", True)[2]
    assert status.startswith("⚠") and "fixed region" in status, status
    middle = np.zeros((256, 256, 4), np.uint8)
    middle[100:200, 60:140] = 255  # covers the pair
    status = app.set_mask(editor, {"background": None, "layers": [middle], "composite": None}, "flexible", True)[2]
    assert status == "mask updated", status


def test_the_canvas_coming_back_after_a_run_keeps_the_runs_status(editor):
    """After a run the app replaces the mask canvas; its change event must not overwrite the run's
    final status nor swap the image again (a second swap could swallow the user's next click)."""
    from webui.app import App
    app = App(editor.model_path)
    alpha = np.zeros((256, 256), np.uint8)
    alpha[100:180, 60:140] = 255
    editor.set_mask_from_layer(alpha)
    outs = list(app.run(editor, 3, "", "", "", "", "0.1", "default", "model default", 1))
    canvas_value = outs[-1][4]
    image, info, status, _ = app.sync_mask(editor, canvas_value, "flexible", True)
    import gradio as gr
    assert image == gr.skip() and status == gr.skip()  # both left alone
    # a real change on the canvas still applies
    alpha2 = np.zeros((256, 256, 4), np.uint8)
    alpha2[20:60, 20:60] = 255
    _, info2, status2, _ = app.sync_mask(editor, {"background": None, "layers": [alpha2], "composite": None},
                                         "flexible", True)
    assert status2.startswith("⚠") or status2 == "mask updated"
    assert editor.mask_array()[10, 10] and not editor.mask_array()[40, 30]


# ------------------------------------------------------------------ the first frame and the last
def test_the_first_frame_of_a_lone_run_comes_before_its_second_step_with_all_threads(model):
    from draggan_core.edit.engine import FrameEvent, LocalEngine, StepEvent
    used = []

    def urgent_threads():
        used.append("urgent")
        return 1

    engine = LocalEngine(renderer=FrameRenderer(threads=lambda: used.append("share") or 1, urgent_threads=urgent_threads),
                         threads=ThreadBudget(total=1, adaptive=False), store=ModelStore())
    events = [e for e in engine.run_session(_session(model, 3), "m", 6, display_every=1)
              if isinstance(e, (FrameEvent, StepEvent))]
    kinds = [(type(e).__name__, e.step if isinstance(e, FrameEvent) else e.result.step) for e in events]
    assert kinds[:2] == [("FrameEvent", 1), ("StepEvent", 1)], kinds  # the run waited for step 1's frame
    assert used[0] == "urgent"                                          # drawn with the urgent thread count


def test_a_failed_first_frame_does_not_stall_the_run():
    renderer, G = FrameRenderer(threads=1), _SlowG()
    G.synthesis.forward = lambda ws, noise_mode="const": (_ for _ in ()).throw(RuntimeError("boom"))
    with renderer.open_stream() as stream:
        stream.submit(G, torch.zeros(1, 1, 1), 1, urgent=True)
        t0 = time.perf_counter()
        assert stream.wait(0, timeout=5.0) is None
        assert time.perf_counter() - t0 < 2.0


def test_the_final_frame_is_the_renderers_exact_job_and_a_preview_in_flight_comes_out_first(model):
    from draggan_core.edit.engine import FrameEvent, LocalEngine, StepEvent
    renderer = FrameRenderer(threads=1)
    engine = LocalEngine(renderer=renderer, threads=ThreadBudget(total=1, adaptive=False), store=ModelStore())
    s = _session(model, 3)
    events = list(engine.run_session(s, "m", 8, display_every=1))
    last = [e for e in events if isinstance(e, StepEvent)][-1].result
    assert last.done and np.array_equal(last.image, s.render())  # exact, not a preview
    frames = [e.step for e in events if isinstance(e, FrameEvent)]
    assert frames == sorted(frames) and all(f <= last.step for f in frames)
    exact_renders = renderer.frames_rendered
    assert exact_renders >= 2  # the first frame and the final one at least, both by the renderer
