"""The web UI driven through gradio_client against a real `python app.py` subprocess."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from draggan_core.edit.recipe import Recipe

pytestmark = pytest.mark.filterwarnings("ignore")


def client(server) -> Client:
    return Client(server["url"], verbose=False)


def debug(c: Client) -> dict:
    return c.predict(api_name="/debug_state")


def run_to_end(c: Client, timeout=60.0):
    job = c.submit(api_name="/run")
    t0 = time.time()
    while not job.done():
        assert time.time() - t0 < timeout, "run did not finish"
        time.sleep(0.1)
    return job.outputs()


def test_seed_pair_run_reaches(ui_server):
    c = client(ui_server)
    img, points, status, _editor, seed, _mask = c.predict(3, 0.7, api_name="/set_seed")
    assert seed == 3 and "seed 3" in status
    assert Image.open(img).size == (512, 512)  # 64 px model upscaled x8 server-side
    _, points, status = c.predict(20, 40, api_name="/add_point")
    assert "handle (20, 40) placed" in points
    _, points, status = c.predict(23, 40, api_name="/add_point")
    assert "1: handle (20, 40) -> target (23, 40)" in points
    outputs = run_to_end(c)
    assert outputs, "no streamed output"
    final_status = outputs[-1][2]
    info = debug(c)
    pair = info["pairs"][0]
    dist = float(np.hypot(pair["handle"][0] - 23, pair["handle"][1] - 40))
    assert dist < 3.0, (final_status, pair)
    if "embedded-faces64" in str(ui_server["model"]):
        assert "done" in final_status and dist <= 1.0, final_status
    assert info["step"] >= 1 and not info["running"]


def test_undo_clear_and_outside_click(ui_server):
    c = client(ui_server)
    c.predict(1, 1, 10, 10, api_name="/add_pair")
    c.predict(5, 5, api_name="/add_point")  # pending handle
    assert debug(c)["pending"] == [5, 5]
    c.predict(api_name="/undo")
    info = debug(c)
    assert info["pending"] is None and len(info["pairs"]) == 1
    c.predict(api_name="/undo")
    assert debug(c)["pairs"] == []
    _, _, status = c.predict(64, 3, api_name="/add_point")
    assert status.startswith("⚠") and "outside" in status
    c.predict(2, 2, 3, 3, api_name="/add_pair")
    c.predict(4, 4, 6, 6, api_name="/add_pair")
    _, points, _ = c.predict(api_name="/clear_points")
    assert "no points" in points and debug(c)["pairs"] == []


def test_latent_upload_download_and_bad_files(ui_server, tmp_path):
    donor, c = client(ui_server), client(ui_server)
    donor.predict(11, 0.7, api_name="/set_seed")
    latent_path = donor.predict(api_name="/download_latent")[0]
    w = np.load(latent_path)
    assert w.ndim == 3 and w.shape[0] == 1

    c.predict(0, 0.7, api_name="/set_seed")
    c.predict(7, 8, 9, 10, api_name="/add_pair")
    before = debug(c)
    out = c.predict(handle_file(latent_path), api_name="/upload_latent")
    assert "latent loaded" in out[2]
    assert "1 point pair cleared" in out[2] and "Undo clear" in out[2], out[2]
    cleared = debug(c)
    assert cleared["image_mean"] != before["image_mean"] and cleared["latent_source"] != "seed"
    assert cleared["pairs"] == [] and cleared["cleared"] == "1 point pair"  # a new image: points cleared
    out = c.predict(api_name="/restore_points")  # ... and brought back by Undo clear
    assert "brought back" in out[2], out[2]
    after = debug(c)
    assert after["pairs"] == before["pairs"] and after["cleared"] is None

    bad_shape = tmp_path / "wrong_shape.npy"
    np.save(bad_shape, np.zeros((3, 7), np.float32))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not a latent\x00\xff" * 50)
    for path, words in ((bad_shape, "shape"), (garbage, "not a latent")):
        out = c.predict(handle_file(str(path)), api_name="/upload_latent")
        assert out[2].startswith("⚠") and words in out[2], out[2]
        assert "/tmp/gradio" not in out[2]  # no server paths leaked
        assert debug(c) == after  # state intact

    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        f.truncate(21 * 1024 * 1024)  # over the 20 MB upload limit
    with pytest.raises(Exception):
        c.predict(handle_file(str(huge)), api_name="/upload_latent")
    assert debug(c) == after
    _, _, status = c.predict(8, 8, api_name="/add_point")  # session still works
    assert "handle at (8, 8)" in status


def test_mask_via_api(ui_server, tmp_path):
    c = client(ui_server)
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[100:140, 60:200] = 255  # editor pixels; 4x -> model x 15-49, y 25-34
    bg = np.full((256, 256, 4), 128, np.uint8)
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.fromarray(bg).save(tmp_path / "bg.png")
    value = {"background": handle_file(str(tmp_path / "bg.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
             "composite": None}
    _, info, status = c.predict(value, "flexible", True, api_name="/set_mask")
    assert "bbox x 15-49, y 25-34" in info, info
    d = debug(c)
    assert d["mask_pixels"] == 35 * 10 and d["mask_bbox"] == [15, 25, 49, 34]
    _, info, _ = c.predict(value, "fixed", True, api_name="/set_mask")
    assert debug(c)["mask_pixels"] == 64 * 64 - 350
    c.predict(api_name="/clear_mask")
    assert debug(c)["mask_pixels"] == 0


def test_stop_and_resume(ui_server):
    c = client(ui_server)
    c.predict(2, 0.7, api_name="/set_seed")
    c.predict(10, 10, 54, 54, api_name="/add_pair")  # far: will not finish quickly
    job = c.submit(api_name="/run")
    t0 = time.time()
    while debug(c)["step"] < 3:
        assert time.time() - t0 < 30
        time.sleep(0.05)
    status = c.predict(api_name="/stop")[2]
    job.cancel()
    assert "stopped at step" in status
    time.sleep(0.5)
    stopped = debug(c)
    assert not stopped["running"] and 3 <= stopped["step"] < 300
    # points can be added after a stop, then Start resumes from the kept state
    c.predict(30, 30, 31, 33, api_name="/add_pair")
    job = c.submit(api_name="/run")
    t0 = time.time()
    while debug(c)["step"] <= stopped["step"] + 2:
        assert time.time() - t0 < 30
        time.sleep(0.05)
    c.predict(api_name="/stop")
    job.cancel()
    time.sleep(0.3)
    assert debug(c)["step"] > stopped["step"]
    _, points, status = c.predict(api_name="/reset")[:3]
    d = debug(c)
    assert d["step"] == 0 and d["pairs"][0]["handle"] == [10, 10]


def test_exports(ui_server):
    c = client(ui_server)
    c.predict(4, 0.7, api_name="/set_seed")
    c.predict(20, 30, 22, 30, api_name="/add_pair")
    run_to_end(c)
    png = c.predict(api_name="/export_png")[0]
    assert Image.open(png).size == (64, 64)
    gif = Image.open(c.predict(api_name="/export_gif")[0])
    assert gif.n_frames >= 2
    npy = np.load(c.predict(api_name="/export_latent")[0])
    assert npy.ndim == 3
    files = c.predict(api_name="/export_recipe")
    text = open(files[0]).read()
    recipe = Recipe.from_dict(json.loads(text))
    assert recipe.seed == 4 and recipe.drags == [(20.0, 30.0, 22.0, 30.0)]


def test_two_clients_no_crosstalk(ui_server):
    c1, c2 = client(ui_server), client(ui_server)
    c1.predict(1, 0.7, api_name="/set_seed")
    c2.predict(2, 0.7, api_name="/set_seed")
    c1.predict(20, 20, 22, 20, api_name="/add_pair")
    c2.predict(40, 40, 40, 43, api_name="/add_pair")
    c2.predict(10, 50, 12, 50, api_name="/add_pair")
    errors = []

    def go(c):
        try:
            run_to_end(c)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(c,)) for c in (c1, c2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors
    d1, d2 = debug(c1), debug(c2)
    assert [p["origin"] for p in d1["pairs"]] == [[20, 20]] and d1["seed"] == 1
    assert [p["origin"] for p in d2["pairs"]] == [[40, 40], [10, 50]] and d2["seed"] == 2


def test_model_switch_and_load_failure_keep_session(tmp_path):
    """State layer (no server): a broken checkpoint gives a UIError and the previous model is kept."""
    from conftest import ui_model_path
    from official_pickle import tiny64_pickle
    from webui.editor.state import EditorState, UIError

    st = EditorState.create(ui_model_path(), seed=1)
    st.click(10, 10)
    st.click(12, 10)
    garbage = tmp_path / "broken.pkl"
    garbage.write_bytes(b"\x80\x04not really a pickle" * 20)
    with pytest.raises(UIError, match="cannot load model broken.pkl"):
        st.set_model(garbage)
    assert st.model_path == str(ui_model_path()) and len(st.session.pairs) == 1
    st.set_model(tiny64_pickle())
    assert st.resolution == 64 and len(st.session.pairs) == 0  # another model, another image: points cleared
    assert st.restore_cleared() == "1 point pair" and len(st.session.pairs) == 1  # Undo clear
    assert st.display().shape == (512, 512, 3)
    st.cleanup()


def test_upload_image_projects_it_and_rejects_garbage(ui_server, tmp_path):
    """'Edit your own image': the upload is inverted, then the edit starts from the found latent."""
    from training import faces
    c = client(ui_server)
    before = debug(c)
    face = faces.to_uint8(faces.render(faces.sample_z(1, seed=4242)).images)[0]
    path = tmp_path / "face.png"
    Image.fromarray(face).resize((200, 200)).save(path)  # any size: cropped/resized to the model
    job = c.submit(handle_file(str(path)), api_name="/upload_image")
    t0 = time.time()
    while not job.done():
        assert time.time() - t0 < 120, "inversion did not finish"
        time.sleep(0.2)
    status = job.outputs()[-1][2]
    assert "projected into the model" in status and "PSNR" in status
    after = debug(c)
    assert after["latent_source"].startswith("image face.png") and after != before
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    outputs = c.predict(handle_file(str(garbage)), api_name="/upload_image")
    assert outputs[2].startswith("⚠")
    assert debug(c)["latent_source"] == after["latent_source"]  # state intact


def test_page_carries_the_first_image():
    """The canvas's initial value is a new visitor's image, so the page shows it without waiting for
    its load event; the load event's image is the same picture."""
    from conftest import ui_model_path
    from webui.app import App, build_demo
    from webui.editor.state import EditorState

    demo = build_demo(ui_model_path())
    canvas = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "canvas")
    assert canvas.value is not None
    shown = np.asarray(Image.open(canvas.value["path"]).convert("RGB"))
    expected = EditorState.create(ui_model_path()).display()
    assert shown.shape == expected.shape and np.array_equal(shown, expected)
    loaded = App(ui_model_path()).on_load(None)[0]
    assert np.array_equal(loaded, expected)


