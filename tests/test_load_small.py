"""The load script (scripts/load_test.py) in small: concurrent sessions without cross-talk, Stop.

The full run (8 sessions x 40 steps, its own server) is marked slow: `python -m pytest -m slow`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import load_test  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def test_concurrent_sessions_match_solo_runs(ui_server):
    pid = load_test.pid_listening_on(ui_server["port"])
    r = load_test.concurrent_phase(ui_server["url"], sessions=3, steps=6, timeout=240, pid=pid)
    assert not r["errors"] and r["completed"] == 3, r["errors"]
    checks = r["crosstalk"]["checks"]
    assert len(checks) == 3 and all(c["match"] for c in checks), checks
    assert len({c["seed"] for c in checks}) == 3  # really different edits
    assert r["total_steps"] == sum(c["ui_steps"] for c in checks) > 0
    assert r["throughput_steps_per_s"] > 0 and r["step_latency_client_s"]["n"] > 0
    if pid:
        assert r["server_rss_mb"]["before"] and r["server_rss_mb"]["after"]


def test_stop_mechanisms(ui_server):
    """job.cancel() and /stop both end a running drag (the time is reported, not asserted: shared CPU)."""
    s = load_test.stop_phase(ui_server["url"], trials=1)
    assert not s["errors"], s
    assert len(s["cancel_s"]) == 1 and len(s["stop_endpoint_s"]) == 1
    assert s["cancel_s"][0] < 15 and s["stop_endpoint_s"][0] < 15, s


@pytest.mark.slow
def test_full_load_run():
    server = load_test.Server()
    try:
        report = load_test.run_all(server.url, sessions=8, steps=40, pid=server.pid, stop_trials=3,
                                   consecutive=20, consecutive_steps=10)
    finally:
        server.stop()
    print(load_test.human(report))
    assert report["ok"], report
    assert server.tracebacks() == 0
    rss = report["consecutive"]["server_rss_mb"]
    assert rss["growth_after_warmup"] < 50, rss
