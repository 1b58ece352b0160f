"""Progress bars of `drag`, `invert`, `eval` and `bench`: drawn on stderr when it is a terminal (the
commands run here with stderr on a pseudo-terminal, as in an interactive shell), never when it is
piped or redirected, never with --quiet; stdout carries the same results either way."""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from draggan_core.cli import program as cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
BAR_MARKS = ("\r", "%|")  # tqdm redraws its line with carriage returns; its bar starts after the percentage


def run_with_terminal_stderr(args: list, timeout: float = 240) -> tuple[int, str, str]:
    """`python -m draggan_core ARGS` with stderr on a pseudo-terminal (120 columns) and stdout on a
    pipe: (exit code, stdout, what the terminal received)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "draggan_core", *map(str, args)], cwd=REPO, env=ENV,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    received = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            if not data:
                break
            received.append(data)
        else:
            proc.kill()
            pytest.fail(f"{args[0]} did not finish within {timeout} s")
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
        proc.stdout.close()
    return code, stdout, b"".join(received).decode(errors="replace")


def without_seconds(text: str) -> str:
    return re.sub(r"\d+\.\d+ s\b", "S s", text)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(path)
    return path


def commands(tmp: Path, photo: Path) -> dict[str, tuple[list, str]]:
    """command -> (its arguments, made small, and the label its bar shows)."""
    return {
        "drag": (["drag", "--seed", 3, "--drag", "40,60:46,64", "--steps", 3, "--out", tmp / "o.png"], "drag"),
        "invert": (["invert", "--image", photo, "--out", tmp / "w.npy", "--steps", 3], "invert"),
        "eval": (["eval", "--pairs", 1, "--steps", 1], "eval"),
        "bench": (["bench", "--config", "embedded", "--steps", 1], "ours (same math)"),
    }


@pytest.mark.parametrize("command", ["drag", "invert", "eval", "bench"])
def test_a_terminal_gets_a_progress_bar(command, tmp_path, photo):
    args, label = commands(tmp_path, photo)[command]
    code, stdout, terminal = run_with_terminal_stderr(args)
    assert code == 0, terminal
    assert all(mark in terminal for mark in BAR_MARKS) and f"{label}: " in terminal, terminal
    assert "\r" not in stdout and "%|" not in stdout and stdout.strip(), stdout


@pytest.mark.parametrize("command", ["drag", "invert", "eval", "bench"])
def test_piped_stderr_gets_no_bar(command, tmp_path, photo, capsys):
    args, _ = commands(tmp_path, photo)[command]
    assert cli.main([str(a) for a in args]) == 0
    captured = capsys.readouterr()  # (pytest's capture is no terminal, as a pipe is not)
    assert not any(mark in captured.err for mark in BAR_MARKS), captured.err
    assert captured.out.strip()


def test_drag_stdout_is_the_same_on_a_pipe_and_with_a_terminal(tmp_path, photo):
    args, _ = commands(tmp_path, photo)["drag"]
    piped = subprocess.run([sys.executable, "-m", "draggan_core", *map(str, args)], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=240)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    lines = piped.stdout.splitlines()
    assert len(lines) == 2 and re.fullmatch(r"did not reach the target in 3 steps \(\d+\.\d\d s\); final distances "
                                            r"\d+\.\d px", lines[0]), lines
    assert lines[1] == f"wrote {tmp_path / 'o.png'}"
    _, on_terminal, _ = run_with_terminal_stderr(args)
    assert without_seconds(on_terminal) == without_seconds(piped.stdout)


@pytest.mark.parametrize("command", ["drag", "bench"])
def test_quiet_draws_nothing_on_a_terminal(command, tmp_path, photo):
    args, _ = commands(tmp_path, photo)[command]
    code, stdout, terminal = run_with_terminal_stderr([*args, "--quiet"])
    assert code == 0 and terminal == "", terminal  # bench's phase lines are progress too
    assert stdout.strip()


def test_quiet_is_offered_by_every_command_with_a_bar():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("drag", "invert", "eval", "bench"):
        assert "--quiet" in sub.choices[name].format_help(), name
