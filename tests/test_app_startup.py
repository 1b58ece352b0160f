"""`python app.py` start-up: bad input fails in one line before serving; a known model name is
downloaded (loopback server), verified and opened; offline it says so and exits 2."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from draggan_core.model.paths import CHECKPOINTS_DIR
from draggan_core.model.store import PARTS_64_MODEL_NAME

REPO = Path(__file__).resolve().parents[1]


def _app(*args, env=None, timeout=120):
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--model", "fake.pkl"], "no such checkpoint file"),
    (["--device", "tpu"], "unknown device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_startup_errors_are_one_line_before_serving(args, message):
    r = _app(*args, "--port", "1")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "http://" not in r.stdout


def test_corrupt_checkpoint_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04not really a pickle")
    r = _app("--model", str(bad), "--port", "1")
    assert r.returncode == 2 and "cannot load model bad.pkl" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def model_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = (CHECKPOINTS_DIR / PARTS_64_MODEL_NAME).read_bytes()  # a 64 px model under a test name
    (served / "faces.safetensors").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{srv.server_address[1]}/faces.safetensors", "size": len(payload),
           "sha256": hashlib.sha256(payload).hexdigest()}
    srv.shutdown()


def _registry(tmp_path, url, size, sha256) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"models": [{"name": "test-faces64", "url": url, "filename": "test-faces64.safetensors",
                                            "resolution": 64, "size_bytes": size, "sha256": sha256,
                                            "format": "safetensors"}]}))
    return path


def test_a_known_model_name_is_downloaded_verified_and_opened(tmp_path, model_server):
    downloads = tmp_path / "downloads"
    env = {"DRAGGAN_REGISTRY": str(_registry(tmp_path, **model_server)), "DRAGGAN_DOWNLOAD_DIR": str(downloads),
           "GRADIO_ANALYTICS_ENABLED": "False", "DRAGGAN_MODEL": ""}
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", "test-faces64", "--port", str(port)], cwd=REPO,
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except Exception:
                assert proc.poll() is None, log.read_text()
                assert time.time() - t0 < 120, log.read_text()
                time.sleep(0.25)
        while "python app.py --share" not in log.read_text() and time.time() - t0 < 120:
            time.sleep(0.25)  # the server answers a moment before the banner is printed
        text = log.read_text()
        assert "downloading test-faces64" in text and "test-faces64.safetensors (64 px)" in text, text
        assert hashlib.sha256((downloads / "test-faces64.safetensors").read_bytes()).hexdigest() == model_server["sha256"]
        # the console names our --share option, not gradio's `share=True` in `launch()`
        assert "share=True" not in text and "python app.py --share" in text, text
    finally:
        proc.terminate()
        proc.wait(20)


def test_offline_download_fails_in_one_line(tmp_path):
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
    sock.close()  # nothing listens there: like a machine without internet
    env = {"DRAGGAN_REGISTRY": str(_registry(tmp_path, f"http://127.0.0.1:{closed_port}/x.safetensors", 10, "0" * 64)),
           "DRAGGAN_DOWNLOAD_DIR": str(tmp_path / "downloads")}
    r = _app("--model", "test-faces64", "--port", "1", env=env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download test-faces64") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("command", [["render", "--seed", "1", "--out", "x.png"], ["bench", "--config", "embedded"],
                                     ["drag", "--seed", "1", "--drag", "1,1:2,2", "--out", "x.png"]])
def test_cli_commands_check_the_device_up_front(command, tmp_path):
    bad = "tpu" if torch.cuda.is_available() else "cuda"
    r = subprocess.run([sys.executable, "-m", "draggan_core", *command, "--device", bad], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