def test_a_click_racing_the_page_load_event_is_kept():
    """A quick first click and the page's load event both start without a state; each gets the
    session's one new state, so the load event returning last does not drop the click's point."""
    import types

    import gradio as gr
    from conftest import ui_model_path
    from webui.app import App

    app = App(ui_model_path())
    me, other = types.SimpleNamespace(session_hash="me"), types.SimpleNamespace(session_hash="other")
    click = gr.SelectData(None, {"index": [20 * 8, 40 * 8], "value": None})
    clicked = app.on_click(None, click, me)[3]
    loaded = app.on_load(None, me)[3]
    assert loaded is clicked
    assert "handle (20, 40) placed" in app.on_load(None, me)[1]
    assert app.on_load(None, other)[3] is not clicked  # another visitor: a state of its own
    assert app.ensure(None) is not app.ensure(None)  # no session (the Python API): a new state each time


def test_refused_inputs_name_models_not_server_paths_and_log_one_line(ui_server):
    """A value the model list does not offer is refused by gradio: the message lists model names
    (never the server's paths), and the server log gets one line, not a traceback."""
    from conftest import REPO
    c = client(ui_server)
    before = debug(c)
    log_start = ui_server["log"].stat().st_size
    for value in ("/etc/passwd", str(ui_server["model"])):  # a path, even the loaded model's own, is no name
        with pytest.raises(Exception) as info:
            c.predict(value, api_name="/set_model")
        message = str(info.value)
        assert "not in the list of choices" in message and "embedded-faces64-parts.safetensors" in message, message
        assert str(REPO) not in message.replace(value, ""), message
    assert debug(c) == before
    time.sleep(0.5)
    with open(ui_server["log"], "rb") as log:
        log.seek(log_start)
        text = log.read()
    assert b"Traceback" not in text and text.count(b"gradio refused an input") >= 2, text[-2000:]
    c.predict("embedded-faces64.safetensors", api_name="/set_model")  # a name from the list is taken
    assert debug(c)["model"] == "embedded-faces64.safetensors"
