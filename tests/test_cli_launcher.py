"""`python app.py --port P` with P in use: one line naming our --port flag, exit status 2, no traceback;
found before the model loads, and caught again if the port is taken while it loads."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from webui import launcher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def busy_port():
    """A port that another program listens on (127.0.0.1)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def expected_line(port: int) -> str:
    return f"error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_app_on_a_busy_port_says_so_in_one_line(busy_port):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "app.py", "--port", str(busy_port)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [expected_line(busy_port)], done.stderr
    assert done.stdout == ""


def test_the_port_is_checked_before_the_model_loads(busy_port, monkeypatch, capsys):
    def prepare(args):
        raise AssertionError("the model was loaded although the port is busy")
    monkeypatch.setattr(launcher, "prepare", prepare)
    assert launcher.main(["--port", str(busy_port)]) == 2
    assert capsys.readouterr().err.splitlines() == [expected_line(busy_port)]


def test_a_port_taken_while_the_model_loads_is_caught_too(busy_port, monkeypatch, capsys):
    import gradio as gr
    checks = []

    def port_free_at_first(host, port):  # the port is taken after the first check
        checks.append(port)
        return None if len(checks) == 1 else real_check(host, port)
    real_check = launcher.port_problem
    monkeypatch.setattr(launcher, "port_problem", port_free_at_first)
    with gr.Blocks() as demo:
        gr.Markdown("test")
    monkeypatch.setattr(launcher, "prepare", lambda args: (demo, "test demo"))
    assert launcher.main(["--port", str(busy_port)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [expected_line(busy_port)], captured.err
    assert "GRADIO_SERVER_PORT" not in captured.err + captured.out and len(checks) == 2


@pytest.mark.parametrize("host,port,words", [("127.0.0.1", 70000, "--port 70000 is not a port number"),
                                             ("no-such-host.invalid", 7860, "--host no-such-host.invalid"),
                                             ("192.0.2.1", 7860, "not an address of this machine")])
def test_other_listening_problems_name_our_flags(host, port, words):
    problem = launcher.port_problem(host, port)
    assert problem is not None and words in problem and "\n" not in problem
