"""The CPU thread policy: fewer threads while other processes keep the cores busy (devices.py)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from draggan_core.model import devices
from draggan_core.model.devices import CpuLoadMonitor, ThreadBudget, refresh_threads, threads_for_load

REPO = Path(__file__).resolve().parents[1]


def test_a_neighbour_takes_a_thread_once_it_uses_more_than_the_slack():
    assert threads_for_load(2, 2, None) == 2          # no reading yet: all of them
    assert threads_for_load(2, 2, 0.0) == 2
    assert threads_for_load(2, 2, 0.3) == 2
    assert threads_for_load(2, 2, 0.5) == 1           # a browser at half a core
    assert threads_for_load(2, 2, 1.9) == 1           # never fewer than one
    assert threads_for_load(8, 8, 2.5) == 5
    assert threads_for_load(1, 8, 0.0) == 1           # the configured total caps it


def test_coming_back_up_needs_the_load_to_fall_further():
    assert threads_for_load(2, 2, 0.3, current=1) == 1   # around the edge: stay down
    assert threads_for_load(2, 2, 0.1, current=1) == 2
    assert threads_for_load(2, 2, 0.5, current=2) == 1   # going down needs no margin


def test_the_monitor_counts_other_processes_not_this_one():
    hz = os.sysconf("SC_CLK_TCK")
    # (seconds, machine busy ticks, own CPU seconds): over the first second the machine was busy 1.8 s
    # of which 1.0 s was this process; over the next, only this process worked; then no /proc/stat
    samples = iter([(0.0, 0, 0.0), (1.0, int(1.8 * hz), 1.0), (2.0, int(2.3 * hz), 1.5), (3.0, None, 2.0)])
    clock = iter([0.2, 1.0, 1.1, 2.0, 3.0])  # what each update() reads from the clock first
    monitor = CpuLoadMonitor(interval=0.5, sample=lambda: next(samples), clock=lambda: next(clock))
    assert monitor.update() is None                  # under the interval: no reading yet
    assert monitor.update() == pytest.approx(0.8)    # 1.8 busy - 1.0 own over 1 s
    assert monitor.update() == pytest.approx(0.8)    # under the interval again: the last reading, no sample
    assert monitor.update() == pytest.approx(0.0)
    assert monitor.update() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load monitor reads /proc/stat (Linux)")
def test_the_monitor_reads_this_machine():
    monitor = CpuLoadMonitor(interval=0.1)
    time.sleep(0.3)
    others = monitor.update()
    assert others is not None and 0.0 <= others <= (os.cpu_count() or 1) + 0.5


def test_runs_follow_their_share_before_every_step(monkeypatch):
    readings = iter([0.0, 0.0, 1.2, 0.0, 0.0])
    monkeypatch.setattr(devices, "load_monitor", lambda: type("M", (), {"update": lambda self: next(readings)})())
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    budget = ThreadBudget(total=2, renderer=False, adaptive=True)
    try:
        with budget.run() as run:
            assert run.threads == 2
            refresh_threads()
            assert torch.get_num_threads() == 2
            refresh_threads()                      # a neighbour arrives
            assert run.threads == 1 and torch.get_num_threads() == 1
            refresh_threads()
            refresh_threads()                      # and leaves
            assert run.threads == 2
        refresh_threads()                          # outside a run: nothing changes
    finally:
        torch.set_num_threads(before)


def test_the_fixed_policy_and_an_explicit_thread_count_are_kept(monkeypatch):
    monkeypatch.setenv("DRAGGAN_THREAD_POLICY", "fixed")
    monkeypatch.setattr(devices, "load_monitor", lambda: pytest.fail("the fixed policy reads no load"))
    assert ThreadBudget(total=2, renderer=False).share() == 2
    env = {**os.environ, "DRAGGAN_THREAD_POLICY": "adaptive"}
    out = subprocess.run([sys.executable, "-m", "draggan_core", "bench", "--config", "embedded", "--steps", "2",
                          "--threads", "1", "--json", "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"threads": 1' in out.stdout.splitlines()[-1]
