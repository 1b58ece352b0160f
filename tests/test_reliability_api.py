"""Hostile and malformed input through the web UI's API (gradio_client / raw HTTP) against a real
`python app.py` (the session-scoped `ui_server` fixture).

After every refused input: a clear error (a ⚠ status or a gradio error event), no code executed
(marker files), the server still answers, and /debug_state shows the session exactly as before.
The UI offers no way to upload a model file: models come from a dropdown of local checkpoints, so
the model part checks that the dropdown cannot be pointed anywhere else.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hostile  # noqa: E402
import load_test  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def client(server) -> Client:
    return Client(server["url"], verbose=False)


def debug(c: Client) -> dict:
    return c.predict(api_name="/debug_state")


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    time.sleep(0.1)
    assert not m.exists(), "a payload ran in the server!"


@pytest.fixture(scope="module")
def edited(ui_server):
    """A client whose session has a seed, two pairs and a mask: the state every test must keep."""
    c = client(ui_server)
    c.predict(5, 0.7, api_name="/set_seed")
    c.predict(12, 14, 16, 12, api_name="/add_pair")
    c.predict(40, 40, 38, 45, api_name="/add_pair")
    return c


def set_good_mask(c: Client, tmp_path: Path):
    layer = tmp_path / "good_layer.png"
    layer.write_bytes(hostile.image_bytes("RGBA"))
    value = {"background": handle_file(str(_background(tmp_path))), "layers": [handle_file(str(layer))],
             "composite": None}
    c.predict(value, "flexible", True, api_name="/set_mask")


def _background(tmp_path: Path) -> Path:
    bg = tmp_path / "bg.png"
    if not bg.exists():
        bg.write_bytes(hostile.image_bytes("RGBA", box=(0, 0, 0, 0)))
    return bg


def refused(c: Client, api_name: str, *args) -> str:
    """Call an endpoint that must refuse its input: a ⚠ status or a gradio error. Returns the text."""
    try:
        out = c.predict(*args, api_name=api_name)
    except Exception as e:  # gradio refused it before our handler (component validation)
        return f"gradio error: {e}"
    status = out[2] if isinstance(out, (list, tuple)) and len(out) > 2 else str(out)
    assert status.startswith("⚠"), status
    assert "Traceback" not in status and "/tmp/gradio" not in status and "\n" not in status, status
    return status


def raw_call(server, session_hash: str, api_name: str, data: list) -> str:
    """POST /gradio_api/call/<api> with a JSON body built by json.dumps (NaN / Infinity tokens allowed,
    which gradio_client refuses to send). Returns the SSE text of the result."""
    url = server["url"]
    body = json.dumps({"data": data, "session_hash": session_hash})
    r = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    event_id = r.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as s:
        return "".join(s.iter_text())


# --------------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------------

def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def hostile_latents(marker: Path) -> dict[str, bytes]:
    num_ws, w_dim = 10, 256  # the embedded model; any other shape is refused as well
    files = {f"{name}.npy": fn(marker) for name, fn in hostile.HOSTILE_PICKLES.items()
             if name in ("os_system", "exec", "subprocess_popen", "persistent_module_src", "load_from_bytes_zip")}
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    files.update({
        "pickled_object.npy": hostile.npy_pickled_object(marker),
        "object_dtype.npy": hostile.npy_object_dtype_real(),
        "hostile_data_pkl.pt": hostile.torch_zip_with_data_pkl(hostile.pickle_os_system(marker)),
        "exec_data_pkl.pth": hostile.torch_zip_with_data_pkl(hostile.pickle_exec(marker)),
        "huge_declared.npy": hostile.npy_huge_declared(),
        "nan.npy": _npy(np.full((1, num_ws, w_dim), np.nan, np.float32)),
        "inf.npy": _npy(np.full((w_dim,), np.inf, np.float32)),
        "too_large_values.npy": _npy(np.full((w_dim,), 1e6, np.float32)),
        "wrong_shape.npy": _npy(np.zeros((1, num_ws + 1, w_dim), np.float32)),
        "complex.npy": _npy(np.zeros((1, num_ws, w_dim), np.complex64)),
        "strings.npy": _npy(np.array(["w"] * w_dim)),
        "truncated.npy": _npy(np.zeros((1, num_ws, w_dim), np.float32))[:-100],
        "empty.npy": b"",
        "garbage.pt": hostile.garbage_bytes(2000),
        "wrong_tensor.pt": buf.getvalue(),
    })
    return files


QUICK_LATENTS = ("os_system.npy", "persistent_module_src.npy", "pickled_object.npy", "hostile_data_pkl.pt",
                 "huge_declared.npy", "nan.npy", "wrong_shape.npy", "truncated.npy")


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["quick", "full"])
def test_hostile_latent_uploads(ui_server, edited, tmp_path, marker, full):
    set_good_mask(edited, tmp_path)
    before = debug(edited)
    assert before["mask_pixels"] > 0 and len(before["pairs"]) == 2
    corpus = hostile_latents(marker)
    for name, data in corpus.items():
        if not full and name not in QUICK_LATENTS:
            continue
        path = tmp_path / name
        path.write_bytes(data)
        status = refused(edited, "/upload_latent", handle_file(str(path)))
        assert status.startswith("⚠") and name in status, (name, status)
        assert debug(edited) == before, name
    # a file type the upload widget does not accept never reaches the loader
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(hostile.pickle_os_system(marker))
    assert "Invalid file type" in refused(edited, "/upload_latent", handle_file(str(evil)))
    assert debug(edited) == before


def test_upload_size_limit(ui_server, edited, tmp_path):
    before = debug(edited)
    for name in ("big.npy", "big_layer.png"):
        big = tmp_path / name
        with open(big, "wb") as f:  # sparse: over the 20 MB limit without writing it
            f.write(b"\x93NUMPY" if name.endswith("npy") else b"\x89PNG\r\n\x1a\n")
            f.truncate(21 * 1024 * 1024)
        if name.endswith("npy"):
            text = refused(edited, "/upload_latent", handle_file(str(big)))
        else:
            value = {"background": handle_file(str(_background(tmp_path))), "layers": [handle_file(str(big))],
                     "composite": None}
            text = refused(edited, "/set_mask", value, "flexible", True)
        assert text.startswith("gradio error"), text
    assert debug(edited) == before


# --------------------------------------------------------------------------------------------------
# mask images
# --------------------------------------------------------------------------------------------------

def _mask_value(tmp_path: Path, name: str, data: bytes) -> dict:
    layer = tmp_path / name
    layer.write_bytes(data)
    return {"background": handle_file(str(_background(tmp_path))), "layers": [handle_file(str(layer))],
            "composite": None}


def test_hostile_mask_images_keep_the_state_and_memory(ui_server, edited, tmp_path):
    set_good_mask(edited, tmp_path)
    before = debug(edited)
    pid = load_test.pid_listening_on(ui_server["port"])
    hwm0 = _vm(pid, "VmHWM")
    cases = {
        "bomb.png": hostile.png_bomb(9000, 9000),     # 79 KB -> 81 M pixels
        "big.png": hostile.png_bomb(3000, 3000),      # 9 M pixels: over the web UI's 2048x2048 limit
        "lying.png": hostile.png_lying_header(),
        "garbage.png": hostile.garbage_bytes(3000),
        "truncated.png": hostile.truncated_png(),
        "empty.png": b"",
    }
    for name, data in cases.items():
        t0 = time.perf_counter()
        text = refused(edited, "/set_mask", _mask_value(tmp_path, name, data), "flexible", True)
        assert text.startswith("gradio error"), (name, text)
        assert time.perf_counter() - t0 < 30, name
        assert debug(edited) == before, name
    if hwm0 is not None:  # the bombs were refused before being decoded: the peak RSS barely moved
        assert _vm(pid, "VmHWM") - hwm0 < 200, (hwm0, _vm(pid, "VmHWM"))
    # a background bomb is refused as well
    value = {"background": handle_file(str(tmp_path / "bomb.png")), "layers": [], "composite": None}
    assert refused(edited, "/set_mask", value, "flexible", True).startswith("gradio error")
    assert debug(edited) == before


def test_mask_layers_in_other_modes(ui_server, tmp_path):
    """Layers without alpha are fully opaque once gradio converts them to RGBA: the whole image is
    flexible. Layers with alpha use it. Either way a defined mask, never an error."""
    c = client(ui_server)
    for mode in hostile.MASK_IMAGE_MODES:
        out = c.predict(_mask_value(tmp_path, f"layer_{mode.replace(';', '')}.png", hostile.image_bytes(mode)),
                        "flexible", True, api_name="/set_mask")
        if mode in ("LA", "RGBA"):
            assert out[2] == "mask updated", (mode, out)
            assert "bbox x 25-34, y 15-49" in out[1], (mode, out)  # editor box x 100-140, y 60-200 -> /4
        else:  # all flexible: a defined mask that constrains nothing, and the user is told so
            assert out[1].startswith(f"mask: {64 * 64} of {64 * 64} px flexible"), (mode, out)
            assert out[2].startswith("⚠") and "whole image" in out[2], (mode, out)


def test_odd_sized_layer(ui_server, tmp_path):
    c = client(ui_server)
    rgba = np.zeros((3, 5000, 4), np.uint8)
    rgba[..., 3] = 255
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(rgba).save(buf, format="PNG")
    c.predict(_mask_value(tmp_path, "wide.png", buf.getvalue()), "fixed", True, api_name="/set_mask")
    assert debug(c)["mask_pixels"] == 0  # everything painted "fixed" = nothing flexible = no mask


# --------------------------------------------------------------------------------------------------
# points
# --------------------------------------------------------------------------------------------------

def test_malformed_points(ui_server, edited):
    before = debug(edited)
    for x, y in [(-1, 5), (0, 64), (1e308, 2), (None, 3)]:
        status = refused(edited, "/add_point", x, y)
        assert len(status) < 120, status
        assert debug(edited) == before
    for args in [(1, 2, 3, 99), (None, 1, 2, 3)]:
        refused(edited, "/add_pair", *args)
        assert debug(edited) == before
    assert refused(edited, "/add_point", "abc", 3).startswith("gradio error")
    # NaN / Infinity: gradio_client will not even encode them; send them raw
    for api, data in [("add_point", [float("nan"), 3]), ("add_pair", [1, 2, float("-inf"), 4])]:
        text = raw_call(ui_server, edited.session_hash, api, data)
        assert "event: error" in text, (api, data, text[-300:])
        assert debug(edited) == before
    # fractional coordinates are rounded to pixels, the session keeps working
    _, _, status = edited.predict(3.6, 4.4, api_name="/add_point")
    assert "handle at (4, 4)" in status
    edited.predict(api_name="/undo")
    assert debug(edited) == before


@pytest.mark.slow  # 40 round trips; the cap itself is also tested on the state layer (test_reliability_core)
def test_many_points_hit_the_cap(ui_server):
    from webui.editor.state import MAX_POINT_PAIRS
    c = client(ui_server)
    c.predict(api_name="/clear_points")
    for i in range(MAX_POINT_PAIRS):
        c.predict(i, i, (i + 3) % 64, i, api_name="/add_pair")
    full = debug(c)
    assert len(full["pairs"]) == MAX_POINT_PAIRS
    for _ in range(3):
        assert f"at most {MAX_POINT_PAIRS}" in refused(c, "/add_pair", 1, 1, 2, 2)
        assert f"at most {MAX_POINT_PAIRS}" in refused(c, "/add_point", 1, 1)
    assert debug(c) == full


# --------------------------------------------------------------------------------------------------
# run settings, models
# --------------------------------------------------------------------------------------------------

def test_a_negative_seed_is_refused_by_our_message_and_logs_no_traceback(ui_server, edited):
    before, log_start = debug(edited), ui_server["log"].stat().st_size
    status = refused(edited, "/set_seed", -5, 0.7)
    assert "seed must be between 0 and" in status, status
    assert debug(edited) == before
    with open(ui_server["log"], "rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read()


def test_bad_run_settings_start_nothing(ui_server, edited):
    before = debug(edited)
    #          steps, lr, r1, r2, lambda, stop, tracking, space, every
    good = [10, "", "", "", 20, "", "default", "W+", 1]
    for i, bad in [(1, "nan"), (1, "1e999"), (2, "-3"), (5, "inf"), (4, float("1e30")), (8, 0), (8, -3)]:
        args = list(good)
        args[i] = bad
        text = refused(edited, "/run", *args)
        assert "must be" in text or text.startswith("gradio error"), (i, bad, text)
        assert debug(edited) == before
    for i, bad in [(0, 100000), (6, "L3")]:  # gradio's own component validation
        args = list(good)
        args[i] = bad
        assert refused(edited, "/run", *args).startswith("gradio error"), (i, bad)
        assert debug(edited) == before


def test_model_dropdown_cannot_load_arbitrary_files(ui_server, edited, tmp_path, marker):
    before = debug(edited)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(hostile.pickle_os_system(marker))
    for path in (str(evil), "/etc/passwd", "../checkpoints/x.pkl", "checkpoints/landmarks64.safetensors", ""):
        out = None
        try:
            out = edited.predict(path, api_name="/set_model")
        except Exception as e:
            assert "not in the list of choices" in str(e) or path == "", e
        if out is not None:  # "" = nothing chosen: nothing happens
            assert not out[2].startswith("internal error"), out[2]
        assert debug(edited) == before
    for name in ("../../etc/passwd", "no-such-model", "x" * 5000):
        try:
            edited.predict(name, api_name="/download_model")
        except Exception as e:
            assert "not in the list of choices" in str(e) or "choices" in str(e), e
        assert debug(edited) == before


# --------------------------------------------------------------------------------------------------
# numerical safety in the UI: a diverging run is rolled back and the user is told
# --------------------------------------------------------------------------------------------------

def test_divergence_message_reaches_the_ui():
    """In-process (no server): the /run handler with a session whose next update turns NaN."""
    import PIL.Image
    from conftest import ui_model_path
    from webui.app import build_demo

    limit = PIL.Image.MAX_IMAGE_PIXELS
    try:
        demo = build_demo(ui_model_path())
        assert PIL.Image.MAX_IMAGE_PIXELS <= 2048 * 2048  # the web UI's decompression-bomb limit
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit  # do not change other tests in this process
    run_fn = next(f.fn for f in demo.fns.values() if f.api_name == "run")
    from webui.editor.state import EditorState
    st = EditorState.create(ui_model_path(), seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app does on a shared 2-core box (oversubscription is ~40x slower)
    try:
        st.add_pair(20, 40, 26, 40)
        args = (3, "", "", "", 20, "0", "default", "W+", 1)
        outs = list(run_fn(st, *args))
        good_latent, good_step = st.session.latent, st.session.step_count
        good_handles = [p.handle for p in st.session.pairs]
        assert good_step == 3
        st.session._param.register_hook(lambda g: g * float("nan"))  # poison the next update
        outs = list(run_fn(st, *args))
        status = outs[-1][2]
        assert status.startswith("⚠") and "rolled back" in status and "step 3" in status, status
        assert torch.equal(st.session.latent, good_latent) and st.session.step_count == good_step
        assert [p.handle for p in st.session.pairs] == good_handles
        assert not st.running and np.isfinite(st.image.astype(float)).all()
    finally:
        torch.set_num_threads(threads)
        st.cleanup()


# --------------------------------------------------------------------------------------------------
# a closed tab / dead client frees its work
# --------------------------------------------------------------------------------------------------

def test_disconnected_client_run_stops(ui_server):
    pid = load_test.pid_listening_on(ui_server["port"])
    out = load_test.disconnect_phase(ui_server["url"], pid)
    assert not out["errors"], out
    assert out["stopped"], out
    assert out["step_later"] == out["step_after"] < load_test.FAR_STEPS, out


def _vm(pid, key: str):
    if not pid:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def test_stop_returns_its_own_status_when_the_run_writes_one_meanwhile():
    """A run that has just ended writes its final status from its own thread while /stop renders its
    view; /stop must return the status it computed (under load the client once got the run's text)."""
    from conftest import ui_model_path
    from webui.app import App
    from webui.editor.state import EditorState
    st = EditorState.create(ui_model_path(), seed=3)
    real_display = st.display

    def display_while_the_run_finishes(*args, **kwargs):
        st.last_status = "step 6 / 300 - stopped: press Start to continue"  # the run thread's write
        return real_display(*args, **kwargs)

    st.display = display_while_the_run_finishes
    _, _, status, _ = App(ui_model_path()).view(st, "stopped at step 6 - press Start to resume")
    assert status == "stopped at step 6 - press Start to resume"
