"""Shared fixtures for the web UI tests: one app server subprocess per test session, and
pytest-playwright settings for the Debian chromium (never `playwright install`)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from draggan_core.model.paths import CHECKPOINTS_DIR
from draggan_core.model.store import PARTS_64_MODEL_NAME, default_model_path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Results are bit-identical only at a fixed thread count (a reduction split over 1 or 2 threads rounds
# differently); the adaptive policy would pick the count from whatever else the CI machine is doing, so
# tests that compare two runs exactly use the fixed policy. tests/test_threads.py covers the adaptive one.
os.environ.setdefault("DRAGGAN_THREAD_POLICY", "fixed")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/lib/chromium/chromium")
UI_MAX_STEPS = 300  # DRAGGAN_MAX_STEPS for the test server


def ui_model_path() -> Path:
    """The 64 px embedded parts model, shipped in the repository: the UI tests' clicks, pairs and brush
    strokes are written in its pixels, and easy drags reach their targets. The default model (128 px)
    has a server of its own, `default_ui_server`."""
    return CHECKPOINTS_DIR / PARTS_64_MODEL_NAME


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _serve(model: Path | None, log: Path):
    """`python app.py` on a free 127.0.0.1 port, with `model` or (None) the default model;
    yields {"url", "port", "log", "model"}."""
    port = _free_port()
    env = {**os.environ, "PORT": str(port), "DRAGGAN_MAX_STEPS": str(UI_MAX_STEPS),
           "DRAGGAN_TORCH_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("DRAGGAN_MODEL", None)
    if model is not None:
        env["DRAGGAN_MODEL"] = str(model)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() - t0 > 90:
                proc.kill()
                raise RuntimeError(f"app did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)
    yield {"url": url, "port": port, "log": log, "model": model or default_model_path()}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """The app on the 64 px model (`ui_model_path`), shared by the UI tests."""
    yield from _serve(ui_model_path(), tmp_path_factory.mktemp("webui") / "server.log")


@pytest.fixture(scope="session")
def default_ui_server(tmp_path_factory):
    """The app as `python app.py` starts it: the default model (128 px)."""
    yield from _serve(None, tmp_path_factory.mktemp("webui-default") / "server.log")


# ------------------------------------------------------------------ pytest-playwright overrides
@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():  # a missing browser is a broken setup, not a reason to skip
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium, or set CHROMIUM_PATH")
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1280, "height": 900}, "accept_downloads": True}
